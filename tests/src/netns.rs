//! Network namespaces for the whole-system tests: a hub namespace with a bridge, and one
//! namespace per server joined to it by a veth pair, so a test can cut a server's cable (the
//! bridge port) or its power (SIGKILL to every process in its namespace). Needs root.

use std::process::Command;

/// Runs `cmd`; its stdout, or what failed and its stderr.
pub fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr)))
    }
}

/// Runs `ip` with `args`; panics if it fails.
pub fn ip(args: &[&str]) {
    run(Command::new("ip").args(args)).unwrap_or_else(|e| panic!("{e}"));
}

/// A hub namespace with a bridge, and one namespace per server whose `eth0` is linked to the
/// bridge port `p<i>`. Server `i` (from 1) has address `10.<x>.<lan>.<i>/24`, where `x` comes
/// from the process id. Dropping it kills every process in the server namespaces and deletes
/// the namespaces (and with them their veth ends, the peers and the routes over them).
pub struct Net {
    hub: String,
    servers: Vec<String>,
    /// `10.<x>`: the prefix of every address this test uses.
    prefix: String,
    lan: u8,
}

impl Net {
    /// `n` server namespaces named after `tag` (unique among the tests of one process) on the
    /// /24 numbered `lan`; tests that run at once pick different `lan`s.
    pub fn new(tag: &str, n: usize, lan: u8) -> Net {
        let pid = std::process::id();
        let hub = format!("es{pid}{tag}h");
        let _ = run(Command::new("ip").args(["netns", "del", &hub]));
        ip(&["netns", "add", &hub]);
        let mut net = Net {
            hub: hub.clone(),
            servers: Vec::new(),
            prefix: format!("10.{}", 100 + pid % 100),
            lan,
        };
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &hub, "link", "set", "br0", "up"]);
        ip(&["-n", &hub, "link", "set", "lo", "up"]);
        for i in 1..=n {
            let ns = format!("es{pid}{tag}{i}");
            let _ = run(Command::new("ip").args(["netns", "del", &ns]));
            ip(&["netns", "add", &ns]);
            net.servers.push(ns.clone());
            let port = format!("p{i}");
            ip(&[
                "-n", &hub, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ]);
            ip(&["-n", &hub, "link", "set", &port, "master", "br0"]);
            ip(&["-n", &hub, "link", "set", &port, "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", net.addr(i)),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        net
    }

    /// Gives this namespace a direct link to every server, apart from the bridge: a veth pair
    /// per server on the /30 `10.<x>.<lan + i>.0`, and a host route to the server's address
    /// over it. Cutting a server's bridge port then leaves it reachable from here.
    pub fn add_client_links(&self) {
        let pid = std::process::id();
        for (i, ns) in (1..).zip(&self.servers) {
            let here = format!("lc{pid}{i}");
            let lan = usize::from(self.lan) + i;
            let (near, far) = (
                format!("{}.{lan}.1", self.prefix),
                format!("{}.{lan}.2", self.prefix),
            );
            ip(&[
                "link", "add", &here, "type", "veth", "peer", "name", "cl0", "netns", ns,
            ]);
            ip(&["addr", "add", &format!("{near}/30"), "dev", &here]);
            ip(&["link", "set", &here, "up"]);
            ip(&["-n", ns, "addr", "add", &format!("{far}/30"), "dev", "cl0"]);
            ip(&["-n", ns, "link", "set", "cl0", "up"]);
            ip(&[
                "route",
                "add",
                &format!("{}/32", self.addr(i)),
                "via",
                &far,
                "dev",
                &here,
            ]);
        }
    }

    /// Server `i`'s address on the bridge.
    pub fn addr(&self, i: usize) -> String {
        format!("{}.{}.{i}", self.prefix, self.lan)
    }

    /// Server `i`'s namespace.
    pub fn ns(&self, i: usize) -> &str {
        &self.servers[i - 1]
    }

    /// Limits what server `i` sends to `mbit` Mbit/s (a token bucket on its cable), or lifts
    /// the limit (`None`).
    pub fn rate(&self, i: usize, mbit: Option<u32>) {
        let ns = self.ns(i);
        let _ = run(Command::new("ip").args([
            "netns", "exec", ns, "tc", "qdisc", "del", "dev", "eth0", "root",
        ]));
        if let Some(m) = mbit {
            let rate = format!("{m}mbit");
            let r = run(Command::new("ip").args([
                "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate",
                &rate, "burst", "256kb", "latency", "200ms",
            ]));
            r.unwrap_or_else(|e| panic!("tc on {ns}: {e}"));
        }
    }

    /// Cuts (or restores) server `i`'s cable at the bridge.
    pub fn link(&self, i: usize, up: bool) {
        ip(&[
            "-n",
            &self.hub,
            "link",
            "set",
            &format!("p{i}"),
            if up { "up" } else { "down" },
        ]);
    }

    /// The local ports of server `i`'s established TCP connections to `to` ("ADDR:PORT").
    pub fn connections(&self, i: usize, to: &str) -> Vec<u16> {
        let out = run(Command::new("ip").args([
            "netns",
            "exec",
            self.ns(i),
            "ss",
            "-tnH",
            "state",
            "established",
        ]))
        .unwrap_or_default();
        // Recv-Q Send-Q Local:Port Peer:Port
        out.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let (local, peer) = (f.get(2)?, f.get(3)?);
                (*peer == to).then(|| local.rsplit(':').next()?.parse().ok())?
            })
            .collect()
    }

    /// Drops every packet of server `i`'s TCP connections from the local `ports` (both ways,
    /// in its namespace): those connections go silent, as over a cut link, and nothing else
    /// does. An empty list lifts it.
    pub fn drop_flows(&self, i: usize, ports: &[u16]) {
        let ns = self.ns(i);
        let nft = |script: &str| run(Command::new("ip").args(["netns", "exec", ns, "nft", script]));
        let _ = nft("delete table inet enspeed_test_cut");
        if ports.is_empty() {
            return;
        }
        let set = ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let script = format!(
            "table inet enspeed_test_cut {{ \
               chain i {{ type filter hook input priority -10; tcp dport {{ {set} }} drop; }}; \
               chain o {{ type filter hook output priority -10; tcp sport {{ {set} }} drop; }}; }}"
        );
        nft(&script).unwrap_or_else(|e| panic!("nft on {ns}: {e}"));
    }

    /// The processes in server `i`'s namespace: (pid, command line).
    pub fn processes(&self, i: usize) -> Vec<(u32, String)> {
        let out = run(Command::new("ip").args(["netns", "pids", self.ns(i)])).unwrap_or_default();
        out.split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
            .filter_map(|pid| {
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                // A zombie has an empty command line: it runs nothing.
                (!cmd.is_empty()).then_some((pid, cmd))
            })
            .collect()
    }

    /// Whether a VMM runs in server `i`'s namespace.
    pub fn vmm_running(&self, i: usize) -> bool {
        self.processes(i).iter().any(|(_, c)| c.contains(" vmm "))
    }

    /// SIGKILL to every process of server `i`: a power cut.
    pub fn power_cut(&self, i: usize) {
        for _ in 0..3 {
            for (pid, _) in self.processes(i) {
                // SAFETY: kill(2) on a pid read from the namespace; no memory involved.
                unsafe {
                    libc::kill(pid as i32, libc::SIGKILL);
                }
            }
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for i in 1..=self.servers.len() {
            self.power_cut(i);
        }
        for ns in self.servers.iter().chain(std::iter::once(&self.hub)) {
            let _ = run(Command::new("ip").args(["netns", "del", ns]));
        }
    }
}
