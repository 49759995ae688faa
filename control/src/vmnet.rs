//! What a VM server does for each network card of a VM it runs, on the card's tap: answers
//! the guest's DHCP with the address the cluster leased the card (only this server, the one
//! running the VM, answers, and only into this tap), and learns the addresses the guest uses
//! from its DHCP and ARP traffic. One thread per card reads the frames the guest sends on a
//! packet socket that a BPF filter limits to ARP and DHCP requests; the bridge's filters
//! (`netdev::filter_tap`) keep those requests from going further.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dhcproto::v4::{DhcpOption, HType, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};

use crate::state_machine::MAX_SEEN_ADDRESSES;
pub use vmm_api::parse_mac;

/// The MAC the DHCP service's answers come from (locally administered, outside the range the
/// cluster gives VMs).
pub const SERVICE_MAC: [u8; 6] = [0x06, 0x45, 0x53, 0x00, 0x00, 0x01];

/// How long a lease lasts, seconds (the address never changes: a renewal always succeeds).
const LEASE_SECS: u32 = 86_400;

/// DHCP answers a card gets at most per second (a guest that floods requests is answered no
/// more).
const ANSWERS_PER_SEC: u32 = 20;

const ETH_P_ALL: u16 = 0x0003;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;

/// What a card is leased on a network with a subnet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The card's MAC.
    pub mac: [u8; 6],
    /// Its address.
    pub ip: Ipv4Addr,
    /// The subnet's mask.
    pub mask: Ipv4Addr,
    /// The subnet's broadcast address.
    pub broadcast: Ipv4Addr,
    /// The router named to the guest, also the service's identifier.
    pub router: Ipv4Addr,
    /// DNS servers named to the guest.
    pub dns: Vec<Ipv4Addr>,
}

/// What a frame the guest sent says, as far as this service cares.
#[derive(Debug, PartialEq)]
enum Seen {
    /// An ARP packet from `mac` claiming `ip`.
    Arp { mac: [u8; 6], ip: Ipv4Addr },
    /// A DHCP request from `mac`.
    Dhcp { mac: [u8; 6], msg: Box<Message> },
}

/// Reads an Ethernet frame the guest sent: ARP, or a DHCP request (UDP to port 67).
fn read_frame(f: &[u8]) -> Option<Seen> {
    let src: [u8; 6] = f.get(6..12)?.try_into().ok()?;
    match u16::from_be_bytes(f.get(12..14)?.try_into().ok()?) {
        ETH_P_ARP => {
            let a = f.get(14..42)?;
            // Ethernet and IPv4, 6- and 4-byte addresses.
            if a[0..6] != [0, 1, 8, 0, 6, 4] {
                return None;
            }
            let mac: [u8; 6] = a[8..14].try_into().ok()?;
            let ip = Ipv4Addr::new(a[14], a[15], a[16], a[17]);
            (mac == src).then_some(Seen::Arp { mac, ip })
        }
        ETH_P_IP => {
            let ip = f.get(14..)?;
            let ihl = usize::from(*ip.first()? & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes(ip.get(2..4)?.try_into().ok()?));
            let fragment = u16::from_be_bytes(ip.get(6..8)?.try_into().ok()?) & 0x3fff != 0;
            if ip[0] >> 4 != 4 || ihl < 20 || fragment || ip.get(9) != Some(&17) {
                return None;
            }
            let ip = ip.get(..total)?;
            let udp = ip.get(ihl..)?;
            let len = usize::from(u16::from_be_bytes(udp.get(4..6)?.try_into().ok()?));
            if udp.get(2..4)? != 67u16.to_be_bytes() || len < 8 {
                return None;
            }
            let msg = Message::decode(&mut Decoder::new(udp.get(8..len)?)).ok()?;
            Some(Seen::Dhcp {
                mac: src,
                msg: Box::new(msg),
            })
        }
        _ => None,
    }
}

/// The DHCP service's answer to `msg` from `from` (an Ethernet frame for the tap), if it
/// gets one: an offer or acknowledgement of the card's leased address, a refusal (NAK) of
/// any other, nothing for a request from another MAC or one meant for another server.
fn answer(lease: &Lease, from: [u8; 6], msg: &Message) -> Option<(MessageType, Vec<u8>)> {
    if msg.opcode() != Opcode::BootRequest
        || msg.htype() != HType::Eth
        || msg.chaddr().get(..6) != Some(&lease.mac[..])
        || from != lease.mac
    {
        return None;
    }
    let requested = match msg.opts().get(OptionCode::RequestedIpAddress) {
        Some(DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
        _ => None,
    };
    let server = match msg.opts().get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
        _ => None,
    };
    let kind = match msg.opts().msg_type()? {
        MessageType::Discover => MessageType::Offer,
        MessageType::Request => {
            if server.is_some_and(|s| s != lease.router) {
                return None;
            }
            let asked = requested.or((!msg.ciaddr().is_unspecified()).then(|| msg.ciaddr()));
            if asked.is_some_and(|a| a != lease.ip) {
                MessageType::Nak
            } else {
                MessageType::Ack
            }
        }
        MessageType::Inform => MessageType::Ack,
        _ => return None,
    };
    let inform = msg.opts().msg_type() == Some(MessageType::Inform);
    let yiaddr = if kind == MessageType::Nak || inform {
        Ipv4Addr::UNSPECIFIED
    } else {
        lease.ip
    };
    let mut reply = Message::new_with_id(
        msg.xid(),
        if inform {
            msg.ciaddr()
        } else {
            Ipv4Addr::UNSPECIFIED
        },
        yiaddr,
        Ipv4Addr::UNSPECIFIED,
        msg.giaddr(),
        &lease.mac,
    );
    reply.set_opcode(Opcode::BootReply).set_flags(msg.flags());
    let o = reply.opts_mut();
    o.insert(DhcpOption::MessageType(kind));
    o.insert(DhcpOption::ServerIdentifier(lease.router));
    if kind != MessageType::Nak {
        if !inform {
            o.insert(DhcpOption::AddressLeaseTime(LEASE_SECS));
            o.insert(DhcpOption::Renewal(LEASE_SECS / 2));
            o.insert(DhcpOption::Rebinding(LEASE_SECS / 8 * 7));
        }
        o.insert(DhcpOption::SubnetMask(lease.mask));
        o.insert(DhcpOption::BroadcastAddr(lease.broadcast));
        o.insert(DhcpOption::Router(vec![lease.router]));
        if !lease.dns.is_empty() {
            o.insert(DhcpOption::DomainNameServer(lease.dns.clone()));
        }
    }
    let mut payload = Vec::new();
    reply.encode(&mut Encoder::new(&mut payload)).ok()?;
    // To the address the guest has, or (before it has one, and for a refusal) to everyone on
    // the tap: the tap leads to this guest alone.
    let (dst_mac, dst_ip) = if !msg.ciaddr().is_unspecified() && kind != MessageType::Nak {
        (lease.mac, msg.ciaddr())
    } else if msg.flags().broadcast() || kind == MessageType::Nak {
        ([0xff; 6], Ipv4Addr::BROADCAST)
    } else {
        (lease.mac, lease.ip)
    };
    Some((
        kind,
        udp_frame(dst_mac, lease.router, dst_ip, 67, 68, &payload),
    ))
}

/// The Internet checksum of `data`, folded, starting from `sum`.
fn checksum(sum: u32, data: &[u8]) -> u16 {
    let mut sum = data.chunks(2).fold(sum, |s, c| {
        s + u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))
    });
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet frame from the service carrying one UDP datagram.
fn udp_frame(
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let total = 20 + udp_len;
    let mut f = Vec::with_capacity(14 + total);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&SERVICE_MAC);
    f.extend_from_slice(&ETH_P_IP.to_be_bytes());
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let c = checksum(0, &ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    let mut udp = Vec::with_capacity(udp_len);
    udp.extend_from_slice(&sport.to_be_bytes());
    udp.extend_from_slice(&dport.to_be_bytes());
    udp.extend_from_slice(&(udp_len as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    // The pseudo-header: addresses, protocol, length.
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&(udp_len as u16).to_be_bytes());
    let partial = u32::from(!checksum(0, &pseudo));
    let c = match checksum(partial, &udp) {
        0 => 0xffff,
        c => c,
    };
    udp[6..8].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&udp);
    f
}

/// The addresses one card was seen to use, newest last.
#[derive(Default)]
struct Addresses(Vec<Ipv4Addr>);

impl Addresses {
    fn saw(&mut self, ip: Ipv4Addr) {
        if self.0.last() == Some(&ip) {
            return;
        }
        self.0.retain(|a| *a != ip);
        self.0.push(ip);
        if self.0.len() > MAX_SEEN_ADDRESSES {
            self.0.remove(0);
        }
    }
}

/// The service on one card's tap, until dropped.
pub struct CardService {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Addresses>>,
    thread: Option<JoinHandle<()>>,
}

impl CardService {
    /// Starts reading tap `tap`, which must exist, for the card `mac` (`lease`: on a network
    /// with DHCP).
    pub fn start(tap: &str, mac: [u8; 6], lease: Option<Lease>) -> io::Result<CardService> {
        let sock = open_packet_socket(tap)?;
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Addresses::default()));
        let (s, a, name) = (stop.clone(), seen.clone(), tap.to_string());
        let thread = std::thread::Builder::new()
            .name(format!("card {tap}"))
            .spawn(move || serve(&sock, &name, mac, lease.as_ref(), &s, &a))?;
        Ok(CardService {
            stop,
            seen,
            thread: Some(thread),
        })
    }

    /// The addresses its guest was seen to use, newest last.
    pub fn addresses(&self) -> Vec<Ipv4Addr> {
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()
    }
}

impl Drop for CardService {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A packet socket on `tap` that reads, of the frames its guest sends, ARP and the first
/// fragment of UDP to port 67, and gives up a read after half a second.
fn open_packet_socket(tap: &str) -> io::Result<OwnedFd> {
    let what = |e: io::Error| io::Error::new(e.kind(), format!("tap {tap}: {e}"));
    let name = std::ffi::CString::new(tap).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: a plain libc call on a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(what(io::Error::last_os_error()));
    }
    // SAFETY: socket(2); the descriptor is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(ETH_P_ALL.to_be()),
        )
    };
    if fd < 0 {
        return Err(what(io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // ldh [12]; ARP: accept; IPv4: UDP, not a later fragment, destination port 67: accept.
    let mut code = [
        bpf(0x28, 0, 0, 12),
        bpf(0x15, 8, 0, u32::from(ETH_P_ARP)),
        bpf(0x15, 0, 8, u32::from(ETH_P_IP)),
        bpf(0x30, 0, 0, 23),
        bpf(0x15, 0, 6, 17),
        bpf(0x28, 0, 0, 20),
        bpf(0x45, 4, 0, 0x1fff),
        bpf(0xb1, 0, 0, 14),
        bpf(0x48, 0, 0, 16),
        bpf(0x15, 0, 1, 67),
        bpf(0x06, 0, 0, 0xffff),
        bpf(0x06, 0, 0, 0),
    ];
    let prog = libc::sock_fprog {
        len: code.len() as u16,
        filter: code.as_mut_ptr(),
    };
    setsockopt(&sock, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &prog).map_err(what)?;
    // The frames this server sends into the tap are not the guest's.
    setsockopt(&sock, libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, &1i32).map_err(what)?;
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 500_000,
    };
    setsockopt(&sock, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &timeout).map_err(what)?;
    let addr = link_addr(index as i32);
    // SAFETY: `addr` is a valid sockaddr_ll of the size given.
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc < 0 {
        return Err(what(io::Error::last_os_error()));
    }
    Ok(sock)
}

fn bpf(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

fn link_addr(index: i32) -> libc::sockaddr_ll {
    // SAFETY: sockaddr_ll is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = ETH_P_ALL.to_be();
    addr.sll_ifindex = index;
    addr
}

fn setsockopt<T>(sock: &OwnedFd, level: i32, name: i32, value: &T) -> io::Result<()> {
    // SAFETY: `value` points to a live T of the size given.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as u32,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The card's thread: reads what the guest sends until told to stop.
fn serve(
    sock: &OwnedFd,
    tap: &str,
    mac: [u8; 6],
    lease: Option<&Lease>,
    stop: &AtomicBool,
    seen: &Mutex<Addresses>,
) {
    let mut buf = vec![0u8; 2048];
    let mut window = (Instant::now(), 0u32);
    let mut warned = false;
    while !stop.load(Ordering::SeqCst) {
        // SAFETY: reads into `buf`, which outlives the call.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => {}
                // The tap is down (its VMM has not opened it yet, or ended): wait.
                _ => std::thread::sleep(Duration::from_millis(200)),
            }
            continue;
        }
        match read_frame(&buf[..n as usize]) {
            // On a network with DHCP only the lease counts (nothing else gets through).
            Some(Seen::Arp { mac: m, ip })
                if m == mac && !ip.is_unspecified() && lease.is_none_or(|l| l.ip == ip) =>
            {
                seen.lock().unwrap_or_else(|e| e.into_inner()).saw(ip);
            }
            Some(Seen::Dhcp { mac: from, msg }) => {
                let Some(lease) = lease else { continue };
                if window.0.elapsed() >= Duration::from_secs(1) {
                    window = (Instant::now(), 0);
                }
                window.1 += 1;
                if window.1 > ANSWERS_PER_SEC {
                    continue;
                }
                let Some((kind, frame)) = answer(lease, from, &msg) else {
                    continue;
                };
                // SAFETY: writes `frame`, which outlives the call, on the bound socket.
                let sent =
                    unsafe { libc::send(sock.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
                if sent < 0 && !warned {
                    warned = true;
                    tracing::warn!(tap, error = %io::Error::last_os_error(), "cannot answer a guest's DHCP");
                }
                if kind == MessageType::Ack && !msg.opts().has_msg_type(MessageType::Inform) {
                    tracing::info!(tap, ip = %lease.ip, "DHCP: leased");
                    seen.lock().unwrap_or_else(|e| e.into_inner()).saw(lease.ip);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dhcproto::v4::Flags;

    const GUEST: [u8; 6] = [0x02, 0x45, 0x53, 0, 0, 7];

    fn lease() -> Lease {
        Lease {
            mac: GUEST,
            ip: Ipv4Addr::new(10, 20, 0, 5),
            mask: Ipv4Addr::new(255, 255, 255, 0),
            broadcast: Ipv4Addr::new(10, 20, 0, 255),
            router: Ipv4Addr::new(10, 20, 0, 1),
            dns: vec![Ipv4Addr::new(10, 20, 0, 53)],
        }
    }

    /// A client's DHCP message in a frame from `src`, as a guest sends it.
    fn client(src: [u8; 6], kind: MessageType, opts: Vec<DhcpOption>) -> Vec<u8> {
        let mut m = Message::new_with_id(
            0x1234,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &src,
        );
        m.set_flags(Flags::default().set_broadcast());
        m.opts_mut().insert(DhcpOption::MessageType(kind));
        for o in opts {
            m.opts_mut().insert(o);
        }
        let mut payload = Vec::new();
        m.encode(&mut Encoder::new(&mut payload)).unwrap();
        let mut f = udp_frame(
            [0xff; 6],
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
            68,
            67,
            &payload,
        );
        f[6..12].copy_from_slice(&src);
        f
    }

    fn reply(frame: &[u8]) -> (MessageType, Message) {
        let Some(Seen::Dhcp { msg, .. }) = read_frame(frame) else {
            panic!("no DHCP message")
        };
        (msg.opts().msg_type().unwrap(), *msg)
    }

    /// Answers a frame as the card's thread does.
    fn serve_frame(l: &Lease, f: &[u8]) -> Option<Vec<u8>> {
        match read_frame(f)? {
            Seen::Dhcp { mac, msg } => answer(l, mac, &msg).map(|(_, f)| f),
            Seen::Arp { .. } => None,
        }
    }

    #[test]
    fn a_guest_is_offered_and_given_its_lease_and_no_other_address() {
        let l = lease();
        // The answer's own frame parses only because its UDP ports are swapped: read it raw.
        let offer = serve_frame(&l, &client(GUEST, MessageType::Discover, vec![])).unwrap();
        assert_eq!(&offer[0..6], &[0xff; 6], "broadcast asked, broadcast sent");
        assert_eq!(&offer[6..12], &SERVICE_MAC);
        let as_request = |mut f: Vec<u8>| {
            f[14 + 20 + 2..14 + 20 + 4].copy_from_slice(&67u16.to_be_bytes());
            f
        };
        let (kind, m) = reply(&as_request(offer.clone()));
        assert_eq!(kind, MessageType::Offer);
        assert_eq!(m.yiaddr(), l.ip);
        assert_eq!(m.xid(), 0x1234);
        assert_eq!(
            m.opts().get(OptionCode::Router),
            Some(&DhcpOption::Router(vec![l.router]))
        );
        assert_eq!(
            m.opts().get(OptionCode::SubnetMask),
            Some(&DhcpOption::SubnetMask(l.mask))
        );
        // The IP header's checksum verifies, and so does the UDP checksum.
        assert_eq!(checksum(0, &offer[14..34]), 0);
        let udp = &offer[34..];
        let mut pseudo = offer[26..34].to_vec();
        pseudo.extend_from_slice(&[0, 17]);
        pseudo.extend_from_slice(&(udp.len() as u16).to_be_bytes());
        assert_eq!(checksum(u32::from(!checksum(0, &pseudo)), udp), 0);

        let take = |ip: Ipv4Addr| {
            client(
                GUEST,
                MessageType::Request,
                vec![
                    DhcpOption::RequestedIpAddress(ip),
                    DhcpOption::ServerIdentifier(l.router),
                ],
            )
        };
        let (kind, m) = reply(&as_request(serve_frame(&l, &take(l.ip)).unwrap()));
        assert_eq!(kind, MessageType::Ack);
        assert_eq!(m.yiaddr(), l.ip);
        let (kind, m) = reply(&as_request(
            serve_frame(&l, &take(Ipv4Addr::new(10, 20, 0, 9))).unwrap(),
        ));
        assert_eq!(kind, MessageType::Nak, "another address is refused");
        assert!(m.yiaddr().is_unspecified());
        // Another server's offer taken: not ours to answer.
        let elsewhere = client(
            GUEST,
            MessageType::Request,
            vec![DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 20, 0, 2))],
        );
        assert!(serve_frame(&l, &elsewhere).is_none());
        // Another MAC (a guest asking for someone else's lease) gets nothing.
        let mut other = GUEST;
        other[5] = 8;
        assert!(serve_frame(&l, &client(other, MessageType::Discover, vec![])).is_none());
        // A release is not answered.
        assert!(serve_frame(&l, &client(GUEST, MessageType::Release, vec![])).is_none());
    }

    #[test]
    fn arp_claims_are_read_and_garbage_is_not() {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&GUEST);
        f.extend_from_slice(&ETH_P_ARP.to_be_bytes());
        f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&GUEST);
        f.extend_from_slice(&[192, 168, 1, 9]);
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&[192, 168, 1, 1]);
        assert_eq!(
            read_frame(&f),
            Some(Seen::Arp {
                mac: GUEST,
                ip: Ipv4Addr::new(192, 168, 1, 9)
            })
        );
        // The sender's MAC in the packet must be the frame's.
        let mut spoof = f.clone();
        spoof[22 + 5] = 9;
        assert_eq!(read_frame(&spoof), None);
        for n in 0..f.len() {
            assert_eq!(read_frame(&f[..n]), None, "cut at {n}");
        }
        // Every cut of a DHCP frame is refused without a panic.
        let d = client(GUEST, MessageType::Discover, vec![]);
        for n in 0..d.len() {
            let _ = read_frame(&d[..n]);
        }
        let mut seen = Addresses::default();
        for i in 0..6 {
            seen.saw(Ipv4Addr::new(10, 0, 0, i));
        }
        seen.saw(Ipv4Addr::new(10, 0, 0, 3));
        assert_eq!(seen.0.len(), MAX_SEEN_ADDRESSES);
        assert_eq!(seen.0.last(), Some(&Ipv4Addr::new(10, 0, 0, 3)));
        assert_eq!(parse_mac("02:45:53:00:00:07"), Some(GUEST));
        assert_eq!(parse_mac("02:45:53:00:00"), None);
        assert_eq!(parse_mac("02:45:53:00:00:07:01"), None);
    }
}
