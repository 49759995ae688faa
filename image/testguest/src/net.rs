//! virtio-net driver (device id 1), a minimal ARP/ICMP responder and the
//! `net` action.

use crate::cmdline;
use crate::io::Global;
use crate::serial::Mac;
use crate::io::Deadline;
use crate::virtio::{deadline, Error, Mmio, Seg, Virtq, TIMEOUT_MS};
use crate::{fail, say};

/// VIRTIO_NET_F_MAC: the device provides a MAC in config space.
const F_MAC: u64 = 1 << 5;
/// virtio_net_hdr with VERSION_1 (num_buffers included): 12 bytes.
const HDR: usize = 12;
/// Buffer size: header + 1514-byte frame, rounded up.
const BUF: usize = 2048;
const RX_N: usize = 64;
const TX_N: usize = 16;
/// Network devices we drive.
pub const MAX_NET: usize = 2;

#[repr(C, align(4096))]
struct NetBufs {
    rx: [[u8; BUF]; RX_N],
    tx: [[u8; BUF]; TX_N],
}

static BUFS: Global<[NetBufs; MAX_NET]> =
    Global::new([const { NetBufs { rx: [[0; BUF]; RX_N], tx: [[0; BUF]; TX_N] } }; MAX_NET]);

/// One initialised virtio-net device.
pub struct Net {
    mmio: Mmio,
    rxq: Virtq,
    txq: Virtq,
    /// Our MAC address.
    pub mac: [u8; 6],
    bufs: &'static mut NetBufs,
    tx_free: [u16; TX_N],
    ntx_free: usize,
}

static NETS: Global<[Option<Net>; MAX_NET]> = Global::new([const { None }; MAX_NET]);
static NNET: Global<usize> = Global::new(0);

/// Addresses and progress of the ARP/ICMP exchange.
struct NetState {
    ip: [u8; 4],
    peer: [u8; 4],
    peer_mac: Option<[u8; 6]>,
    echo_id: u16,
    echo_seq: u16,
    got_echo: bool,
}

/// Our IPv4 address once `net` has run (or `tg.ip` at `wait`).
static STATE: Global<NetState> =
    Global::new(NetState { ip: [0; 4], peer: [0; 4], peer_mac: None, echo_id: 0x7467, echo_seq: 0, got_echo: false });

/// Initialises the virtio-net device at `mmio` (already probed).
pub fn init(index: usize, mmio: Mmio) -> Result<(), Error> {
    let n = NNET.get();
    if *n >= MAX_NET {
        return Err(Error::Other("too many net devices"));
    }
    let feats = mmio.begin_init(F_MAC)?;
    let rxq = Virtq::setup(&mmio, 0)?;
    let txq = Virtq::setup(&mmio, 1)?;
    mmio.driver_ok()?;
    let mac = if feats & F_MAC != 0 {
        core::array::from_fn(|i| mmio.cfg8(i as u64))
    } else {
        // Locally administered, unique per device index.
        [0x02, 0x74, 0x67, 0x00, 0x00, index as u8]
    };
    let bufs = &mut BUFS.get()[*n];
    let mut dev = Net { mmio, rxq, txq, mac, bufs, tx_free: [0; TX_N], ntx_free: TX_N };
    for (i, t) in dev.tx_free.iter_mut().enumerate() {
        *t = i as u16;
    }
    let nrx = RX_N.min(dev.rxq.size() as usize);
    for i in 0..nrx {
        dev.post_rx(i)?;
    }
    dev.rxq.kick();
    say!("net dev={} mac={}", index, Mac(mac));
    NETS.get()[*n] = Some(dev);
    *n += 1;
    Ok(())
}

impl Net {
    fn post_rx(&mut self, i: usize) -> Result<(), Error> {
        let addr = self.bufs.rx[i].as_ptr() as u64;
        self.rxq.add(&[Seg { addr, len: BUF as u32, write: true }], i as u32)
    }

    /// Reclaims finished transmit buffers.
    fn reap_tx(&mut self) -> Result<(), Error> {
        while let Some((tok, _)) = self.txq.poll()? {
            self.tx_free[self.ntx_free] = tok as u16;
            self.ntx_free += 1;
        }
        Ok(())
    }

    /// Sends one Ethernet frame (virtio_net_hdr prepended, all zero: no
    /// offloads).
    fn send(&mut self, frame: &[u8]) -> Result<(), Error> {
        if frame.len() > BUF - HDR {
            return Err(Error::Other("frame too long"));
        }
        self.reap_tx()?;
        let dl = deadline();
        while self.ntx_free == 0 {
            if dl.expired() {
                self.mmio.check()?;
                return Err(Error::Timeout);
            }
            core::hint::spin_loop();
            self.reap_tx()?;
        }
        self.ntx_free -= 1;
        let t = self.tx_free[self.ntx_free] as usize;
        let b = &mut self.bufs.tx[t];
        b[..HDR].fill(0);
        b[HDR..HDR + frame.len()].copy_from_slice(frame);
        let addr = b.as_ptr() as u64;
        self.txq.add(&[Seg { addr, len: (HDR + frame.len()) as u32, write: false }], t as u32)?;
        self.txq.kick();
        Ok(())
    }

    /// Handles every received frame; returns whether any arrived.
    fn service(&mut self, st: &mut NetState) -> Result<bool, Error> {
        let mut any = false;
        let mut reply = [0u8; BUF];
        while let Some((tok, len)) = self.rxq.poll()? {
            any = true;
            let i = tok as usize;
            let len = len as usize;
            let mut out = 0;
            if len > HDR {
                out = handle_frame(&self.bufs.rx[i][HDR..len], self.mac, st, &mut reply);
            }
            self.post_rx(i)?;
            self.rxq.kick();
            if out > 0 {
                self.send(&reply[..out])?;
            }
        }
        Ok(any)
    }

    /// Services the device until `done` or the deadline.
    fn wait_for(&mut self, st: &mut NetState, dl: Deadline, done: fn(&NetState) -> bool) -> Result<bool, Error> {
        while !dl.expired() {
            self.service(st)?;
            if done(st) {
                return Ok(true);
            }
            core::hint::spin_loop();
        }
        Ok(false)
    }
}

/// RFC 1071 Internet checksum.
fn csum(data: &[u8]) -> u16 {
    let mut s: u32 = 0;
    let mut it = data.chunks_exact(2);
    for c in &mut it {
        s += u16::from_be_bytes([c[0], c[1]]) as u32;
    }
    if let [b] = it.remainder() {
        s += (*b as u32) << 8;
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

/// Builds an ARP packet into `out` (returns its length).
fn arp(out: &mut [u8], op: u16, src_mac: [u8; 6], src_ip: [u8; 4], dst_mac: [u8; 6], dst_ip: [u8; 4], eth_dst: [u8; 6]) -> usize {
    out[0..6].copy_from_slice(&eth_dst);
    out[6..12].copy_from_slice(&src_mac);
    out[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    let a = &mut out[14..42];
    a[0..2].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    a[2..4].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    a[4] = 6;
    a[5] = 4;
    a[6..8].copy_from_slice(&op.to_be_bytes());
    a[8..14].copy_from_slice(&src_mac);
    a[14..18].copy_from_slice(&src_ip);
    a[18..24].copy_from_slice(&dst_mac);
    a[24..28].copy_from_slice(&dst_ip);
    // Pad to the 60-byte Ethernet minimum.
    out[42..60].fill(0);
    60
}

/// Builds an IPv4 ICMP packet (`icmp` = type, code, rest of header and
/// data; its checksum is filled in here). Returns the frame length.
fn ipv4_icmp(out: &mut [u8], src_mac: [u8; 6], dst_mac: [u8; 6], src: [u8; 4], dst: [u8; 4], id: u16, icmp: &[u8]) -> usize {
    out[0..6].copy_from_slice(&dst_mac);
    out[6..12].copy_from_slice(&src_mac);
    out[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let total = 20 + icmp.len();
    let ip = &mut out[14..14 + total];
    ip[0] = 0x45;
    ip[1] = 0;
    ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    ip[4..6].copy_from_slice(&id.to_be_bytes());
    ip[6..8].copy_from_slice(&0x4000u16.to_be_bytes()); // DF
    ip[8] = 64;
    ip[9] = 1; // ICMP
    ip[10..12].fill(0);
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let c = csum(&ip[..20]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    ip[20..].copy_from_slice(icmp);
    ip[22..24].fill(0);
    let c = csum(&ip[20..]);
    ip[22..24].copy_from_slice(&c.to_be_bytes());
    let len = 14 + total;
    if len < 60 {
        out[len..60].fill(0);
        60
    } else {
        len
    }
}

/// Reacts to one received frame: learns the peer's MAC, notes echo
/// replies, answers ARP requests and echo requests for our IP. Returns the
/// length of a reply written to `out` (0 = none).
fn handle_frame(f: &[u8], mac: [u8; 6], st: &mut NetState, out: &mut [u8]) -> usize {
    if f.len() < 14 {
        return 0;
    }
    let our_ip = st.ip != [0; 4];
    match be16(f, 12) {
        0x0806 if f.len() >= 42 => {
            let a = &f[14..42];
            if be16(a, 0) != 1 || be16(a, 2) != 0x0800 || a[4] != 6 || a[5] != 4 {
                return 0;
            }
            let op = be16(a, 6);
            let sha: [u8; 6] = a[8..14].try_into().unwrap();
            let spa: [u8; 4] = a[14..18].try_into().unwrap();
            let tpa: [u8; 4] = a[24..28].try_into().unwrap();
            if spa == st.peer && st.peer != [0; 4] && (op == 1 || op == 2) {
                st.peer_mac = Some(sha);
            }
            if op == 1 && our_ip && tpa == st.ip {
                return arp(out, 2, mac, st.ip, sha, spa, sha);
            }
            0
        }
        0x0800 if f.len() >= 34 => {
            let ip = &f[14..];
            let ihl = (ip[0] & 0x0f) as usize * 4;
            let total = be16(ip, 2) as usize;
            if ip[0] >> 4 != 4 || ihl < 20 || total < ihl + 8 || total > ip.len() || ip[9] != 1 {
                return 0;
            }
            if csum(&ip[..ihl]) != 0 || be16(ip, 6) & 0x3fff != 0 {
                return 0; // bad header or a fragment
            }
            let src: [u8; 4] = ip[12..16].try_into().unwrap();
            let dst: [u8; 4] = ip[16..20].try_into().unwrap();
            let icmp = &ip[ihl..total];
            if !our_ip || dst != st.ip || csum(icmp) != 0 {
                return 0;
            }
            match icmp[0] {
                // Echo reply to our request.
                0 if src == st.peer && be16(icmp, 4) == st.echo_id && be16(icmp, 6) == st.echo_seq => {
                    st.got_echo = true;
                    0
                }
                // Echo request: answer with the same id/seq/data.
                8 if icmp.len() <= out.len() - 34 => {
                    let smac: [u8; 6] = f[6..12].try_into().unwrap();
                    let mut body = [0u8; BUF];
                    let body = &mut body[..icmp.len()];
                    body.copy_from_slice(icmp);
                    body[0] = 0;
                    ipv4_icmp(out, mac, smac, st.ip, src, be16(ip, 4), body)
                }
                _ => 0,
            }
        }
        _ => 0,
    }
}

fn first() -> Option<&'static mut Net> {
    NETS.get()[0].as_mut()
}

fn ip_arg(key: &str) -> Option<[u8; 4]> {
    match cmdline::get(key).map(cmdline::parse_ipv4) {
        Some(Some(ip)) => Some(ip),
        Some(None) => {
            fail!("net bad {}", key);
            None
        }
        None => {
            fail!("net missing {}", key);
            None
        }
    }
}

/// Action `net`: ARP for `tg.peer`, ICMP echo to it, print its MAC.
pub fn act_net() {
    let Some(d) = first() else {
        fail!("net no-device");
        return;
    };
    let (Some(ip), Some(peer)) = (ip_arg("tg.ip"), ip_arg("tg.peer")) else { return };
    let st = STATE.get();
    st.ip = ip;
    st.peer = peer;
    st.peer_mac = None;
    if let Err(e) = net_test(d, st) {
        fail!("net {}", e);
    }
}

fn net_test(d: &mut Net, st: &mut NetState) -> Result<(), Error> {
    const TRIES: u64 = 5;
    let per_try = (*TIMEOUT_MS.get() / TRIES).max(1);
    let mut f = [0u8; 128];
    for _ in 0..TRIES {
        let n = arp(&mut f, 1, d.mac, st.ip, [0; 6], st.peer, [0xff; 6]);
        d.send(&f[..n])?;
        if d.wait_for(st, Deadline::after_ms(per_try), |s| s.peer_mac.is_some())? {
            break;
        }
    }
    let Some(pmac) = st.peer_mac else {
        return Err(Error::Other("arp timeout"));
    };
    say!("net arp peer_mac={}", Mac(pmac));
    let mut icmp = [0u8; 8 + 32];
    for (i, b) in icmp[8..].iter_mut().enumerate() {
        *b = b'a' + (i % 26) as u8;
    }
    st.got_echo = false;
    for seq in 1..=TRIES as u16 {
        st.echo_seq = seq;
        icmp[0] = 8;
        icmp[1] = 0;
        icmp[4..6].copy_from_slice(&st.echo_id.to_be_bytes());
        icmp[6..8].copy_from_slice(&seq.to_be_bytes());
        let n = ipv4_icmp(&mut f, d.mac, pmac, st.ip, st.peer, seq, &icmp);
        d.send(&f[..n])?;
        if d.wait_for(st, Deadline::after_ms(per_try), |s| s.got_echo)? {
            say!("net ok peer_mac={}", Mac(pmac));
            return Ok(());
        }
    }
    Err(Error::Other("icmp echo timeout"))
}

/// End `wait`: answer ARP and ICMP echo for our IP forever. Without a net
/// device (or without `tg.ip`) there is nothing to answer: just halt.
pub fn serve_forever() -> ! {
    let st = STATE.get();
    if st.ip == [0; 4] {
        if let Some(ip) = cmdline::get("tg.ip").and_then(cmdline::parse_ipv4) {
            st.ip = ip;
        }
    }
    if let Some(d) = first() {
        if st.ip != [0; 4] {
            loop {
                if let Err(e) = d.service(st) {
                    fail!("net wait {}", e);
                    break;
                }
                core::hint::spin_loop();
            }
        }
    }
    crate::io::halt_forever()
}
