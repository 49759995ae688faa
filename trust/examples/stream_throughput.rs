//! What the TLS stream alone costs: MiB/s of one-way bulk data over loopback, the cluster's
//! mutual TLS (`TlsStream`) beside plain TCP, written in 64 KiB chunks (as blockd's mirror
//! link writes through its buffer) and read in 256 KiB reads. A benchmark, not a test:
//!
//!     cargo run --release -p enspeed-trust --example stream_throughput [MIB] [ROUNDS]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use enspeed_trust::{Identity, TrustDir};

const CHUNK: usize = 64 << 10;

/// Sends `mib` MiB from `send` to `recv` (each end on its own thread); MiB/s.
fn run<S, R>(mib: usize, mut send: S, mut recv: R) -> f64
where
    S: Write + Send + 'static,
    R: Read + Send + 'static,
{
    let total = mib << 20;
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 << 10];
        let mut got = 0;
        while got < total {
            match recv.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) => panic!("read: {e}"),
            }
        }
        got
    });
    let chunk: Vec<u8> = (0..CHUNK).map(|i| (i * 31) as u8).collect();
    let t0 = Instant::now();
    let mut sent = 0;
    while sent < total {
        send.write_all(&chunk).expect("write");
        sent += CHUNK;
    }
    send.flush().expect("flush");
    let got = reader.join().expect("reader");
    assert_eq!(got, total, "every byte arrives");
    mib as f64 / t0.elapsed().as_secs_f64()
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("MIB and ROUNDS are numbers"))
        .collect();
    let (mib, rounds) = (
        args.first().copied().unwrap_or(2048),
        args.get(1).copied().unwrap_or(3),
    );
    let base =
        std::env::temp_dir().join(format!("enspeed-stream-throughput-{}", std::process::id()));
    let (one, two) = (
        TrustDir::of(&base.join("one")),
        TrustDir::of(&base.join("two")),
    );
    one.create_cluster(1).expect("a cluster");
    two.install(&one.enroll(2).expect("enroll"))
        .expect("install");
    let (id1, id2) = (Identity::load(&one).unwrap(), Identity::load(&two).unwrap());
    let mut tls = Vec::new();
    let mut plain = Vec::new();
    for _ in 0..rounds {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let server = id1.clone();
        let t = std::thread::spawn(move || server.accept(l.accept().unwrap().0).unwrap().0);
        let (c, _) = id2
            .connector()
            .connect(&addr, Duration::from_secs(5))
            .unwrap();
        let s = t.join().unwrap();
        tls.push(run(mib, c, s));

        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        c.set_nodelay(true).unwrap();
        let s = l.accept().unwrap().0;
        plain.push(run(mib, c, s));
    }
    let _ = std::fs::remove_dir_all(&base);
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (t, p) = (median(&mut tls), median(&mut plain));
    println!("{mib} MiB one way, median of {rounds}: TLS {t:.0} MiB/s, plain TCP {p:.0} MiB/s, TLS/plain {:.2}", t / p);
}
