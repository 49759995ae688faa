//! Request/answer throughput over one connection, as a mirror link uses it: many threads send
//! 4 KiB requests under one writer lock and wait for their 64-byte answers, which a receiver
//! thread delivers; the other end reads requests on one thread and answers on another.
//! TLS (the servers' stream) against plain TCP: `cargo run --release --example pingpong`.

use std::collections::HashMap;
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use enspeed_trust::{Identity, TlsStream, TrustDir};

trait Conn: Read + Write + Send + 'static {
    fn dup(&self) -> Self;
}
impl Conn for TcpStream {
    fn dup(&self) -> Self {
        self.try_clone().unwrap()
    }
}
impl Conn for TlsStream {
    fn dup(&self) -> Self {
        self.try_clone().unwrap()
    }
}

fn serve<C: Conn>(c: C) {
    let (tx, rx) = channel::<u64>();
    let w = c.dup();
    std::thread::spawn(move || {
        let mut w = BufWriter::new(w);
        while let Ok(seq) = rx.recv() {
            let mut a = [0u8; 64];
            a[..8].copy_from_slice(&seq.to_le_bytes());
            if w.write_all(&a).is_err() {
                return;
            }
            while let Ok(seq) = rx.try_recv() {
                a[..8].copy_from_slice(&seq.to_le_bytes());
                let _ = w.write_all(&a);
            }
            if w.flush().is_err() {
                return;
            }
        }
    });
    let mut r = BufReader::with_capacity(256 << 10, c);
    let mut req = vec![0u8; 4096 + 8];
    while r.read_exact(&mut req).is_ok() {
        let seq = u64::from_le_bytes(req[..8].try_into().unwrap());
        if tx.send(seq).is_err() {
            return;
        }
    }
}

fn run<C: Conn>(c: C, threads: usize, per: usize) -> f64 {
    let waiting: Arc<Mutex<HashMap<u64, Sender<()>>>> = Default::default();
    let r = c.dup();
    let w2 = Arc::clone(&waiting);
    std::thread::spawn(move || {
        let mut r = BufReader::with_capacity(64 << 10, r);
        let mut a = [0u8; 64];
        while r.read_exact(&mut a).is_ok() {
            let seq = u64::from_le_bytes(a[..8].try_into().unwrap());
            if let Some(tx) = w2.lock().unwrap().remove(&seq) {
                let _ = tx.send(());
            }
        }
    });
    let writer = Arc::new(Mutex::new((BufWriter::with_capacity(64 << 10, c), 0u64)));
    let t0 = Instant::now();
    let hs: Vec<_> = (0..threads)
        .map(|_| {
            let (writer, waiting) = (Arc::clone(&writer), Arc::clone(&waiting));
            std::thread::spawn(move || {
                let mut req = vec![7u8; 4096 + 8];
                for _ in 0..per {
                    let (tx, rx) = channel();
                    {
                        let mut g = writer.lock().unwrap();
                        g.1 += 1;
                        let seq = g.1;
                        waiting.lock().unwrap().insert(seq, tx);
                        req[..8].copy_from_slice(&seq.to_le_bytes());
                        g.0.write_all(&req).unwrap();
                        g.0.flush().unwrap();
                    }
                    rx.recv_timeout(Duration::from_secs(10)).unwrap();
                }
            })
        })
        .collect();
    hs.into_iter().for_each(|h| h.join().unwrap());
    (threads * per) as f64 / t0.elapsed().as_secs_f64()
}

fn main() {
    let dir = std::env::temp_dir().join(format!("pingpong-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let t = TrustDir::of(&dir);
    t.create_cluster(1).unwrap();
    let id = Identity::load(&t).unwrap();
    for threads in [1, 32] {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let server = id.clone();
        std::thread::spawn(move || {
            for (i, s) in l.incoming().enumerate() {
                let s = s.unwrap();
                s.set_nodelay(true).unwrap();
                if i == 0 {
                    let server = server.clone();
                    std::thread::spawn(move || serve(server.accept(s).unwrap().0));
                } else {
                    std::thread::spawn(move || serve(s));
                }
            }
        });
        let (tls, _) = id
            .connector()
            .connect(&addr, Duration::from_secs(5))
            .unwrap();
        let tls_rate = run(tls, threads, 20_000 / threads);
        let plain = TcpStream::connect(&addr).unwrap();
        plain.set_nodelay(true).unwrap();
        let plain_rate = run(plain, threads, 20_000 / threads);
        println!("{threads} threads: TLS {tls_rate:.0}/s, plain {plain_rate:.0}/s");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
