//! Virtual Appliances on untrusted bytes: an OVA's descriptor, its manifest and the archive
//! itself (`control::ova`).
//!
//! Input: any bytes. As text, they are read as an OVF descriptor, as the original product's
//! appliance.xml and as a manifest: never a panic; a descriptor read gives 1 to 4 disks, some
//! memory and 1 to 255 vCPUs. As an archive, they are scanned as an upload is: never a panic,
//! every entry found is a plain name lying inside the bytes given.

#![no_main]

use control::ova;
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
    if let Ok(s) = ova::scan(data, data.len() as u64) {
        for (name, e) in &s.entries {
            assert!(e.offset + e.size <= data.len() as u64, "{name}: {e:?}");
            assert!(!name.contains('/') && name != ".." && name != ".");
        }
        assert!(s.entries.contains_key(&s.ovf));
    }
});
