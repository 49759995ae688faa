//! Stream-optimized VMDK, the disk format of OVAs (VMware's Virtual Disk Format 1.1), decoded
//! to a raw image as its bytes arrive: an import then has nothing left to convert once the
//! archive's last byte is in.
//!
//! A stream-optimized VMDK is a 512-byte header, its descriptor, then sector-aligned markers:
//! a grain (its first sector's number, then its bytes deflated in zlib's format) or a
//! metadata marker (a grain table, the grain directory, the footer; their contents follow)
//! up to the end-of-stream marker (a sector of zeros) or the file's end. The grain tables only index the grains,
//! which name their own sectors, so a reader in order needs none of them.
//!
//! Every byte is untrusted. This reader is only a quicker way to what `qemu-img convert` makes
//! of such a file: whatever it does not take as plainly right (a field out of range, grains
//! out of order, a descriptor that names a parent, a grain that inflates past its size) it
//! gives up on, and the import converts the image with qemu-img as it does any other.

use std::io::{self, Read};

use crate::library::Upload;

/// Bytes of a sector.
const SECTOR: u64 = 512;
/// The header's first four bytes: "KDMV".
const MAGIC: &[u8; 4] = b"KDMV";
/// Header flag: grains are compressed.
const FLAG_COMPRESSED: u32 = 1 << 16;
/// Header flag: grains and metadata have markers.
const FLAG_MARKERS: u32 = 1 << 17;
/// The compression algorithm of a stream: deflate.
const DEFLATE: u16 = 1;
/// The largest grain taken (qemu's own limit is the same): bounds the memory a grain takes.
const MAX_GRAIN: u64 = 16 << 20;
/// The largest embedded descriptor taken.
const MAX_DESCRIPTOR: u64 = 64 << 10;
/// The most bytes taken between the header and the first marker.
const MAX_OVERHEAD: u64 = 64 << 20;

/// A stream-optimized VMDK's header: what a reader in order needs of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamHeader {
    /// The disk's size, bytes.
    pub capacity: u64,
    /// A grain's size, bytes.
    grain: u64,
    /// Where the descriptor is, and its length, bytes.
    descriptor: (u64, u64),
    /// Where the first marker is, bytes.
    overhead: u64,
}

/// Little-endian integers at their offsets in a header.
fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("four bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("eight bytes"))
}

impl StreamHeader {
    /// The header of a stream-optimized VMDK, if `head` (its first sector) is one this reader
    /// takes: version 3, compressed grains with markers, deflate, fields within bounds.
    pub fn parse(head: &[u8; 512]) -> Option<StreamHeader> {
        if &head[..4] != MAGIC || u32_at(head, 4) != 3 {
            return None;
        }
        let flags = u32_at(head, 8);
        if flags & (FLAG_COMPRESSED | FLAG_MARKERS) != FLAG_COMPRESSED | FLAG_MARKERS
            || u16_at(head, 77) != DEFLATE
        {
            return None;
        }
        let capacity = u64_at(head, 12).checked_mul(SECTOR)?;
        let grain = u64_at(head, 20).checked_mul(SECTOR)?;
        let descriptor = (
            u64_at(head, 28).checked_mul(SECTOR)?,
            u64_at(head, 36).checked_mul(SECTOR)?,
        );
        let overhead = u64_at(head, 64).checked_mul(SECTOR)?;
        let descriptor_end = descriptor.0.checked_add(descriptor.1)?;
        let fits = capacity > 0
            && capacity <= crate::state_machine::MAX_DISK_BYTES
            && grain.is_power_of_two()
            && (4096..=MAX_GRAIN).contains(&grain)
            && descriptor.0 >= SECTOR
            && (1..=MAX_DESCRIPTOR).contains(&descriptor.1)
            && descriptor_end <= overhead
            && overhead <= MAX_OVERHEAD;
        fits.then_some(StreamHeader {
            capacity,
            grain,
            descriptor,
            overhead,
        })
    }
}

/// Why a decoding stopped.
#[derive(Debug)]
pub enum Stop {
    /// Reading the VMDK's bytes failed: the archive is cut short or damaged.
    Input(io::Error),
    /// Writing the raw image failed: this server's storage.
    Output(io::Error),
    /// Something this reader does not take as plainly right: qemu-img is left to judge it.
    Doubt(String),
}

fn doubt<T>(why: impl Into<String>) -> Result<T, Stop> {
    Err(Stop::Doubt(why.into()))
}

/// The VMDK's bytes, counted as they are read.
struct Counted<'a, R> {
    input: &'a mut R,
    at: u64,
}

impl<R: Read> Counted<'_, R> {
    /// Fills `buf`; an end before it is full is a doubt (a cut short archive shows as such
    /// when its entry is found short).
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), Stop> {
        let mut got = 0;
        while got < buf.len() {
            match self.input.read(&mut buf[got..]) {
                Ok(0) => return doubt(format!("it ends at byte {} inside a record", self.at)),
                Ok(n) => {
                    got += n;
                    self.at += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Stop::Input(e)),
            }
        }
        Ok(())
    }

    /// Fills `buf`, or answers false if the input ends before its first byte.
    fn fill_or_end(&mut self, buf: &mut [u8]) -> Result<bool, Stop> {
        let mut first = [0u8; 1];
        loop {
            match self.input.read(&mut first) {
                Ok(0) => return Ok(false),
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Stop::Input(e)),
            }
        }
        self.at += 1;
        buf[0] = first[0];
        self.fill(&mut buf[1..])?;
        Ok(true)
    }

    /// Reads and drops bytes up to offset `to`, or answers false if the input ends first.
    fn skip_to_or_end(&mut self, to: u64) -> Result<bool, Stop> {
        let mut sink = [0u8; 512];
        while self.at < to {
            let n = (to - self.at).min(sink.len() as u64) as usize;
            match self.input.read(&mut sink[..n]) {
                Ok(0) => return Ok(false),
                Ok(k) => self.at += k as u64,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Stop::Input(e)),
            }
        }
        Ok(true)
    }

    /// Reads and drops bytes up to offset `to`.
    fn skip_to(&mut self, to: u64) -> Result<(), Stop> {
        let mut sink = [0u8; 8192];
        while self.at < to {
            let n = (to - self.at).min(sink.len() as u64) as usize;
            self.fill(&mut sink[..n])?;
        }
        Ok(())
    }
}

/// The embedded descriptor must make the file stand alone: a stream-optimized disk, no parent.
fn check_descriptor(text: &[u8]) -> Result<(), Stop> {
    let text = String::from_utf8_lossy(text);
    let mut stream = false;
    for line in text.lines().map(str::trim) {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let (key, value) = (key.trim(), value.trim().trim_matches('"'));
        match key {
            "createType" => stream = value == "streamOptimized",
            "parentCID" if !value.eq_ignore_ascii_case("ffffffff") => {
                return doubt(format!("its descriptor names a parent (parentCID={value})"))
            }
            "parentFileNameHint" => return doubt("its descriptor names a parent file"),
            _ => {}
        }
    }
    if !stream {
        return doubt("its descriptor does not say createType=\"streamOptimized\"");
    }
    Ok(())
}

/// Decodes the VMDK whose header `h` (its first sector, read already) was, from `input`
/// (positioned after that sector), into raw image `out` (a `Shelf::Image` upload, empty), up
/// to its end-of-stream marker or `input`'s end; the image then has `h.capacity` bytes. Reads
/// nothing past that marker. After each grain, tells `decoded` how many of the VMDK's bytes
/// are decoded.
pub fn decode(
    h: &StreamHeader,
    input: &mut impl Read,
    out: &mut Upload,
    decoded: &mut dyn FnMut(u64),
) -> Result<(), Stop> {
    let mut input = Counted { input, at: SECTOR };
    input.skip_to(h.descriptor.0)?;
    let mut text = vec![0u8; h.descriptor.1 as usize];
    input.fill(&mut text)?;
    let end = text.iter().position(|b| *b == 0).unwrap_or(text.len());
    check_descriptor(&text[..end])?;
    input.skip_to(h.overhead)?;
    let mut inflate = flate2::Decompress::new(true);
    let mut packed = Vec::new();
    let mut grain = vec![0u8; h.grain as usize];
    let mut marker = [0u8; 12];
    loop {
        // Each marker begins a sector. qemu-img writes no end-of-stream marker (its tables are
        // in its head): the file's end is the stream's, inside the last sector's padding too.
        let next = input.at.div_ceil(SECTOR) * SECTOR;
        if !input.skip_to_or_end(next)? || !input.fill_or_end(&mut marker)? {
            let left = h.capacity - out.size();
            out.skip_zeros(left);
            return Ok(());
        }
        let (val, size) = (u64_at(&marker, 0), u32_at(&marker, 8) as u64);
        if size == 0 {
            let mut kind = [0u8; 4];
            input.fill(&mut kind)?;
            let sectors = val;
            match u32::from_le_bytes(kind) {
                // The end of the stream (its sector read to its end): the rest of the disk is
                // zeros.
                0 => {
                    input.skip_to_or_end(input.at.div_ceil(SECTOR) * SECTOR)?;
                    let left = h.capacity - out.size();
                    out.skip_zeros(left);
                    return Ok(());
                }
                // A grain table, the grain directory, the footer: not needed in order.
                kind @ 1..=3 => {
                    let Some(after) = sectors
                        .checked_mul(SECTOR)
                        .and_then(|b| b.checked_add(input.at.div_ceil(SECTOR) * SECTOR))
                    else {
                        return doubt(format!("metadata marker {kind} of {sectors} sectors"));
                    };
                    input.skip_to(input.at.div_ceil(SECTOR) * SECTOR)?;
                    input.skip_to(after)?;
                }
                kind => return doubt(format!("a marker of unknown type {kind}")),
            }
            continue;
        }
        // A grain: its first sector, and its bytes deflated. Incompressible bytes grow a little.
        let start = val.saturating_mul(SECTOR);
        if start % h.grain != 0 || start >= h.capacity {
            return doubt(format!(
                "a grain at sector {val}: not a grain's start within its {} bytes",
                h.capacity
            ));
        }
        if start < out.size() {
            return doubt(format!("a grain at sector {val} out of order"));
        }
        if size > h.grain + h.grain / 16 + 1024 {
            return doubt(format!("a grain of {size} bytes deflated"));
        }
        packed.resize(size as usize, 0);
        input.fill(&mut packed)?;
        inflate.reset(true);
        let status = inflate
            .decompress(&packed, &mut grain, flate2::FlushDecompress::Finish)
            .or_else(|e| doubt(format!("a grain at sector {val} does not inflate: {e}")))?;
        if status != flate2::Status::StreamEnd {
            return doubt(format!(
                "a grain at sector {val} inflates past the grain's {} bytes",
                h.grain
            ));
        }
        // A whole grain, or the disk's last bytes (qemu-img refuses a short one too).
        let whole = h.grain.min(h.capacity - start);
        if inflate.total_out() < whole {
            return doubt(format!(
                "a grain at sector {val} inflates to {} bytes, short of its {whole}",
                inflate.total_out()
            ));
        }
        let n = (inflate.total_out()).min(h.capacity - start) as usize;
        out.skip_zeros(start - out.size());
        out.write(&grain[..n]).map_err(Stop::Output)?;
        decoded(input.at);
    }
}

/// `raw` as qemu-img writes it stream-optimized (for tests).
#[cfg(test)]
pub(crate) fn stream_of(raw: &std::path::Path) -> Vec<u8> {
    let out = raw.with_extension("vmdk");
    let ok = std::process::Command::new("qemu-img")
        .args([
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
        ])
        .arg(raw)
        .arg(&out)
        .status()
        .unwrap();
    assert!(ok.success());
    std::fs::read(out).unwrap()
}

/// `vmdk` (as `stream_of` makes it) with a descriptor that names a parent (for tests).
#[cfg(test)]
pub(crate) fn with_parent(vmdk: &[u8]) -> Vec<u8> {
    let mut parent = vmdk.to_vec();
    let at = parent
        .windows(18)
        .position(|w| w == b"parentCID=ffffffff")
        .expect("qemu-img's descriptor names no parent");
    parent[at + 10..at + 18].copy_from_slice(b"12345678");
    parent
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::library::Shelf;
    use std::path::{Path, PathBuf};

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vmdk-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Decodes `vmdk` into a sealed image in `d`; its bytes.
    fn decoded(d: &Path, vmdk: &[u8]) -> Result<Vec<u8>, Stop> {
        let head: &[u8; 512] = vmdk[..512].try_into().unwrap();
        let h = StreamHeader::parse(head).ok_or(Stop::Doubt("header".into()))?;
        let mut out = Upload::new(d, Shelf::Image).unwrap();
        decode(&h, &mut &vmdk[512..], &mut out, &mut |_| {})?;
        assert_eq!(out.size(), h.capacity);
        let sealed = out.seal().unwrap();
        Ok(std::fs::read(sealed.path()).unwrap())
    }

    #[test]
    fn decodes_what_qemu_img_writes() {
        let d = dir("same");
        // Data, a hole of whole grains, data in a grain of its own, and a zero tail: 5 MiB
        // and a half sector short of a grain's end (the last grain is partial).
        let size = (5 << 20) + 3 * 512;
        let mut raw = vec![0u8; size];
        for (i, b) in raw[..3 << 20].iter_mut().enumerate() {
            *b = (i as u32).wrapping_mul(2_654_435_761).rotate_right(13) as u8;
        }
        raw[(4 << 20) + 100..(4 << 20) + 104].copy_from_slice(b"tail");
        raw[size - 1] = 7;
        let path = d.join("disk.raw");
        std::fs::write(&path, &raw).unwrap();
        let vmdk = stream_of(&path);
        let got = decoded(&d, &vmdk).unwrap_or_else(|e| panic!("{e:?}"));
        assert!(got == raw, "the decoded image differs from the original");
        // Every grain data to the disk's end: qemu-img's file ends with the last grain.
        let full: Vec<u8> = (0..1u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
            .collect();
        std::fs::write(&path, &full).unwrap();
        let vmdk = stream_of(&path);
        let got = decoded(&d, &vmdk).unwrap_or_else(|e| panic!("{e:?}"));
        assert!(got == full, "the decoded image differs from the original");
        // As VMware and VirtualBox write it: grain tables, the grain directory, the footer
        // (the header again) and the end-of-stream marker after the grains. Nothing after that
        // marker is read.
        let marker = |sectors: u64, kind: u32| {
            let mut m = vec![0u8; 512];
            m[..8].copy_from_slice(&sectors.to_le_bytes());
            m[12..16].copy_from_slice(&kind.to_le_bytes());
            m
        };
        let mut vmware = vmdk.clone();
        vmware.resize(vmware.len().div_ceil(512) * 512, 0);
        // qemu-img's zeros after its last grain would read as the end of the stream.
        while vmware.ends_with(&[0u8; 512]) {
            vmware.truncate(vmware.len() - 512);
        }
        let tables = vmware.len();
        vmware.extend(marker(4, 1));
        vmware.extend([0u8; 4 * 512]);
        vmware.extend(marker(1, 2));
        vmware.extend([0u8; 512]);
        vmware.extend(marker(1, 3));
        vmware.extend(&vmdk[..512]);
        vmware.extend([0u8; 512]);
        vmware.extend([0xffu8; 700]);
        let head: &[u8; 512] = vmware[..512].try_into().unwrap();
        let h = StreamHeader::parse(head).unwrap();
        let mut out = Upload::new(&d, Shelf::Image).unwrap();
        let mut rest = &vmware[512..];
        decode(&h, &mut rest, &mut out, &mut |_| {}).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(rest.len(), 700, "read past the end-of-stream marker");
        let sealed = out.seal().unwrap();
        assert!(std::fs::read(sealed.path()).unwrap() == full);
        // A marker of a type the format does not have; a table cut short.
        let mut odd = vmware.clone();
        odd[tables + 12] = 7;
        match decoded(&d, &odd) {
            Err(Stop::Doubt(w)) => assert!(w.contains("unknown type 7"), "{w}"),
            other => panic!("{other:?}"),
        }
        match decoded(&d, &vmware[..tables + 1024]) {
            Err(Stop::Doubt(w)) => assert!(w.contains("ends at byte"), "{w}"),
            other => panic!("{other:?}"),
        }
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn doubts_what_it_does_not_take() {
        let d = dir("doubt");
        let mut raw = vec![0u8; 1 << 20];
        raw[..4096].fill(0xab);
        raw[(512 << 10)..(512 << 10) + 4096].fill(0xcd);
        let path = d.join("disk.raw");
        std::fs::write(&path, &raw).unwrap();
        let vmdk = stream_of(&path);
        let overhead = u64_at(&vmdk, 64) as usize * 512;
        assert!(decoded(&d, &vmdk).is_ok());
        let doubted = |v: &[u8], why: &str| match decoded(&d, v) {
            Err(Stop::Doubt(w)) => assert!(w.contains(why), "{w}"),
            other => panic!("expected a doubt saying {why:?}, got {other:?}"),
        };
        // A grain past the disk's end.
        let mut past = vmdk.clone();
        past[overhead..overhead + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        doubted(&past, "within its");
        // The second grain before the first.
        let second = (overhead + 12 + u32_at(&vmdk, overhead + 8) as usize).div_ceil(512) * 512;
        let mut order = vmdk.clone();
        order[overhead..overhead + 8].copy_from_slice(&1024u64.to_le_bytes());
        order[second..second + 8].copy_from_slice(&0u64.to_le_bytes());
        doubted(&order, "out of order");
        // Deflated bytes damaged.
        let mut bad = vmdk.clone();
        bad[overhead + 12..overhead + 20].fill(0xff);
        doubted(&bad, "inflate");
        // A descriptor naming a parent.
        doubted(&with_parent(&vmdk), "parent");
        // Cut inside a grain's deflated bytes.
        doubted(&vmdk[..overhead + 40], "ends at byte");
        // A grain that inflates short of a grain, not the disk's last.
        let c = {
            use std::io::Write;
            let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
            z.write_all(&[0xab; 4096]).unwrap();
            z.finish().unwrap()
        };
        let mut short = vmdk[..overhead].to_vec();
        short.extend(0u64.to_le_bytes());
        short.extend((c.len() as u32).to_le_bytes());
        short.extend(&c);
        short.resize(short.len().div_ceil(512) * 512, 0);
        short.extend(&vmdk[second..]);
        doubted(&short, "short of its 65536");
        // A header this reader does not take (not compressed) is no stream at all.
        let mut flat = vmdk.clone();
        flat[10] = 0;
        assert!(StreamHeader::parse(flat[..512].try_into().unwrap()).is_none());
        let _ = std::fs::remove_dir_all(&d);
    }
}
