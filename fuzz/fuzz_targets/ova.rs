//! Virtual Appliances on untrusted bytes: an OVA's descriptor, its manifest and the archive
//! itself (`control::ova`).
//!
//! Input: any bytes. As text, they are read as an OVF descriptor, as the original product's
//! appliance.xml and as a manifest: never a panic; a descriptor read gives 1 to 4 disks, some
//! memory and 1 to 255 vCPUs. As an archive, they are scanned as an upload is: never a panic,
//! every entry found is a plain name lying inside the bytes given. As a stream-optimized VMDK
//! (`control::vmdk`), they are decoded to a raw image: never a panic, and a decoding that ends
//! well leaves an image of the disk's size.

#![no_main]

use control::library::{Shelf, Upload};
use control::{ova, vmdk};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(d) = ova::parse_ovf(&text) {
        assert!((1..=4).contains(&d.disks.len()), "{d:?}");
        assert!(d.memory_mib > 0 && (1..=255).contains(&d.vcpus), "{d:?}");
    }
    // As the original product's appliance.xml: the same promises.
    if let Ok(d) = control::zipped::parse_xml(&text) {
        assert!((1..=4).contains(&d.disks.len()), "{d:?}");
        assert!(d.memory_mib > 0 && (1..=255).contains(&d.vcpus), "{d:?}");
    }
    let _ = ova::parse_manifest(&text);
    let _ = ova::unit_bytes(&text);

    // As an archive, read as it would arrive: never a panic, and whatever it finds lies
    // inside the bytes it was given.
    if let Ok(s) = ova::scan(data, data.len() as u64, None) {
        for (name, e) in &s.entries {
            assert!(e.offset + e.size <= data.len() as u64, "{name}: {e:?}");
            assert!(!name.contains('/') && name != ".." && name != ".");
        }
        assert!(s.entries.contains_key(&s.ovf));
    }

    // As a stream-optimized VMDK (disks up to 1 GiB: larger ones only take longer to hash).
    if let Some(head) = data.get(..512) {
        let head: &[u8; 512] = head.try_into().expect("512 bytes");
        if let Some(h) = vmdk::StreamHeader::parse(head).filter(|h| h.capacity <= 1 << 30) {
            let dir = std::env::temp_dir().join(format!("fuzz-vmdk-{}", std::process::id()));
            let mut out = Upload::new(&dir, Shelf::Image).expect("a file in the temp dir");
            if vmdk::decode(&h, &mut &data[512..], &mut out, &mut |_| {}).is_ok() {
                assert_eq!(out.size(), h.capacity);
            }
        }
    }
});
