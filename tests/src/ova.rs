//! OVA archives made by tests, as other vendors' tools make them (and as attackers would):
//! disk images converted by qemu-img, an OVF descriptor, a manifest, written into a tar whose
//! entry names are taken as given.

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// A tar archive of `entries` (name, bytes), in order: a ustar header each (the name written
/// as given, `..` and `/` included), the bytes padded to 512, two zero blocks at the end.
pub fn tar(entries: &[(&str, &[u8])]) -> Vec<u8> {
    tar_typed(
        &entries
            .iter()
            .map(|(n, b)| (*n, *b, b'0'))
            .collect::<Vec<_>>(),
    )
}

/// A ustar header for an entry `name` of `len` bytes and type `kind` (`b'0'` a file, `b'2'`
/// a symbolic link to /etc/passwd), the name written as given.
fn tar_header(name: &str, len: u64, kind: u8) -> [u8; 512] {
    let mut h = [0u8; 512];
    assert!(name.len() < 100, "a short name: {name}");
    h[..name.len()].copy_from_slice(name.as_bytes());
    let octal = |h: &mut [u8; 512], at: usize, width: usize, v: u64| {
        let s = format!("{v:0w$o}\0", w = width - 1);
        h[at..at + width].copy_from_slice(s.as_bytes());
    };
    octal(&mut h, 100, 8, 0o644);
    octal(&mut h, 108, 8, 0);
    octal(&mut h, 116, 8, 0);
    octal(&mut h, 124, 12, len);
    octal(&mut h, 136, 12, 1_700_000_000);
    h[156] = kind;
    if kind == b'2' {
        h[157..157 + 11].copy_from_slice(b"/etc/passwd");
    }
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    h
}

/// As `tar`, with each entry's type flag (`b'0'` a file, `b'2'` a symbolic link, ...).
pub fn tar_typed(entries: &[(&str, &[u8], u8)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, bytes, kind) in entries {
        out.extend_from_slice(&tar_header(name, bytes.len() as u64, *kind));
        out.extend_from_slice(bytes);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

/// Writes a tar archive of files `entries` (name, path) to `out`, streamed (for archives too
/// large to hold in memory).
pub fn tar_files(out: &Path, entries: &[(&str, &Path)]) -> std::io::Result<()> {
    use std::io::Write;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(out)?);
    for (name, path) in entries {
        let len = std::fs::metadata(path)?.len();
        w.write_all(&tar_header(name, len, b'0'))?;
        std::io::copy(&mut std::fs::File::open(path)?, &mut w)?;
        let pad = (512 - len % 512) % 512;
        w.write_all(&vec![0u8; pad as usize])?;
    }
    w.write_all(&[0u8; 1024])?;
    w.flush()
}

/// Raw image `raw` converted by qemu-img into `format` (`qcow2`, `vmdk` stream-optimized as
/// OVAs carry it, or `raw`), in `dir`.
pub fn convert(raw: &Path, format: &str, dir: &Path) -> PathBuf {
    let out = dir.join(format!("converted.{format}"));
    let mut cmd = Command::new("qemu-img");
    cmd.args(["convert", "-q", "-f", "raw", "-O", format]);
    if format == "vmdk" {
        cmd.args(["-o", "subformat=streamOptimized"]);
    }
    let st = cmd
        .arg(raw)
        .arg(&out)
        .status()
        .expect("run qemu-img (qemu-utils)");
    assert!(st.success(), "qemu-img convert to {format}");
    out
}

/// An OVF 1.0 descriptor as VirtualBox writes one: a VM of `memory_mib` and `vcpus` with
/// `nics` cards, on an AHCI controller, with a disk in each of `disks` (file, capacity).
pub fn ovf(name: &str, memory_mib: u64, vcpus: u32, nics: u32, disks: &[(&str, u64)]) -> String {
    let mut refs = String::new();
    let mut section = String::new();
    let mut items = String::new();
    for (i, (file, capacity)) in disks.iter().enumerate() {
        refs += &format!("    <File ovf:id=\"file{i}\" ovf:href=\"{file}\"/>\n");
        section += &format!(
            "    <Disk ovf:capacity=\"{capacity}\" ovf:diskId=\"vmdisk{i}\" ovf:fileRef=\"file{i}\" ovf:format=\"http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized\"/>\n"
        );
        items += &format!(
            "      <Item><rasd:HostResource>/disk/vmdisk{i}</rasd:HostResource><rasd:Parent>5</rasd:Parent><rasd:ResourceType>17</rasd:ResourceType></Item>\n"
        );
    }
    for _ in 0..nics {
        items += "      <Item><rasd:ResourceSubType>E1000</rasd:ResourceSubType><rasd:ResourceType>10</rasd:ResourceType></Item>\n";
    }
    format!(
        r#"<?xml version="1.0"?>
<Envelope ovf:version="1.0" xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData">
  <References>
{refs}  </References>
  <DiskSection>
    <Info>List of the virtual disks used in the package</Info>
{section}  </DiskSection>
  <VirtualSystem ovf:id="{name}">
    <Info>A virtual machine</Info>
    <AnnotationSection><Annotation>{name}, made by a test</Annotation></AnnotationSection>
    <VirtualHardwareSection>
      <Item><rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>{vcpus}</rasd:VirtualQuantity></Item>
      <Item><rasd:AllocationUnits>MegaBytes</rasd:AllocationUnits><rasd:ResourceType>4</rasd:ResourceType><rasd:VirtualQuantity>{memory_mib}</rasd:VirtualQuantity></Item>
      <Item><rasd:InstanceID>5</rasd:InstanceID><rasd:ResourceSubType>AHCI</rasd:ResourceSubType><rasd:ResourceType>20</rasd:ResourceType></Item>
{items}    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"#
    )
}

/// A manifest of `entries` (name, bytes): `SHA256(name)= hex` lines.
pub fn manifest(entries: &[(&str, &[u8])]) -> String {
    entries
        .iter()
        .map(|(n, b)| {
            let d: String = Sha256::digest(b)
                .iter()
                .map(|x| format!("{x:02x}"))
                .collect();
            format!("SHA256({n})= {d}\n")
        })
        .collect()
}

/// An OVA of one VM (`name`, 128 MiB, 1 vCPU) whose one disk is raw image `raw` in `format`
/// (made in `dir`), with a SHA-256 manifest when `with_manifest`.
pub fn one_disk(name: &str, raw: &Path, format: &str, dir: &Path, with_manifest: bool) -> Vec<u8> {
    let disk = std::fs::read(convert(raw, format, dir)).expect("read the converted disk");
    let capacity = std::fs::metadata(raw).expect("the raw image").len();
    let file = format!("{name}-disk1.{format}");
    let ovf = ovf(name, 128, 1, 0, &[(&file, capacity)]);
    let ovf_name = format!("{name}.ovf");
    let mut entries: Vec<(&str, &[u8])> = vec![(&ovf_name, ovf.as_bytes())];
    let mf = manifest(&[(&ovf_name, ovf.as_bytes()), (&file, &disk)]);
    let mf_name = format!("{name}.mf");
    if with_manifest {
        entries.push((&mf_name, mf.as_bytes()));
    }
    entries.push((&file, &disk));
    tar(&entries)
}

/// A zip of `entries` (name, bytes, stored rather than deflated), as Python's zipfile writes
/// one (any name, `..` too), made in directory `dir`.
pub fn zip(dir: &Path, entries: &[(&str, &[u8], bool)]) -> Vec<u8> {
    let mut listed = Vec::new();
    for (i, (name, bytes, stored)) in entries.iter().enumerate() {
        let part = dir.join(format!("zip-part-{i}"));
        std::fs::write(&part, bytes).expect("write a zip part");
        listed.push(serde_json::json!([name, part, stored]));
    }
    let out = dir.join("made.zip");
    let script = "import json, sys, zipfile\n\
        out, entries = sys.argv[1], json.loads(sys.argv[2])\n\
        with zipfile.ZipFile(out, 'w') as z:\n\
        \x20   for name, part, stored in entries:\n\
        \x20       how = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED\n\
        \x20       z.writestr(zipfile.ZipInfo(name), open(part, 'rb').read(), compress_type=how)\n";
    let st = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(&out)
        .arg(serde_json::Value::from(listed).to_string())
        .status()
        .expect("run python3");
    assert!(st.success(), "python3 zipfile");
    std::fs::read(&out).expect("read the zip")
}
