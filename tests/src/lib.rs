//! Helpers for the whole-system tests: find the `enspeed` binary and the
//! test guest, run `enspeed vmm` as a real process, read its serial console
//! line by line, and talk to its control socket and its RFB console
//! ([`rfb`]); run `enspeed server`s ([`cluster`]) in network namespaces
//! ([`netns`]).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub mod blockd;
pub mod cluster;
pub mod linearizability;
pub mod netns;
pub mod ova;
pub mod rfb;
pub mod web;

/// The repository root.
///
/// Found from the working directory (cargo runs a test in its package's directory; the
/// scripts run tools from the repository's top): a build in a shared target directory may
/// have been compiled in another clone, whose path `CARGO_MANIFEST_DIR` would still name.
pub fn repo_root() -> PathBuf {
    let is_root =
        |d: &Path| d.join("image/testguest/build.sh").is_file() && d.join("Cargo.toml").is_file();
    if let Ok(cwd) = std::env::current_dir() {
        if let Some(d) = cwd.ancestors().find(|d| is_root(d)) {
            return d.to_path_buf();
        }
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The Cargo profile directory (target/<profile>) the running test or tool was built into.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> (tests) or target/<profile>/<bin> (tools)
    let mut dir = exe.parent().expect("executable has a directory");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("target profile dir");
    }
    dir.to_path_buf()
}

/// The `enspeed` binary next to the test executable (built by the test
/// command before the tests run), or `$ENSPEED_BIN`.
pub fn enspeed_bin() -> PathBuf {
    if let Ok(p) = std::env::var("ENSPEED_BIN") {
        return p.into();
    }
    let bin = profile_dir().join("enspeed");
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo build -p enspeed), or set ENSPEED_BIN",
        bin.display()
    );
    bin
}

/// The level-1 test guest ELF, built once per test process.
pub fn testguest() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        if let Ok(p) = std::env::var("ENSPEED_TESTGUEST") {
            return p.into();
        }
        let script = repo_root().join("image/testguest/build.sh");
        let out = Command::new("sh")
            .arg(&script)
            .stderr(Stdio::inherit())
            .output()
            .expect("run testguest build.sh");
        assert!(out.status.success(), "building the test guest failed");
        let s = String::from_utf8_lossy(&out.stdout);
        PathBuf::from(
            s.lines()
                .last()
                .expect("build.sh prints the ELF path")
                .trim(),
        )
    })
    .clone()
}

/// The firmware tests' boot disk (image/testguest/bootdisk), assembled once
/// per test process: a 1 MiB raw image the BIOS boots.
pub fn bootdisk() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let script = repo_root().join("image/testguest/bootdisk/build.sh");
        let out = Command::new("sh")
            .arg(&script)
            .stderr(Stdio::inherit())
            .output()
            .expect("run bootdisk build.sh");
        assert!(out.status.success(), "assembling the boot disk failed");
        let s = String::from_utf8_lossy(&out.stdout);
        PathBuf::from(
            s.lines()
                .last()
                .expect("build.sh prints the image path")
                .trim(),
        )
    })
    .clone()
}

/// An ISO 9660 image whose only content is `boot`, an El Torito
/// no-emulation boot image (the BIOS loads it whole at 0x7c00): a primary
/// volume descriptor, the boot record, the boot catalog and the image.
pub fn eltorito_iso(boot: &[u8]) -> Vec<u8> {
    const S: usize = 2048;
    let image_sectors = boot.len().div_ceil(S);
    let total = 20 + image_sectors;
    let mut iso = vec![0u8; total * S];
    let both32 = |v: u32| {
        let mut b = v.to_le_bytes().to_vec();
        b.extend_from_slice(&v.to_be_bytes());
        b
    };
    // Sector 16: the primary volume descriptor.
    let pvd = &mut iso[16 * S..17 * S];
    pvd[0] = 1;
    pvd[1..6].copy_from_slice(b"CD001");
    pvd[6] = 1;
    pvd[40..48].copy_from_slice(b"BOOTDISK");
    pvd[80..88].copy_from_slice(&both32(total as u32));
    pvd[120..124].copy_from_slice(&[1, 0, 0, 1]);
    pvd[124..128].copy_from_slice(&[1, 0, 0, 1]);
    pvd[128..132].copy_from_slice(&[0, 8, 8, 0]);
    pvd[881] = 1;
    // Sector 17: the El Torito boot record, pointing at the catalog in sector 19.
    let br = &mut iso[17 * S..18 * S];
    br[1..6].copy_from_slice(b"CD001");
    br[6] = 1;
    br[7..30].copy_from_slice(b"EL TORITO SPECIFICATION");
    br[0x47..0x4b].copy_from_slice(&19u32.to_le_bytes());
    // Sector 18: the set terminator.
    let t = &mut iso[18 * S..19 * S];
    t[0] = 255;
    t[1..6].copy_from_slice(b"CD001");
    t[6] = 1;
    // Sector 19: the catalog: validation entry (its words sum to zero), default entry.
    let cat = &mut iso[19 * S..20 * S];
    cat[0] = 1;
    cat[4..12].copy_from_slice(b"ENSPEED ");
    cat[30] = 0x55;
    cat[31] = 0xaa;
    let sum = cat[..32].chunks(2).fold(0u16, |a, w| {
        a.wrapping_add(u16::from_le_bytes([w[0], w[1]]))
    });
    cat[28..30].copy_from_slice(&0u16.wrapping_sub(sum).to_le_bytes());
    cat[32] = 0x88;
    cat[38..40].copy_from_slice(&(boot.len().div_ceil(512) as u16).to_le_bytes());
    cat[40..44].copy_from_slice(&20u32.to_le_bytes());
    iso[20 * S..20 * S + boot.len()].copy_from_slice(boot);
    iso
}

/// The boot disk's program as an El Torito CD image, written once per test process.
pub fn bootdisk_iso() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let img = bootdisk();
        let bin = std::fs::read(img.with_file_name("bootdisk.bin")).expect("read bootdisk.bin");
        let iso = img.with_file_name("bootdisk.iso");
        std::fs::write(&iso, eltorito_iso(&bin)).expect("write bootdisk.iso");
        iso
    })
    .clone()
}

/// The boot disk's installer as an El Torito CD: booted, it writes itself onto the first hard
/// disk as a system that counts on the BIOS clock (`TICK nnnn` on its text screen and serial
/// console, reading its disk at each step), says so and powers the VM off.
pub fn installer_iso() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let img = bootdisk();
        let mut bin = std::fs::read(img.with_file_name("bootdisk.bin")).expect("read bootdisk.bin");
        bin[0x204] = 5;
        let iso = img.with_file_name("installer.iso");
        std::fs::write(&iso, eltorito_iso(&bin)).expect("write installer.iso");
        iso
    })
    .clone()
}

/// The boot disk's display test as an El Torito CD: booted, it sets VBE mode 0x144
/// (1024x768x32) through the VGA BIOS, draws red, green, blue and white bars and halts.
pub fn bars_iso() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let img = bootdisk();
        let mut bin = std::fs::read(img.with_file_name("bootdisk.bin")).expect("read bootdisk.bin");
        bin[0x204] = 1;
        let iso = img.with_file_name("bars.iso");
        std::fs::write(&iso, eltorito_iso(&bin)).expect("write bars.iso");
        iso
    })
    .clone()
}

/// Whether /dev/kvm can run guests here. Tests that boot guests skip only
/// when it is missing, and say so loudly.
pub fn kvm_available(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    eprintln!("\n!!!!!!!! SKIPPED {test}: /dev/kvm is missing on this machine; no guest was booted !!!!!!!!\n");
    false
}

/// A scratch directory removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// A fresh directory for test `name`.
    pub fn new(name: &str) -> Scratch {
        let base = std::env::var_os("TMPDIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| "/tmp".into());
        let p = base.join(format!("enspeed-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create scratch dir");
        Scratch(p)
    }

    /// A path inside the directory.
    pub fn path(&self, f: &str) -> PathBuf {
        self.0.join(f)
    }

    /// A zero-filled file of `size` bytes.
    pub fn disk(&self, f: &str, size: u64) -> PathBuf {
        let p = self.path(f);
        std::fs::File::create(&p)
            .and_then(|h| h.set_len(size))
            .expect("create disk file");
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // ENSPEED_KEEP_SCRATCH=1 keeps it (the servers' logs), for reading after the run.
        if std::env::var_os("ENSPEED_KEEP_SCRATCH").is_some() {
            eprintln!("scratch kept: {}", self.0.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `enspeed vmm` whose serial console is its stdout.
pub struct Vmm {
    child: Child,
    lines: Receiver<String>,
    seen: Arc<Mutex<Vec<String>>>,
    /// The control socket, when one was asked for.
    pub api: Option<PathBuf>,
    started: Instant,
}

impl Vmm {
    /// Starts `enspeed vmm` with `args` (plus `--serial stdout`).
    pub fn start(args: &[String]) -> Vmm {
        let mut cmd = Command::new(enspeed_bin());
        cmd.arg("vmm").args(args).args(["--serial", "stdout"]);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = cmd.spawn().expect("spawn enspeed vmm");
        let (tx, rx) = channel();
        let seen = Arc::new(Mutex::new(Vec::new()));
        for (stream, tag) in [
            (
                Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
                "",
            ),
            (
                Box::new(child.stderr.take().expect("stderr")),
                "[vmm stderr] ",
            ),
        ] {
            let tx = tx.clone();
            let seen = seen.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { return };
                    let line = format!("{tag}{}", line.trim_end_matches('\r'));
                    seen.lock().unwrap().push(line.clone());
                    let _ = tx.send(line);
                }
            });
        }
        let api = args
            .iter()
            .position(|a| a == "--api-socket")
            .map(|i| PathBuf::from(&args[i + 1]));
        Vmm {
            child,
            lines: rx,
            seen,
            api,
            started,
        }
    }

    /// Everything printed so far.
    pub fn output(&self) -> String {
        self.seen.lock().unwrap().join("\n")
    }

    /// Waits for a line containing `pat`; panics with the output on timeout.
    pub fn wait_for(&mut self, pat: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(pat) => return l,
                Ok(l) if l.contains("tg: FAIL") => panic!(
                    "guest reported {l:?} while waiting for {pat:?}\n{}",
                    self.output()
                ),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "no line with {pat:?} within {timeout:?}; output so far:\n{}",
                        self.output()
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!(
                        "VMM output ended before {pat:?}; output:\n{}",
                        self.output()
                    )
                }
            }
        }
    }

    /// Time since the process was spawned.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().expect("wait for vmm") {
                return s;
            }
            if Instant::now() > deadline {
                panic!(
                    "VMM did not exit within {timeout:?}; output:\n{}",
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends one request to the control socket and returns the parsed answer.
    pub fn api(&self, request: &str) -> serde_json::Value {
        let path = self.api.as_ref().expect("VMM started without --api-socket");
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("cannot connect to {}: {e}", path.display()),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        s.write_all(b"\n").unwrap();
        let mut line = String::new();
        BufReader::new(s)
            .read_line(&mut line)
            .expect("control socket answer");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad answer {line:?}: {e}"))
    }

    /// Kills the process with SIGKILL and waits until all it printed is read.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Ok(_) | Err(RecvTimeoutError::Timeout) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            if Instant::now() >= deadline {
                break;
            }
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Builds the argument list for booting the test guest.
pub fn guest_args(cmdline: &str, extra: &[&str]) -> Vec<String> {
    let mut a = vec![
        "--kernel".to_string(),
        testguest().display().to_string(),
        "--cmdline".into(),
        format!("console=ttyS0 {cmdline}"),
        "--memory".into(),
        "128".into(),
    ];
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// A copy of the test guest that the VMM enters through the Linux 64-bit
/// boot protocol instead of PVH (with boot_params in RSI, where a
/// framebuffer is described): its PVH note gets an unknown type, so the
/// loader falls back to the ELF entry point.
pub fn linux64_testguest(s: &Scratch) -> std::path::PathBuf {
    let mut elf = std::fs::read(testguest()).unwrap();
    let pat: &[u8] = &[4, 0, 0, 0, 8, 0, 0, 0, 18, 0, 0, 0, b'X', b'e', b'n', 0];
    let at = elf
        .windows(pat.len())
        .position(|w| w == pat)
        .expect("test guest has a PVH note");
    elf[at + 8] = 0x7f;
    let kernel = s.path("testguest-64");
    std::fs::write(&kernel, elf).unwrap();
    kernel
}

/// A stamped block as the test guest's `stamp` action writes it.
#[derive(Debug, PartialEq, Eq)]
pub enum Stamp {
    /// Never written.
    Empty,
    /// A valid stamp of `seq`.
    Seq(u64),
    /// Header or checksum wrong.
    Torn,
}

/// IEEE CRC-32 continued from `crc` (0 to start), as the guest computes it.
pub fn crc32_update(crc: u32, data: &[u8]) -> u32 {
    let mut c = !crc;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xedb8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// The first `len` bytes of the file at `path`, or all of it if it is shorter: what a test
/// reads of a VM's disk (a gigabyte, mostly a hole) whose guest wrote only its first blocks.
pub fn read_head(path: &Path, len: usize) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(len);
    std::io::Read::read_to_end(
        &mut std::io::Read::take(std::fs::File::open(path)?, len as u64),
        &mut head,
    )?;
    Ok(head)
}

/// Whether the files at `a` and `b` hold the same bytes, compared a MiB at a time rather than
/// each read whole into memory (a VM's disk is a gigabyte).
pub fn same_contents(a: &Path, b: &Path) -> std::io::Result<bool> {
    let (fa, fb) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ra, mut rb) = (
        std::io::BufReader::with_capacity(1 << 20, fa),
        std::io::BufReader::with_capacity(1 << 20, fb),
    );
    loop {
        let (x, y) = (ra.fill_buf()?, rb.fill_buf()?);
        let n = x.len().min(y.len());
        if n == 0 {
            return Ok(x.is_empty() && y.is_empty());
        }
        if x[..n] != y[..n] {
            return Ok(false);
        }
        ra.consume(n);
        rb.consume(n);
    }
}

/// Decodes stamped block `index` from a disk image.
pub fn read_stamp(image: &[u8], index: u64) -> Stamp {
    let b = &image[(index * 4096) as usize..((index + 1) * 4096) as usize];
    if b.iter().all(|x| *x == 0) {
        return Stamp::Empty;
    }
    let idx = u64::from_le_bytes(b[8..16].try_into().unwrap());
    let seq = u64::from_le_bytes(b[16..24].try_into().unwrap());
    let crc = u32::from_le_bytes(b[24..28].try_into().unwrap());
    // The checksum covers the whole block except its own four bytes.
    let expect = crc32_update(crc32_update(0, &b[..24]), &b[28..]);
    if &b[0..8] != b"ENSPSTMP" || idx != index || crc != expect {
        return Stamp::Torn;
    }
    Stamp::Seq(seq)
}

/// The `p` quantile (0 to 1) of `sorted` latencies.
pub fn percentile(sorted: &[std::time::Duration], p: f64) -> std::time::Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// A benchmark's knob: environment variable `name` as a number, or `default`.
pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `bytes` in `d`, MiB a second.
pub fn mib_per_s(bytes: u64, d: std::time::Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
}

/// Runs shell command `cmd`, which must succeed; how long it took.
pub fn sh_timed(cmd: &str) -> std::time::Duration {
    let t = std::time::Instant::now();
    let st = Command::new("sh")
        .args(["-c", cmd])
        .status()
        .expect("run sh");
    assert!(st.success(), "{cmd} failed");
    t.elapsed()
}

/// A duration in milliseconds, two decimals, for the benchmark tables.
pub fn ms(d: std::time::Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// Runs `run` (a scenario that boots machines under QEMU with an emulated AMD-V) up to
/// `attempts` times: again only while `machine_failed` names a failure of the machine under
/// test itself, not of the scenario's checks. Each retry is said loudly and noted
/// (`note_retry`), and the time of all attempts is noted (`note_time`). The last outcome.
pub fn run_retrying(
    name: &str,
    attempts: u32,
    mut run: impl FnMut() -> std::process::Output,
    machine_failed: impl Fn(&std::process::Output) -> Option<String>,
) -> std::process::Output {
    let began = std::time::Instant::now();
    let mut out = run();
    for attempt in 2..=attempts {
        let Some(why) = machine_failed(&out) else {
            break;
        };
        println!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let line = format!(
            "{name}: {why} (exit {:?}), not the scenario's checks; running it again (attempt {attempt} of {attempts})",
            out.status.code()
        );
        eprintln!("\n!!!!!!!! {line} !!!!!!!!\n");
        note_retry(&line);
        out = run();
    }
    note_time(&format!(
        "{name}: {} s in all, exit {:?}",
        began.elapsed().as_secs(),
        out.status.code()
    ));
    out
}

/// Notes a scenario run again because the machine under test failed by itself (the emulated
/// AMD-V), in target/<profile>/testhost-retries.log, for test.sh to show even when every test
/// passes: a rising count is a bug to find.
pub fn note_retry(line: &str) {
    append_line("testhost-retries.log", line);
}

/// Notes how long a scenario that boots machines under QEMU took, attempts included, in
/// target/<profile>/testhost-times.log, which test.sh shows at the end: where CI's minutes go.
pub fn note_time(line: &str) {
    append_line("testhost-times.log", line);
}

fn append_line(file: &str, line: &str) {
    use std::io::Write;
    let path = profile_dir().join(file);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path);
    if let Err(e) = file.and_then(|mut f| writeln!(f, "{line}")) {
        eprintln!("cannot note {line:?} in {}: {e}", path.display());
    }
}
