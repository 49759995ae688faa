//! The installer's questions on the console, for a person: each with its default in brackets,
//! each answer checked as the answer file's would be, asked again until it is right.

use std::io::{BufRead, Write};

use crate::answers::{self, After, Answers, ClusterChoice, DiskChoice, Network, NicChoice};
use crate::probe::{Disk, Nic};

struct Console<R, W> {
    input: R,
    out: W,
}

impl<R: BufRead, W: Write> Console<R, W> {
    /// Asks `q`; an empty line takes `default`. `None` when the console closed.
    fn ask(&mut self, q: &str, default: &str) -> Option<String> {
        if default.is_empty() {
            let _ = write!(self.out, "{q}: ");
        } else {
            let _ = write!(self.out, "{q} [{default}]: ");
        }
        let _ = self.out.flush();
        let mut line = String::new();
        match self.input.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => {
                let l = line.trim();
                Some(if l.is_empty() {
                    default.into()
                } else {
                    l.into()
                })
            }
        }
    }

    /// Asks until `check` takes the answer.
    fn ask_until<T>(
        &mut self,
        q: &str,
        default: &str,
        check: impl Fn(&str) -> Result<T, String>,
    ) -> Option<T> {
        loop {
            let a = self.ask(q, default)?;
            match check(&a) {
                Ok(v) => return Some(v),
                Err(e) => {
                    let _ = writeln!(self.out, "  {e}");
                }
            }
        }
    }

    fn say(&mut self, s: &str) {
        let _ = writeln!(self.out, "{s}");
    }
}

/// Asks a person everything, on standard input and output.
pub fn ask_all(disks: &[Disk], nics: &[Nic]) -> Option<Answers> {
    let stdin = std::io::stdin();
    let mut c = Console {
        input: stdin.lock(),
        out: std::io::stdout(),
    };
    ask(&mut c, disks, nics)
}

fn ask<R: BufRead, W: Write>(
    c: &mut Console<R, W>,
    disks: &[Disk],
    nics: &[Nic],
) -> Option<Answers> {
    c.say("\nDisks:");
    for (i, d) in disks.iter().enumerate() {
        c.say(&format!("  {}. {}", i + 1, d.describe()));
    }
    let default_disk = crate::pick_disk(&DiskChoice::Largest, disks)
        .map(|d| d.path)
        .unwrap_or_default();
    let disk = c.ask_until(
        "Install on which disk (number or /dev/ path)",
        &default_disk,
        |a| {
            let path = match a.parse::<usize>() {
                Ok(n) if (1..=disks.len()).contains(&n) => disks[n - 1].path.clone(),
                _ => a.to_string(),
            };
            let choice = answers::disk_choice(&path).map_err(|e| e.why().to_string())?;
            let d = crate::pick_disk(&choice, disks)?;
            crate::install::check_disk(&d, true).map_err(|e| e.to_string())?;
            Ok(d)
        },
    )?;
    let mut wipe = false;
    if !disk.signatures.is_empty() {
        let yes = c.ask(
            &format!(
                "{} holds {}. Erase it all? (yes/no)",
                disk.path,
                disk.signatures.join(", ")
            ),
            "no",
        )?;
        if yes != "yes" {
            return None;
        }
        wipe = true;
    }
    let hostname = c.ask_until("Host name", "vmserver1", |a| {
        answers::hostname(a).map_err(|e| e.why().to_string())
    })?;

    c.say("\nNetwork cards:");
    for (i, n) in nics.iter().enumerate() {
        let link = if n.link { "link up" } else { "no link" };
        c.say(&format!("  {}. {} {} ({link})", i + 1, n.name, n.mac));
    }
    let default_nic = crate::pick_nic(&NicChoice::Auto, nics)
        .map(|n| n.name)
        .unwrap_or_default();
    let nic_answer = |a: &str| -> Result<NicChoice, String> {
        let name = match a.parse::<usize>() {
            Ok(n) if (1..=nics.len()).contains(&n) => nics[n - 1].name.clone(),
            _ => a.to_string(),
        };
        let choice = answers::nic_choice("network", &name).map_err(|e| e.why().to_string())?;
        crate::pick_nic(&choice, nics)?;
        Ok(choice)
    };
    let interface = c.ask_until("Management network card", &default_nic, nic_answer)?;
    let address = c.ask("Management address: dhcp, or ADDRESS/PREFIX", "dhcp")?;
    let addressing = if address == "dhcp" {
        answers::addressing("dhcp", "").ok()?
    } else {
        let mut address = address;
        loop {
            let gw = c.ask("Gateway (empty for none)", "")?;
            match answers::addressing(&address, &gw) {
                Ok(a) => break a,
                Err(e) => {
                    c.say(&format!("  {}", e.why()));
                    address = c.ask("Management address: dhcp, or ADDRESS/PREFIX", "dhcp")?;
                    if address == "dhcp" {
                        break answers::addressing("dhcp", "").ok()?;
                    }
                }
            }
        }
    };
    let vlan = c.ask_until("Management VLAN tag (0 for none)", "0", |a| {
        match a.parse::<u16>() {
            Ok(0) => Ok(None),
            Ok(v @ 1..=4094) => Ok(Some(v)),
            _ => Err(format!("{a:?} is not a VLAN tag (1-4094, 0 for none)")),
        }
    })?;
    let vm_interface = c.ask_until("Network card for VM traffic", &default_nic, nic_answer)?;

    let how = c.ask_until(
        "Create a new cluster or join one? (create/join)",
        "create",
        |a| match a {
            "create" | "join" => Ok(a == "create"),
            _ => Err("create or join".into()),
        },
    )?;
    let cluster = if how {
        loop {
            let p = c.ask_until("The Manager's (admin's) password", "", |a| {
                answers::password(a).map_err(|e| e.why().to_string())
            })?;
            let again = c.ask("The same password again", "")?;
            if again == p {
                break ClusterChoice::Create {
                    manager_password: p,
                };
            }
            c.say("  the two differ; again");
        }
    } else {
        c.say("A Manager shows the cluster's address and join token with `enspeed servers join-info`.");
        c.say("Without them, this server waits to be added by a Manager (VM Servers, Add server).");
        loop {
            let address = c.ask("A member's cluster address (ADDRESS:7400; empty: wait)", "")?;
            if address.is_empty() {
                break ClusterChoice::Await;
            }
            let token = c.ask("The cluster's join token", "")?;
            match answers::join_choice(&address, &token) {
                Ok(j) => break j,
                Err(e) => c.say(&format!("  {}", e.why())),
            }
        }
    };
    let answers = Answers {
        disk: DiskChoice::Path(disk.path.clone()),
        wipe,
        hostname,
        network: Network {
            interface,
            addressing,
            vlan,
            vm_interface,
        },
        cluster,
        after: After::Reboot,
    };
    let go = c.ask(
        &format!("Erase {} and install EnSpeed? (yes/no)", disk.path),
        "no",
    )?;
    (go == "yes").then_some(answers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(input: &str) -> (Option<Answers>, String) {
        let disks = [Disk {
            path: "/dev/vda".into(),
            size: 20 << 30,
            model: "QEMU".into(),
            signatures: vec![],
            is_install_medium: false,
        }];
        let nics = [Nic {
            name: "enp1s0".into(),
            mac: "52:54:00:00:00:01".into(),
            link: true,
        }];
        let mut out = Vec::new();
        let mut c = Console {
            input: input.as_bytes(),
            out: &mut out,
        };
        let a = ask(&mut c, &disks, &nics);
        (a, String::from_utf8(out).unwrap())
    }

    #[test]
    fn a_person_takes_the_defaults_and_corrects_a_mistake() {
        // disk, host name (bad, then good), card, address, gateway, vlan, vm card, create,
        // password (short, then good), again, go.
        let (a, out) = run("\nbad name\ns1\n\n10.0.0.5/24\n10.0.0.1\n\n1\ncreate\nshort\nlong enough\nlong enough\nyes\n");
        let a = a.expect(&out);
        assert_eq!(a.disk, DiskChoice::Path("/dev/vda".into()));
        assert_eq!(a.hostname, "s1");
        assert!(out.contains("is not a host name"), "{out}");
        assert!(out.contains("at least 8 characters"), "{out}");
        assert_eq!(a.network.interface, NicChoice::Named("enp1s0".into()));
        assert!(matches!(
            a.network.addressing,
            answers::Addressing::Static { prefix: 24, .. }
        ));
        assert_eq!(a.after, After::Reboot);
    }

    #[test]
    fn no_at_the_end_or_a_closed_console_installs_nothing() {
        assert!(run("\ns1\n\n\n\n\ncreate\nlong enough\nlong enough\nno\n")
            .0
            .is_none());
        assert!(run("\ns1\n").0.is_none());
    }
}
