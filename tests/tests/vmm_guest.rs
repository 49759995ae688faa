//! Level 1: `enspeed vmm` boots the project's test guest on this machine's
//! /dev/kvm, and the guest drives every device the way a driver does.

use std::process::Command;
use std::time::Duration;

use enspeed_tests::*;

const BOOT: Duration = Duration::from_secs(30);

#[test]
fn disk_io_flush_device_id_and_acpi_poweroff() {
    if !kvm_available("disk_io_flush_device_id_and_acpi_poweroff") {
        return;
    }
    let s = Scratch::new("blk");
    let disk = s.disk("disk0.img", 16 << 20);
    let mut vm = Vmm::start(&guest_args(
        "tg.run=blk,blkid tg.blocks=64 tg.end=poweroff",
        &["--disk", disk.to_str().unwrap()],
    ));
    vm.wait_for("tg: entry", BOOT);
    vm.wait_for("tg: blk dev=0 sectors=32768 ro=0 flush=1", BOOT);
    vm.wait_for("tg: blk ok blocks=64", BOOT);
    vm.wait_for("tg: blk id=disk0.img", BOOT);
    vm.wait_for("tg: done ok", BOOT);
    assert!(
        vm.wait_exit(BOOT).success(),
        "guest poweroff must exit 0:\n{}",
        vm.output()
    );
    // What the guest wrote reached the file.
    let data = std::fs::read(&disk).unwrap();
    assert!(
        data.iter().any(|b| *b != 0),
        "the guest's writes are not in the disk file"
    );
}

/// Read-only media is announced as such (VIRTIO_BLK_F_RO) and stays
/// readable; the VMM's refusal of writes to it is covered by the block
/// worker's unit tests.
#[test]
fn readonly_media_is_announced_and_readable() {
    if !kvm_available("readonly_media_is_announced_and_readable") {
        return;
    }
    let s = Scratch::new("ro");
    let disk = s.disk("cd.iso", 1 << 20);
    let mut vm = Vmm::start(&guest_args(
        "tg.run=blk,blkid tg.end=poweroff",
        &["--disk", &format!("{},readonly", disk.display())],
    ));
    vm.wait_for("tg: blk dev=0 sectors=2048 ro=1", BOOT);
    vm.wait_for("tg: blk ok", BOOT);
    vm.wait_for("tg: blk id=cd.iso", BOOT);
    vm.wait_for("tg: done ok", BOOT);
    assert!(vm.wait_exit(BOOT).success());
    assert!(
        std::fs::read(&disk).unwrap().iter().all(|b| *b == 0),
        "read-only media was modified"
    );
}

#[test]
fn every_acknowledged_stamped_write_is_on_disk() {
    if !kvm_available("every_acknowledged_stamped_write_is_on_disk") {
        return;
    }
    let s = Scratch::new("stamp");
    let disk = s.disk("disk.img", 4 << 20);
    let mut vm = Vmm::start(&guest_args(
        "tg.run=stamp tg.blocks=16 tg.ops=48 tg.flushevery=8 tg.end=poweroff",
        &["--disk", disk.to_str().unwrap()],
    ));
    vm.wait_for("tg: done ok", BOOT);
    assert!(vm.wait_exit(BOOT).success());
    let mut last = std::collections::HashMap::new();
    for l in vm.output().lines() {
        if let Some(rest) = l.strip_prefix("tg: ack ") {
            let mut blk = None;
            let mut seq = None;
            for kv in rest.split_whitespace() {
                match kv.split_once('=') {
                    Some(("blk", v)) => blk = v.parse::<u64>().ok(),
                    Some(("seq", v)) => seq = v.parse::<u64>().ok(),
                    _ => {}
                }
            }
            last.insert(blk.unwrap(), seq.unwrap());
        }
    }
    assert_eq!(
        last.values().count(),
        16,
        "every block should have been acknowledged at least once"
    );
    let image = std::fs::read(&disk).unwrap();
    for (blk, seq) in last {
        assert_eq!(read_stamp(&image, blk), Stamp::Seq(seq), "block {blk}");
    }
}

/// The same guest entered through the Linux 64-bit boot protocol.
#[test]
fn linux_64bit_entry_boots_too() {
    if !kvm_available("linux_64bit_entry_boots_too") {
        return;
    }
    let s = Scratch::new("entry64");
    let kernel = linux64_testguest(&s);
    let disk = s.disk("disk.img", 1 << 20);
    let mut args = guest_args(
        "tg.run=blk tg.blocks=8 tg.end=poweroff",
        &["--disk", disk.to_str().unwrap()],
    );
    args[1] = kernel.display().to_string();
    let mut vm = Vmm::start(&args);
    vm.wait_for("tg: boot linux", BOOT);
    vm.wait_for("tg: blk ok", BOOT);
    assert!(vm.wait_exit(BOOT).success());
}

#[test]
fn several_vcpus_boot() {
    if !kvm_available("several_vcpus_boot") {
        return;
    }
    let mut vm = Vmm::start(&guest_args("tg.end=poweroff", &["--vcpus", "4"]));
    vm.wait_for("tg: done ok", BOOT);
    assert!(vm.wait_exit(BOOT).success());
}

#[test]
fn ctrl_alt_del_reaches_the_keyboard_and_kbd_reset_reboots() {
    if !kvm_available("ctrl_alt_del_reaches_the_keyboard_and_kbd_reset_reboots") {
        return;
    }
    let s = Scratch::new("kbd");
    let sock = s.path("api.sock");
    let mut vm = Vmm::start(&guest_args(
        "tg.run=kbd tg.kbdwait=2000000000 tg.end=kbd-reset",
        &["--api-socket", sock.to_str().unwrap()],
    ));
    vm.wait_for("tg: ready", BOOT);
    let r = vm.api(r#"{"cmd":"ctrl-alt-del"}"#);
    assert_eq!(r["ok"], true, "{r}");
    vm.wait_for("tg: kbd ctrl-alt-del", BOOT);
    vm.wait_for("tg: end kbd-reset", BOOT);
    // The keyboard-controller reset reboots the VM: the guest starts again.
    vm.wait_for("tg: entry", BOOT);
    vm.wait_for("tg: ready", BOOT);
    let st = vm.api(r#"{"cmd":"status"}"#);
    assert_eq!(st["status"]["boots"], 2, "{st}");
    assert_eq!(vm.api(r#"{"cmd":"stop"}"#)["ok"], true);
    assert!(vm.wait_exit(BOOT).success());
}

#[test]
fn acpi_reset_register_reboots() {
    if !kvm_available("acpi_reset_register_reboots") {
        return;
    }
    let s = Scratch::new("acpireset");
    let sock = s.path("api.sock");
    let mut vm = Vmm::start(&guest_args(
        "tg.end=reboot",
        &["--api-socket", sock.to_str().unwrap()],
    ));
    vm.wait_for("tg: end reboot", BOOT);
    vm.wait_for("tg: entry", BOOT);
    vm.wait_for("tg: end reboot", BOOT);
    vm.wait_for("tg: entry", BOOT);
    // Requests that arrive while the VM reboots are answered by the next boot.
    let st = vm.api(r#"{"cmd":"status"}"#);
    let boots = st["status"]["boots"]
        .as_u64()
        .unwrap_or_else(|| panic!("{st}"));
    assert!(boots >= 3, "only {boots} boots");
    assert_eq!(vm.api(r#"{"cmd":"stop"}"#)["ok"], true);
    assert!(vm.wait_exit(BOOT).success());
}

#[test]
fn pause_stops_the_guest_and_resume_continues_it() {
    if !kvm_available("pause_stops_the_guest_and_resume_continues_it") {
        return;
    }
    let s = Scratch::new("pause");
    let sock = s.path("api.sock");
    let disk = s.disk("disk.img", 4 << 20);
    let mut vm = Vmm::start(&guest_args(
        "tg.run=stamp tg.blocks=16 tg.ops=0",
        &[
            "--disk",
            disk.to_str().unwrap(),
            "--api-socket",
            sock.to_str().unwrap(),
        ],
    ));
    vm.wait_for("tg: ack", BOOT);
    let count = |vm: &Vmm| vm.output().matches("tg: ack").count();
    assert_eq!(vm.api(r#"{"cmd":"pause"}"#)["ok"], true);
    assert_eq!(vm.api(r#"{"cmd":"status"}"#)["status"]["state"], "paused");
    std::thread::sleep(Duration::from_millis(300));
    let a = count(&vm);
    std::thread::sleep(Duration::from_millis(700));
    let b = count(&vm);
    assert_eq!(a, b, "the guest kept running while paused");
    assert_eq!(vm.api(r#"{"cmd":"resume"}"#)["ok"], true);
    assert_eq!(vm.api(r#"{"cmd":"status"}"#)["status"]["state"], "running");
    std::thread::sleep(Duration::from_millis(500));
    assert!(count(&vm) > b, "the guest did not continue after resume");
    assert_eq!(vm.api(r#"{"cmd":"stop"}"#)["ok"], true);
    assert!(vm.wait_exit(BOOT).success());
}

#[test]
fn shutdown_without_a_listening_guest_falls_back_to_stop_after_timeout() {
    if !kvm_available("shutdown_without_a_listening_guest_falls_back_to_stop_after_timeout") {
        return;
    }
    let s = Scratch::new("shutdown");
    let sock = s.path("api.sock");
    let mut vm = Vmm::start(&guest_args(
        "tg.end=halt",
        &["--api-socket", sock.to_str().unwrap()],
    ));
    vm.wait_for("tg: done ok", BOOT);
    let r = vm.api(r#"{"cmd":"shutdown","timeout_secs":1}"#);
    assert_eq!(r["ok"], true, "{r}");
    assert!(
        r["error"].as_str().unwrap_or("").contains("not enabled"),
        "{r}"
    );
    assert_eq!(
        vm.api(r#"{"cmd":"status"}"#)["status"]["state"],
        "shutting-down"
    );
    assert!(vm.wait_exit(Duration::from_secs(10)).success());
    assert!(
        !sock.exists(),
        "the control socket should be removed on exit"
    );
}

#[test]
fn control_socket_rejects_bad_requests_and_changes_media() {
    if !kvm_available("control_socket_rejects_bad_requests_and_changes_media") {
        return;
    }
    let s = Scratch::new("media");
    let sock = s.path("api.sock");
    let disk = s.disk("disk.img", 1 << 20);
    let iso = s.disk("a.iso", 2 << 20);
    let iso2 = s.disk("b.iso", 3 << 20);
    let mut vm = Vmm::start(&guest_args(
        "tg.end=halt",
        &[
            "--disk",
            disk.to_str().unwrap(),
            "--disk",
            &format!("{},readonly", iso.display()),
            "--api-socket",
            sock.to_str().unwrap(),
        ],
    ));
    vm.wait_for("tg: done ok", BOOT);
    for bad in [
        r#"{"cmd":"explode"}"#,
        "garbage",
        r#"{"cmd":"status","x":1}"#,
        r#"{"cmd":"media","disk":9,"path":null}"#,
    ] {
        let r = vm.api(bad);
        assert_eq!(r["ok"], false, "{bad} -> {r}");
        assert!(
            r["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{bad} -> {r}"
        );
    }
    let r = vm.api(r#"{"cmd":"media","disk":0,"path":null}"#);
    assert_eq!(r["ok"], false, "a writable disk is not removable: {r}");
    let r = vm.api(&format!(
        r#"{{"cmd":"media","disk":1,"path":"{}"}}"#,
        iso2.display()
    ));
    assert_eq!(r["ok"], true, "{r}");
    let st = vm.api(r#"{"cmd":"status"}"#);
    assert_eq!(st["status"]["disks"][1]["path"], iso2.display().to_string());
    assert_eq!(
        vm.api(r#"{"cmd":"media","disk":1,"path":null}"#)["ok"],
        true
    );
    let st = vm.api(r#"{"cmd":"status"}"#);
    assert!(st["status"]["disks"][1]["path"].is_null(), "{st}");
    let r = vm.api(r#"{"cmd":"media","disk":1,"path":"/nonexistent.iso"}"#);
    assert_eq!(r["ok"], false);
    assert!(
        r["error"].as_str().unwrap().contains("/nonexistent.iso"),
        "{r}"
    );
    vm.api(r#"{"cmd":"stop"}"#);
    assert!(vm.wait_exit(BOOT).success());
}

#[test]
fn serial_console_streams_history_over_the_control_socket() {
    if !kvm_available("serial_console_streams_history_over_the_control_socket") {
        return;
    }
    use std::io::{Read, Write};
    let s = Scratch::new("serial");
    let sock = s.path("api.sock");
    let mut vm = Vmm::start(&guest_args(
        "tg.end=halt",
        &["--api-socket", sock.to_str().unwrap()],
    ));
    vm.wait_for("tg: done ok", BOOT);
    let mut c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(b"{\"cmd\":\"serial\"}\n").unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("tg: done ok") {
        let n = c.read(&mut buf).expect("serial stream");
        assert!(
            n > 0,
            "stream closed early: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("{\"ok\":true}\n"), "{text}");
    assert!(text.contains("tg: entry"), "{text}");
}

#[test]
fn virtio_net_exchanges_arp_and_icmp_with_the_host_over_a_tap() {
    if !kvm_available("virtio_net_exchanges_arp_and_icmp_with_the_host_over_a_tap") {
        return;
    }
    let tap = format!("tgt{}", std::process::id() % 100_000);
    let ip = |args: &[&str]| {
        let st = Command::new("ip").args(args).status().expect("run ip");
        assert!(st.success(), "ip {args:?} failed");
    };
    ip(&["tuntap", "add", &tap, "mode", "tap"]);
    struct Cleanup(String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["link", "del", &self.0]).status();
        }
    }
    let _cleanup = Cleanup(tap.clone());
    let n = std::process::id() % 200 + 20;
    let host_ip = format!("10.{n}.77.1");
    let guest_ip = format!("10.{n}.77.2");
    ip(&["addr", "add", &format!("{host_ip}/24"), "dev", &tap]);
    ip(&["link", "set", &tap, "up"]);
    let rarp = RarpListener::on(&tap);
    let mut vm = Vmm::start(&guest_args(
        &format!("tg.run=net tg.ip={guest_ip} tg.peer={host_ip} tg.end=wait"),
        &["--net", &format!("tap={tap},mac=52:54:00:aa:bb:cc")],
    ));
    // The VMM announced the VM's MAC at once (RARP, as switches learn from), several times.
    let announced = rarp.frames(Duration::from_secs(3));
    assert!(
        announced.len() >= 3
            && announced
                .iter()
                .all(|src| *src == [0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]),
        "RARP announcements from the VM's MAC: {announced:x?}"
    );
    vm.wait_for("tg: net ok", BOOT);
    // And the host reaches the guest.
    let ping = Command::new("ping")
        .args(["-c", "3", "-W", "2", "-I", &tap, &guest_ip])
        .output();
    match ping {
        Ok(out) => assert!(
            out.status.success(),
            "host could not ping the guest: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            vm.output()
        ),
        Err(e) => eprintln!("ping is not installed ({e}); guest-to-host path was checked"),
    }
}

/// A raw socket on a tap that hears RARP frames (what a VMM announces a MAC with).
struct RarpListener(std::os::fd::OwnedFd);

impl RarpListener {
    fn on(tap: &str) -> RarpListener {
        use std::os::fd::FromRawFd;
        const ETH_P_RARP: u16 = 0x8035;
        let name = std::ffi::CString::new(tap).unwrap();
        // SAFETY: plain socket calls with valid, properly sized arguments; the descriptor is
        // owned from here on.
        unsafe {
            let fd = libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW,
                i32::from(ETH_P_RARP.to_be()),
            );
            assert!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            let owned = std::os::fd::OwnedFd::from_raw_fd(fd);
            let mut sa: libc::sockaddr_ll = std::mem::zeroed();
            sa.sll_family = libc::AF_PACKET as u16;
            sa.sll_protocol = ETH_P_RARP.to_be();
            sa.sll_ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
            let r = libc::bind(
                fd,
                &sa as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(r, 0, "bind to {tap}: {}", std::io::Error::last_os_error());
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 200_000,
            };
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            );
            RarpListener(owned)
        }
    }

    /// The source MACs of the RARP frames heard within `window`.
    fn frames(&self, window: Duration) -> Vec<[u8; 6]> {
        use std::os::fd::AsRawFd;
        let until = std::time::Instant::now() + window;
        let mut out = Vec::new();
        let mut buf = [0u8; 2048];
        while std::time::Instant::now() < until {
            // SAFETY: reads into a buffer of its stated size.
            let n =
                unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n >= 14 && buf[12..14] == [0x80, 0x35] {
                out.push(buf[6..12].try_into().unwrap());
            }
        }
        out
    }
}

/// The test guest's `fb` pattern (image/testguest/src/fb.rs): colour bars
/// in the top half, red = x, green = y, blue = x ^ y below.
fn fb_pattern(x: u32, y: u32, w: u32, h: u32) -> u32 {
    const BARS: [u32; 8] = [
        0xffffff, 0xffff00, 0x00ffff, 0x00ff00, 0xff00ff, 0xff0000, 0x0000ff, 0x000000,
    ];
    if y < h / 2 {
        BARS[(x * 8 / w) as usize]
    } else {
        (x & 0xff) << 16 | (y & 0xff) << 8 | ((x ^ y) & 0xff)
    }
}

/// Asks `c` for the whole screen and checks every pixel against the
/// pattern, at the precision of the client's pixel format.
fn assert_pattern(c: &mut rfb::RfbClient) {
    let (w, h) = (c.width, c.height);
    c.request(false, 0, 0, w, h).unwrap();
    let rects = c.read_update().unwrap();
    let area: u32 = rects.iter().map(|r| u32::from(r.2) * u32::from(r.3)).sum();
    assert_eq!(
        area,
        u32::from(w) * u32::from(h),
        "a full update covers the screen once: {rects:?}"
    );
    let f = c.format();
    for y in 0..h {
        for x in 0..w {
            let want = f.expect(fb_pattern(x.into(), y.into(), w.into(), h.into()));
            assert_eq!(c.pixel(x, y), want, "pixel {x},{y} in {f:?}");
        }
    }
}

/// Starts the test guest, entered with boot_params, with a 640x480
/// framebuffer on an RFB socket, running `actions` (the first one `fb`:
/// it paints its pattern).
fn start_fb_guest(s: &Scratch, actions: &str) -> (Vmm, std::path::PathBuf) {
    let sock = s.path("vnc.sock");
    let api = s.path("api.sock");
    let mut args = guest_args(
        &format!("tg.run={actions} tg.end=poweroff"),
        &[
            "--vnc",
            sock.to_str().unwrap(),
            "--framebuffer",
            "640x480",
            "--name",
            "console-test",
            "--api-socket",
            api.to_str().unwrap(),
        ],
    );
    args[1] = linux64_testguest(s).display().to_string();
    let mut vm = Vmm::start(&args);
    vm.wait_for(
        "tg: fb 640x480 bpp=32 stride=2560 base=0xc0000000 size=1245184",
        BOOT,
    );
    vm.wait_for("tg: fb painted", BOOT);
    (vm, sock)
}

/// The guest's drawing reaches RFB clients in the pixel formats they ask
/// for, a change is sent once it happens (found through KVM's dirty log)
/// and not before, and keys typed through RFB reach the guest's i8042 as
/// the right scan codes.
#[test]
fn framebuffer_and_keyboard_over_rfb() {
    if !kvm_available("framebuffer_and_keyboard_over_rfb") {
        return;
    }
    use rfb::{keysym::*, PixelFormat, RfbClient};
    let s = Scratch::new("rfb");
    let (mut vm, sock) = start_fb_guest(&s, "fb,keys,fbfill,keys");
    let mut c = RfbClient::connect(&sock).unwrap();
    assert_eq!(
        (c.width, c.height, c.name.as_str()),
        (640, 480, "console-test")
    );
    assert_eq!(c.server_format, PixelFormat::XRGB32);
    c.set_encodings(&[0, -223]).unwrap();
    assert_pattern(&mut c);
    // Nothing changed: an incremental request is not answered yet.
    c.request(true, 0, 0, 640, 480).unwrap();
    assert!(
        !c.pending(Duration::from_millis(300)).unwrap(),
        "update without a change"
    );
    // Other clients at once, in other formats, and Zlib encoded (two full
    // updates through one zlib stream).
    for (f, encodings) in [
        (PixelFormat::BGR32_BE, &[0, -223][..]),
        (PixelFormat::RGB565, &[0]),
        (PixelFormat::XRGB32, &[7, 6, 0, -256 + 6]),
        (PixelFormat::RGB565, &[6]),
    ] {
        let mut other = RfbClient::connect(&sock).unwrap();
        other.set_pixel_format(f).unwrap();
        other.set_encodings(encodings).unwrap();
        assert_pattern(&mut other);
        let raw_size = u64::from(other.width) * u64::from(other.height) * f.bytes() as u64;
        if encodings.contains(&6) {
            assert_pattern(&mut other);
            // The pattern's bars and gradients shrink too, if less than text.
            assert!(
                other.update_bytes < raw_size,
                "{f:?}, Zlib: {} bytes for two full updates of {raw_size}",
                other.update_bytes
            );
        } else {
            assert!(
                other.update_bytes > raw_size,
                "{f:?}, Raw: {} bytes",
                other.update_bytes
            );
        }
    }

    vm.wait_for("tg: keys waiting", BOOT);
    c.key(SHIFT_L, true).unwrap();
    c.tap(u32::from(b'H')).unwrap();
    c.key(SHIFT_L, false).unwrap();
    for k in [b'i', b' ', b'1', b'!'] {
        // '!' without Shift held: the VMM adds it.
        c.tap(u32::from(k)).unwrap();
    }
    for k in [F1, UP, BACKSPACE] {
        c.tap(k).unwrap();
    }
    c.key(CONTROL_L, true).unwrap();
    c.tap(u32::from(b'c')).unwrap();
    c.key(CONTROL_L, false).unwrap();
    c.tap(RETURN).unwrap();
    let line = vm.wait_for("tg: keys scancodes=", BOOT);
    assert_eq!(
        line,
        "tg: keys scancodes=2a,23,a3,aa,17,97,39,b9,02,82,2a,02,aa,82,3b,bb,\
         e0,48,e0,c8,0e,8e,1d,2e,ae,9d,1c line=Hi 1!<f1><up><bs>^C"
    );

    // The guest paints the screen over: the pending incremental request
    // is answered, as often as needed until the client has it all.
    vm.wait_for("tg: fb filled", BOOT);
    let fill = c.format().expect(0x336699);
    let deadline = std::time::Instant::now() + BOOT;
    loop {
        c.read_update().unwrap();
        let done = (0..480).all(|y| (0..640).all(|x| c.pixel(x, y) == fill));
        if done {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the fill never fully arrived"
        );
        c.request(true, 0, 0, 640, 480).unwrap();
    }
    c.tap(RETURN).unwrap();
    vm.wait_for("tg: done ok", BOOT);
    assert!(
        !vm.output().contains("no dirty log"),
        "KVM's dirty log of the framebuffer failed:\n{}",
        vm.output()
    );
    assert!(vm.wait_exit(BOOT).success());
    assert!(!sock.exists(), "the RFB socket should be removed on exit");
}

/// Clients that send garbage are closed one by one; the VM runs on and
/// a well-behaved client still gets pictures and types.
#[test]
fn hostile_rfb_clients_are_closed_and_the_vm_runs_on() {
    if !kvm_available("hostile_rfb_clients_are_closed_and_the_vm_runs_on") {
        return;
    }
    use rfb::{closed_by_peer, connect_retrying, keysym::RETURN, PixelFormat, RfbClient};
    use std::io::{Read, Write};
    let s = Scratch::new("rfb-hostile");
    let (mut vm, sock) = start_fb_guest(&s, "fb,keys");
    let mut good = RfbClient::connect(&sock).unwrap();

    // Not RFB at all.
    let mut bad = connect_retrying(&sock).unwrap();
    let mut version = [0u8; 12];
    bad.read_exact(&mut version).unwrap();
    bad.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert!(closed_by_peer(&mut bad), "garbage handshake");
    // A clipboard of 4 GiB, an unknown message type.
    for (what, bytes) in [
        (
            "huge ClientCutText",
            vec![6u8, 0, 0, 0, 0xff, 0xff, 0xff, 0xff],
        ),
        ("unknown message type", vec![0x42, 1, 2, 3]),
    ] {
        let mut c = RfbClient::connect(&sock).unwrap();
        c.stream().write_all(&bytes).unwrap();
        assert!(closed_by_peer(c.stream()), "{what}");
    }
    // A colour-map pixel format.
    let mut c = RfbClient::connect(&sock).unwrap();
    c.set_pixel_format(PixelFormat {
        bits_per_pixel: 8,
        depth: 8,
        true_colour: false,
        ..PixelFormat::XRGB32
    })
    .unwrap();
    assert!(closed_by_peer(c.stream()), "colour-map pixel format");

    assert_eq!(vm.api(r#"{"cmd":"status"}"#)["status"]["state"], "running");
    assert_pattern(&mut good);
    vm.wait_for("tg: keys waiting", BOOT);
    for k in [b'o', b'k'] {
        good.tap(u32::from(k)).unwrap();
    }
    good.tap(RETURN).unwrap();
    let line = vm.wait_for("tg: keys scancodes=", BOOT);
    assert!(line.ends_with(" line=ok"), "{line}");
    vm.wait_for("tg: done ok", BOOT);
    assert!(vm.wait_exit(BOOT).success());
}

/// A guest flooding its serial port fills no disk: the serial log keeps the newest
/// `--serial-max-kib` of output, in FILE and FILE.1, and the VMM goes on and obeys the guest.
#[test]
fn a_guest_flooding_its_serial_port_keeps_to_the_log_s_bound() {
    if !kvm_available("a_guest_flooding_its_serial_port_keeps_to_the_log_s_bound") {
        return;
    }
    let s = Scratch::new("flood");
    let log = s.path("serial.log");
    let mut child = Command::new(enspeed_bin())
        .arg("vmm")
        .args(guest_args(
            "tg.run=flood tg.floodkib=1024 tg.end=poweroff",
            &["--serial", log.to_str().unwrap(), "--serial-max-kib", "512"],
        ))
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("start enspeed vmm");
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the flooding guest did not power off in 180 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "guest poweroff must exit 0: {status}");
    let old = s.path("serial.log.1");
    let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let (new_len, old_len) = (size(&log), size(&old));
    assert!(
        new_len + old_len <= 512 << 10,
        "the log holds {new_len} + {old_len} bytes, over 512 KiB"
    );
    assert!(
        old_len == 256 << 10,
        "the log was rotated: {old_len}; the log ends {:?}",
        String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default())
            .chars()
            .rev()
            .take(400)
            .collect::<String>()
            .chars()
            .rev()
            .collect::<String>()
    );
    let newest = String::from_utf8_lossy(&std::fs::read(&log).unwrap()).into_owned();
    assert!(
        newest.contains("tg: flood done bytes=1048"),
        "the newest output is kept: {:?}",
        &newest[newest.len().saturating_sub(300)..]
    );
}

/// The `tick` line's count: `tg: tick n=N maxgap-us=G`.
fn tick_count(line: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("n="))
        .and_then(|n| n.parse().ok())
}

/// Live migration (issue 13), level 1: the test guest counts and keeps rewriting 4 MiB of its
/// memory, checking each page held what it wrote the pass before; its VMM moves it to a second
/// VMM started with `--incoming`. The second goes on counting from where the first stopped,
/// without booting again, every page as written; the first ends. A migration to nobody or of a
/// paused VM is refused and the VM runs on where it was.
#[test]
fn a_running_guest_moves_live_to_another_vmm_and_counts_on() {
    if !kvm_available("a_running_guest_moves_live_to_another_vmm_and_counts_on") {
        return;
    }
    let s = Scratch::new("migrate");
    // 64 MiB of it carry data, the rest was never touched.
    let cmdline = "tg.run=fill,tick tg.fillmib=64 tg.tickms=120000";
    let src_api = s.path("src.sock");
    let mut src = Vmm::start(&guest_args(
        cmdline,
        &["--api-socket", src_api.to_str().unwrap()],
    ));
    src.wait_for("tg: tick ready", BOOT);
    src.wait_for("tg: tick n=", BOOT);

    // Refused, and nothing changes: nobody at the target socket; a paused VM.
    let nobody = s.path("nobody.sock");
    let r = src.api(&format!(
        r#"{{"cmd":"migrate","to":"{}"}}"#,
        nobody.display()
    ));
    assert_eq!(r["ok"], false, "{r}");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("reaching the target VMM"),
        "{r}"
    );
    assert_eq!(src.api(r#"{"cmd":"pause"}"#)["ok"], true);
    let r = src.api(&format!(
        r#"{{"cmd":"migrate","to":"{}"}}"#,
        nobody.display()
    ));
    assert!(
        r["error"].as_str().unwrap().contains("only a running VM"),
        "{r}"
    );
    assert_eq!(src.api(r#"{"cmd":"resume"}"#)["ok"], true);
    let before = tick_count(&src.wait_for("tg: tick n=", BOOT)).unwrap();

    let incoming = s.path("incoming.sock");
    let dst_api = s.path("dst.sock");
    let mut dst = Vmm::start(&guest_args(
        cmdline,
        &[
            "--api-socket",
            dst_api.to_str().unwrap(),
            "--incoming",
            incoming.to_str().unwrap(),
        ],
    ));
    let deadline = std::time::Instant::now() + BOOT;
    while !incoming.exists() {
        assert!(std::time::Instant::now() < deadline, "no incoming socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = src.api(&format!(
        r#"{{"cmd":"migrate","to":"{}"}}"#,
        incoming.display()
    ));
    assert_eq!(r["ok"], true, "{r}\n{}", src.output());
    let m = &r["migrated"];
    eprintln!(
        "migrated: downtime {} ms, total {} ms, {} rounds, {} bytes",
        m["downtime_ms"], m["total_ms"], m["rounds"], m["transferred_bytes"]
    );
    // The data went; memory never touched did not (the guest has 128 MiB).
    let sent = m["transferred_bytes"].as_u64().unwrap();
    assert!((64 << 20..128 << 20).contains(&sent), "{r}");
    assert!(m["rounds"].as_u64().unwrap() >= 1, "{r}");
    assert!(
        src.wait_exit(BOOT).success(),
        "the source VMM must end once the VM runs elsewhere:\n{}",
        src.output()
    );
    let last_here = src.output().lines().filter_map(tick_count).max().unwrap();
    assert!(last_here > before);

    // The copy counts on from there, page checks holding, and never boots again.
    let mut after = Vec::new();
    while after.len() < 5 {
        after.push(tick_count(&dst.wait_for("tg: tick n=", BOOT)).unwrap());
    }
    assert!(
        after[0] > last_here && after.windows(2).all(|w| w[1] > w[0]),
        "the count did not go on from {last_here}: {after:?}\n{}",
        dst.output()
    );
    let out = dst.output();
    assert!(!out.contains("tg: entry"), "the guest booted again:\n{out}");
    assert!(!out.contains("tg: FAIL"), "{out}");
    let st = dst.api(r#"{"cmd":"status"}"#);
    assert_eq!(st["status"]["state"], "running", "{st}");
}

/// The highest `seq` of the `tg: ack blk=B seq=S` lines in `output`.
fn last_ack(output: &str) -> Option<u64> {
    output
        .lines()
        .filter(|l| l.starts_with("tg: ack "))
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("seq=")))
        .filter_map(|v| v.parse().ok())
        .max()
}

/// Live migration of a guest writing its disk, with its screen: the guest (entered with
/// boot_params, a 640x480 framebuffer it paints once) keeps writing stamped blocks one at a
/// time, printing every 16th acknowledgement, while its VMM moves it to a second one. The
/// disk is a file the VMM serves (`file`) or served by a vhost-user-blk backend in this
/// process (`vhost-user`), which the source hands over to the target at the pause; its writes
/// into guest memory during the copy are found through the dirty log it shares. The target's
/// guest acknowledges on past the source's last, without booting again; its RFB console shows
/// the picture painted before the move; every write acknowledged on either side is in the file.
fn a_guest_writing_its_disk_moves_live(kind: &str) {
    let s = Scratch::new(&format!("migrate-{kind}"));
    const BLOCKS: u64 = 64;
    let disk = s.disk("disk.img", 16 << 20);
    let sock = s.path("disk.sock");
    let (disk_arg, server) = match kind {
        "file" => (disk.display().to_string(), None),
        _ => {
            let store =
                blockrepl::store::FileStore::open(&disk, false).expect("open the disk file");
            let server = blockrepl::vhost_blk::spawn(&sock, std::sync::Arc::new(store))
                .expect("start the vhost-user-blk backend");
            (format!("vhost-user={}", sock.display()), Some(server))
        }
    };
    let vmm = |side: &str, incoming: Option<&std::path::Path>| {
        let api = s.path(&format!("{side}-api.sock"));
        let vnc = s.path(&format!("{side}-vnc.sock"));
        let mut extra = vec![
            "--vnc",
            vnc.to_str().unwrap(),
            "--framebuffer",
            "640x480",
            "--api-socket",
            api.to_str().unwrap(),
            "--disk",
            &disk_arg,
        ];
        if let Some(i) = incoming {
            extra.extend(["--incoming", i.to_str().unwrap()]);
        }
        let mut args = guest_args(
            &format!("tg.run=fb,stamp tg.blocks={BLOCKS} tg.ops=0 tg.ackevery=16"),
            &extra,
        );
        args[1] = linux64_testguest(&s).display().to_string();
        (Vmm::start(&args), vnc)
    };
    let (mut src, _) = vmm("src", None);
    src.wait_for("tg: fb painted", BOOT);
    for _ in 0..3 {
        src.wait_for("tg: ack ", BOOT);
    }
    if kind == "file" {
        // A target whose disk differs (another size) refuses the VM once it has all of it,
        // and says so: the VM runs on at the source, writing on.
        let other = s.disk("other.img", 8 << 20);
        let incoming = s.path("refusing.sock");
        let mut args = guest_args(
            &format!("tg.run=fb,stamp tg.blocks={BLOCKS} tg.ops=0 tg.ackevery=16"),
            &[
                "--vnc",
                s.path("refusing-vnc.sock").to_str().unwrap(),
                "--framebuffer",
                "640x480",
                "--disk",
                other.to_str().unwrap(),
                "--incoming",
                incoming.to_str().unwrap(),
            ],
        );
        args[1] = linux64_testguest(&s).display().to_string();
        let mut refusing = Vmm::start(&args);
        let deadline = std::time::Instant::now() + BOOT;
        while !incoming.exists() {
            assert!(std::time::Instant::now() < deadline, "no incoming socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        let r = src.api(&format!(
            r#"{{"cmd":"migrate","to":"{}"}}"#,
            incoming.display()
        ));
        assert_eq!(r["ok"], false, "{r}");
        let e = r["error"].as_str().unwrap();
        assert!(
            e.contains("the target refused the VM") && e.contains("differs"),
            "{r}"
        );
        assert!(
            !refusing.wait_exit(BOOT).success(),
            "the refusing target must fail"
        );
        let before = last_ack(&src.output()).unwrap();
        let mut now = before;
        while now <= before + 3 * 16 {
            now = last_ack(&src.wait_for("tg: ack ", BOOT)).unwrap();
        }
    }
    let incoming = s.path("incoming.sock");
    let (mut dst, dst_vnc) = vmm("dst", Some(&incoming));
    let deadline = std::time::Instant::now() + BOOT;
    while !incoming.exists() {
        assert!(std::time::Instant::now() < deadline, "no incoming socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = src.api(&format!(
        r#"{{"cmd":"migrate","to":"{}"}}"#,
        incoming.display()
    ));
    assert_eq!(r["ok"], true, "{r}\n{}\n{}", src.output(), dst.output());
    let m = &r["migrated"];
    eprintln!(
        "{kind} disk: downtime {} ms, total {} ms, {} rounds, {} bytes",
        m["downtime_ms"], m["total_ms"], m["rounds"], m["transferred_bytes"]
    );
    assert!(
        src.wait_exit(BOOT).success(),
        "the source VMM must end once the VM runs elsewhere:\n{}",
        src.output()
    );
    let last_here = last_ack(&src.output()).expect("acknowledgements at the source");

    // The target's guest writes on from there.
    let mut after = 0;
    while after <= last_here + 5 * 16 {
        after = last_ack(&dst.wait_for("tg: ack ", BOOT)).unwrap();
    }
    let out = dst.output();
    assert!(!out.contains("tg: entry"), "the guest booted again:\n{out}");
    assert!(!out.contains("tg: FAIL"), "{out}");

    // Its screen came along.
    let mut c = rfb::RfbClient::connect(&dst_vnc).expect("the target's RFB console");
    assert_pattern(&mut c);

    // Every write acknowledged before the last acknowledgement (one at a time: each completed
    // before the next began) is in the file, or a later one of the same block.
    assert_eq!(dst.api(r#"{"cmd":"pause"}"#)["ok"], true);
    let acked = last_ack(&dst.output()).unwrap();
    let image = std::fs::read(&disk).unwrap();
    for blk in 0..BLOCKS {
        // The last write of this block at or before `acked`.
        let Some(want) = (1..=acked).rev().find(|q| q % BLOCKS == blk) else {
            continue;
        };
        match read_stamp(&image, blk) {
            Stamp::Seq(got) => assert!(
                got >= want && got % BLOCKS == blk,
                "block {blk} holds write {got}; write {want} was acknowledged"
            ),
            other => panic!("block {blk}: {other:?}; write {want} was acknowledged"),
        }
    }
    drop(dst);
    if let Some(server) = server {
        server.stop().expect("the backend stops cleanly");
    }
}

#[test]
fn a_guest_writing_its_file_disk_moves_live_with_its_screen() {
    if !kvm_available("a_guest_writing_its_file_disk_moves_live_with_its_screen") {
        return;
    }
    a_guest_writing_its_disk_moves_live("file");
}

#[test]
fn a_guest_writing_its_vhost_user_disk_moves_live_with_its_screen() {
    if !kvm_available("a_guest_writing_its_vhost_user_disk_moves_live_with_its_screen") {
        return;
    }
    a_guest_writing_its_disk_moves_live("vhost-user");
}

/// A target that holds the whole VM but never hears its source's go (the source died after the
/// target's Ready: between servers, after the cluster gave the target the disks) runs the VM on
/// the go of its control socket, where the guest stood: no reboot, its writes going on. The go
/// is refused where no VM waits for it. The test stands between the two VMMs as the relay
/// between servers does, and keeps the target's Ready from the source.
#[test]
fn a_target_whose_source_died_after_its_ready_runs_on_the_go_of_its_control_socket() {
    if !kvm_available(
        "a_target_whose_source_died_after_its_ready_runs_on_the_go_of_its_control_socket",
    ) {
        return;
    }
    use vmm_api::migration::{read_reply, Reply};
    let s = Scratch::new("migrate-go");
    let disk = s.disk("disk.img", 16 << 20);
    let vmm = |side: &str, incoming: Option<&std::path::Path>| {
        let api = s.path(&format!("{side}-api.sock"));
        let mut extra = vec![
            "--api-socket",
            api.to_str().unwrap(),
            "--disk",
            disk.to_str().unwrap(),
        ];
        if let Some(i) = incoming {
            extra.extend(["--incoming", i.to_str().unwrap()]);
        }
        (
            Vmm::start(&guest_args(
                "tg.run=stamp tg.blocks=64 tg.ops=0 tg.ackevery=16",
                &extra,
            )),
            api,
        )
    };
    let (mut src, src_api) = vmm("src", None);
    for _ in 0..3 {
        src.wait_for("tg: ack ", BOOT);
    }
    let r = call(&src_api, r#"{"cmd":"migration-go"}"#);
    assert_eq!(r["ok"], false, "{r}");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("no migrated VM waits"),
        "{r}"
    );
    let incoming = s.path("incoming.sock");
    let (mut dst, dst_api) = vmm("dst", Some(&incoming));
    let deadline = std::time::Instant::now() + BOOT;
    while !incoming.exists() {
        assert!(std::time::Instant::now() < deadline, "no incoming socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = call(&dst_api, r#"{"cmd":"migration-go"}"#);
    assert_eq!(
        r["ok"], false,
        "a target that holds nothing yet takes no go: {r}"
    );
    // The relay: the stream forth untouched; the target's Ready kept from the source.
    let relay = s.path("relay.sock");
    let listener = std::os::unix::net::UnixListener::bind(&relay).unwrap();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let relaying = {
        let incoming = incoming.clone();
        std::thread::spawn(move || {
            let (mut from_src, _) = listener.accept().unwrap();
            let mut to_dst = std::os::unix::net::UnixStream::connect(&incoming).unwrap();
            let mut back = to_dst.try_clone().unwrap();
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut from_src, &mut to_dst);
            });
            let _ = ready_tx.send(read_reply(&mut back).map_err(|e| e.to_string()));
            read_reply(&mut back).map_err(|e| e.to_string())
        })
    };
    {
        let (api, relay) = (src_api.clone(), relay.clone());
        // Its answer never comes: the source dies waiting for the target's Ready.
        std::thread::spawn(move || {
            use std::io::{BufRead, Write};
            let Ok(mut c) = std::os::unix::net::UnixStream::connect(&api) else {
                return;
            };
            let _ = writeln!(c, r#"{{"cmd":"migrate","to":"{}"}}"#, relay.display());
            let _ = std::io::BufReader::new(c).read_line(&mut String::new());
        });
    }
    let ready = ready_rx
        .recv_timeout(BOOT)
        .expect("the target's first reply");
    assert_eq!(ready, Ok(Reply::Ready), "\n{}", dst.output());
    src.kill9();
    let last_at_source = last_ack(&src.output()).expect("acknowledgements at the source");
    let r = call(&dst_api, r#"{"cmd":"migration-go"}"#);
    assert_eq!(r["ok"], true, "{r}\n{}", dst.output());
    assert_eq!(
        relaying.join().unwrap(),
        Ok(Reply::Resumed),
        "\n{}",
        dst.output()
    );
    let mut after = 0;
    while after <= last_at_source + 3 * 16 {
        after = last_ack(&dst.wait_for("tg: ack ", BOOT)).unwrap();
    }
    let out = dst.output();
    assert!(!out.contains("tg: entry"), "the guest booted again:\n{out}");
    assert!(!out.contains("tg: FAIL"), "{out}");
}

/// Auto-converge: a guest that rewrites 16 MiB at 256 MB/s moves over a link of about 40 MB/s
/// (a relay the test holds to that rate), which never catches up with it; asked to, the source
/// holds the vCPUs back a growing share of the time (its progress says how much) until what
/// is left fits a 300 ms pause. The guest counts on at the target, its memory checks holding,
/// and runs freely there.
#[test]
fn a_guest_dirtying_faster_than_the_link_is_slowed_until_its_move_converges() {
    if !kvm_available("a_guest_dirtying_faster_than_the_link_is_slowed_until_its_move_converges") {
        return;
    }
    let s = Scratch::new("migrate-converge");
    let cmdline = "tg.run=tick tg.tickmib=16 tg.tickpages=64 tg.tickms=120000";
    let src_api = s.path("src.sock");
    let mut src = Vmm::start(&guest_args(
        cmdline,
        &["--api-socket", src_api.to_str().unwrap()],
    ));
    src.wait_for("tg: tick n=", BOOT);
    // Steps over five lines (half a second; 500 at full speed): the source's own pace before
    // the move, beside whatever else this machine runs, is what the target's is held to.
    let pace = |vmm: &mut Vmm| {
        let first = tick_count(&vmm.wait_for("tg: tick n=", BOOT)).unwrap();
        let mut last = first;
        for _ in 0..5 {
            last = tick_count(&vmm.wait_for("tg: tick n=", BOOT)).unwrap();
        }
        last - first
    };
    let before = pace(&mut src);
    let incoming = s.path("incoming.sock");
    let mut dst = Vmm::start(&guest_args(
        cmdline,
        &["--incoming", incoming.to_str().unwrap()],
    ));
    let deadline = std::time::Instant::now() + BOOT;
    while !incoming.exists() {
        assert!(std::time::Instant::now() < deadline, "no incoming socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The link: 256 KiB every 6.5 ms forth, the replies back as they come.
    let relay = s.path("relay.sock");
    let listener = std::os::unix::net::UnixListener::bind(&relay).unwrap();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut from_src, _) = listener.accept().unwrap();
        let mut to_dst = std::os::unix::net::UnixStream::connect(&incoming).unwrap();
        let (mut back_r, mut back_w) = (to_dst.try_clone().unwrap(), from_src.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut back_r, &mut back_w);
        });
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let t = std::time::Instant::now();
            let n = match from_src.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if to_dst.write_all(&buf[..n]).is_err() {
                break;
            }
            let due = Duration::from_micros(6500) * n as u32 / (256 << 10);
            std::thread::sleep(due.saturating_sub(t.elapsed()));
        }
        let _ = to_dst.shutdown(std::net::Shutdown::Write);
    });
    let migrate = {
        let (api, relay) = (src_api.clone(), relay.clone());
        std::thread::spawn(move || {
            call(
                &api,
                &format!(
                    r#"{{"cmd":"migrate","to":"{}","downtime_ms":300,"auto_converge":true}}"#,
                    relay.display()
                ),
            )
        })
    };
    let mut held = 0;
    while !migrate.is_finished() {
        let r = call(&src_api, r#"{"cmd":"migration-status"}"#);
        if let Some(t) = r["migration"]["throttle_pct"].as_u64() {
            held = held.max(t);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = migrate.join().unwrap();
    assert_eq!(r["ok"], true, "{r}\n{}", src.output());
    eprintln!(
        "auto-converge: {}, the vCPUs held back up to {held}%",
        r["migrated"]
    );
    assert!(
        held >= 20,
        "the guest was never held back: {held}%\n{}",
        src.output()
    );
    // At the target: counting on at the source's pace from before the move, once its first
    // pass over the region is done (a step then touches pages this VMM's KVM maps for the
    // first time since the move).
    for _ in 0..5 {
        dst.wait_for("tg: tick n=", BOOT);
    }
    let after = pace(&mut dst);
    assert!(
        after * 10 >= before.min(500) * 7,
        "the guest runs slowly at the target: {after} steps in half a second, against {before} \
         at the source before the move"
    );
    let out = dst.output();
    assert!(!out.contains("tg: FAIL"), "{out}");
}

/// One request to a VMM's control socket at `path`, from any thread.
fn call(path: &std::path::Path, request: &str) -> serde_json::Value {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(path).expect("the control socket");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    s.write_all(b"\n").unwrap();
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad answer {line:?}: {e}"))
}

/// A migration says where it stands while it copies (phase, bytes sent, the VM's size) and is
/// cancelled while it still copies: the VM runs on where it was. The target here is a socket
/// that takes the stream slowly (about 30 MB/s), so that the copy lasts seconds.
#[test]
fn a_migration_reports_its_progress_and_is_cancelled_while_it_copies() {
    if !kvm_available("a_migration_reports_its_progress_and_is_cancelled_while_it_copies") {
        return;
    }
    let s = Scratch::new("migrate-cancel");
    let api = s.path("api.sock");
    let mut src = Vmm::start(&guest_args(
        "tg.run=fill,tick tg.fillmib=64 tg.tickms=120000",
        &["--api-socket", api.to_str().unwrap()],
    ));
    src.wait_for("tg: tick n=", BOOT);
    let slow = s.path("slow.sock");
    let listener = std::os::unix::net::UnixListener::bind(&slow).unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let (mut c, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        while let Ok(n) = c.read(&mut buf) {
            if n == 0 {
                break;
            }
            got += n as u64;
            std::thread::sleep(Duration::from_millis(30));
        }
        got
    });
    let r = call(&api, r#"{"cmd":"cancel-migration"}"#);
    assert!(
        r["error"].as_str().unwrap().contains("no live migration"),
        "{r}"
    );
    let migrate = {
        let (api, slow) = (api.clone(), slow.clone());
        std::thread::spawn(move || {
            call(
                &api,
                &format!(r#"{{"cmd":"migrate","to":"{}"}}"#, slow.display()),
            )
        })
    };
    let deadline = std::time::Instant::now() + BOOT;
    let seen = loop {
        let r = call(&api, r#"{"cmd":"migration-status"}"#);
        let m = &r["migration"];
        if m["phase"] == "copying" && m["transferred_bytes"].as_u64().unwrap_or(0) >= 16 << 20 {
            break m.clone();
        }
        assert!(std::time::Instant::now() < deadline, "no progress: {r}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(seen["memory_bytes"], 128u64 << 20, "{seen}");
    // How far through memory round 0 is: at least what went whole.
    assert!(
        seen["covered_bytes"].as_u64().unwrap() >= seen["transferred_bytes"].as_u64().unwrap(),
        "{seen}"
    );
    assert_eq!(seen["round"], 0, "{seen}");
    let r = call(&api, r#"{"cmd":"cancel-migration"}"#);
    assert_eq!(r["ok"], true, "{r}");
    let r = migrate.join().unwrap();
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"].as_str().unwrap().contains("cancelled"), "{r}");
    let got = reader.join().unwrap();
    assert!(
        got < 64 << 20,
        "the copy stopped before the end of the guest's 64 MiB of data: {got} bytes"
    );
    // It runs on here, and nothing is under way any more.
    let before = tick_count(&src.wait_for("tg: tick n=", BOOT)).unwrap();
    let after = tick_count(&src.wait_for("tg: tick n=", BOOT)).unwrap();
    assert!(after > before);
    assert_eq!(src.api(r#"{"cmd":"status"}"#)["status"]["state"], "running");
    assert!(call(&api, r#"{"cmd":"migration-status"}"#)["migration"].is_null());
}

/// A target that takes the whole VM and then says nothing, and goes: the source cannot know
/// whether it runs the VM, so the VM stays paused there; resumed (its driver learnt the target
/// never will), the guest goes on writing its disk, its devices started again from where they
/// stopped.
#[test]
fn a_vm_left_paused_by_a_silent_target_resumes_with_its_devices() {
    if !kvm_available("a_vm_left_paused_by_a_silent_target_resumes_with_its_devices") {
        return;
    }
    let s = Scratch::new("migrate-silent");
    let api = s.path("api.sock");
    let disk = s.disk("disk.img", 16 << 20);
    let mut src = Vmm::start(&guest_args(
        "tg.run=fill,stamp tg.fillmib=32 tg.blocks=64 tg.ops=0 tg.ackevery=16",
        &[
            "--api-socket",
            api.to_str().unwrap(),
            "--disk",
            disk.to_str().unwrap(),
        ],
    ));
    src.wait_for("tg: ack ", BOOT);
    let silent = s.path("silent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&silent).unwrap();
    let taker = std::thread::spawn(move || {
        use std::io::Read;
        let (mut c, _) = listener.accept().unwrap();
        // Everything the source sends, until it waits for an answer; then gone, unanswered.
        c.set_read_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        while let Ok(n) = c.read(&mut buf) {
            if n == 0 {
                break;
            }
            got += n as u64;
        }
        got
    });
    let r = call(
        &api,
        &format!(r#"{{"cmd":"migrate","to":"{}"}}"#, silent.display()),
    );
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"].as_str().unwrap().contains("stays paused"), "{r}");
    assert!(
        taker.join().unwrap() >= 32 << 20,
        "the target took the whole VM (its 32 MiB of data at least)"
    );
    assert_eq!(src.api(r#"{"cmd":"status"}"#)["status"]["state"], "paused");
    let before = last_ack(&src.output()).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        last_ack(&src.output()).unwrap(),
        before,
        "a paused guest writes nothing"
    );
    assert_eq!(src.api(r#"{"cmd":"resume"}"#)["ok"], true);
    let mut now = before;
    while now <= before + 3 * 16 {
        now = last_ack(&src.wait_for("tg: ack ", BOOT)).unwrap();
    }
}
