//! Virtual Appliances as files: OVA archives (a tar of an OVF 1.x or 2.0 descriptor, an
//! optional `.mf` manifest and the disk images) read into the library, and written from it.
//!
//! Everything in an archive is untrusted. Its entries must be plain files at its top (no
//! directories, links, devices, sparse entries, `..` or absolute names), at most
//! `MAX_ENTRIES`; the descriptor at most `MAX_OVF_BYTES`, XML without a DTD (so no entity
//! expansion) and at most `MAX_XML_NODES` nodes; a manifest, when there is one, must list the
//! descriptor and every disk with digests that match. A disk image is a single file (raw,
//! qcow2, or a monolithic-sparse or stream-optimized VMDK), never one that names others
//! (backing files, data files, extents): `qemu-img info` says, before `qemu-img convert`
//! makes it raw. What the disks expand to is bounded: by `MAX_EXPANSION` times the archive's
//! bytes (above a floor) and by the library's free space.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::path::{Component, Path};
use std::process::Command;

use serde::Deserialize;
use sha2::Digest;

use crate::library::{Sealed, Shelf};
use crate::state_machine::{ApplianceRecord, BootMode, DiskBus, MAX_DISK_BYTES, MAX_VM_DISKS};

/// The most entries an archive may have.
pub const MAX_ENTRIES: usize = 64;
/// The largest descriptor read, bytes.
pub const MAX_OVF_BYTES: u64 = 1 << 20;
/// The most XML nodes a descriptor may have.
pub const MAX_XML_NODES: u32 = 100_000;
/// How many times its archive's bytes an appliance's disks may expand to...
pub const MAX_EXPANSION: u64 = 4096;
/// ...when they are larger than this (a small archive of a thin disk is no bomb).
pub const EXPANSION_FLOOR: u64 = 64 << 30;

/// Why an import or export failed.
#[derive(Debug, thiserror::Error)]
pub enum OvaError {
    /// The archive is not one we take: what is wrong with it.
    #[error("{0}")]
    Refused(String),
    /// This server failed: what it was doing, and why.
    #[error("{what}: {source}")]
    Io {
        /// What failed, on what.
        what: String,
        /// Why.
        source: io::Error,
    },
    /// Stopped by its task's cancel.
    #[error("cancelled")]
    Cancelled,
}

/// What a long import hears and tells as it goes.
pub struct Watch<'a> {
    /// What it is doing, said as each step begins.
    pub step: &'a dyn Fn(String),
    /// Bytes of its disks converted so far, of all of them: told as the conversions go.
    pub bytes: &'a dyn Fn(u64, u64),
    /// Set to stop it: it then ends with `OvaError::Cancelled`, its qemu-img stopped.
    pub cancel: &'a std::sync::atomic::AtomicBool,
}

impl Watch<'_> {
    /// `Cancelled` once the cancel is set.
    fn check(&self) -> Result<(), OvaError> {
        if self.cancel.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(OvaError::Cancelled);
        }
        Ok(())
    }
}

pub(crate) fn refused<T>(what: impl Into<String>) -> Result<T, OvaError> {
    Err(OvaError::Refused(what.into()))
}

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> OvaError {
    let what = what.into();
    move |source| OvaError::Io { what, source }
}

/// A disk of a descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OvfDisk {
    /// Its file in the archive.
    pub file: String,
    /// Its capacity as the descriptor states it, bytes (the image itself decides).
    pub capacity: u64,
}

/// What a descriptor says of its virtual machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// Its virtual system's name (`ovf:id`, or its `Name`).
    pub name: String,
    /// Its annotation or product description.
    pub description: String,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Network cards.
    pub nics: u32,
    /// Its firmware: `uefi` when it says EFI, else `bios`.
    pub boot: BootMode,
    /// `virtio` when its disks' controller says so, else `sata` (every OS has an AHCI driver).
    pub disk_bus: DiskBus,
    /// Its disks, in the order its hardware attaches them.
    pub disks: Vec<OvfDisk>,
}

/// Untrusted XML `xml` (`what`, to speak of it) read without a DTD (so without entity
/// expansion) and at most `MAX_XML_NODES` nodes, its root element `root`.
pub(crate) fn xml_document<'i>(
    xml: &'i str,
    what: &str,
    root: &str,
) -> Result<roxmltree::Document<'i>, OvaError> {
    let opt = roxmltree::ParsingOptions {
        allow_dtd: false,
        nodes_limit: MAX_XML_NODES,
    };
    let doc = roxmltree::Document::parse_with_options(xml, opt)
        .or_else(|e| refused(format!("{what} is not XML we read: {e}")))?;
    let found = doc.root_element().tag_name().name();
    if found != root {
        return refused(format!("{what}'s root is <{found}>, not <{root}>"));
    }
    Ok(doc)
}

/// The local name of an attribute `name` of `n`, in any namespace.
fn attr<'a>(n: roxmltree::Node<'a, '_>, name: &str) -> Option<&'a str> {
    n.attributes().find(|a| a.name() == name).map(|a| a.value())
}

/// The text of the child element `name` of `n`, trimmed.
fn child_text<'a>(n: roxmltree::Node<'a, '_>, name: &str) -> Option<&'a str> {
    n.children()
        .find(|c| c.is_element() && c.tag_name().name() == name)
        .and_then(|c| c.text())
        .map(str::trim)
}

/// The elements named `name` (local name) in `n`, itself included.
fn elements<'a, 'i>(n: roxmltree::Node<'a, 'i>, name: &str) -> Vec<roxmltree::Node<'a, 'i>> {
    n.descendants()
        .filter(|c| c.is_element() && c.tag_name().name() == name)
        .collect()
}

/// Bytes in one of `units` (`byte * 2^20`, `MegaBytes`, `GB`, ...); `None` if unknown.
pub fn unit_bytes(units: &str) -> Option<u64> {
    let u: String = units.chars().filter(|c| !c.is_whitespace()).collect();
    let u = u.to_ascii_lowercase();
    if let Some(rest) = u.strip_prefix("byte*2^") {
        return rest
            .parse::<u32>()
            .ok()
            .filter(|p| *p <= 60)
            .map(|p| 1u64 << p);
    }
    Some(match u.as_str() {
        "" | "byte" | "bytes" => 1,
        "kilobytes" | "kb" | "kib" => 1 << 10,
        "megabytes" | "mb" | "mib" => 1 << 20,
        "gigabytes" | "gb" | "gib" => 1 << 30,
        "terabytes" | "tb" | "tib" => 1 << 40,
        _ => return None,
    })
}

/// Reads an OVF descriptor (1.x or 2.0, any vendor's): one virtual system's memory, CPUs,
/// network cards, firmware and disks.
pub fn parse_ovf(xml: &str) -> Result<Descriptor, OvaError> {
    let doc = xml_document(xml, "the OVF descriptor", "Envelope")?;
    let root = doc.root_element();
    // Files by id, disks by id.
    let files: BTreeMap<&str, &str> = elements(root, "File")
        .into_iter()
        .filter_map(|f| Some((attr(f, "id")?, attr(f, "href")?)))
        .collect();
    let mut disks: Vec<(String, OvfDisk)> = Vec::new();
    for d in elements(root, "Disk") {
        let id = attr(d, "diskId").unwrap_or_default();
        let file_ref = attr(d, "fileRef").ok_or_else(|| {
            OvaError::Refused(format!(
                "disk {id:?} of the descriptor has no file (a blank disk)"
            ))
        })?;
        let file = files.get(file_ref).ok_or_else(|| {
            OvaError::Refused(format!(
                "disk {id:?} names file {file_ref:?}, which the descriptor does not list"
            ))
        })?;
        let units = attr(d, "capacityAllocationUnits").unwrap_or("byte");
        let capacity = attr(d, "capacity")
            .and_then(|c| c.trim().parse::<u64>().ok())
            .zip(unit_bytes(units))
            .and_then(|(c, u)| c.checked_mul(u))
            .ok_or_else(|| {
                OvaError::Refused(format!(
                    "disk {id:?}: its capacity is not a number of {units:?}"
                ))
            })?;
        if disks.iter().any(|(_, d)| d.file == *file) {
            return refused(format!(
                "disk {id:?} names file {file:?}, which another disk names too"
            ));
        }
        disks.push((
            id.to_string(),
            OvfDisk {
                file: file.to_string(),
                capacity,
            },
        ));
    }
    let systems = elements(root, "VirtualSystem");
    let system = match systems.as_slice() {
        [one] => *one,
        [] => return refused("the descriptor has no VirtualSystem"),
        many => {
            return refused(format!(
                "the descriptor has {} virtual systems: an appliance is one VM",
                many.len()
            ))
        }
    };
    let name = attr(system, "id")
        .or_else(|| child_text(system, "Name"))
        .unwrap_or_default()
        .to_string();
    let description = elements(system, "Annotation")
        .first()
        .or(elements(system, "Description").first())
        .and_then(|n| n.text())
        .unwrap_or_default()
        .trim()
        .to_string();
    let (mut memory_mib, mut vcpus, mut nics) = (None, None, 0u32);
    let mut attached: Vec<String> = Vec::new();
    let mut virtio = false;
    // Items of VirtualHardwareSection: OVF 1.x's <Item>, OVF 2.0's <StorageItem> and
    // <EthernetPortItem> too.
    let items = system.descendants().filter(|c| {
        c.is_element()
            && matches!(
                c.tag_name().name(),
                "Item" | "StorageItem" | "EthernetPortItem"
            )
    });
    for item in items {
        let kind: u32 = child_text(item, "ResourceType")
            .and_then(|t| t.parse().ok())
            .unwrap_or(0);
        let quantity = child_text(item, "VirtualQuantity").and_then(|t| t.parse::<u64>().ok());
        match kind {
            3 => vcpus = quantity,
            4 => {
                let units = child_text(item, "AllocationUnits").unwrap_or("byte * 2^20");
                let bytes = quantity
                    .zip(unit_bytes(units))
                    .and_then(|(q, u)| q.checked_mul(u));
                memory_mib = bytes.map(|b| b >> 20);
            }
            10 => nics += 1,
            5 | 6 | 20 => {
                let sub = child_text(item, "ResourceSubType").unwrap_or_default();
                virtio |= sub.to_ascii_lowercase().contains("virtio");
            }
            17 => {
                // ovf:/disk/<id>, or (some exporters) ovf:/file/<id>.
                if let Some(r) = child_text(item, "HostResource") {
                    let id = r.rsplit('/').next().unwrap_or_default();
                    attached.push(id.to_string());
                }
            }
            _ => {}
        }
    }
    let memory_mib = memory_mib
        .filter(|m| *m > 0)
        .ok_or_else(|| OvaError::Refused("the descriptor gives the VM no memory".into()))?;
    let vcpus = vcpus.unwrap_or(1).clamp(1, 255) as u32;
    // Disks in the order the hardware attaches them; any not attached after.
    let mut ordered = Vec::new();
    for id in &attached {
        if let Some(i) = disks.iter().position(|(d, _)| d == id) {
            ordered.push(disks.remove(i).1);
        } else if let Some(i) = disks
            .iter()
            .position(|(_, d)| files.get(id.as_str()) == Some(&d.file.as_str()))
        {
            ordered.push(disks.remove(i).1);
        }
    }
    ordered.extend(disks.into_iter().map(|(_, d)| d));
    if ordered.is_empty() || ordered.len() > MAX_VM_DISKS {
        return refused(format!(
            "the descriptor has {} disks with images: 1 to {MAX_VM_DISKS}",
            ordered.len()
        ));
    }
    // UEFI as VMware (`<vmw:Config vmw:key="firmware" vmw:value="efi"/>`) and VirtualBox
    // (`<Firmware type="EFI"/>`) write it.
    let efi = root.descendants().filter(|n| n.is_element()).any(|n| {
        (attr(n, "key") == Some("firmware")
            && attr(n, "value").is_some_and(|v| v.eq_ignore_ascii_case("efi")))
            || (n.tag_name().name() == "Firmware"
                && attr(n, "type").is_some_and(|t| t.to_ascii_lowercase().starts_with("efi")))
    });
    Ok(Descriptor {
        name,
        description,
        memory_mib,
        vcpus,
        nics,
        boot: if efi { BootMode::Uefi } else { BootMode::Bios },
        disk_bus: if virtio {
            DiskBus::Virtio
        } else {
            DiskBus::Sata
        },
        disks: ordered,
    })
}

/// A digest algorithm of a manifest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DigestKind {
    /// SHA-1 (OVF 1.x).
    Sha1,
    /// SHA-256 (OVF 2.0, and 1.x exporters since).
    Sha256,
}

/// Reads a manifest: `SHA256(file)= hex` lines (or `SHA1`), by file.
pub fn parse_manifest(text: &str) -> Result<BTreeMap<String, (DigestKind, String)>, OvaError> {
    let mut out = BTreeMap::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let bad = || OvaError::Refused(format!("manifest line {line:?} is not ALGO(file)= digest"));
        let (algo, rest) = line.split_once('(').ok_or_else(bad)?;
        let (file, rest) = rest.rsplit_once(')').ok_or_else(bad)?;
        let digest = rest.trim_start().strip_prefix('=').ok_or_else(bad)?.trim();
        let kind = match algo.trim().to_ascii_uppercase().as_str() {
            "SHA1" => DigestKind::Sha1,
            "SHA256" => DigestKind::Sha256,
            other => return refused(format!("manifest: digest {other} is not SHA1 or SHA256")),
        };
        let len = if kind == DigestKind::Sha1 { 40 } else { 64 };
        if digest.len() != len || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        if out
            .insert(file.trim().to_string(), (kind, digest.to_ascii_lowercase()))
            .is_some()
        {
            return refused(format!("manifest lists {file:?} twice"));
        }
    }
    Ok(out)
}

/// An entry of an archive, read where it lies: qemu-img later reads a disk in place.
#[derive(Clone, Debug, Default)]
pub struct Entry {
    /// Where its bytes start in the archive.
    pub offset: u64,
    /// Its bytes.
    pub size: u64,
    /// Its SHA-1, hex, if it was computed (no manifest read before it, or one asking for it).
    sha1: Option<String>,
    /// Its SHA-256, hex, likewise.
    sha256: Option<String>,
}

impl Entry {
    /// An entry of `size` bytes at `offset`, hashed by no one here (a zip's, checked by its
    /// CRC-32 instead).
    pub(crate) fn at(offset: u64, size: u64) -> Entry {
        Entry {
            offset,
            size,
            ..Entry::default()
        }
    }

    /// Its digest of `kind`, hex, if it was computed.
    pub fn digest(&self, kind: DigestKind) -> Option<&str> {
        match kind {
            DigestKind::Sha1 => self.sha1.as_deref(),
            DigestKind::Sha256 => self.sha256.as_deref(),
        }
    }
}

/// An archive read once, as it arrived: its entries checked and hashed, its descriptor and
/// manifest kept.
#[derive(Debug)]
pub struct Scanned {
    /// Every entry, by its name.
    pub entries: BTreeMap<String, Entry>,
    /// The descriptor's name.
    pub ovf: String,
    /// The descriptor's text.
    pub descriptor: String,
    /// The manifest's name and text, if there is one.
    pub manifest: Option<(String, String)>,
    /// The archive's bytes.
    pub packed: u64,
    /// Its stream-optimized VMDKs decoded to raw images as they arrived (`vmdk`), by entry
    /// name: sealed, waiting to be put in place.
    pub unpacked: BTreeMap<String, Sealed>,
}

/// Where `scan` decodes the stream-optimized VMDKs it meets (`vmdk`), as they arrive.
#[derive(Clone, Debug)]
pub struct Unpack {
    /// The directory their raw images are written in (on the library's file system).
    pub work: std::path::PathBuf,
    /// The library directory they are put in place in.
    pub library: std::path::PathBuf,
    /// The file the archive is being written to, each byte before `scan` reads it: what is
    /// decoded is dropped from it (a hole), so that its pages need never reach the disk.
    pub archive: Option<std::path::PathBuf>,
}

/// How far apart holes are punched in an archive's file behind its decoding.
const DROP_EVERY: u64 = 16 << 20;

/// Drops bytes `from..to` of file `f` (a hole; its size kept), whole 4 KiB blocks of them.
fn punch(f: &File, from: u64, to: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let (from, to) = (from.next_multiple_of(4096), to / 4096 * 4096);
    if to <= from {
        return Ok(());
    }
    // SAFETY: fallocate on a descriptor we own, a range of it, no memory passed.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            from as i64,
            (to - from) as i64,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An entry's bytes as `scan` reads them: hashed and counted on the way.
struct Hashing<'a, R> {
    input: R,
    digests: &'a mut Digests,
    read: u64,
}

impl<R: Read> Read for Hashing<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.input.read(buf)?;
        self.digests.update(&buf[..n]);
        self.read += n as u64;
        Ok(n)
    }
}

/// Decodes entry `name` (at `offset` in an archive of `packed` bytes), read from `input`'s
/// start, into a raw image in `to` if it is a stream-optimized VMDK `vmdk` takes; `None` if
/// it is not, or if `vmdk` gave up on it before its first grain (qemu-img then converts it in
/// place). Once grains are decoded they are dropped from the archive's file (`Unpack::archive`):
/// a doubt after that refuses the archive.
fn unpack_entry(
    input: &mut impl Read,
    name: &str,
    offset: u64,
    packed: u64,
    to: &Unpack,
) -> Result<Option<Sealed>, OvaError> {
    let mut head = [0u8; 512];
    let mut got = 0;
    while got < head.len() {
        match input.read(&mut head[got..]) {
            Ok(0) => return Ok(None),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return refused(format!("the archive is cut short or damaged: {e}")),
        }
    }
    let Some(h) = crate::vmdk::StreamHeader::parse(&head) else {
        return Ok(None);
    };
    // The limits the import checks (`convert_disks`), checked before a byte is written.
    let free = free_bytes(&to.library).unwrap_or(0);
    let bomb = h.capacity > EXPANSION_FLOOR && h.capacity / MAX_EXPANSION > packed;
    if bomb || h.capacity > free {
        return Ok(None);
    }
    let mut out = crate::library::Upload::new_in(&to.work, &to.library, Shelf::Image).map_err(
        io_err(format!("a file for {name} in {}", to.work.display())),
    )?;
    let mut archive = match &to.archive {
        Some(p) => Some(
            File::options()
                .write(true)
                .open(p)
                .map_err(io_err(format!("opening {}", p.display())))?,
        ),
        None => None,
    };
    // The entry's bytes from `offset` up to `dropped` are a hole in the archive's file. A file
    // system that cannot punch holes keeps them: only the disk's time is lost.
    let (mut dropped, mut seen) = (offset, 0);
    let drop_decoded = |archive: &mut Option<File>, dropped: &mut u64, to: u64| {
        let Some(f) = archive.as_ref() else { return };
        match punch(f, *dropped, to) {
            Ok(()) => *dropped = to,
            Err(e) => {
                tracing::warn!(entry = %name, error = %e, "cannot drop decoded bytes from the archive's file");
                *archive = None;
            }
        }
    };
    let decoding = crate::vmdk::decode(&h, input, &mut out, &mut |at| {
        seen = at;
        if offset + at >= dropped + DROP_EVERY {
            drop_decoded(&mut archive, &mut dropped, offset + at);
        }
    });
    match decoding {
        Ok(()) => {
            // The rest of what was decoded goes too.
            drop_decoded(&mut archive, &mut dropped, offset + seen);
            out.seal()
                .map(Some)
                .map_err(io_err(format!("storing {name} decoded")))
        }
        Err(crate::vmdk::Stop::Input(e)) => {
            refused(format!("the archive is cut short or damaged: {e}"))
        }
        Err(crate::vmdk::Stop::Output(e)) => Err(OvaError::Io {
            what: format!("writing {name} decoded in {}", to.work.display()),
            source: e,
        }),
        Err(crate::vmdk::Stop::Doubt(why)) if dropped > offset => refused(format!(
            "{name}, a stream-optimized VMDK read in order as it arrived: {why}"
        )),
        Err(crate::vmdk::Stop::Doubt(why)) => {
            tracing::info!(entry = %name, %why, "a stream-optimized VMDK left to qemu-img");
            Ok(None)
        }
    }
}

/// Hex of `bytes`.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The digests asked for, over one reading.
struct Digests {
    sha1: Option<sha1::Sha1>,
    sha256: Option<sha2::Sha256>,
}

impl Digests {
    fn new(sha1: bool, sha256: bool) -> Digests {
        Digests {
            sha1: sha1.then(sha1::Sha1::new),
            sha256: sha256.then(sha2::Sha256::new),
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        if let Some(h) = &mut self.sha1 {
            h.update(bytes);
        }
        if let Some(h) = &mut self.sha256 {
            h.update(bytes);
        }
    }

    fn finish(self, e: &mut Entry) {
        e.sha1 = self.sha1.map(|h| hex(&h.finalize()));
        e.sha256 = self.sha256.map(|h| hex(&h.finalize()));
    }
}

/// Reads OVA `input` (`packed` bytes in all) once, from its start, as it arrives: checks every
/// entry and where it lies, keeps the descriptor's and manifest's texts, and hashes every other
/// entry with the digest the manifest names for it (read before it, as OVF orders them) or,
/// no manifest read yet, with both. With `unpack`, decodes the stream-optimized VMDKs its
/// descriptor names as disks to raw images on the way. Reads `input` to its end.
pub fn scan(
    mut input: impl Read,
    packed: u64,
    unpack: Option<&Unpack>,
) -> Result<Scanned, OvaError> {
    // An OVA is a ustar archive (OVF's own rule): its first header says so.
    let mut head = [0u8; 512];
    let is_tar = input.read_exact(&mut head).is_ok() && &head[257..262] == b"ustar";
    if !is_tar {
        return refused(
            "this is not an OVA: not a tar (ustar) archive, and so no .ovf descriptor in it",
        );
    }
    let damaged =
        |e: io::Error| OvaError::Refused(format!("the archive is cut short or damaged: {e}"));
    let mut tar = tar::Archive::new(io::Cursor::new(head).chain(input));
    let mut entries: BTreeMap<String, Entry> = BTreeMap::new();
    let mut descriptor: Option<(String, String)> = None;
    let mut manifest: Option<(String, String)> = None;
    let mut listed: Option<BTreeMap<String, (DigestKind, String)>> = None;
    let mut unpacked = BTreeMap::new();
    // The entries the descriptor names as disks, read with it (an OVA's first entry).
    let mut disk_files: Vec<String> = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    for entry in tar.entries().map_err(damaged)? {
        let mut entry = entry.map_err(damaged)?;
        let kind = entry.header().entry_type();
        if kind == tar::EntryType::XGlobalHeader {
            continue;
        }
        let path = entry.path().map_err(damaged)?.into_owned();
        let shown = path.display().to_string();
        if !(kind.is_file() || kind == tar::EntryType::Continuous) {
            return refused(format!(
                "archive entry {shown:?} is a {kind:?}: an OVA holds plain files only"
            ));
        }
        let mut parts = path.components();
        let name = match (parts.next(), parts.next()) {
            (Some(Component::Normal(n)), None) => n.to_string_lossy().into_owned(),
            _ => {
                return refused(format!(
                    "archive entry {shown:?}: only plain file names, at the archive's top"
                ))
            }
        };
        if name.starts_with('.') || name.contains('\\') {
            return refused(format!("archive entry {shown:?}: a hidden or odd name"));
        }
        if entries.len() >= MAX_ENTRIES {
            return refused(format!("the archive has more than {MAX_ENTRIES} entries"));
        }
        if entries.contains_key(&name) {
            return refused(format!("archive entry {name:?} comes twice"));
        }
        let size = entry.header().size().map_err(damaged)?;
        if size > packed {
            return refused(format!(
                "archive entry {name:?} claims {size} bytes, more than the archive's {packed}: it is cut short or damaged"
            ));
        }
        let mut e = Entry {
            offset: entry.raw_file_position(),
            size,
            ..Entry::default()
        };
        let is_ovf = name.ends_with(".ovf");
        let is_mf = name.ends_with(".mf");
        let mut rest = (&mut entry).take(size);
        if is_ovf || is_mf {
            // Small texts, read whole (and hashed both ways: a manifest lists the descriptor).
            if size > MAX_OVF_BYTES {
                return refused(format!("{name} has {size} bytes, at most {MAX_OVF_BYTES}"));
            }
            let mut bytes = Vec::with_capacity(size as usize);
            rest.read_to_end(&mut bytes).map_err(damaged)?;
            if bytes.len() as u64 != size {
                return refused(format!(
                    "archive entry {name:?} is cut short: {} of {size} bytes",
                    bytes.len()
                ));
            }
            let mut d = Digests::new(true, true);
            d.update(&bytes);
            d.finish(&mut e);
            let text = String::from_utf8(bytes)
                .or_else(|err| refused(format!("{name} is not UTF-8 text: {err}")))?;
            let slot = if is_ovf {
                &mut descriptor
            } else {
                &mut manifest
            };
            if slot.is_some() {
                return refused(format!(
                    "the archive has more than one {}",
                    if is_ovf {
                        ".ovf descriptor"
                    } else {
                        ".mf manifest"
                    }
                ));
            }
            if is_mf {
                listed = Some(parse_manifest(&text)?);
            } else if unpack.is_some() {
                disk_files = parse_ovf(&text)
                    .map(|d| d.disks.into_iter().map(|disk| disk.file).collect())
                    .unwrap_or_default();
            }
            *slot = Some((name.clone(), text));
        } else {
            let mut d = match listed.as_ref().map(|l| l.get(&name).map(|(k, _)| *k)) {
                None => Digests::new(true, true),
                Some(None) => Digests::new(false, false),
                Some(Some(k)) => Digests::new(k == DigestKind::Sha1, k == DigestKind::Sha256),
            };
            let mut hashing = Hashing {
                input: rest,
                digests: &mut d,
                read: 0,
            };
            // Only a disk the descriptor (read first, as OVF orders an OVA) names is decoded.
            if let Some(to) = unpack.filter(|_| disk_files.contains(&name)) {
                if let Some(image) = unpack_entry(&mut hashing, &name, e.offset, packed, to)? {
                    unpacked.insert(name.clone(), image);
                }
            }
            while hashing.read(&mut buf).map_err(damaged)? > 0 {}
            let read = hashing.read;
            if read != size {
                return refused(format!(
                    "archive entry {name:?} is cut short: {read} of {size} bytes"
                ));
            }
            d.finish(&mut e);
        }
        entries.insert(name, e);
    }
    // What follows the archive's end (its padding) is read too: a sender is never left waiting.
    let _ = io::copy(&mut tar.into_inner(), &mut io::sink());
    let Some((ovf, descriptor)) = descriptor else {
        return refused("the archive has no .ovf descriptor: is it an OVA?");
    };
    Ok(Scanned {
        entries,
        ovf,
        descriptor,
        manifest,
        packed,
        unpacked,
    })
}

/// What an upload or a download turned out to be, read as it arrived.
#[derive(Debug)]
pub enum Arrived {
    /// An OVA, scanned.
    Ova(Scanned),
    /// The original product's zip (`zipped`), only received: its directory is at its end.
    Zip,
}

/// Reads an archive as it arrives: `scan` for an OVA (decoding into `unpack`); a zip is read
/// to its end, unread.
pub fn arrive(
    mut input: impl Read,
    packed: u64,
    unpack: Option<&Unpack>,
) -> Result<Arrived, OvaError> {
    let mut head = Vec::with_capacity(4);
    (&mut input)
        .take(4)
        .read_to_end(&mut head)
        .or_else(|e| refused(format!("the archive is cut short or damaged: {e}")))?;
    let mut rest = io::Cursor::new(head.clone()).chain(input);
    if crate::zipped::is_zip(&head) {
        let _ = io::copy(&mut rest, &mut io::sink());
        return Ok(Arrived::Zip);
    }
    scan(rest, packed, unpack).map(Arrived::Ova)
}

/// Imports what arrived in file `archive` (`import` or `zipped::import`).
pub fn import_arrived(
    archive: &Path,
    arrived: Arrived,
    work: &Path,
    library: &Path,
    watch: &Watch<'_>,
) -> Result<Imported, OvaError> {
    match arrived {
        Arrived::Ova(s) => import(archive, s, work, library, watch),
        Arrived::Zip => crate::zipped::import(archive, work, library, watch),
    }
}

/// `scan` of the archive in file `path`.
pub fn scan_file(path: &Path) -> Result<Scanned, OvaError> {
    let f = File::open(path).map_err(io_err(format!("opening {}", path.display())))?;
    let packed = f.metadata().map_err(io_err("the archive"))?.len();
    scan(BufReader::with_capacity(1 << 20, f), packed, None)
}

/// Checks the archive's manifest, if it has one: it lists the descriptor and each of `disks`,
/// and each entry it lists is there with its digest.
fn check_manifest(s: &Scanned, disks: &[OvfDisk]) -> Result<(), OvaError> {
    let Some((mf_name, text)) = &s.manifest else {
        return Ok(());
    };
    let listed = parse_manifest(text)?;
    let needed = std::iter::once(&s.ovf).chain(disks.iter().map(|d| &d.file));
    for n in needed {
        if !listed.contains_key(n) {
            return refused(format!("manifest {mf_name} does not list {n}"));
        }
    }
    for (name, (kind, want)) in &listed {
        let entry = s.entries.get(name).ok_or_else(|| {
            OvaError::Refused(format!(
                "manifest {mf_name} lists {name}, which the archive lacks"
            ))
        })?;
        let got = entry.digest(*kind).ok_or_else(|| {
            OvaError::Refused(format!(
                "{name}: its {kind:?} was not computed as the archive was read"
            ))
        })?;
        if got != want {
            return refused(format!(
                "{name} does not match the manifest: its {kind:?} is {got}, the manifest says {want}"
            ));
        }
    }
    Ok(())
}

/// The digest of file `path` of `kind`, hex.
fn digest_file(path: &Path, kind: DigestKind) -> io::Result<String> {
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut d = Digests::new(kind == DigestKind::Sha1, kind == DigestKind::Sha256);
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        d.update(&buf[..n]);
    }
    let mut e = Entry::default();
    d.finish(&mut e);
    Ok(e.digest(kind).unwrap_or_default().to_string())
}

/// A disk image format qemu-img is told (never left to guess).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    /// Raw bytes.
    Raw,
    /// QEMU's qcow2.
    Qcow2,
    /// VMware's VMDK, single file.
    Vmdk,
}

impl ImageFormat {
    fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Vmdk => "vmdk",
        }
    }
}

/// A disk image where it lies inside an archive, read there by qemu-img through its raw
/// driver's offset and size: never copied out.
pub struct InPlace<'a> {
    /// The archive.
    pub archive: &'a Path,
    /// The entry's name, to speak of it.
    pub name: &'a str,
    /// Where it lies.
    pub entry: &'a Entry,
}

impl InPlace<'_> {
    /// The block node of its bytes: the archive's file, from its offset, for its size in whole
    /// 512-byte blocks (qemu's rule; a tar pads each entry to them).
    fn bytes_node(&self) -> serde_json::Value {
        serde_json::json!({
            "driver": "raw",
            "offset": self.entry.offset,
            "size": self.entry.size.div_ceil(512) * 512,
            "file": {"driver": "file", "filename": self.archive},
        })
    }

    /// Its qemu `json:` name, as an image of `format`.
    fn spec(&self, format: ImageFormat) -> String {
        let node = match format {
            ImageFormat::Raw => self.bytes_node(),
            f => serde_json::json!({"driver": f.name(), "file": self.bytes_node()}),
        };
        format!("json:{node}")
    }

    /// Its format, from its first bytes.
    pub fn probe(&self) -> Result<ImageFormat, OvaError> {
        use std::os::unix::fs::FileExt;
        let mut head = [0u8; 32];
        let f = File::open(self.archive)
            .map_err(io_err(format!("opening {}", self.archive.display())))?;
        let want = (self.entry.size as usize).min(head.len());
        f.read_exact_at(&mut head[..want], self.entry.offset)
            .map_err(io_err(format!("reading {}", self.name)))?;
        let head = &head[..want];
        Ok(if head.starts_with(b"QFI\xfb") {
            ImageFormat::Qcow2
        } else if head.starts_with(b"KDMV") {
            ImageFormat::Vmdk
        } else if head.starts_with(b"# Disk DescriptorFile") {
            return refused(format!(
                "{}: a VMDK descriptor naming other files; only single-file VMDKs (monolithic sparse, stream-optimized) are taken",
                self.name
            ));
        } else {
            ImageFormat::Raw
        })
    }

    /// Its size as a disk of `format`, checked to stand alone: no backing file, no external
    /// data file, no extent elsewhere than its own bytes.
    pub fn inspect(&self, format: ImageFormat) -> Result<u64, OvaError> {
        let shown = self.name;
        let out = Command::new("qemu-img")
            .args(["info", "--output=json", "-f", format.name()])
            .arg(self.spec(format))
            .output()
            .map_err(io_err("running qemu-img info (Debian's qemu-utils)"))?;
        if !out.status.success() {
            return refused(format!(
                "{shown} is not a {} image qemu-img reads: {}",
                format.name(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let info: ImageInfo = serde_json::from_slice(&out.stdout)
            .or_else(|e| refused(format!("{shown}: qemu-img info: {e}")))?;
        if let Some(b) = info.backing_filename {
            return refused(format!(
                "{shown} names a backing file ({b:?}): an image must stand alone"
            ));
        }
        let data = info
            .format_specific
            .as_ref()
            .and_then(|f| f.get("data"))
            .cloned()
            .unwrap_or_default();
        if let Some(d) = data.get("data-file") {
            return refused(format!(
                "{shown} keeps its data in another file ({d}): an image must stand alone"
            ));
        }
        if format == ImageFormat::Vmdk {
            // Each extent must be this entry's own bytes: qemu names them by the same node.
            let me = self.bytes_node();
            let extents = data
                .get("extents")
                .and_then(|e| e.as_array())
                .cloned()
                .unwrap_or_default();
            for e in &extents {
                let file = e
                    .get("filename")
                    .and_then(|f| f.as_str())
                    .unwrap_or_default();
                let node = file
                    .strip_prefix("json:")
                    .and_then(|j| serde_json::from_str::<serde_json::Value>(j).ok());
                if node.as_ref() != Some(&me) {
                    return refused(format!(
                        "{shown} has an extent in another file ({file:?}): an image must stand alone"
                    ));
                }
            }
        }
        if info.virtual_size == 0 || info.virtual_size > MAX_DISK_BYTES {
            return refused(format!(
                "{shown}: a disk of {} bytes (1 to {} GiB)",
                info.virtual_size,
                MAX_DISK_BYTES >> 30
            ));
        }
        Ok(info.virtual_size)
    }
}

/// What `qemu-img info` says of an image.
#[derive(Debug, Deserialize)]
struct ImageInfo {
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "backing-filename")]
    backing_filename: Option<String>,
    #[serde(rename = "format-specific")]
    format_specific: Option<serde_json::Value>,
}

/// Free bytes of the file system holding `path`.
fn free_bytes(path: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statvfs fills the zeroed struct we own from a NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Runs qemu-img `args`; its error output on a failure.
fn qemu_img(args: &[&std::ffi::OsStr], what: &str) -> Result<(), OvaError> {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .map_err(io_err(format!("running qemu-img to {what}")))?;
    if !out.status.success() {
        return Err(OvaError::Io {
            what: what.to_string(),
            source: io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        });
    }
    Ok(())
}

/// Runs qemu-img `args` (a `convert -p`), hearing its percentage done in `percent`, stopped
/// when `cancel` is set; its error output on a failure.
fn qemu_img_watched(
    args: &[&std::ffi::OsStr],
    what: &str,
    cancel: &std::sync::atomic::AtomicBool,
    percent: &dyn Fn(f64),
) -> Result<(), OvaError> {
    use std::process::Stdio;
    use std::sync::atomic::Ordering;
    use std::time::Duration;
    let mut child = Command::new("qemu-img")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io_err(format!("running qemu-img to {what}")))?;
    let (tx, rx) = std::sync::mpsc::channel();
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    // `-p` writes "    (12.34/100%)\r" as it goes: each figure, once read, goes to this thread.
    let reader = std::thread::spawn(move || {
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while let Ok(1) = stdout.read(&mut byte) {
            if byte[0] != b'\r' && byte[0] != b'\n' {
                line.push(byte[0]);
                continue;
            }
            let text = String::from_utf8_lossy(&line);
            let p = text
                .trim()
                .strip_prefix('(')
                .and_then(|t| t.split('/').next())
                .and_then(|t| t.parse::<f64>().ok());
            line.clear();
            if let Some(p) = p.filter(|p| (0.0..=100.0).contains(p)) {
                if tx.send(p).is_err() {
                    break;
                }
            }
        }
    });
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = (&mut stderr).take(64 << 10).read_to_string(&mut text);
        text
    });
    let mut cancelled = false;
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(p) => percent(p),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if !cancelled && cancel.load(Ordering::Relaxed) {
            cancelled = true;
            let _ = child.kill();
        }
    }
    let status = child
        .wait()
        .map_err(io_err(format!("waiting for qemu-img to {what}")))?;
    let _ = reader.join();
    let errors = errors.join().unwrap_or_default();
    if cancelled {
        return Err(OvaError::Cancelled);
    }
    if !status.success() {
        return Err(OvaError::Io {
            what: what.to_string(),
            source: io::Error::other(errors.trim().to_string()),
        });
    }
    Ok(())
}

#[cfg(test)]
#[test]
fn a_cancelled_conversion_stops_its_qemu_img() {
    let dir = std::env::temp_dir().join(format!("ova-cancel-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("out.raw");
    // A qcow2 image of `size` (thin), converted to raw under `cancel`, its progress to `heard`.
    let convert = |size: &str, cancel: &std::sync::atomic::AtomicBool, heard: &dyn Fn(f64)| {
        let src = dir.join(format!("{size}.qcow2"));
        let made = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&src)
            .arg(size)
            .status()
            .unwrap();
        assert!(made.success());
        let args: [&std::ffi::OsStr; 8] = [
            "convert".as_ref(),
            "-p".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-O".as_ref(),
            "raw".as_ref(),
            src.as_os_str(),
            out.as_os_str(),
        ];
        qemu_img_watched(&args, "converting", cancel, heard)
    };
    let started = std::time::Instant::now();
    let cancel = std::sync::atomic::AtomicBool::new(true);
    let r = convert("64G", &cancel, &|_| {});
    assert!(matches!(r, Err(OvaError::Cancelled)), "{r:?}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    // Not cancelled, it runs to its end, its progress heard up to 100%.
    cancel.store(false, std::sync::atomic::Ordering::Relaxed);
    let heard = std::sync::Mutex::new(Vec::new());
    convert("64M", &cancel, &|p| heard.lock().unwrap().push(p)).unwrap();
    assert_eq!(heard.lock().unwrap().last(), Some(&100.0));
    let _ = std::fs::remove_dir_all(&dir);
}

/// An archive read into the library's files: its descriptor and its disks, raw, hashed and
/// durable, each waiting to be put in place once the library lists the appliance.
pub struct Imported {
    /// What its descriptor says.
    pub descriptor: Descriptor,
    /// Its disks, Disk0 first.
    pub disks: Vec<Sealed>,
}

impl Imported {
    /// Appliance `name` as its descriptor says (within the cluster's limits: its description
    /// cut, its memory, vCPUs and cards at most what a VM may have), with its images.
    pub fn appliance(&self, name: &str, origin: String) -> crate::state_machine::NewAppliance {
        use crate::state_machine as sm;
        let d = &self.descriptor;
        let mut description = d.description.clone();
        let mut end = description.len().min(sm::MAX_APPLIANCE_DESCRIPTION);
        while !description.is_char_boundary(end) {
            end -= 1;
        }
        description.truncate(end);
        sm::NewAppliance {
            name: name.to_string(),
            description,
            memory_mib: d.memory_mib.min(sm::MAX_VM_MEMORY_MIB),
            vcpus: d.vcpus.min(255),
            boot: d.boot,
            disk_bus: d.disk_bus,
            nics: d.nics.min(sm::MAX_VM_NICS as u32),
            disks: self
                .disks
                .iter()
                .map(|s| sm::ApplianceDisk {
                    size: s.size,
                    sha256: s.sha256.clone(),
                })
                .collect(),
            origin: if d.name.is_empty() {
                origin
            } else {
                format!("{origin}, virtual system {:?}", d.name)
            },
        }
    }
}

/// The bytes a channel delivers, as a blocking reader: what `scan` reads on a thread of its
/// own while an upload or a download arrives. Its end is the channel's closing.
pub struct Arriving<T> {
    rx: std::sync::mpsc::Receiver<T>,
    chunk: Option<T>,
    at: usize,
}

impl<T: AsRef<[u8]>> Arriving<T> {
    /// Reads what `rx` delivers.
    pub fn new(rx: std::sync::mpsc::Receiver<T>) -> Arriving<T> {
        Arriving {
            rx,
            chunk: None,
            at: 0,
        }
    }
}

impl<T: AsRef<[u8]>> Read for Arriving<T> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if let Some(c) = &self.chunk {
                let rest = &c.as_ref()[self.at..];
                if !rest.is_empty() {
                    let n = buf.len().min(rest.len());
                    buf[..n].copy_from_slice(&rest[..n]);
                    self.at += n;
                    return Ok(n);
                }
            }
            match self.rx.recv() {
                Ok(c) => (self.chunk, self.at) = (Some(c), 0),
                Err(_) => return Ok(0),
            }
        }
    }
}

/// Imports OVA `archive`, read already by `scanned`: checks its descriptor and manifest, and
/// converts each disk not decoded as it arrived, read in place in the archive, to a raw image
/// sealed in `work` (a new directory inside library directory `library`, removed by the
/// caller), told to `watch`.
pub fn import(
    archive: &Path,
    mut scanned: Scanned,
    work: &Path,
    library: &Path,
    watch: &Watch<'_>,
) -> Result<Imported, OvaError> {
    let descriptor = parse_ovf(&scanned.descriptor)?;
    check_manifest(&scanned, &descriptor.disks)?;
    let mut images = Vec::new();
    for (i, d) in descriptor.disks.iter().enumerate() {
        let entry = scanned.entries.get(&d.file).ok_or_else(|| {
            OvaError::Refused(format!("Disk{i}'s image {} is not in the archive", d.file))
        })?;
        images.push(match scanned.unpacked.remove(&d.file) {
            Some(image) => Source::Decoded(&d.file, image),
            None => Source::InPlace(InPlace {
                archive,
                name: &d.file,
                entry,
            }),
        });
    }
    let disks = convert_disks(images, scanned.packed, work, library, watch)?;
    Ok(Imported { descriptor, disks })
}

/// A disk of an archive, to import.
pub(crate) enum Source<'a> {
    /// Read in place in the archive, to be checked and converted.
    InPlace(InPlace<'a>),
    /// Decoded already as the archive arrived (`vmdk`): its entry's name, its raw image.
    Decoded(&'a str, Sealed),
}

/// Converts disk `images` (Disk0 first) of an archive of `packed` bytes, each checked first,
/// to raw images sealed in `work` (a new directory inside library directory `library`), told
/// to `watch` as they go; those decoded already are only checked against the same limits.
pub(crate) fn convert_disks(
    images: Vec<Source<'_>>,
    packed: u64,
    work: &Path,
    library: &Path,
    watch: &Watch<'_>,
) -> Result<Vec<Sealed>, OvaError> {
    std::fs::create_dir_all(work).map_err(io_err(format!("creating {}", work.display())))?;
    let mut checked = Vec::new();
    for image in images {
        let image = match image {
            Source::InPlace(image) => image,
            Source::Decoded(name, sealed) => {
                checked.push(Checked::Decoded(name, sealed));
                continue;
            }
        };
        let format = image.probe()?;
        let size = image.inspect(format)?;
        if size % 512 != 0 {
            return refused(format!(
                "{}: {size} bytes is not whole 512-byte sectors",
                image.name
            ));
        }
        checked.push(Checked::InPlace(image, format, size));
    }
    let size_of = |c: &Checked| match c {
        Checked::InPlace(_, _, size) => *size,
        Checked::Decoded(_, sealed) => sealed.size,
    };
    let expanded: u64 = checked.iter().map(size_of).sum();
    if expanded > EXPANSION_FLOOR && expanded / MAX_EXPANSION > packed {
        return refused(format!(
            "its disks expand to {expanded} bytes from an archive of {packed}: more than {MAX_EXPANSION} times"
        ));
    }
    // What is decoded already takes its space.
    let to_convert: u64 = checked
        .iter()
        .filter(|c| matches!(c, Checked::InPlace(..)))
        .map(size_of)
        .sum();
    let free =
        free_bytes(library).map_err(io_err(format!("the free space of {}", library.display())))?;
    if to_convert > free {
        return refused(format!(
            "its disks expand to {expanded} bytes; the library at {} has {free} free",
            library.display()
        ));
    }
    let mut disks = Vec::new();
    let mut before = 0u64;
    (watch.bytes)(0, expanded);
    for (i, c) in checked.into_iter().enumerate() {
        watch.check()?;
        let (image, format, size) = match c {
            Checked::InPlace(image, format, size) => (image, format, size),
            Checked::Decoded(name, sealed) => {
                (watch.step)(format!(
                    "Disk{i} ({name}, {} bytes) was decoded to raw as it arrived",
                    sealed.size
                ));
                before += sealed.size;
                disks.push(sealed);
                (watch.bytes)(before, expanded);
                continue;
            }
        };
        (watch.step)(format!(
            "converting Disk{i} ({}, {size} bytes) to raw",
            format.name()
        ));
        let raw = work.join(format!(".disk{i}.raw.part"));
        let percent = |p: f64| (watch.bytes)(before + (size as f64 * p / 100.0) as u64, expanded);
        qemu_img_watched(
            &[
                "convert".as_ref(),
                "-p".as_ref(),
                "-f".as_ref(),
                format.name().as_ref(),
                "-O".as_ref(),
                "raw".as_ref(),
                image.spec(format).as_ref(),
                raw.as_os_str(),
            ],
            &format!("converting Disk{i}"),
            watch.cancel,
            &percent,
        )
        .map_err(|e| match e {
            // An image whose headers pass but whose tables do not: the archive's fault.
            OvaError::Io { what, source } if source.kind() == io::ErrorKind::Other => {
                OvaError::Refused(format!("{what}: qemu-img cannot read it: {source}"))
            }
            e => e,
        })?;
        watch.check()?;
        (watch.step)(format!("hashing Disk{i}"));
        let sealed = Sealed::adopt(library, Shelf::Image, raw)
            .map_err(io_err(format!("hashing Disk{i}")))?;
        disks.push(sealed);
        before += size;
        (watch.bytes)(before, expanded);
    }
    Ok(disks)
}

/// A disk checked, to convert: in place, its format and size; or decoded already.
enum Checked<'a> {
    InPlace(InPlace<'a>, ImageFormat, u64),
    Decoded(&'a str, Sealed),
}

/// XML text with its special characters escaped.
fn xml_escape(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '&' => "&amp;".to_string(),
            '<' => "&lt;".to_string(),
            '>' => "&gt;".to_string(),
            '"' => "&quot;".to_string(),
            '\'' => "&apos;".to_string(),
            c if (c as u32) < 0x20 && !matches!(c, '\n' | '\t') => " ".to_string(),
            c => c.to_string(),
        })
        .collect()
}

/// The OVF 2.0 descriptor of appliance `a`, its disks in files `disk_files` (of their sizes).
pub fn write_ovf(a: &ApplianceRecord, disk_files: &[(String, u64)]) -> String {
    let mut refs = String::new();
    let mut disks = String::new();
    let mut items = String::new();
    let mut id = 1;
    let mut item = |body: String| {
        items.push_str(&format!(
            "      <Item>\n        <rasd:InstanceID>{id}</rasd:InstanceID>\n{body}      </Item>\n"
        ));
        id += 1;
        id - 1
    };
    item(format!(
        "        <rasd:ElementName>{} virtual CPUs</rasd:ElementName>\n        <rasd:ResourceType>3</rasd:ResourceType>\n        <rasd:VirtualQuantity>{}</rasd:VirtualQuantity>\n",
        a.vcpus, a.vcpus
    ));
    item(format!(
        "        <rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>\n        <rasd:ElementName>{} MB of memory</rasd:ElementName>\n        <rasd:ResourceType>4</rasd:ResourceType>\n        <rasd:VirtualQuantity>{}</rasd:VirtualQuantity>\n",
        a.memory_mib, a.memory_mib
    ));
    let sub = match a.disk_bus {
        DiskBus::Sata => "AHCI",
        DiskBus::Virtio => "virtio",
    };
    let controller = item(format!(
        "        <rasd:ElementName>disk controller</rasd:ElementName>\n        <rasd:ResourceSubType>{sub}</rasd:ResourceSubType>\n        <rasd:ResourceType>20</rasd:ResourceType>\n"
    ));
    for (i, (file, bytes)) in disk_files.iter().enumerate() {
        let size = a.disks.get(i).map_or(0, |d| d.size);
        refs.push_str(&format!(
            "    <File ovf:id=\"file{i}\" ovf:href=\"{}\" ovf:size=\"{bytes}\"/>\n",
            xml_escape(file)
        ));
        disks.push_str(&format!(
            "    <Disk ovf:capacity=\"{size}\" ovf:capacityAllocationUnits=\"byte\" ovf:diskId=\"disk{i}\" ovf:fileRef=\"file{i}\" ovf:format=\"http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized\"/>\n"
        ));
        item(format!(
            "        <rasd:AddressOnParent>{i}</rasd:AddressOnParent>\n        <rasd:ElementName>Disk{i}</rasd:ElementName>\n        <rasd:HostResource>ovf:/disk/disk{i}</rasd:HostResource>\n        <rasd:Parent>{controller}</rasd:Parent>\n        <rasd:ResourceType>17</rasd:ResourceType>\n"
        ));
    }
    for n in 0..a.nics {
        item(format!(
            "        <rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>\n        <rasd:Connection>network</rasd:Connection>\n        <rasd:ElementName>NIC{n}</rasd:ElementName>\n        <rasd:ResourceSubType>virtio</rasd:ResourceSubType>\n        <rasd:ResourceType>10</rasd:ResourceType>\n"
        ));
    }
    let firmware = if a.boot == BootMode::Uefi {
        "      <vmw:Config ovf:required=\"false\" vmw:key=\"firmware\" vmw:value=\"efi\"/>\n"
    } else {
        ""
    };
    let name = xml_escape(&a.name);
    let network = if a.nics > 0 {
        "  <NetworkSection>\n    <Info>The networks the VM's cards are on</Info>\n    <Network ovf:name=\"network\">\n      <Description>The VM's network</Description>\n    </Network>\n  </NetworkSection>\n"
    } else {
        ""
    };
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/2" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/2" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData" xmlns:vmw="http://www.vmware.com/schema/ovf">
  <References>
{refs}  </References>
  <DiskSection>
    <Info>The VM's disks</Info>
{disks}  </DiskSection>
{network}  <VirtualSystem ovf:id="{name}">
    <Info>An EnSpeed Virtual Appliance</Info>
    <Name>{name}</Name>
    <AnnotationSection>
      <Info>What it is</Info>
      <Annotation>{}</Annotation>
    </AnnotationSection>
    <OperatingSystemSection ovf:id="1">
      <Info>Its operating system</Info>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Its hardware</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>{name}</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>vmx-13</vssd:VirtualSystemType>
      </System>
{items}{firmware}    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"#,
        xml_escape(&a.description)
    )
}

/// Writes appliance `a` (its disk images in library directory `library`) as an OVA at `out`:
/// its descriptor, its manifest (SHA-256), its disks as stream-optimized VMDKs, made in
/// `work` (a directory the caller removes). `progress` hears what it is doing.
pub fn export(
    a: &ApplianceRecord,
    library: &Path,
    work: &Path,
    out: &Path,
    progress: &dyn Fn(String),
) -> Result<(), OvaError> {
    std::fs::create_dir_all(work).map_err(io_err(format!("creating {}", work.display())))?;
    let mut files = Vec::new();
    for (i, d) in a.disks.iter().enumerate() {
        let src = crate::library::file(library, Shelf::Image, &d.sha256);
        if !src.exists() {
            return Err(OvaError::Io {
                what: format!("appliance {}'s Disk{i}", a.name),
                source: io::Error::new(io::ErrorKind::NotFound, "not copied to this server yet"),
            });
        }
        let name = format!("{}-disk{i}.vmdk", a.name);
        let vmdk = work.join(&name);
        progress(format!("converting Disk{i} to a stream-optimized VMDK"));
        qemu_img(
            &[
                "convert".as_ref(),
                "-q".as_ref(),
                "-f".as_ref(),
                "raw".as_ref(),
                "-O".as_ref(),
                "vmdk".as_ref(),
                "-o".as_ref(),
                "subformat=streamOptimized".as_ref(),
                src.as_os_str(),
                vmdk.as_os_str(),
            ],
            &format!("converting Disk{i} of appliance {}", a.name),
        )?;
        let bytes = std::fs::metadata(&vmdk).map_err(io_err(&name))?.len();
        files.push((name, vmdk, bytes));
    }
    let listed: Vec<(String, u64)> = files.iter().map(|(n, _, b)| (n.clone(), *b)).collect();
    let ovf_name = format!("{}.ovf", a.name);
    let ovf = write_ovf(a, &listed);
    let ovf_path = work.join(&ovf_name);
    std::fs::write(&ovf_path, &ovf).map_err(io_err(&ovf_name))?;
    let mut mf = String::new();
    for (n, p) in
        std::iter::once((&ovf_name, &ovf_path)).chain(files.iter().map(|(n, p, _)| (n, p)))
    {
        let d = digest_file(p, DigestKind::Sha256).map_err(io_err(format!("hashing {n}")))?;
        mf.push_str(&format!("SHA256({n})= {d}\n"));
    }
    let mf_name = format!("{}.mf", a.name);
    let mf_path = work.join(&mf_name);
    std::fs::write(&mf_path, mf).map_err(io_err(&mf_name))?;
    progress("writing the archive".into());
    let file = File::create(out).map_err(io_err(format!("creating {}", out.display())))?;
    let mut tar = tar::Builder::new(io::BufWriter::with_capacity(1 << 20, file));
    let mtime = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // The descriptor first, as OVF asks; then the manifest; then the disks in order.
    let order = [(ovf_name, ovf_path), (mf_name, mf_path)]
        .into_iter()
        .chain(files.into_iter().map(|(n, p, _)| (n, p)));
    for (name, path) in order {
        let mut f = File::open(&path).map_err(io_err(&name))?;
        let len = f.metadata().map_err(io_err(&name))?.len();
        let mut h = tar::Header::new_ustar();
        h.set_size(len);
        h.set_mode(0o644);
        h.set_mtime(mtime);
        h.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut h, &name, &mut f)
            .map_err(io_err(format!("adding {name} to the archive")))?;
    }
    let mut w = tar.into_inner().map_err(io_err("finishing the archive"))?;
    w.flush().map_err(io_err("writing the archive"))?;
    w.get_ref()
        .sync_all()
        .map_err(io_err("writing the archive"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const VBOX: &str = r#"<?xml version="1.0"?>
<Envelope ovf:version="1.0" xml:lang="en-US" xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vbox="http://www.virtualbox.org/ovf/machine">
  <References>
    <File ovf:id="file1" ovf:href="web-disk001.vmdk"/>
    <File ovf:id="file2" ovf:href="web-disk002.vmdk"/>
  </References>
  <DiskSection>
    <Info>List of the virtual disks used in the package</Info>
    <Disk ovf:capacity="2" ovf:capacityAllocationUnits="byte * 2^30" ovf:diskId="vmdisk2" ovf:fileRef="file2" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
    <Disk ovf:capacity="10737418240" ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <VirtualSystem ovf:id="web">
    <Info>A virtual machine</Info>
    <AnnotationSection><Annotation>A web server &amp; its database</Annotation></AnnotationSection>
    <VirtualHardwareSection>
      <Item><rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>2</rasd:VirtualQuantity></Item>
      <Item><rasd:AllocationUnits>MegaBytes</rasd:AllocationUnits><rasd:ResourceType>4</rasd:ResourceType><rasd:VirtualQuantity>1024</rasd:VirtualQuantity></Item>
      <Item><rasd:InstanceID>5</rasd:InstanceID><rasd:ResourceSubType>AHCI</rasd:ResourceSubType><rasd:ResourceType>20</rasd:ResourceType></Item>
      <Item><rasd:ResourceType>10</rasd:ResourceType></Item>
      <Item><rasd:HostResource>/disk/vmdisk1</rasd:HostResource><rasd:Parent>5</rasd:Parent><rasd:ResourceType>17</rasd:ResourceType></Item>
      <Item><rasd:HostResource>/disk/vmdisk2</rasd:HostResource><rasd:Parent>5</rasd:Parent><rasd:ResourceType>17</rasd:ResourceType></Item>
    </VirtualHardwareSection>
    <vbox:Machine><Hardware><Firmware type="EFI"/></Hardware></vbox:Machine>
  </VirtualSystem>
</Envelope>"#;

    #[test]
    fn a_virtualbox_descriptor_is_read() {
        let d = parse_ovf(VBOX).unwrap();
        assert_eq!(d.name, "web");
        assert_eq!(d.description, "A web server & its database");
        assert_eq!((d.memory_mib, d.vcpus, d.nics), (1024, 2, 1));
        assert_eq!((d.boot, d.disk_bus), (BootMode::Uefi, DiskBus::Sata));
        // In the order the hardware attaches them, not the DiskSection's.
        let files: Vec<(&str, u64)> = d
            .disks
            .iter()
            .map(|d| (d.file.as_str(), d.capacity))
            .collect();
        assert_eq!(
            files,
            [
                ("web-disk001.vmdk", 10 << 30),
                ("web-disk002.vmdk", 2 << 30)
            ]
        );
    }

    #[test]
    fn hostile_descriptors_are_refused_with_a_reason() {
        let refused = |xml: &str| match parse_ovf(xml) {
            Err(OvaError::Refused(why)) => why,
            other => panic!("{xml:.60}: {other:?}"),
        };
        // Entity expansion: a DTD is never read.
        let laughs = r#"<?xml version="1.0"?><!DOCTYPE Envelope [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;"><!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">]><Envelope>&c;</Envelope>"#;
        assert!(refused(laughs).contains("not XML we read"));
        let external = r#"<?xml version="1.0"?><!DOCTYPE Envelope [<!ENTITY x SYSTEM "file:///etc/passwd">]><Envelope>&x;</Envelope>"#;
        assert!(refused(external).contains("not XML we read"));
        // Too many nodes.
        let many = format!(
            "<Envelope>{}</Envelope>",
            "<a/>".repeat(MAX_XML_NODES as usize + 1)
        );
        assert!(refused(&many).contains("not XML we read"));
        assert!(refused("<html/>").contains("Envelope"));
        assert!(
            refused("<Envelope><VirtualSystem/><VirtualSystem/></Envelope>")
                .contains("2 virtual systems")
        );
        let no_memory = VBOX.replace(
            "<rasd:ResourceType>4</rasd:ResourceType>",
            "<rasd:ResourceType>99</rasd:ResourceType>",
        );
        assert!(refused(&no_memory).contains("no memory"));
        let dangling = VBOX.replace("ovf:fileRef=\"file2\"", "ovf:fileRef=\"file9\"");
        assert!(refused(&dangling).contains("file9"));
        let huge = VBOX.replace(
            "ovf:capacity=\"2\"",
            "ovf:capacity=\"99999999999999999999\"",
        );
        assert!(refused(&huge).contains("capacity"));
        let twice = VBOX.replace("ovf:fileRef=\"file2\"", "ovf:fileRef=\"file1\"");
        assert!(refused(&twice).contains("another disk names too"));
    }

    #[test]
    fn manifests_are_read_and_bad_lines_refused() {
        let sha = "ab".repeat(32);
        let m = parse_manifest(&format!(
            "SHA256(a.ovf)= {sha}\nSHA1 (b.vmdk) = {}\n",
            "cd".repeat(20)
        ))
        .unwrap();
        assert_eq!(m["a.ovf"], (DigestKind::Sha256, sha.clone()));
        assert_eq!(m["b.vmdk"].0, DigestKind::Sha1);
        for bad in [
            "MD5(a)= 00".to_string(),
            format!("SHA256(a.ovf) {sha}"),
            "SHA256(a.ovf)= zz".to_string(),
            format!("SHA256(a)= {sha}\nSHA256(a)= {sha}"),
        ] {
            assert!(
                matches!(parse_manifest(&bad), Err(OvaError::Refused(_))),
                "{bad}"
            );
        }
    }

    /// A tar of `entries` (name, bytes) in order, as `tar` writes one.
    fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, bytes) in entries {
            let mut h = tar::Header::new_ustar();
            h.set_size(bytes.len() as u64);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            b.append_data(&mut h, name, *bytes).unwrap();
        }
        b.into_inner().unwrap()
    }

    /// Disk `raw` written in `dir`, as qemu-img makes it a stream-optimized VMDK, and a
    /// descriptor of one disk, `d.vmdk`: the raw file's path, the VMDK, the descriptor.
    fn stream_disk(dir: &Path, raw: &[u8]) -> (std::path::PathBuf, Vec<u8>, String) {
        let raw_path = dir.join("disk.raw");
        std::fs::write(&raw_path, raw).unwrap();
        let vmdk = crate::vmdk::stream_of(&raw_path);
        let ovf = VBOX
            .replace(r#"<File ovf:id="file2" ovf:href="web-disk002.vmdk"/>"#, "")
            .replace(r#"ovf:href="web-disk001.vmdk""#, r#"ovf:href="d.vmdk""#)
            .lines()
            .filter(|l| !l.contains("vmdisk2"))
            .collect::<Vec<_>>()
            .join("\n");
        (raw_path, vmdk, ovf)
    }

    /// A stream-optimized VMDK decoded as its archive arrives is the image qemu-img makes of
    /// it in place: the same hash either way, and the library holds it sealed.
    #[test]
    fn a_stream_optimized_disk_is_decoded_as_it_arrives_into_what_qemu_img_makes() {
        let dir = std::env::temp_dir().join(format!("ova-unpack-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let library = dir.join("library");
        std::fs::create_dir_all(&library).unwrap();
        let mut raw = vec![0u8; 3 << 20];
        for (i, b) in raw[..1 << 20].iter_mut().enumerate() {
            *b = (i % 253) as u8;
        }
        raw[(2 << 20) + 17] = 1;
        let (raw_path, vmdk, ovf) = stream_disk(&dir, &raw);
        let ova = tar_of(&[("a.ovf", ovf.as_bytes()), ("d.vmdk", &vmdk)]);
        let archive = dir.join("a.ova");
        std::fs::write(&archive, &ova).unwrap();
        let want = crate::library::hash_file(&raw_path, Shelf::Image)
            .unwrap()
            .0;
        let cancel = std::sync::atomic::AtomicBool::new(false);
        let watch = Watch {
            step: &|_| {},
            bytes: &|_, _| {},
            cancel: &cancel,
        };
        let work = dir.join("work");
        std::fs::create_dir_all(&work).unwrap();
        let unpack = Unpack {
            work: work.clone(),
            library: library.clone(),
            archive: None,
        };
        // Decoded as it arrives, in small pieces: the import converts nothing.
        let s = scan(
            io::BufReader::with_capacity(1000, &ova[..]),
            ova.len() as u64,
            Some(&unpack),
        )
        .unwrap();
        assert_eq!(s.unpacked.keys().collect::<Vec<_>>(), ["d.vmdk"]);
        let decoded = import(&archive, s, &work.join("disks"), &library, &watch).unwrap();
        assert_eq!(decoded.disks.len(), 1);
        assert_eq!(decoded.disks[0].sha256, want);
        assert_eq!(decoded.disks[0].size, raw.len() as u64);
        assert_eq!(std::fs::read(decoded.disks[0].path()).unwrap(), raw);
        // Not decoded (no `unpack`): qemu-img converts it in place, to the same image.
        let s = scan(&ova[..], ova.len() as u64, None).unwrap();
        assert!(s.unpacked.is_empty());
        let converted = import(&archive, s, &work.join("disks2"), &library, &watch).unwrap();
        assert_eq!(converted.disks[0].sha256, want);
        // A damaged grain: left to qemu-img, which refuses it.
        let mut bad = vmdk.clone();
        bad[70_000..70_100].fill(0x55);
        let ova = tar_of(&[("a.ovf", ovf.as_bytes()), ("d.vmdk", &bad)]);
        std::fs::write(&archive, &ova).unwrap();
        let s = scan(&ova[..], ova.len() as u64, Some(&unpack)).unwrap();
        assert!(s.unpacked.is_empty());
        match import(&archive, s, &work.join("disks3"), &library, &watch) {
            Err(OvaError::Refused(why)) => assert!(why.contains("qemu-img"), "{why}"),
            other => panic!("a damaged grain imported: {:?}", other.map(|i| i.disks)),
        }
        drop((decoded, converted));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// An archive being written to a file has its decoded grains dropped from that file as
    /// they are decoded; a damaged grain after that refuses the archive (qemu-img could no
    /// longer read it in place).
    #[test]
    fn decoded_bytes_leave_the_archive_s_file() {
        let dir = std::env::temp_dir().join(format!("ova-punch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let library = dir.join("library");
        std::fs::create_dir_all(&library).unwrap();
        // 40 MiB that do not compress.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let raw: Vec<u8> = (0..40u64 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let (raw_path, vmdk, ovf) = stream_disk(&dir, &raw);
        let want = crate::library::hash_file(&raw_path, Shelf::Image)
            .unwrap()
            .0;
        let cancel = std::sync::atomic::AtomicBool::new(false);
        let watch = Watch {
            step: &|_| {},
            bytes: &|_, _| {},
            cancel: &cancel,
        };
        let work = dir.join("work");
        std::fs::create_dir_all(&work).unwrap();
        let archive = dir.join("a.ova");
        let unpack = Unpack {
            work: work.clone(),
            library: library.clone(),
            archive: Some(archive.clone()),
        };
        let blocks =
            |p: &Path| std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(p).unwrap()) * 512;
        // The archive written whole to its file first: `scan` reads only what is written. The
        // descriptor names d.vmdk alone: extra.vmdk, the same VMDK again, is no disk of it.
        let notes: Vec<u8> = (0..5000u32).map(|i| (i % 241) as u8).collect();
        let ova = tar_of(&[
            ("a.ovf", ovf.as_bytes()),
            ("d.vmdk", &vmdk),
            ("notes.txt", &notes),
            ("extra.vmdk", &vmdk),
        ]);
        std::fs::write(&archive, &ova).unwrap();
        File::open(&archive).unwrap().sync_all().unwrap();
        let s = scan(&ova[..], ova.len() as u64, Some(&unpack)).unwrap();
        assert_eq!(s.unpacked.keys().collect::<Vec<_>>(), ["d.vmdk"]);
        let held = blocks(&archive);
        assert!(
            held < (ova.len() - vmdk.len()) as u64 + (1 << 20),
            "{held} of {} bytes still held",
            ova.len()
        );
        assert_eq!(std::fs::metadata(&archive).unwrap().len(), ova.len() as u64);
        // What lies before and after the decoded entry is untouched.
        let kept = std::fs::read(&archive).unwrap();
        let d = &s.entries["d.vmdk"];
        assert!(kept[..d.offset as usize] == ova[..d.offset as usize]);
        let after = (d.offset + d.size).next_multiple_of(4096) as usize;
        assert!(kept[after..] == ova[after..], "bytes after d.vmdk dropped");
        let decoded = import(&archive, s, &work.join("disks"), &library, &watch).unwrap();
        assert_eq!(decoded.disks[0].sha256, want);
        // A grain damaged past the first holes: refused, naming the VMDK.
        let mut bad = vmdk.clone();
        let at = vmdk.len() - (4 << 20);
        bad[at..at + 4096].fill(0x55);
        let ova = tar_of(&[("a.ovf", ovf.as_bytes()), ("d.vmdk", &bad)]);
        std::fs::write(&archive, &ova).unwrap();
        match scan(&ova[..], ova.len() as u64, Some(&unpack)) {
            Err(OvaError::Refused(why)) => assert!(
                why.contains("d.vmdk, a stream-optimized VMDK read in order"),
                "{why}"
            ),
            other => panic!("a damaged grain scanned: {:?}", other.map(|s| s.unpacked)),
        }
        // Doubted before its first grain (its descriptor names a parent): nothing is dropped,
        // and qemu-img is left to read it in place.
        let parent = crate::vmdk::with_parent(&vmdk);
        let ova = tar_of(&[("a.ovf", ovf.as_bytes()), ("d.vmdk", &parent)]);
        std::fs::write(&archive, &ova).unwrap();
        File::open(&archive).unwrap().sync_all().unwrap();
        let s = scan(&ova[..], ova.len() as u64, Some(&unpack)).unwrap();
        assert!(s.unpacked.is_empty());
        assert!(std::fs::read(&archive).unwrap() == ova);
        assert!(blocks(&archive) >= ova.len() as u64 / 4096 * 4096);
        drop(decoded);
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn sha256_hex(b: &[u8]) -> String {
        hex(&sha2::Sha256::digest(b))
    }

    #[test]
    fn an_archive_is_read_once_where_its_entries_lie_and_hashed_as_its_manifest_asks() {
        let disk: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mf = format!(
            "SHA256(a.ovf)= {}\nSHA256(a.raw)= {}\n",
            sha256_hex(VBOX.as_bytes()),
            sha256_hex(&disk)
        );
        let other = b"not listed".to_vec();
        let ova = tar_of(&[
            ("a.ovf", VBOX.as_bytes()),
            ("a.mf", mf.as_bytes()),
            ("a.raw", &disk),
            ("notes.txt", &other),
        ]);
        // Read in small pieces, as an upload arrives.
        let s = scan(
            io::BufReader::with_capacity(1000, &ova[..]),
            ova.len() as u64,
            None,
        )
        .unwrap();
        assert_eq!((s.ovf.as_str(), s.descriptor.as_str()), ("a.ovf", VBOX));
        assert_eq!(s.manifest.as_ref().map(|m| m.1.as_str()), Some(mf.as_str()));
        let e = &s.entries["a.raw"];
        let at = e.offset as usize;
        assert_eq!(&ova[at..at + e.size as usize], &disk[..]);
        // The manifest came first: only the digest it names was computed.
        assert_eq!(
            e.digest(DigestKind::Sha256),
            Some(sha256_hex(&disk).as_str())
        );
        assert_eq!(e.digest(DigestKind::Sha1), None);
        assert_eq!(s.entries["notes.txt"].digest(DigestKind::Sha256), None);
        check_manifest(&s, &[]).unwrap();

        // A manifest after the disks: both digests of every entry before it.
        let late = tar_of(&[
            ("a.ovf", VBOX.as_bytes()),
            ("a.raw", &disk),
            ("a.mf", mf.as_bytes()),
        ]);
        let s = scan(&late[..], late.len() as u64, None).unwrap();
        let e = &s.entries["a.raw"];
        assert!(e.digest(DigestKind::Sha1).is_some() && e.digest(DigestKind::Sha256).is_some());
        check_manifest(&s, &[]).unwrap();

        // One byte of the disk changed: the manifest refuses it.
        let mut bad = ova.clone();
        bad[at + 7] ^= 1;
        let s = scan(&bad[..], bad.len() as u64, None).unwrap();
        match check_manifest(&s, &[]) {
            Err(OvaError::Refused(why)) => assert!(why.contains("a.raw does not match"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn hostile_archives_are_refused_as_they_arrive() {
        let refused = |bytes: &[u8], packed: u64| match scan(bytes, packed, None) {
            Err(OvaError::Refused(why)) => why,
            other => panic!("{other:?}"),
        };
        let ovf = VBOX.as_bytes();
        assert!(refused(b"PK\x03\x04 a zip", 12).contains("not a tar"));
        let ova = tar_of(&[("a.ovf", ovf), ("d.raw", &[7u8; 5000])]);
        // Cut short: its last entry lacks bytes.
        assert!(refused(&ova[..1536], ova.len() as u64).contains("cut short"));
        // An entry larger than the whole upload says it is.
        assert!(refused(&ova, 2000).contains("more than the archive's"));
        assert!(refused(&tar_of(&[("d.raw", b"x")]), 2048).contains("no .ovf"));
        let two = tar_of(&[("a.ovf", ovf), ("b.ovf", ovf)]);
        assert!(refused(&two, two.len() as u64).contains("more than one .ovf"));
        let twice = tar_of(&[("a.ovf", ovf), ("a.ovf", ovf)]);
        assert!(refused(&twice, twice.len() as u64).contains("comes twice"));
        let hidden = tar_of(&[("a.ovf", ovf), (".x", b"x")]);
        assert!(refused(&hidden, hidden.len() as u64).contains("hidden"));
        let bad_mf = tar_of(&[("a.ovf", ovf), ("a.mf", b"MD5(a.ovf)= 00")]);
        assert!(refused(&bad_mf, bad_mf.len() as u64).contains("manifest"));
        let big = vec![b' '; MAX_OVF_BYTES as usize + 1];
        let huge = tar_of(&[("a.ovf", &big)]);
        assert!(refused(&huge, huge.len() as u64).contains("at most"));
        // `..` and absolute names: the header is written by hand (tar's builder refuses them).
        for name in ["../evil.ovf", "/etc/evil.ovf", "dir/a.ovf"] {
            let mut h = tar::Header::new_ustar();
            h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            h.set_size(1);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            h.set_cksum();
            let mut bytes = h.as_bytes().to_vec();
            bytes.extend_from_slice(&[b'x'; 512]);
            bytes.extend_from_slice(&[0; 1024]);
            assert!(
                refused(&bytes, bytes.len() as u64).contains("only plain file names"),
                "{name}"
            );
        }
    }

    #[test]
    fn units_are_read() {
        assert_eq!(unit_bytes("byte * 2^20"), Some(1 << 20));
        assert_eq!(unit_bytes("byte*2^30"), Some(1 << 30));
        assert_eq!(unit_bytes("MegaBytes"), Some(1 << 20));
        assert_eq!(unit_bytes("byte * 2^99"), None);
        assert_eq!(unit_bytes("furlongs"), None);
    }
}
