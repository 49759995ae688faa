//! Level 1, vhost-user-blk: the backend runs in this test process over a
//! file, a real `enspeed vmm` boots the test guest with
//! `--disk vhost-user=SOCKET`, and what the guest wrote is checked byte by
//! byte in the file.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use blockrepl::store::FileStore;
use blockrepl::vhost_blk::{self, VhostBlkServer};
use enspeed_tests::*;

const BOOT: Duration = Duration::from_secs(30);

fn serve(file: &Path, read_only: bool, socket: &Path) -> VhostBlkServer {
    let store = FileStore::open(file, read_only).expect("open the disk file");
    vhost_blk::spawn(socket, Arc::new(store)).expect("start the vhost-user-blk backend")
}

fn disk_arg(socket: &Path) -> String {
    format!("vhost-user={}", socket.display())
}

/// The last acknowledged seq of every stamped block, from the guest's output.
fn last_acks(output: &str) -> HashMap<u64, u64> {
    let mut last = HashMap::new();
    for l in output.lines() {
        if let Some(rest) = l.strip_prefix("tg: ack ") {
            let mut kv = rest
                .split_whitespace()
                .filter_map(|w| w.split_once('='))
                .filter_map(|(k, v)| Some((k, v.parse::<u64>().ok()?)));
            if let (Some(("blk", b)), Some(("seq", s))) = (kv.next(), kv.next()) {
                last.insert(b, s);
            }
        }
    }
    last
}

#[test]
fn guest_io_through_the_backend_reaches_the_file() {
    if !kvm_available("guest_io_through_the_backend_reaches_the_file") {
        return;
    }
    let s = Scratch::new("vhost-io");
    let disk = s.disk("disk0.img", 16 << 20);
    let sock = s.path("disk0.sock");
    let server = serve(&disk, false, &sock);
    let mut vm = Vmm::start(&guest_args(
        "tg.run=blk,blkid,stamp,verify tg.blocks=16 tg.ops=48 tg.flushevery=8 tg.end=poweroff",
        &["--disk", &disk_arg(&sock)],
    ));
    vm.wait_for("tg: blk dev=0 sectors=32768 ro=0 flush=1", BOOT);
    vm.wait_for("tg: blk ok blocks=16", BOOT);
    vm.wait_for("tg: blk id=disk0.img", BOOT);
    vm.wait_for("tg: flushed seq=48", BOOT);
    vm.wait_for("tg: verify ok blocks=16 torn=0", BOOT);
    vm.wait_for("tg: done ok", BOOT);
    assert!(vm.wait_exit(BOOT).success(), "{}", vm.output());

    let last = last_acks(&vm.output());
    assert_eq!(last.len(), 16, "every block is acknowledged at least once");
    let image = std::fs::read(&disk).unwrap();
    for (blk, seq) in last {
        assert_eq!(read_stamp(&image, blk), Stamp::Seq(seq), "block {blk}");
    }
    server.stop().expect("the backend stops cleanly");
}

#[test]
fn a_guest_reboot_connects_again_and_its_disk_still_works() {
    if !kvm_available("a_guest_reboot_connects_again_and_its_disk_still_works") {
        return;
    }
    let s = Scratch::new("vhost-reboot");
    let disk = s.disk("disk.img", 4 << 20);
    let sock = s.path("disk.sock");
    let api = s.path("api.sock");
    let server = serve(&disk, false, &sock);
    let mut vm = Vmm::start(&guest_args(
        "tg.run=stamp,verify tg.blocks=8 tg.ops=12 tg.flushevery=4 tg.end=reboot",
        &[
            "--disk",
            &disk_arg(&sock),
            "--api-socket",
            api.to_str().unwrap(),
        ],
    ));
    for _boot in 1..=3 {
        vm.wait_for("tg: entry", BOOT);
        vm.wait_for("tg: verify ok blocks=8 torn=0", BOOT);
        vm.wait_for("tg: end reboot", BOOT);
    }
    let st = vm.api(r#"{"cmd":"status"}"#);
    let boots = st["status"]["boots"].as_u64().unwrap_or(0);
    assert!(boots >= 3, "{st}");
    assert_eq!(vm.api(r#"{"cmd":"stop"}"#)["ok"], true);
    assert!(vm.wait_exit(BOOT).success());
    let image = std::fs::read(&disk).unwrap();
    for (blk, seq) in last_acks(&vm.output()) {
        assert_eq!(read_stamp(&image, blk), Stamp::Seq(seq), "block {blk}");
    }
    server.stop().expect("the backend stops cleanly");
}

/// The guest sees VIRTIO_BLK_F_RO and does not write; the backend's refusal
/// of writes that come anyway is covered by its own tests.
#[test]
fn a_read_only_store_is_read_only_to_the_guest() {
    if !kvm_available("a_read_only_store_is_read_only_to_the_guest") {
        return;
    }
    let s = Scratch::new("vhost-ro");
    let disk = s.disk("cd.iso", 1 << 20);
    let sock = s.path("cd.sock");
    let server = serve(&disk, true, &sock);
    let mut vm = Vmm::start(&guest_args(
        "tg.run=blk,blkid,verify tg.blocks=4 tg.end=poweroff",
        &["--disk", &disk_arg(&sock)],
    ));
    vm.wait_for("tg: blk dev=0 sectors=2048 ro=1", BOOT);
    vm.wait_for("tg: blk ok blocks=0", BOOT);
    vm.wait_for("tg: blk id=cd.iso", BOOT);
    vm.wait_for("tg: verify ok blocks=4 torn=0", BOOT);
    vm.wait_for("tg: done ok", BOOT);
    assert!(vm.wait_exit(BOOT).success());
    assert!(
        std::fs::read(&disk).unwrap().iter().all(|b| *b == 0),
        "read-only disk was modified"
    );
    server.stop().expect("the backend stops cleanly");
}

#[test]
fn a_backend_that_goes_away_fails_the_guests_io_not_the_vmm() {
    if !kvm_available("a_backend_that_goes_away_fails_the_guests_io_not_the_vmm") {
        return;
    }
    let s = Scratch::new("vhost-gone");
    let disk = s.disk("disk.img", 4 << 20);
    let sock = s.path("disk.sock");
    let api = s.path("api.sock");
    let server = serve(&disk, false, &sock);
    let mut vm = Vmm::start(&guest_args(
        "tg.run=stamp tg.blocks=8 tg.ops=0 tg.timeout=2000 tg.end=halt",
        &[
            "--disk",
            &disk_arg(&sock),
            "--api-socket",
            api.to_str().unwrap(),
        ],
    ));
    vm.wait_for("tg: ack", BOOT);
    server.stop().expect("the backend stops cleanly");
    vm.wait_for("backend hung up", BOOT);
    vm.wait_for("tg: FAIL stamp", BOOT);
    let st = vm.api(r#"{"cmd":"status"}"#);
    assert_eq!(st["status"]["state"], "running", "{st}");
    assert_eq!(vm.api(r#"{"cmd":"stop"}"#)["ok"], true);
    assert!(vm.wait_exit(BOOT).success(), "{}", vm.output());
}

#[test]
fn a_vmm_without_its_backend_refuses_to_start_and_names_the_socket() {
    if !kvm_available("a_vmm_without_its_backend_refuses_to_start_and_names_the_socket") {
        return;
    }
    let s = Scratch::new("vhost-none");
    // Under a file, not a directory: refused at once; a missing socket would
    // be waited for a while, in case its backend is restarting.
    std::fs::write(s.path("file"), b"").unwrap();
    let sock = s.path("file").join("nobody.sock");
    let mut vm = Vmm::start(&guest_args(
        "tg.end=poweroff",
        &["--disk", &disk_arg(&sock)],
    ));
    let st = vm.wait_exit(BOOT);
    let out = vm.output();
    assert!(
        !st.success(),
        "the VMM ended {st} without its backend:\n{out}"
    );
    assert!(
        out.contains(&sock.display().to_string()) && out.contains("vhost-user-blk backend"),
        "{out}"
    );
}

/// Above 3 GiB the guest's RAM is two regions of one memfd (the 32-bit MMIO
/// hole between them): the backend maps both.
#[test]
fn guest_ram_split_around_the_mmio_hole_is_shared_whole() {
    if !kvm_available("guest_ram_split_around_the_mmio_hole_is_shared_whole") {
        return;
    }
    let s = Scratch::new("vhost-4g");
    let disk = s.disk("disk.img", 4 << 20);
    let sock = s.path("disk.sock");
    let server = serve(&disk, false, &sock);
    let mut args = guest_args(
        "tg.run=blk tg.blocks=8 tg.end=poweroff",
        &["--disk", &disk_arg(&sock)],
    );
    let mem = args.iter().position(|a| a == "--memory").unwrap();
    args[mem + 1] = "4608".into();
    let mut vm = Vmm::start(&args);
    vm.wait_for("tg: blk ok blocks=8", BOOT);
    vm.wait_for("tg: done ok", BOOT);
    assert!(vm.wait_exit(BOOT).success());
    server.stop().expect("the backend stops cleanly");
}
