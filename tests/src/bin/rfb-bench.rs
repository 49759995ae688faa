//! The graphical console's full-screen updates, Raw beside Zlib: `enspeed
//! vmm` boots the test guest with a 1024x768 framebuffer, which paints its
//! pattern (colour bars over a gradient, harder to compress than a text
//! console), and one client per encoding asks for the whole screen again and
//! again on the VMM's RFB socket, the encodings interleaved round by round.
//! Prints a Markdown table: bytes per full screen and the time from request
//! to the last byte read, medians, with their ratios to Raw.
//!
//! Run with `scripts/bench-rfb.sh` (release build). Knob: BENCH_RUNS (full
//! updates per encoding, default 40).

use std::time::{Duration, Instant};

use enspeed_tests::rfb::RfbClient;
use enspeed_tests::{guest_args, linux64_testguest, Scratch, Vmm};

const WIDTH: u16 = 1024;
const HEIGHT: u16 = 768;

/// One client and what it measured.
struct Encoding {
    name: &'static str,
    client: RfbClient,
    times: Vec<Duration>,
    bytes: Vec<u64>,
}

fn median<T: Ord + Copy>(v: &[T]) -> T {
    let mut v = v.to_vec();
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let s = Scratch::new("rfb-bench");
    let sock = s.path("vnc.sock");
    let mut args = guest_args(
        // `keys` keeps the guest running (waiting for a typed line) while the clients read.
        "tg.run=fb,keys tg.keylines=1 tg.kbdms=300000 tg.end=poweroff",
        &[
            "--vnc",
            sock.to_str().unwrap(),
            "--framebuffer",
            &format!("{WIDTH}x{HEIGHT}"),
            "--name",
            "rfb-bench",
        ],
    );
    args[1] = linux64_testguest(&s).display().to_string();
    let mut vm = Vmm::start(&args);
    vm.wait_for("tg: fb painted", Duration::from_secs(30));

    let mut encodings: Vec<Encoding> = [
        ("Raw", &[0][..]),
        ("Zlib, level 1 (the VMM's default)", &[6, 0]),
        ("Zlib, level 6 (asked by the client)", &[6, 0, -256 + 6]),
    ]
    .into_iter()
    .map(|(name, list)| {
        let mut client = RfbClient::connect(&sock).expect("connect to the VMM's RFB socket");
        assert_eq!((client.width, client.height), (WIDTH, HEIGHT));
        client.set_encodings(list).expect("SetEncodings");
        Encoding {
            name,
            client,
            times: Vec::new(),
            bytes: Vec::new(),
        }
    })
    .collect();
    // One warm-up update each, then the measured ones, interleaved.
    for round in 0..=runs {
        for e in &mut encodings {
            let c = &mut e.client;
            let before = c.update_bytes;
            let t = Instant::now();
            c.request(false, 0, 0, WIDTH, HEIGHT).expect("request");
            c.read_update().expect("read the update");
            if round > 0 {
                e.times.push(t.elapsed());
                e.bytes.push(c.update_bytes - before);
            }
        }
    }
    let raw_time = median(&encodings[0].times);
    let raw_bytes = median(&encodings[0].bytes);
    println!(
        "Full {WIDTH}x{HEIGHT} screen of the test guest's pattern, {runs} updates per encoding, \
         over the VMM's RFB socket (medians):\n"
    );
    println!("| encoding | bytes per full screen | vs Raw | request to last byte | vs Raw |");
    println!("|---|---|---|---|---|");
    for e in &encodings {
        let (t, b) = (median(&e.times), median(&e.bytes));
        println!(
            "| {} | {b} | {:.3}x | {:.2} ms | {:.2}x |",
            e.name,
            b as f64 / raw_bytes as f64,
            t.as_secs_f64() * 1e3,
            t.as_secs_f64() / raw_time.as_secs_f64()
        );
    }
    drop(vm);
}
