//! The appliance (issue 12): the installer ISO, built from Debian's packages and this build's
//! `enspeed`, booted by QEMU (TCG with an emulated AMD-V, as the test host) from its CD by UEFI
//! with a blank disk and an answer disk, installs and powers off; the installed disk, booted
//! alone by BIOS, serves the API over HTTPS on port 443 to the Manager the answers named, offers
//! its memory to VMs, and shows the UI's address and its KVM on the console.
//! `tests/appliance/install.sh` is the drive; this test builds the ISO and judges its report.

use std::process::Command;

use enspeed_tests::{enspeed_bin, repo_root};

#[test]
fn the_iso_installs_unattended_and_the_installed_server_serves_its_api() {
    let root = repo_root();
    let build = Command::new(root.join("image/appliance/build.sh"))
        .arg(enspeed_bin())
        .output()
        .expect("run image/appliance/build.sh");
    let log = String::from_utf8_lossy(&build.stderr);
    assert!(build.status.success(), "build.sh failed:\n{log}");
    let iso = String::from_utf8_lossy(&build.stdout)
        .lines()
        .last()
        .map(str::to_string)
        .expect("build.sh prints the ISO's path last");
    assert!(iso.ends_with("-amd64.iso"), "{iso}");
    let work = std::env::temp_dir().join(format!("appliance-test-{}", std::process::id()));
    let out = Command::new(root.join("tests/appliance/install.sh"))
        .arg(&iso)
        .arg(&work)
        .output()
        .expect("run tests/appliance/install.sh");
    let report = String::from_utf8_lossy(&out.stdout);
    eprintln!("{report}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success() && report.contains("APPLIANCE: PASS"),
        "the appliance test failed (its consoles stay in {}):\n{report}",
        work.display()
    );
    let mb: u64 = report
        .lines()
        .find_map(|l| l.strip_prefix("APPLIANCE iso-mb "))
        .and_then(|v| v.trim().parse().ok())
        .expect("the ISO's size");
    assert!(mb < 700, "the ISO is {mb} MB; the target is under 700");
    let _ = std::fs::remove_dir_all(&work);
}
