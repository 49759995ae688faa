//! The original product's Virtual Appliance: a zip of the disk images and a descriptive XML
//! (`appliance.xml`), read into the library with the same checks and conversion as an OVA
//! (`ova::convert_disks`).
//!
//! The XML is one element:
//!
//! ```xml
//! <VirtualAppliance name="drupal" memory="512" vcpus="1" firmware="bios" disk-bus="sata" nics="1">
//!   <Description>Drupal on CentOS 5</Description>
//!   <Disk file="drupal-disk0.img"/>
//! </VirtualAppliance>
//! ```
//!
//! `memory` in MiB; `firmware` `bios` (the default) or `uefi`; `disk-bus` `sata` (the default)
//! or `virtio`; `nics` 0 to 8 (default 1); one to four `Disk`s, Disk0 first, each a file of the
//! zip holding a raw, qcow2 or single-file VMDK image.
//!
//! Everything in the zip is untrusted, as in an OVA: at most `ova::MAX_ENTRIES` entries, plain
//! file names at its top, stored or deflated (nothing encrypted), each read through the zip's
//! CRC-32; the XML without a DTD, at most `ova::MAX_OVF_BYTES`; what the disks expand to
//! bounded like an OVA's. A stored image is converted where it lies in the zip; a deflated one
//! is inflated into the work directory first, no further than its stated size.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use crate::ova::{
    self, io_err, refused, Descriptor, Entry, Imported, InPlace, OvaError, OvfDisk, MAX_ENTRIES,
    MAX_OVF_BYTES,
};
use crate::state_machine::{BootMode, DiskBus, MAX_VM_DISKS, MAX_VM_NICS};

/// The descriptive XML's name in the zip.
pub const XML_NAME: &str = "appliance.xml";

/// Whether an archive's first bytes are a zip's.
pub fn is_zip(head: &[u8]) -> bool {
    head.starts_with(b"PK\x03\x04")
}

/// Reads the appliance's XML.
pub fn parse_xml(xml: &str) -> Result<Descriptor, OvaError> {
    let doc = ova::xml_document(xml, XML_NAME, "VirtualAppliance")?;
    let root = doc.root_element();
    let number = |name: &str, default: Option<u64>, most: u64| -> Result<u64, OvaError> {
        match (root.attribute(name), default) {
            (None, Some(d)) => Ok(d),
            (None, None) => refused(format!("{XML_NAME} gives no {name}")),
            (Some(v), _) => match v.trim().parse::<u64>() {
                Ok(n) if n <= most => Ok(n),
                _ => refused(format!(
                    "{XML_NAME}: {name}={v:.40?}: a number, at most {most}"
                )),
            },
        }
    };
    let memory_mib = number("memory", None, crate::state_machine::MAX_VM_MEMORY_MIB)?;
    let vcpus = number("vcpus", Some(1), 255)? as u32;
    let nics = number("nics", Some(1), MAX_VM_NICS as u64)? as u32;
    if memory_mib == 0 || vcpus == 0 {
        return refused(format!("{XML_NAME}: no memory or no vCPU"));
    }
    let boot = match root.attribute("firmware").unwrap_or("bios") {
        "bios" => BootMode::Bios,
        "uefi" => BootMode::Uefi,
        other => return refused(format!("{XML_NAME}: firmware={other:.20?}: bios or uefi")),
    };
    let disk_bus = match root.attribute("disk-bus").unwrap_or("sata") {
        "sata" => DiskBus::Sata,
        "virtio" => DiskBus::Virtio,
        other => return refused(format!("{XML_NAME}: disk-bus={other:.20?}: sata or virtio")),
    };
    let description = root
        .children()
        .find(|n| n.has_tag_name("Description"))
        .and_then(|n| n.text())
        .unwrap_or_default()
        .trim()
        .to_string();
    let mut disks = Vec::new();
    for d in root.children().filter(|n| n.has_tag_name("Disk")) {
        let file = d
            .attribute("file")
            .ok_or_else(|| OvaError::Refused(format!("{XML_NAME}: a <Disk> without a file")))?;
        if disks.iter().any(|o: &OvfDisk| o.file == file) {
            return refused(format!("{XML_NAME}: two disks name {file:.64?}"));
        }
        disks.push(OvfDisk {
            file: file.to_string(),
            capacity: 0,
        });
    }
    if disks.is_empty() || disks.len() > MAX_VM_DISKS {
        return refused(format!(
            "{XML_NAME} names {} disks: 1 to {MAX_VM_DISKS}",
            disks.len()
        ));
    }
    Ok(Descriptor {
        name: root.attribute("name").unwrap_or_default().to_string(),
        description,
        memory_mib,
        vcpus,
        nics,
        boot,
        disk_bus,
        disks,
    })
}

/// An entry of the zip: its index, whether it is stored (not compressed), where its bytes
/// lie, its size.
struct ZipEntry {
    index: usize,
    stored: bool,
    entry: Entry,
}

/// Imports the zip `archive`: checks its entries and XML, reads every disk through the zip's
/// CRC-32, inflates a compressed one into `work` (a new directory inside library directory
/// `library`, removed by the caller), and converts each to a raw image sealed there.
pub fn import(
    archive: &Path,
    work: &Path,
    library: &Path,
    watch: &ova::Watch<'_>,
) -> Result<Imported, OvaError> {
    let f = File::open(archive).map_err(io_err(format!("opening {}", archive.display())))?;
    let packed = f.metadata().map_err(io_err("the archive"))?.len();
    let bad = |e: zip::result::ZipError| OvaError::Refused(format!("not a zip we read: {e}"));
    let mut z = zip::ZipArchive::new(f).map_err(bad)?;
    if z.len() > MAX_ENTRIES {
        return refused(format!("the zip has more than {MAX_ENTRIES} entries"));
    }
    let mut entries: BTreeMap<String, ZipEntry> = BTreeMap::new();
    for index in 0..z.len() {
        let e = z.by_index_raw(index).map_err(bad)?;
        let name = e.name().to_string();
        let plain = !name.is_empty()
            && !name.contains(['/', '\\'])
            && !name.starts_with('.')
            && !name.contains('\0');
        if !plain || e.is_dir() {
            return refused(format!(
                "zip entry {name:.64?}: only plain files, at the zip's top"
            ));
        }
        if e.encrypted() {
            return refused(format!("zip entry {name:.64?} is encrypted"));
        }
        let stored = match e.compression() {
            zip::CompressionMethod::Stored => true,
            zip::CompressionMethod::Deflated => false,
            other => {
                return refused(format!(
                    "zip entry {name:.64?} is compressed with {other:?}: stored or deflated only"
                ))
            }
        };
        if stored && e.data_start() + e.size() > packed {
            return refused(format!("zip entry {name:.64?} lies past the zip's end"));
        }
        let z_entry = ZipEntry {
            index,
            stored,
            entry: Entry::at(e.data_start(), e.size()),
        };
        if entries.insert(name.clone(), z_entry).is_some() {
            return refused(format!("zip entry {name:.64?} comes twice"));
        }
    }
    let xml = entries
        .get(XML_NAME)
        .ok_or_else(|| OvaError::Refused(format!("the zip has no {XML_NAME}")))?;
    let mut text = String::new();
    z.by_index(xml.index)
        .map_err(bad)?
        .take(MAX_OVF_BYTES + 1)
        .read_to_string(&mut text)
        .or_else(|e| refused(format!("{XML_NAME}: {e}")))?;
    if text.len() as u64 > MAX_OVF_BYTES {
        return refused(format!("{XML_NAME}: more than {MAX_OVF_BYTES} bytes"));
    }
    let descriptor = parse_xml(&text)?;

    std::fs::create_dir_all(work).map_err(io_err(format!("creating {}", work.display())))?;
    // Each disk read whole through the zip (its CRC-32 checked at its end); a deflated one
    // kept, inflated, in the work directory.
    let mut inflated: Vec<(usize, PathBuf, Entry)> = Vec::new();
    let mut stated = 0u64;
    for (i, d) in descriptor.disks.iter().enumerate() {
        let e = entries.get(&d.file).ok_or_else(|| {
            OvaError::Refused(format!("Disk{i}'s image {} is not in the zip", d.file))
        })?;
        stated += e.entry.size;
        if stated > ova::EXPANSION_FLOOR && stated / ova::MAX_EXPANSION > packed {
            return refused(format!(
                "its disks' files are {stated} bytes inflated, from a zip of {packed}: more than {} times",
                ova::MAX_EXPANSION
            ));
        }
        if watch.cancel.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(OvaError::Cancelled);
        }
        (watch.step)(format!("checking Disk{i} ({})", d.file));
        let mut r = z.by_index(e.index).map_err(bad)?;
        let mut out: Box<dyn io::Write> = if e.stored {
            Box::new(io::sink())
        } else {
            let path = work.join(format!(".zdisk{i}"));
            let f = File::create(&path).map_err(io_err(format!("creating {}", path.display())))?;
            inflated.push((i, path, Entry::at(0, e.entry.size)));
            Box::new(io::BufWriter::with_capacity(1 << 20, f))
        };
        let copied = io::copy(&mut (&mut r).take(e.entry.size + 1), &mut out).or_else(|err| {
            if err.kind() == io::ErrorKind::InvalidData
                || err.kind() == io::ErrorKind::UnexpectedEof
            {
                refused(format!("{}: damaged in the zip: {err}", d.file))
            } else {
                Err(OvaError::Io {
                    what: format!("reading {} from the zip", d.file),
                    source: err,
                })
            }
        })?;
        out.flush().map_err(io_err(format!("writing {}", d.file)))?;
        if copied != e.entry.size {
            return refused(format!(
                "{}: {copied} bytes in the zip, {} stated",
                d.file, e.entry.size
            ));
        }
    }
    let images: Vec<ova::Source<'_>> = descriptor
        .disks
        .iter()
        .enumerate()
        .map(|(i, d)| match inflated.iter().find(|(n, ..)| *n == i) {
            Some((_, path, entry)) => InPlace {
                archive: path,
                name: &d.file,
                entry,
            },
            None => InPlace {
                archive,
                name: &d.file,
                entry: &entries[&d.file].entry,
            },
        })
        .map(ova::Source::InPlace)
        .collect();
    let disks = ova::convert_disks(images, packed, work, library, watch)?;
    Ok(Imported { descriptor, disks })
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = r#"<?xml version="1.0"?>
<VirtualAppliance name="drupal" memory="512" vcpus="2" firmware="uefi" disk-bus="virtio" nics="2">
  <Description> Drupal on CentOS 5 </Description>
  <Disk file="d0.img"/>
  <Disk file="d1.qcow2"/>
</VirtualAppliance>"#;

    #[test]
    fn the_original_xml_is_read_and_bad_ones_refused_with_a_reason() {
        let d = parse_xml(XML).unwrap();
        assert_eq!(
            (
                d.name.as_str(),
                d.description.as_str(),
                d.memory_mib,
                d.vcpus,
                d.nics
            ),
            ("drupal", "Drupal on CentOS 5", 512, 2, 2)
        );
        assert_eq!((d.boot, d.disk_bus), (BootMode::Uefi, DiskBus::Virtio));
        let files: Vec<&str> = d.disks.iter().map(|d| d.file.as_str()).collect();
        assert_eq!(files, ["d0.img", "d1.qcow2"]);
        let refused = |xml: &str| match parse_xml(xml) {
            Err(OvaError::Refused(why)) => why,
            other => panic!("{xml}: {other:?}"),
        };
        assert!(refused("<Envelope/>").contains("VirtualAppliance"));
        assert!(refused(&XML.replace(r#"memory="512""#, "")).contains("no memory"));
        assert!(refused(&XML.replace("512", "99999999999")).contains("memory"));
        assert!(refused(&XML.replace("uefi", "coreboot")).contains("firmware"));
        assert!(refused(&XML.replace("d1.qcow2", "d0.img")).contains("two disks"));
        let laughs = r#"<?xml version="1.0"?><!DOCTYPE a [<!ENTITY a "aaaa">]><VirtualAppliance memory="1">&a;</VirtualAppliance>"#;
        assert!(refused(laughs).contains("not XML we read"));
        let none = r#"<VirtualAppliance memory="64"/>"#;
        assert!(refused(none).contains("0 disks"));
    }
}
