//! Level 1, firmware boot: `enspeed vmm` without `--kernel` starts SeaBIOS
//! (Debian's, as the product ships it) on this machine's /dev/kvm, which
//! finds the VM's virtio-pci disks, boots the project's boot disk through
//! them, and hands it the ACPI tables it powers off with. Bad media and
//! empty machines end in the firmware's own message, with the VMM still
//! obeying its control socket.

use std::io::Write;
use std::time::Duration;

use enspeed_tests::rfb::RfbClient;
use enspeed_tests::{bootdisk, bootdisk_iso, enspeed_bin, kvm_available, Scratch, Vmm};

fn firmware_args(memory: u32, vcpus: u32, disks: &[&std::path::Path]) -> Vec<String> {
    let mut a = vec![
        "--memory".to_string(),
        memory.to_string(),
        "--vcpus".into(),
        vcpus.to_string(),
    ];
    for d in disks {
        a.push("--disk".into());
        a.push(d.display().to_string());
    }
    a
}

fn assert_no_failure(vmm: &Vmm) {
    let out = vmm.output();
    assert!(
        !out.contains("bootdisk: FAIL"),
        "the boot disk failed:\n{out}"
    );
}

#[test]
fn seabios_boots_a_virtio_pci_disk_and_the_guest_powers_off_through_acpi() {
    if !kvm_available("seabios_boots_a_virtio_pci_disk") {
        return;
    }
    let s = Scratch::new("fw-boot");
    let disk = s.path("boot.img");
    std::fs::copy(bootdisk(), &disk).unwrap();
    let mut vmm = Vmm::start(&firmware_args(256, 2, &[&disk]));
    // The firmware's own text, forwarded to COM1 (sercon).
    vmm.wait_for("SeaBIOS (version", Duration::from_secs(60));
    vmm.wait_for("bootdisk: started by the firmware", Duration::from_secs(60));
    // Stage 2 came through SeaBIOS's virtio-blk driver on our virtio-pci transport.
    vmm.wait_for("stage 2 read through int 13h", Duration::from_secs(30));
    vmm.wait_for("bootdisk: stage 2 running", Duration::from_secs(30));
    // Four bytes of fw_cfg's data port in one `rep insb`: each byte reaches the device.
    vmm.wait_for("bootdisk: fw_cfg signature QEMU", Duration::from_secs(30));
    // The BIOS's timed wait, which counts the RTC's periodic interrupt.
    vmm.wait_for(
        "bootdisk: waited 50 ms through int 15h",
        Duration::from_secs(30),
    );
    // The ACPI tables SeaBIOS placed from fw_cfg's loader script chain and check.
    vmm.wait_for("S5 sleep type 5; powering off", Duration::from_secs(30));
    let st = vmm.wait_exit(Duration::from_secs(30));
    assert!(st.success(), "VMM exit {st:?}:\n{}", vmm.output());
    assert_no_failure(&vmm);
    eprintln!("firmware boot to ACPI power-off: {:?}", vmm.elapsed());
}

/// Boots the El Torito image from the SATA CD-ROM drive: `before` are the
/// disks, `extra` further arguments; returns the VMM's output.
fn boot_from_cd(name: &str, disks: &[&std::path::Path], extra: &[&str]) -> String {
    let s = Scratch::new(name);
    let mut args = firmware_args(128, 1, disks);
    args.extend(["--cdrom".to_string(), bootdisk_iso().display().to_string()]);
    args.extend(extra.iter().map(|a| a.to_string()));
    let mut vmm = Vmm::start(&args);
    vmm.wait_for(
        "bootdisk: loaded whole from a CD (El Torito)",
        Duration::from_secs(60),
    );
    // SeaBIOS's AHCI driver read sector 16 through our ATAPI READ(10).
    vmm.wait_for(
        "CD volume descriptor read through int 13h",
        Duration::from_secs(30),
    );
    vmm.wait_for("powering off", Duration::from_secs(30));
    assert!(vmm.wait_exit(Duration::from_secs(30)).success());
    assert_no_failure(&vmm);
    drop(s);
    vmm.output()
}

#[test]
fn an_el_torito_cd_boots_from_the_sata_cdrom_after_a_blank_disk() {
    if !kvm_available("an_el_torito_cd_boots") {
        return;
    }
    let s = Scratch::new("fw-cd-blank");
    let blank = s.disk("blank.img", 64 << 20);
    // Default order, disks first: the blank disk is tried and falls through to the CD.
    let out = boot_from_cd("fw-cd-a", &[&blank], &[]);
    let failed = out
        .find("not a bootable disk")
        .expect("the blank disk was tried first");
    assert!(
        failed < out.find("loaded whole from a CD").unwrap(),
        "{out}"
    );
}

#[test]
fn cdrom_first_boots_the_cd_before_a_bootable_disk() {
    if !kvm_available("cdrom_first_boots_the_cd") {
        return;
    }
    let s = Scratch::new("fw-cd-first");
    let disk = s.path("boot.img");
    std::fs::copy(bootdisk(), &disk).unwrap();
    let out = boot_from_cd("fw-cd-b", &[&disk], &["--boot", "cdrom,disk"]);
    assert!(
        !out.contains("stage 2 read through int 13h"),
        "the disk booted:\n{out}"
    );
}

#[test]
fn a_sata_disk_boots_like_a_virtio_one() {
    if !kvm_available("a_sata_disk_boots") {
        return;
    }
    let s = Scratch::new("fw-sata");
    let disk = s.path("boot.img");
    std::fs::copy(bootdisk(), &disk).unwrap();
    let mut vmm = Vmm::start(&firmware_args(
        128,
        1,
        &[std::path::Path::new(&format!(
            "{},bus=sata",
            disk.display()
        ))],
    ));
    vmm.wait_for("stage 2 read through int 13h", Duration::from_secs(60));
    vmm.wait_for("powering off", Duration::from_secs(30));
    assert!(vmm.wait_exit(Duration::from_secs(30)).success());
    assert_no_failure(&vmm);
}

#[test]
fn the_cdrom_media_changes_and_ejects_on_the_control_socket() {
    if !kvm_available("the_cdrom_media_changes") {
        return;
    }
    let s = Scratch::new("fw-cd-media");
    let blank = s.disk("blank.img", 1 << 20);
    let sock = s.path("api.sock");
    let mut vmm = Vmm::start(
        &[
            firmware_args(128, 1, &[&blank]),
            vec![
                "--cdrom".into(),
                "empty".into(),
                "--api-socket".into(),
                sock.display().to_string(),
            ],
        ]
        .concat(),
    );
    vmm.wait_for("No bootable device", Duration::from_secs(60));
    let st = vmm.api(r#"{"cmd":"status"}"#);
    let disks = st["status"]["disks"].as_array().unwrap().clone();
    assert_eq!(disks.len(), 2, "{st}");
    assert_eq!(
        disks[1]["path"],
        serde_json::Value::Null,
        "an empty drive: {st}"
    );
    let iso = bootdisk_iso().display().to_string();
    let r = vmm.api(&format!(r#"{{"cmd":"media","disk":1,"path":"{iso}"}}"#));
    assert_eq!(r["ok"], true, "{r}");
    let st = vmm.api(r#"{"cmd":"status"}"#);
    assert_eq!(st["status"]["disks"][1]["path"], iso.as_str(), "{st}");
    let r = vmm.api(r#"{"cmd":"media","disk":0,"path":null}"#);
    assert_eq!(r["ok"], false, "disk 0 is not removable: {r}");
    let r = vmm.api(r#"{"cmd":"media","disk":1,"path":"/nonexistent.iso"}"#);
    assert_eq!(r["ok"], false, "{r}");
    assert!(
        r["error"].as_str().unwrap().contains("/nonexistent.iso"),
        "{r}"
    );
    // Ctrl-Alt-Del: the firmware starts over and now boots the CD.
    assert_eq!(vmm.api(r#"{"cmd":"ctrl-alt-del"}"#)["ok"], true);
    vmm.wait_for(
        "bootdisk: loaded whole from a CD (El Torito)",
        Duration::from_secs(60),
    );
    vmm.wait_for("powering off", Duration::from_secs(30));
    assert!(vmm.wait_exit(Duration::from_secs(30)).success());
    assert_no_failure(&vmm);
}

/// Whether the screen is the boot disk's red, green, blue and white bars at 1024x768.
fn shows_the_bars(r: &RfbClient) -> bool {
    r.width == 1024
        && r.height == 768
        && r.pixel(100, 300) == (255, 0, 0)
        && r.pixel(300, 300) == (0, 255, 0)
        && r.pixel(600, 700) == (0, 0, 255)
        && r.pixel(1000, 10) == (255, 255, 255)
}

/// Reads screens until `done` holds for the client's copy, or panics after `limit`.
fn watch(rfb: &mut RfbClient, limit: Duration, what: &str, done: impl Fn(&RfbClient) -> bool) {
    let deadline = std::time::Instant::now() + limit;
    loop {
        rfb.request(true, 0, 0, rfb.width, rfb.height).unwrap();
        if rfb.pending(Duration::from_millis(500)).unwrap() {
            rfb.read_update().unwrap();
        }
        if done(rfb) {
            return;
        }
        if std::time::Instant::now() > deadline {
            let shot = std::env::temp_dir().join("enspeed-vga-failed.ppm");
            let _ = std::fs::write(&shot, rfb.ppm());
            panic!(
                "the screen never showed {what} ({}x{}); it is in {}",
                rfb.width,
                rfb.height,
                shot.display()
            );
        }
    }
}

#[test]
fn the_vga_shows_the_firmwares_text_then_a_vbe_mode_over_rfb() {
    if !kvm_available("the_vga_shows_the_firmwares_text") {
        return;
    }
    let s = Scratch::new("fw-vga");
    let disk = s.path("boot.img");
    let mut img = std::fs::read(bootdisk()).unwrap();
    img[0x204] = 1; // the boot disk's display test
    std::fs::write(&disk, &img).unwrap();
    let sock = s.path("vnc.sock");
    let api = s.path("api.sock");
    let mut args = firmware_args(128, 1, &[&disk]);
    args.extend([
        "--vnc".into(),
        sock.display().to_string(),
        "--api-socket".into(),
        api.display().to_string(),
    ]);
    let mut vmm = Vmm::start(&args);
    let mut rfb = RfbClient::connect(&sock).unwrap();
    rfb.set_encodings(&[6, 0, -223]).unwrap();
    rfb.request(false, 0, 0, rfb.width, rfb.height).unwrap();
    rfb.read_update().unwrap();
    // Text mode 3 once the VGA BIOS ran: 80x25 cells of 9x16, and the firmware's banner
    // drawn with the font the BIOS loaded (light grey on black in its first rows).
    watch(
        &mut rfb,
        Duration::from_secs(60),
        "the 720x400 text screen with text",
        |r| {
            r.width == 720
                && r.height == 400
                && (0..48u16).any(|y| (0..720u16).any(|x| r.pixel(x, y).0 > 100))
        },
    );
    let shots = enspeed_tests::profile_dir().join("vga-screenshots");
    let _ = std::fs::create_dir_all(&shots);
    let _ = std::fs::write(shots.join("firmware-text.ppm"), rfb.ppm());
    vmm.wait_for(
        "bootdisk: drew colour bars in 1024x768x32",
        Duration::from_secs(60),
    );
    // VBE through the VGA BIOS: the screen grows to 1024x768 (DesktopSize) and shows
    // the bars the boot disk drew in the linear framebuffer.
    watch(
        &mut rfb,
        Duration::from_secs(30),
        "the colour bars at 1024x768",
        shows_the_bars,
    );
    let _ = std::fs::write(shots.join("vbe-bars.ppm"), rfb.ppm());
    assert_eq!(vmm.api(r#"{"cmd":"stop"}"#)["ok"], true);
    assert!(vmm.wait_exit(Duration::from_secs(20)).success());
    assert_no_failure(&vmm);
}

#[test]
fn the_consoles_pointer_moves_the_ps2_mouse_the_firmware_reads() {
    if !kvm_available("the_consoles_pointer_moves_the_ps2_mouse") {
        return;
    }
    let s = Scratch::new("fw-mouse");
    let disk = s.path("boot.img");
    let mut img = std::fs::read(bootdisk()).unwrap();
    img[0x204] = 2; // the boot disk's mouse test
    std::fs::write(&disk, &img).unwrap();
    let sock = s.path("vnc.sock");
    let mut args = firmware_args(128, 1, &[&disk]);
    args.extend(["--vnc".into(), sock.display().to_string()]);
    let mut vmm = Vmm::start(&args);
    let mut rfb = RfbClient::connect(&sock).unwrap();
    vmm.wait_for("bootdisk: waiting for the mouse", Duration::from_secs(60));
    // From (100, 100) to (110, 100) with the left button: a packet of +10 in X, left held
    // (status 0x09: the always-one bit and the left button).
    rfb.pointer(100, 100, 0).unwrap();
    rfb.pointer(110, 100, 1).unwrap();
    vmm.wait_for("bootdisk: mouse status=09 x=0A", Duration::from_secs(30));
    assert_no_failure(&vmm);
}

#[test]
fn bad_media_is_reported_by_the_firmware_and_the_vmm_still_obeys() {
    if !kvm_available("bad_media_is_reported_by_the_firmware") {
        return;
    }
    let s = Scratch::new("fw-bad");
    // Random bytes, with no boot signature where the BIOS looks for one.
    let junk = s.path("junk.img");
    let mut bytes = vec![0u8; 1 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in bytes.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    bytes[510] = 0;
    std::fs::File::create(&junk)
        .unwrap()
        .write_all(&bytes)
        .unwrap();
    // A CD that is not bootable: ISO 9660, but no El Torito boot record.
    let mut iso = enspeed_tests::eltorito_iso(&[0u8; 512]);
    iso[17 * 2048..18 * 2048].fill(0);
    let data_cd = s.path("data.iso");
    std::fs::write(&data_cd, &iso).unwrap();
    let sock = s.path("api.sock");
    let mut args = firmware_args(128, 1, &[&junk]);
    args.extend(["--api-socket".into(), sock.display().to_string()]);
    args.extend(["--cdrom".into(), data_cd.display().to_string()]);
    let mut vmm = Vmm::start(&args);
    vmm.wait_for("Boot failed: not a bootable disk", Duration::from_secs(60));
    vmm.wait_for(
        "Boot failed: Could not read from CDROM",
        Duration::from_secs(60),
    );
    vmm.wait_for("No bootable device", Duration::from_secs(60));
    let st = vmm.api(r#"{"cmd":"status"}"#);
    assert_eq!(st["status"]["state"], "running", "{st}");
    assert_eq!(st["status"]["boots"], 1, "{st}");
    // Ctrl-Alt-Del reaches the firmware's keyboard handler, which resets the machine:
    // the VMM builds it again and the firmware starts over.
    let r = vmm.api(r#"{"cmd":"ctrl-alt-del"}"#);
    assert_eq!(r["ok"], true, "{r}");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let st = vmm.api(r#"{"cmd":"status"}"#);
        if st["status"]["boots"] == 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no reboot after Ctrl-Alt-Del: {st}\n{}",
            vmm.output()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(vmm.api(r#"{"cmd":"stop"}"#)["ok"], true);
    let st = vmm.wait_exit(Duration::from_secs(20));
    assert!(st.success(), "VMM exit {st:?}:\n{}", vmm.output());
    assert!(
        !vmm.output().contains("panicked"),
        "the VMM panicked:\n{}",
        vmm.output()
    );
}

#[test]
fn firmware_options_that_cannot_be_served_are_refused_clearly() {
    let s = Scratch::new("fw-refused");
    let disk = s.disk("d.img", 1 << 20);
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(enspeed_bin())
            .arg("vmm")
            .args(["--memory", "64", "--disk"])
            .arg(&disk)
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, err) = run(&["--firmware-image", "/nonexistent/bios.bin"]);
    assert!(!ok && err.contains("/nonexistent/bios.bin"), "{err}");
    let (ok, err) = run(&["--firmware", "floppy"]);
    assert!(!ok && err.contains("bios or uefi"), "{err}");
    let (ok, err) = run(&["--firmware", "bios", "--kernel", "/k"]);
    assert!(!ok && err.contains("--kernel"), "{err}");
    // UEFI runs in the test host (tests/tests/testhost.rs); here only its image is checked.
    let (ok, err) = run(&[
        "--firmware",
        "uefi",
        "--firmware-image",
        "/nonexistent/OVMF.fd",
    ]);
    assert!(
        !ok && err.contains("/nonexistent/OVMF.fd") && err.contains("ovmf package"),
        "{err}"
    );
}

/// The count in a boot disk's "bootdisk: tick n=XXXX" line (hex).
fn tick_of(line: &str) -> Option<u32> {
    let n = line.split("tick n=").nth(1)?;
    u32::from_str_radix(n.trim().get(..4)?, 16).ok()
}

/// The last count the boot disk printed.
fn last_tick(out: &str) -> Option<u32> {
    out.lines().rev().find_map(tick_of)
}

/// Starts a firmware-booted VM on `disk` (with `extra` arguments) and a second VMM with the
/// same command line waiting for it (`--incoming`), moves the VM live once it counted a few
/// times, and returns both, the target's screen client and the move's answer.
fn move_counting_vm(
    s: &Scratch,
    disk: &std::path::Path,
    extra: &[&str],
) -> (Vmm, Vmm, RfbClient, serde_json::Value) {
    let args = |side: &str| {
        let mut a = firmware_args(128, 1, &[]);
        a.extend(["--disk".into(), disk.display().to_string()]);
        a.extend(extra.iter().map(|e| e.to_string()));
        a.extend([
            "--vnc".into(),
            s.path(&format!("{side}-vnc.sock")).display().to_string(),
            "--api-socket".into(),
            s.path(&format!("{side}.sock")).display().to_string(),
        ]);
        a
    };
    let mut src = Vmm::start(&args("src"));
    src.wait_for("bootdisk: started by the firmware", Duration::from_secs(60));
    for _ in 0..3 {
        src.wait_for("bootdisk: tick n=", Duration::from_secs(30));
    }
    let incoming = s.path("incoming.sock");
    let mut dst_args = args("dst");
    dst_args.extend(["--incoming".into(), incoming.display().to_string()]);
    let dst = Vmm::start(&dst_args);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !incoming.exists() {
        assert!(std::time::Instant::now() < deadline, "no incoming socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = last_tick(&src.output()).expect("the source counted");
    let r = src.api(&format!(
        r#"{{"cmd":"migrate","to":"{}"}}"#,
        incoming.display()
    ));
    assert_eq!(r["ok"], true, "{r}\nsource:\n{}", src.output());
    assert!(
        last_tick(&src.output()).unwrap() >= before,
        "the source's count went back"
    );
    let mut rfb = RfbClient::connect(&s.path("dst-vnc.sock")).unwrap();
    rfb.set_encodings(&[6, 0, -223]).unwrap();
    (src, dst, rfb, r)
}

/// Live migration of a firmware-booted VM (issue 13): the boot disk counts on the BIOS clock
/// (the PIT's interrupt through the PIC), reads its disk through SeaBIOS's driver at each
/// count (virtio-pci, then the SATA controller in a second run) and writes the count on the
/// VGA's text screen. Moved live to a second VMM, it counts on from where it was, never
/// started again, its disk reads still answered by the device whose rings and registers
/// SeaBIOS set up at the source, and the target's screen shows the text it had.
#[test]
fn a_firmware_booted_vm_moves_live_counting_on_its_bios_clock_and_reading_its_disk() {
    if !kvm_available("a_firmware_booted_vm_moves_live") {
        return;
    }
    for bus in ["virtio", "sata"] {
        let s = Scratch::new(&format!("fw-move-{bus}"));
        let disk = s.path("boot.img");
        let mut img = std::fs::read(bootdisk()).unwrap();
        img[0x204] = 3; // count on the BIOS clock
        std::fs::write(&disk, &img).unwrap();
        let disk_arg = std::path::PathBuf::from(format!("{},bus={bus}", disk.display()));
        // A CD-ROM drive too: the SATA controller's ports travel with the VM.
        let (mut src, mut dst, mut rfb, r) = move_counting_vm(&s, &disk_arg, &["--cdrom", "empty"]);
        eprintln!("firmware VM on {bus} moved: {}", r["migrated"]);
        let first = tick_of(&dst.wait_for("bootdisk: tick n=", Duration::from_secs(30))).unwrap();
        let later = tick_of(&dst.wait_for("bootdisk: tick n=", Duration::from_secs(30))).unwrap();
        let had = last_tick(&src.output()).unwrap();
        assert!(
            first > had && later > first,
            "the count at the target ({first}, {later}) does not go on from the source's {had}"
        );
        let out = dst.output();
        assert!(
            !out.contains("started by the firmware") && !out.contains("SeaBIOS (version"),
            "the target booted the VM again:\n{out}"
        );
        assert!(
            !out.contains("FAIL"),
            "the boot disk failed at the target:\n{out}"
        );
        assert!(src.wait_exit(Duration::from_secs(20)).success());
        // The text screen: 720x400, "TICK nnnn" in white on blue at its top left.
        watch(
            &mut rfb,
            Duration::from_secs(30),
            "the count on the target's text screen",
            |r| r.width == 720 && r.height == 400 && r.pixel(1, 1) == (0, 0, 170),
        );
        assert_eq!(dst.api(r#"{"cmd":"stop"}"#)["ok"], true);
        assert!(dst.wait_exit(Duration::from_secs(20)).success());
    }
}

/// Live migration of a firmware-booted VM in a VBE mode: the colour bars the boot disk drew
/// in the linear framebuffer (memory KVM maps where the guest put the VGA's BAR) are on the
/// target's screen, and the count on the RTC's seconds goes on.
#[test]
fn a_firmware_booted_vm_moves_live_with_its_vbe_screen_and_its_rtc() {
    if !kvm_available("a_firmware_booted_vm_moves_live_with_its_vbe_screen") {
        return;
    }
    let s = Scratch::new("fw-move-vbe");
    let disk = s.path("boot.img");
    let mut img = std::fs::read(bootdisk()).unwrap();
    img[0x204] = 4; // colour bars, then count on the RTC
    std::fs::write(&disk, &img).unwrap();
    let (mut src, mut dst, mut rfb, r) = move_counting_vm(&s, &disk, &[]);
    eprintln!("firmware VM in VBE mode moved: {}", r["migrated"]);
    let first = tick_of(&dst.wait_for("bootdisk: tick n=", Duration::from_secs(30))).unwrap();
    let had = last_tick(&src.output()).unwrap();
    assert!(
        first > had,
        "the count at the target ({first}) does not go on from {had}"
    );
    assert!(src.wait_exit(Duration::from_secs(20)).success());
    watch(
        &mut rfb,
        Duration::from_secs(30),
        "the colour bars at 1024x768 on the target",
        shows_the_bars,
    );
    let out = dst.output();
    assert!(
        !out.contains("started by the firmware"),
        "the target booted the VM again:\n{out}"
    );
    dst.kill9();
}
