//! `enspeed install`: the appliance's installer, run by `enspeed-installer.service` on the
//! installer ISO's live system. With an answer file (`enspeed-install.toml` on a filesystem
//! labelled `ENSPEED`) it asks nothing; otherwise it asks on the console.

pub mod answers;
pub mod files;
pub mod install;
pub mod probe;
mod prompt;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use answers::{After, Answers, DiskChoice, NicChoice, ANSWER_FILE, ANSWER_LABEL};
use install::{Plan, Progress};
use probe::{Disk, Nic};

/// How `enspeed install` runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// An answer file to use instead of looking for the `ENSPEED` filesystem.
    pub answers: Option<PathBuf>,
    /// The system to copy.
    pub squashfs: PathBuf,
    /// Where the new system is mounted while installing.
    pub target: PathBuf,
    /// Power off or reboot at the end (off: just return, for a person at a shell).
    pub finish: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            answers: None,
            squashfs: install::live_squashfs(),
            target: PathBuf::from("/run/enspeed-target"),
            finish: true,
        }
    }
}

/// What the installer says, on its console and (unattended) on every other console too, so a
/// person at the screen and a log on the serial port both see it.
struct Say {
    extra: Vec<std::fs::File>,
}

impl Say {
    fn new(unattended: bool) -> Say {
        let mut extra = Vec::new();
        if unattended {
            let mine = std::fs::read_link("/proc/self/fd/1")
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default();
            // /dev/console is the kernel's last console= (tty0: the screen's foreground
            // terminal, tty1 at boot).
            let console = std::fs::read_to_string("/sys/class/tty/console/active")
                .ok()
                .and_then(|a| a.split_whitespace().last().map(str::to_string))
                .map(|c| if c == "tty0" { "tty1".to_string() } else { c });
            for tty in ["ttyS0", "tty1"] {
                let same = mine == format!("/dev/{tty}")
                    || (mine == "/dev/console" && console.as_deref() == Some(tty));
                if !same {
                    if let Ok(f) = std::fs::OpenOptions::new()
                        .write(true)
                        .open(format!("/dev/{tty}"))
                    {
                        extra.push(f);
                    }
                }
            }
        }
        Say { extra }
    }

    fn line(&mut self, s: &str) {
        let text = format!("enspeed install: {s}\r\n");
        let _ = std::io::stdout().write_all(text.as_bytes());
        let _ = std::io::stdout().flush();
        for f in &mut self.extra {
            let _ = f.write_all(text.as_bytes());
        }
    }
}

impl Progress for Say {
    fn step(&mut self, n: usize, of: usize, what: &str) {
        self.line(&format!("[{n}/{of}] {what}"));
    }

    fn percent(&mut self, p: u32) {
        self.line(&format!("      copying the system: {p}%"));
    }
}

/// Finds and reads the answer file: `path`, or the `ENSPEED` filesystem's.
fn answer_text(path: Option<&Path>) -> Result<Option<String>, String> {
    if let Some(p) = path {
        return std::fs::read_to_string(p)
            .map(Some)
            .map_err(|e| format!("{}: {e}", p.display()));
    }
    let dev = PathBuf::from(format!("/dev/disk/by-label/{ANSWER_LABEL}"));
    if !dev.exists() {
        return Ok(None);
    }
    let at = Path::new("/run/enspeed-answers");
    std::fs::create_dir_all(at).map_err(|e| format!("{}: {e}", at.display()))?;
    let mounted = Command::new("mount")
        .args(["-o", "ro"])
        .arg(&dev)
        .arg(at)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !mounted {
        return Err(format!(
            "cannot mount the {ANSWER_LABEL} filesystem ({})",
            dev.display()
        ));
    }
    let file = at.join(ANSWER_FILE);
    let r = std::fs::read_to_string(&file);
    let _ = Command::new("umount").arg(at).status();
    match r {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(format!(
            "the {ANSWER_LABEL} filesystem has no {ANSWER_FILE}"
        )),
        Err(e) => Err(format!("{ANSWER_FILE}: {e}")),
    }
}

/// Resolves the disk answer against the machine's disks.
pub fn pick_disk(choice: &DiskChoice, disks: &[Disk]) -> Result<Disk, String> {
    match choice {
        DiskChoice::Path(p) => {
            let real = std::fs::canonicalize(p).map(|r| r.to_string_lossy().into_owned());
            disks
                .iter()
                .find(|d| &d.path == p || real.as_deref().is_ok_and(|r| r == d.path))
                .cloned()
                .ok_or_else(|| format!("disk {p}: no such disk (disks: {})", names(disks)))
        }
        DiskChoice::Largest => disks
            .iter()
            .filter(|d| !d.is_install_medium)
            .max_by_key(|d| d.size)
            .cloned()
            .ok_or_else(|| "disk = \"largest\": this machine has no disk to install on".into()),
    }
}

fn names(disks: &[Disk]) -> String {
    let v: Vec<&str> = disks.iter().map(|d| d.path.as_str()).collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// Resolves a card answer against the machine's cards: `auto` is the first with a link (or,
/// with none linked, the first).
pub fn pick_nic(choice: &NicChoice, nics: &[Nic]) -> Result<Nic, String> {
    match choice {
        NicChoice::Auto => nics
            .iter()
            .find(|n| n.link)
            .or_else(|| nics.first())
            .cloned()
            .ok_or_else(|| "this machine has no network card".into()),
        NicChoice::Named(n) => nics
            .iter()
            .find(|c| &c.name == n || &c.mac == n)
            .cloned()
            .ok_or_else(|| {
                let all: Vec<&str> = nics.iter().map(|c| c.name.as_str()).collect();
                format!("network card {n}: no such card (cards: {})", all.join(", "))
            }),
    }
}

/// Runs the installer; the exit code says whether the disk was installed.
pub fn main(opts: Options) -> ExitCode {
    let version = env!("CARGO_PKG_VERSION");
    let text = answer_text(opts.answers.as_deref());
    let unattended = matches!(text, Ok(Some(_)) | Err(_));
    let mut say = Say::new(unattended);
    say.line(&format!("EnSpeed {version} installer"));
    let disks = match probe::disks() {
        Ok(d) => d,
        Err(e) => return failed(&mut say, &format!("cannot list the disks: {e}")),
    };
    let nics = probe::nics(Duration::from_secs(3));
    let answers = match text {
        Err(e) => return failed(&mut say, &e),
        Ok(Some(t)) => match answers::parse(&t) {
            Ok(a) => {
                say.line(&format!(
                    "unattended: answers from the {ANSWER_LABEL} filesystem"
                ));
                a
            }
            Err(e) => return failed(&mut say, &e.to_string()),
        },
        Ok(None) => match prompt::ask_all(&disks, &nics) {
            Some(a) => a,
            None => {
                return failed(
                    &mut say,
                    "nothing installed: the console closed or the person said no",
                )
            }
        },
    };
    let plan = match resolve(answers, &disks, &nics) {
        Ok(p) => p,
        Err(e) => return failed(&mut say, &e),
    };
    say.line(&format!(
        "installing on {} as {}; management on {} ({}), VM traffic on {}",
        plan.disk.describe(),
        plan.answers.hostname,
        plan.mgmt.name,
        plan.mgmt.mac,
        plan.vm.name
    ));
    if let Err(e) = install::run(&plan, &opts.squashfs, &opts.target, &mut say) {
        return failed(
            &mut say,
            &format!("{e}; {} was left blank (not bootable)", plan.disk.path),
        );
    }
    say.line("ENSPEED-INSTALL: DONE");
    if opts.finish {
        let verb = match plan.answers.after {
            After::Poweroff => "poweroff",
            After::Reboot => "reboot",
        };
        let _ = Command::new("systemctl").arg(verb).status();
    }
    ExitCode::SUCCESS
}

fn resolve(answers: Answers, disks: &[Disk], nics: &[Nic]) -> Result<Plan, String> {
    let disk = pick_disk(&answers.disk, disks)?;
    install::check_disk(&disk, answers.wipe).map_err(|e| e.to_string())?;
    let mgmt = pick_nic(&answers.network.interface, nics)?;
    let vm = match &answers.network.vm_interface {
        NicChoice::Auto => mgmt.clone(),
        c => pick_nic(c, nics)?,
    };
    Ok(Plan {
        answers,
        disk,
        mgmt,
        vm,
        id: install::new_server_id(),
    })
}

fn failed(say: &mut Say, why: &str) -> ExitCode {
    say.line(&format!("ENSPEED-INSTALL: FAILED: {why}"));
    say.line("fix it and boot the installer again; \"Rescue shell\" in its menu gives a shell");
    ExitCode::FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nic(name: &str, mac: &str, link: bool) -> Nic {
        Nic {
            name: name.into(),
            mac: mac.into(),
            link,
        }
    }

    #[test]
    fn auto_is_the_first_card_with_a_link_and_names_match_names_or_macs() {
        let nics = [
            nic("enp1s0", "52:54:00:00:00:01", false),
            nic("enp2s0", "52:54:00:00:00:02", true),
        ];
        assert_eq!(pick_nic(&NicChoice::Auto, &nics).unwrap().name, "enp2s0");
        assert_eq!(
            pick_nic(&NicChoice::Auto, &nics[..1]).unwrap().name,
            "enp1s0"
        );
        assert_eq!(
            pick_nic(&NicChoice::Named("52:54:00:00:00:01".into()), &nics)
                .unwrap()
                .name,
            "enp1s0"
        );
        let e = pick_nic(&NicChoice::Named("eth9".into()), &nics).unwrap_err();
        assert!(e.contains("cards: enp1s0, enp2s0"), "{e}");
        assert!(pick_nic(&NicChoice::Auto, &[]).is_err());
    }

    #[test]
    fn largest_skips_the_medium() {
        let d = |p: &str, size: u64, medium: bool| Disk {
            path: p.into(),
            size,
            model: String::new(),
            signatures: vec![],
            is_install_medium: medium,
        };
        let disks = [
            d("/dev/sda", 64 << 30, true),
            d("/dev/vda", 20 << 30, false),
            d("/dev/vdb", 40 << 30, false),
        ];
        assert_eq!(
            pick_disk(&DiskChoice::Largest, &disks).unwrap().path,
            "/dev/vdb"
        );
        assert_eq!(
            pick_disk(&DiskChoice::Path("/dev/vda".into()), &disks)
                .unwrap()
                .path,
            "/dev/vda"
        );
        let e = pick_disk(&DiskChoice::Path("/dev/sdz".into()), &disks).unwrap_err();
        assert!(e.contains("no such disk"), "{e}");
    }
}
