//! Virtual Appliances on untrusted bytes: an OVA's descriptor, its manifest and the archive
//! itself (`control::ova`).
//!
//! Input: any bytes. As text, they are read as an OVF descriptor and as a manifest: never a
//! panic; a descriptor read gives 1 to 4 disks, some memory and 1 to 255 vCPUs. As an archive,
//! they are unpacked into a fresh directory: never a panic, and whatever is unpacked is plain
//! files directly inside that directory, none elsewhere.

#![no_main]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use control::ova;
use libfuzzer_sys::fuzz_target;

fn scratch() -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    std::env::temp_dir().join(format!(
        "enspeed-fuzz-ova-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(d) = ova::parse_ovf(&text) {
        assert!((1..=4).contains(&d.disks.len()), "{d:?}");
        assert!(d.memory_mib > 0 && (1..=255).contains(&d.vcpus), "{d:?}");
    }
    let _ = ova::parse_manifest(&text);
    let _ = ova::unit_bytes(&text);

    let dir = scratch();
    std::fs::create_dir_all(&dir).unwrap();
    let archive = dir.join("in.ova");
    std::fs::write(&archive, data).unwrap();
    let out = dir.join("out");
    if let Ok(u) = ova::unpack(&archive, &out) {
        for (name, path) in &u.files {
            assert_eq!(path.parent(), Some(out.as_path()), "{name}: {}", path.display());
            assert!(!name.contains('/') && name != ".." && name != ".");
        }
    }
    // Nothing lands beside the directory it was unpacked into.
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let n = e.file_name();
        assert!(n == "in.ova" || n == "out", "{n:?} beside the unpacked files");
    }
    if out.exists() {
        for e in std::fs::read_dir(&out).unwrap().flatten() {
            assert!(e.file_type().unwrap().is_file(), "{:?} is no plain file", e.path());
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
});
