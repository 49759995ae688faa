//! `./run.sh` stopped as a person and as a service manager stop it: Ctrl-C in a terminal (a
//! pseudo-terminal, through util-linux `script`), and SIGTERM to its process group. Each time
//! the demo comes up to its banner first; then every process it started is gone within
//! seconds, its ports are free, and it returns 130 (Ctrl-C) or 0 (SIGTERM). Its terminal shows
//! the banner and status lines, not the test host's kernel messages.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use enspeed_tests::repo_root;

/// The demo's listening ports: forwarded from the test host (8443-8445), or on real KVM its
/// servers' own (HTTP, HTTPS, cluster, mirror).
const PORTS: &[u16] = &[
    8443, 8444, 8445, 8080, 8081, 8082, 7401, 7402, 7403, 7501, 7502, 7503,
];

/// How long the demo may take to show its banner: it builds what changed (nothing, after
/// test.sh's build), then (inside the test host, under TCG) boots three servers and a Debian
/// guest: about a minute. Past this the test host is taken for hung (see `demo`).
const BANNER_WITHIN: Duration = Duration::from_secs(300);

/// Everything `pid` started, still running: its descendants, by the parent links in /proc.
fn descendants(pid: u32) -> BTreeSet<u32> {
    let mut parent = BTreeMap::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so read after its last ')'.
        let rest = &stat[stat.rfind(')').unwrap_or(0) + 1..];
        if let Some(pp) = rest
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse::<u32>().ok())
        {
            parent.insert(p, pp);
        }
    }
    let mut out = BTreeSet::new();
    let mut grew = true;
    while grew {
        grew = false;
        for (&p, &pp) in &parent {
            if (pp == pid || out.contains(&pp)) && out.insert(p) {
                grew = true;
            }
        }
    }
    out
}

/// Whether process `pid` still runs (a zombie does not).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s[s.rfind(')').unwrap_or(0) + 1..]
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

fn port_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// The demo's output as it comes, line by line.
fn lines(out: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let mut r = std::io::BufReader::new(out);
        let mut line = Vec::new();
        while std::io::BufRead::read_until(&mut r, b'\n', &mut line).unwrap_or(0) > 0 {
            if tx
                .send(String::from_utf8_lossy(&line).into_owned())
                .is_err()
            {
                return;
            }
            line.clear();
        }
    });
    rx
}

/// Reads the demo's output until its banner has been shown; all of it so far.
fn until_banner(rx: &Receiver<String>, child: &mut Child) -> Result<String, String> {
    let deadline = Instant::now() + BANNER_WITHIN;
    let mut seen = String::new();
    while Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(l) => {
                eprint!("run.sh| {l}");
                seen.push_str(&l);
                if l.contains("Ctrl-C stops the cluster") {
                    return Ok(seen);
                }
            }
            Err(_) => {
                if let Ok(Some(st)) = child.try_wait() {
                    return Err(format!("./run.sh ended ({st}) before its banner:\n{seen}"));
                }
            }
        }
    }
    Err(format!(
        "no banner from ./run.sh within {BANNER_WITHIN:?}:\n{seen}"
    ))
}

/// Stops a demo that did not come up, and everything it started: SIGTERM, then SIGKILL to
/// what is left after 20 s.
fn kill_demo(child: &mut Child) {
    let started = descendants(child.id());
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    for p in &started {
        unsafe { libc::kill(*p as i32, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline && started.iter().any(|p| alive(*p)) {
        std::thread::sleep(Duration::from_millis(200));
    }
    for p in started.iter().filter(|p| alive(**p)) {
        unsafe { libc::kill(*p as i32, libc::SIGKILL) };
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Starts the demo with `start` until it shows its banner: the child, its output and what it
/// showed. Inside the test host, its own kernel now and then fails under the emulated AMD-V
/// before the demo is up (see tests/testhost.rs; the restarted demo VM boots as the cluster
/// comes up), ending it or leaving it hung: that demo is stopped, whole, and run again, up to
/// three times in all, noted in the retries log that test.sh shows.
fn demo(start: impl Fn() -> Child) -> (Child, Receiver<String>, String) {
    for attempt in 1..=3 {
        let mut child = start();
        let rx = lines(child.stdout.take().unwrap());
        match until_banner(&rx, &mut child) {
            Ok(shown) => return (child, rx, shown),
            Err(why) => {
                kill_demo(&mut child);
                if attempt == 3 {
                    panic!("{why}");
                }
                eprintln!("!!!! the demo did not come up (attempt {attempt}), run again: {why}");
                let first = why.lines().next().unwrap_or_default();
                enspeed_tests::note_retry(&format!(
                    "run_sh: the demo did not come up (attempt {attempt} of 3): {first}"
                ));
            }
        }
    }
    unreachable!("the last attempt panics")
}

/// Waits for `child` to end after it was asked to stop; its exit code, the rest of its output.
fn stopped(child: &mut Child, rx: &Receiver<String>) -> (Option<i32>, Duration) {
    let asked = Instant::now();
    loop {
        while let Ok(l) = rx.try_recv() {
            eprint!("run.sh| {l}");
        }
        if let Some(st) = child.try_wait().unwrap() {
            return (st.code(), asked.elapsed());
        }
        assert!(
            asked.elapsed() < Duration::from_secs(60),
            "./run.sh still runs a minute after it was asked to stop"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// After a stop: nothing of `started` runs any more, and the ports are free.
fn nothing_left(started: &BTreeSet<u32>) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left: Vec<u32> = started.iter().copied().filter(|p| alive(*p)).collect();
        let held: Vec<u16> = PORTS.iter().copied().filter(|p| !port_free(*p)).collect();
        if left.is_empty() && held.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            let names: Vec<String> = left
                .iter()
                .map(|p| {
                    std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                        .unwrap_or_default()
                        .replace('\0', " ")
                })
                .collect();
            for p in &left {
                unsafe { libc::kill(*p as i32, libc::SIGKILL) };
            }
            panic!("left behind: processes {names:?}, ports {held:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `cmd` with a person's environment: none of the variables `cargo test` sets for its tests
/// (some reach build scripts, and the demo's build would then redo work already done).
fn clean_env(cmd: &mut Command) -> &mut Command {
    cmd.env_clear();
    for k in [
        "PATH",
        "HOME",
        "LANG",
        "TERM",
        "USER",
        "TMPDIR",
        "ENSPEED_CACHE",
    ] {
        if let Ok(v) = std::env::var(k) {
            cmd.env(k, v);
        }
    }
    cmd
}

fn skip_without_kvm() -> bool {
    if std::path::Path::new("/dev/kvm").exists() {
        return false;
    }
    eprintln!(
        "\n!!!! SKIPPED: no /dev/kvm on this machine: ./run.sh cannot run its demo here !!!!\n"
    );
    true
}

#[test]
fn ctrl_c_in_a_terminal_and_sigterm_to_the_process_group_stop_the_whole_demo() {
    if skip_without_kvm() {
        return;
    }
    for p in PORTS {
        assert!(port_free(*p), "port {p} is taken before the demo starts");
    }

    // A person's terminal: `script` gives ./run.sh a pseudo-terminal; Ctrl-C is the byte 0x03
    // typed into it, which the terminal turns into SIGINT for its foreground process group.
    let (mut child, rx, shown) = demo(|| {
        clean_env(&mut Command::new("script"))
            .args(["-qfec", "./run.sh", "/dev/null"])
            .current_dir(repo_root())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("script (util-linux)")
    });
    std::thread::sleep(Duration::from_secs(2));
    let started = descendants(child.id());
    if started.len() <= 3 {
        let out = Command::new("ps")
            .args(["-eo", "pid,ppid,pgid,sid,stat,comm"])
            .output();
        eprintln!(
            "script is {}; processes:\n{}",
            child.id(),
            out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        );
    }
    assert!(started.len() > 3, "the demo's processes: {started:?}");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"\x03").unwrap();
    stdin.flush().unwrap();
    let (code, took) = stopped(&mut child, &rx);
    eprintln!("Ctrl-C: ./run.sh returned {code:?} after {took:?}");
    assert_eq!(code, Some(130), "./run.sh after Ctrl-C");
    nothing_left(&started);
    // The terminal shows the banner and status lines, not kernel messages.
    let kernel: Vec<&str> = shown
        .lines()
        .filter(|l| {
            let l = l.trim_start_matches('\r');
            l.starts_with('[')
                && l[1..].trim_start().split(']').next().is_some_and(|t| {
                    t.contains('.') && t.chars().all(|c| c.is_ascii_digit() || c == '.')
                })
                || l.contains("Unhandled WRMSR")
                || l.contains("SeaBIOS")
                || l.contains("iPXE")
        })
        .collect();
    assert!(
        kernel.is_empty(),
        "kernel messages on the terminal: {kernel:?}"
    );
    drop(stdin);

    // A service manager: SIGTERM to ./run.sh's process group.
    let (mut child, rx, shown_again) = demo(|| {
        clean_env(&mut Command::new("./run.sh"))
            .current_dir(repo_root())
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("./run.sh")
    });
    let started = descendants(child.id());
    unsafe { libc::kill(-(child.id() as i32), libc::SIGTERM) };
    let (code, took) = stopped(&mut child, &rx);
    eprintln!("SIGTERM: ./run.sh returned {code:?} after {took:?}");
    assert_eq!(code, Some(0), "./run.sh after SIGTERM");
    nothing_left(&started);
    // The second ./run.sh started the same cluster: the Manager's password it shows is the
    // first one's, kept across the first one's stop (a power cut for its servers).
    let manager = |shown: &str| {
        shown
            .lines()
            .find(|l| l.contains("Manager:"))
            .map(|l| l.trim().to_string())
    };
    assert!(
        manager(&shown).is_some(),
        "no Manager line in the banner:\n{shown}"
    );
    assert_eq!(
        manager(&shown),
        manager(&shown_again),
        "the second ./run.sh is the same cluster as the first"
    );
}
