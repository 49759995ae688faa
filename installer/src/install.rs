//! The install itself: partition the disk, copy the system, configure it, make it bootable.
//!
//! ```text
//!   check ──> blank the disk ──> partition ──> filesystems ──> copy the system
//!                                                                   │
//!   done <── bootloader (last) <── settings <───────────────────────┘
//!    any step fails ──> blank the disk again: unbootable, never half-installed
//! ```
//!
//! The disk (GPT, BIOS and UEFI alike): 1 MiB for GRUB's BIOS stage, a 256 MiB EFI system
//! partition, the system (6 GiB, read-only at run time) and /var, the rest: logs, the server's
//! state and its storage pool for VM disks.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::answers::{After, Answers, ClusterChoice};
use crate::files::{self, label};
use crate::probe::{Disk, Nic};

/// The smallest disk an install takes: the system partitions and 4 GiB for /var.
pub const MIN_DISK: u64 = 12 << 30;
const ROOT_MIB: u64 = 6 * 1024;

/// One install's resolved choices.
#[derive(Debug)]
pub struct Plan {
    /// The answers.
    pub answers: Answers,
    /// The target disk.
    pub disk: Disk,
    /// The management card.
    pub mgmt: Nic,
    /// The card VM traffic goes out on.
    pub vm: Nic,
    /// The server's Raft id.
    pub id: u64,
}

/// An install that failed, and where.
#[derive(Debug, thiserror::Error)]
#[error("{step}: {why}")]
pub struct InstallError {
    /// The step that failed.
    pub step: &'static str,
    /// Why.
    pub why: String,
}

fn fail(step: &'static str, why: impl Into<String>) -> InstallError {
    InstallError {
        step,
        why: why.into(),
    }
}

/// Checks that `disk` can be installed on with these answers.
pub fn check_disk(disk: &Disk, wipe: bool) -> Result<(), InstallError> {
    if disk.is_install_medium {
        return Err(fail(
            "disk",
            format!("{} holds the installer itself", disk.path),
        ));
    }
    if disk.size < MIN_DISK {
        return Err(fail(
            "disk",
            format!(
                "{} has {} MiB; an EnSpeed server needs at least {} GiB",
                disk.path,
                disk.size >> 20,
                MIN_DISK >> 30
            ),
        ));
    }
    if !disk.signatures.is_empty() && !wipe {
        return Err(fail(
            "disk",
            format!(
                "{} holds {}: not erased without wipe = true (or the person's yes)",
                disk.path,
                disk.signatures.join(", ")
            ),
        ));
    }
    Ok(())
}

/// The partition device `n` of `disk` (`/dev/vda2`, `/dev/nvme0n1p2`).
pub fn partition(disk: &str, n: u32) -> String {
    if disk.ends_with(|c: char| c.is_ascii_digit()) {
        format!("{disk}p{n}")
    } else {
        format!("{disk}{n}")
    }
}

/// sfdisk's script for the layout.
pub fn sfdisk_script() -> String {
    format!(
        "label: gpt\n\
         size=1MiB, type=21686148-6449-6E6F-744E-656564454649, name=bios\n\
         size=256MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=esp\n\
         size={ROOT_MIB}MiB, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name={root}\n\
         type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name={var}\n",
        root = label::ROOT,
        var = label::VAR,
    )
}

/// Where progress goes: a line per step, and percentages while copying.
pub trait Progress {
    /// Step `n` of `of` begins.
    fn step(&mut self, n: usize, of: usize, what: &str);
    /// The copy is `percent` done.
    fn percent(&mut self, percent: u32);
}

const STEPS: usize = 7;

/// Runs the install of `plan`, copying the system from `squashfs`, with the target mounted
/// under `target`. On failure the disk is blanked again.
pub fn run(
    plan: &Plan,
    squashfs: &Path,
    target: &Path,
    progress: &mut dyn Progress,
) -> Result<(), InstallError> {
    let r = steps(plan, squashfs, target, progress);
    if r.is_err() {
        unmount_all(target);
        // Unbootable rather than half-installed.
        let _ = Command::new("wipefs")
            .args(["-a", "-f", &plan.disk.path])
            .status();
    }
    r
}

fn steps(
    plan: &Plan,
    squashfs: &Path,
    target: &Path,
    progress: &mut dyn Progress,
) -> Result<(), InstallError> {
    let disk = &plan.disk.path;
    check_disk(&plan.disk, plan.answers.wipe)?;
    if !squashfs.is_file() {
        return Err(fail("system", format!("{} is missing", squashfs.display())));
    }

    progress.step(1, STEPS, &format!("erasing and partitioning {disk}"));
    // Old partitions first, then the disk: nothing old boots from here on.
    for n in 1..=16 {
        let p = partition(disk, n);
        if Path::new(&p).exists() {
            run_cmd("wipefs", Command::new("wipefs").args(["-a", "-f", &p]))?;
        }
    }
    run_cmd("wipefs", Command::new("wipefs").args(["-a", "-f", disk]))?;
    run_input(
        "sfdisk",
        Command::new("sfdisk").args(["--quiet", "--wipe", "always", disk]),
        &sfdisk_script(),
    )?;
    let _ = Command::new("partx").args(["-u", disk]).status();
    let _ = Command::new("udevadm").arg("settle").status();
    let (esp, root, var) = (partition(disk, 2), partition(disk, 3), partition(disk, 4));
    for p in [&esp, &root, &var] {
        wait_for(p)?;
    }

    progress.step(2, STEPS, "making filesystems");
    run_cmd(
        "mkfs.vfat",
        Command::new("mkfs.vfat").args(["-F", "32", "-n", label::ESP, &esp]),
    )?;
    run_cmd(
        "mkfs.ext4",
        Command::new("mkfs.ext4").args(["-q", "-F", "-L", label::ROOT, &root]),
    )?;
    run_cmd(
        "mkfs.ext4",
        Command::new("mkfs.ext4").args(["-q", "-F", "-L", label::VAR, &var]),
    )?;

    progress.step(3, STEPS, "copying the system");
    std::fs::create_dir_all(target)
        .map_err(|e| fail("mount", format!("{}: {e}", target.display())))?;
    mount(&root, target)?;
    mount(&var, &target.join("var"))?;
    mount(&esp, &target.join("boot/efi"))?;
    copy_system(squashfs, target, progress)?;

    progress.step(4, STEPS, "writing the server's settings");
    write_settings(plan, target)?;

    progress.step(5, STEPS, "installing the bootloader (BIOS and UEFI)");
    bootloader(disk, target)?;

    progress.step(6, STEPS, "writing everything to the disk");
    let _ = Command::new("sync").status();
    unmount_all(target);

    progress.step(
        7,
        STEPS,
        match plan.answers.after {
            After::Poweroff => "installed; powering off",
            After::Reboot => "installed; rebooting into the installed system",
        },
    );
    Ok(())
}

fn wait_for(p: &str) -> Result<(), InstallError> {
    for _ in 0..100 {
        if Path::new(p).exists() {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Err(fail(
        "partition",
        format!("{p} did not appear after partitioning"),
    ))
}

fn mount(dev: &str, at: &Path) -> Result<(), InstallError> {
    std::fs::create_dir_all(at).map_err(|e| fail("mount", format!("{}: {e}", at.display())))?;
    run_cmd("mount", Command::new("mount").arg(dev).arg(at))
}

/// Unmounts whatever is mounted under `target`, deepest first.
fn unmount_all(target: &Path) {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let t = target.to_string_lossy();
    let mut under: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .filter(|m| *m == t || m.starts_with(&format!("{t}/")))
        .collect();
    under.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in under {
        let _ = Command::new("umount").arg(m).status();
    }
}

/// Unpacks the system with unsquashfs, telling how far it is: the bytes written under `target`
/// against the system's size, which the ISO carries beside the squashfs (`filesystem.size`,
/// bytes, as Debian's live images do).
fn copy_system(
    squashfs: &Path,
    target: &Path,
    progress: &mut dyn Progress,
) -> Result<(), InstallError> {
    let total: Option<u64> = std::fs::read_to_string(squashfs.with_file_name("filesystem.size"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .filter(|t| *t > 0);
    let before = used_bytes(target);
    let mut child = Command::new("unsquashfs")
        .args(["-f", "-no-progress", "-d"])
        .arg(target)
        .arg(squashfs)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail("copy", format!("unsquashfs: {e}")))?;
    let mut told = 0u64;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) => {}
            Err(e) => return Err(fail("copy", format!("unsquashfs: {e}"))),
        }
        std::thread::sleep(std::time::Duration::from_secs(2));
        if let Some(total) = total {
            let p = (used_bytes(target).saturating_sub(before) * 100 / total).min(99);
            if p >= told + 10 {
                progress.percent(p as u32);
                told = p;
            }
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|e| fail("copy", format!("unsquashfs: {e}")))?;
    if !out.status.success() {
        let last = last_line(&out.stderr);
        return Err(fail(
            "copy",
            format!("unsquashfs {}: {last}", squashfs.display()),
        ));
    }
    progress.percent(100);
    Ok(())
}

/// Bytes in use on the filesystems mounted at `target` and `target/var`.
fn used_bytes(target: &Path) -> u64 {
    [target.to_path_buf(), target.join("var")]
        .iter()
        .filter_map(|p| {
            let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).ok()?;
            // SAFETY: statvfs writes into the zeroed struct it is given; `c` is NUL-terminated.
            let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
            (unsafe { libc::statvfs(c.as_ptr(), &mut st) } == 0)
                .then(|| (st.f_blocks - st.f_bfree) * st.f_frsize)
        })
        .sum()
}

fn write(target: &Path, rel: &str, contents: &str, mode: u32) -> Result<(), InstallError> {
    use std::os::unix::fs::PermissionsExt;
    let p = target.join(rel);
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d)
            .map_err(|e| fail("settings", format!("{}: {e}", d.display())))?;
    }
    std::fs::write(&p, contents)
        .and_then(|()| std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)))
        .map_err(|e| fail("settings", format!("{}: {e}", p.display())))
}

fn write_settings(plan: &Plan, target: &Path) -> Result<(), InstallError> {
    let a = &plan.answers;
    write(target, "etc/fstab", &files::fstab(), 0o644)?;
    write(target, "etc/hostname", &format!("{}\n", a.hostname), 0o644)?;
    write(target, "etc/hosts", &files::hosts(&a.hostname), 0o644)?;
    write(target, "etc/default/grub", &files::grub_defaults(), 0o644)?;
    let vm_mac = (plan.vm.mac != plan.mgmt.mac).then_some(plan.vm.mac.as_str());
    for (name, text) in files::networkd(a, &plan.mgmt.mac, vm_mac) {
        write(target, &format!("etc/systemd/network/{name}"), &text, 0o644)?;
    }
    write(
        target,
        files::SERVER_ENV,
        &files::server_env(a, plan.id),
        0o600,
    )?;
    if let ClusterChoice::Create { manager_password } = &a.cluster {
        write(
            target,
            files::PASSWORD_FILE,
            &format!("{manager_password}\n"),
            0o600,
        )?;
    }
    // The live system's machine id is not this server's.
    write(target, "etc/machine-id", "", 0o444)?;
    run_cmd(
        "systemd-machine-id-setup",
        Command::new("systemd-machine-id-setup")
            .arg("--root")
            .arg(target),
    )
}

/// GRUB for BIOS (into the BIOS boot partition) and UEFI (at the removable path, so no NVRAM
/// entry is needed), and its menu; the last step, so a failure before leaves nothing bootable.
fn bootloader(disk: &str, target: &Path) -> Result<(), InstallError> {
    let binds = ["dev", "proc", "sys", "run"];
    for b in binds {
        let at = target.join(b);
        std::fs::create_dir_all(&at)
            .map_err(|e| fail("bootloader", format!("{}: {e}", at.display())))?;
        run_cmd(
            "mount",
            Command::new("mount")
                .args(["--rbind", &format!("/{b}")])
                .arg(&at),
        )?;
    }
    let chroot = |args: &[&str]| {
        let mut c = Command::new("chroot");
        c.arg(target).args(args);
        c
    };
    let r = run_cmd(
        "grub-install",
        &mut chroot(&["grub-install", "--target=i386-pc", disk]),
    )
    .and_then(|()| {
        run_cmd(
            "grub-install",
            &mut chroot(&[
                "grub-install",
                "--target=x86_64-efi",
                "--efi-directory=/boot/efi",
                "--removable",
                "--no-nvram",
            ]),
        )
    })
    .and_then(|()| {
        run_cmd(
            "update-grub",
            &mut chroot(&["grub-mkconfig", "-o", "/boot/grub/grub.cfg"]),
        )
    });
    for b in binds.iter().rev() {
        let _ = Command::new("umount")
            .args(["-R"])
            .arg(target.join(b))
            .status();
    }
    r
}

fn run_cmd(step: &'static str, c: &mut Command) -> Result<(), InstallError> {
    let out = c
        .stdin(Stdio::null())
        .output()
        .map_err(|e| fail(step, format!("cannot run {:?}: {e}", c.get_program())))?;
    if out.status.success() {
        Ok(())
    } else {
        let last = last_line(&out.stderr);
        Err(fail(
            step,
            format!("{} failed ({}): {last}", describe(c), out.status),
        ))
    }
}

fn run_input(step: &'static str, c: &mut Command, input: &str) -> Result<(), InstallError> {
    use std::io::Write;
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(step, format!("cannot run {:?}: {e}", c.get_program())))?;
    if let Some(mut i) = child.stdin.take() {
        let _ = i.write_all(input.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| fail(step, e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(fail(
            step,
            format!(
                "{} failed: {}",
                describe(c),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ))
    }
}

/// A tool's last words: the last line of what it wrote that is not blank.
fn last_line(stderr: &[u8]) -> String {
    String::from_utf8_lossy(stderr)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_string()
}

fn describe(c: &Command) -> String {
    std::iter::once(c.get_program())
        .chain(c.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A random Raft id for a new server: unique in a cluster with overwhelming odds, and short
/// enough to read (below 2^31, never 0).
pub fn new_server_id() -> u64 {
    let mut b = [0u8; 4];
    getrandom::getrandom(&mut b).expect("the system's random numbers");
    u64::from(u32::from_le_bytes(b) & 0x7fff_ffff).max(1)
}

/// The live system's squashfs, as live-boot mounted its medium.
pub fn live_squashfs() -> PathBuf {
    PathBuf::from("/run/live/medium/live/filesystem.squashfs")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(size: u64, sig: &[&str], medium: bool) -> Disk {
        Disk {
            path: "/dev/vda".into(),
            size,
            model: String::new(),
            signatures: sig.iter().map(|s| s.to_string()).collect(),
            is_install_medium: medium,
        }
    }

    #[test]
    fn a_disk_with_a_filesystem_is_erased_only_when_told() {
        assert!(check_disk(&disk(20 << 30, &[], false), false).is_ok());
        let e = check_disk(&disk(20 << 30, &["ext4 on /dev/vda1"], false), false).unwrap_err();
        assert!(e.to_string().contains("holds ext4 on /dev/vda1"), "{e}");
        assert!(check_disk(&disk(20 << 30, &["ext4 on /dev/vda1"], false), true).is_ok());
        assert!(
            check_disk(&disk(20 << 30, &[], true), true).is_err(),
            "never the medium"
        );
        let small = check_disk(&disk(8 << 30, &[], false), true).unwrap_err();
        assert!(small.to_string().contains("at least 12 GiB"), "{small}");
    }

    #[test]
    fn partitions_are_named_as_the_kernel_names_them() {
        assert_eq!(partition("/dev/vda", 2), "/dev/vda2");
        assert_eq!(partition("/dev/nvme0n1", 3), "/dev/nvme0n1p3");
        assert_eq!(partition("/dev/mmcblk0", 1), "/dev/mmcblk0p1");
        let s = sfdisk_script();
        assert!(s.starts_with("label: gpt\n") && s.matches("type=").count() == 4);
        assert!(
            s.lines().last().unwrap().starts_with("type="),
            "/var takes the rest"
        );
    }
}
