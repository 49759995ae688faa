//! A Linux tap interface carrying frames with a virtio-net header in front.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// Length of the virtio 1.x net header that precedes every frame.
pub const VNET_HDR_LEN: usize = 12;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
// _IOW('T', 202, int), _IOW('T', 216, int), _IOU('T', 208)
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;

/// TUNSETOFFLOAD bits (linux/if_tun.h).
pub mod offload {
    /// Frames may come with their checksum left to do.
    pub const CSUM: u32 = 0x01;
    /// TCP over IPv4 segments larger than the MTU.
    pub const TSO4: u32 = 0x02;
    /// TCP over IPv6 segments larger than the MTU.
    pub const TSO6: u32 = 0x04;
    /// Such segments with ECN.
    pub const TSO_ECN: u32 = 0x08;
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Errors opening a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The interface name is empty or too long.
    #[error("invalid tap name {0:?} (1 to 15 bytes)")]
    Name(String),
    /// A system call failed.
    #[error("cannot open tap {name}: {what}: {err}")]
    Open {
        /// Interface name.
        name: String,
        /// Which step.
        what: &'static str,
        /// Cause.
        err: std::io::Error,
    },
}

/// An open tap device, non-blocking.
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens (creating if needed) tap interface `name` with vnet headers.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
            return Err(TapError::Name(name.into()));
        }
        let err = |what, err| TapError::Open {
            name: name.into(),
            what,
            err,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| err("/dev/net/tun", e))?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        let fd = file.as_raw_fd();
        // SAFETY: the ioctls get valid pointers to properly sized values.
        unsafe {
            if libc::ioctl(fd, TUNSETIFF as _, &mut req) < 0 {
                return Err(err("TUNSETIFF", std::io::Error::last_os_error()));
            }
            let hdr = VNET_HDR_LEN as libc::c_int;
            if libc::ioctl(fd, TUNSETVNETHDRSZ as _, &hdr) < 0 {
                return Err(err("TUNSETVNETHDRSZ", std::io::Error::last_os_error()));
            }
        }
        let tap = Tap {
            file,
            name: name.into(),
        };
        // No offloads until a driver says which it takes.
        tap.set_offloads(0).map_err(|e| err("TUNSETOFFLOAD", e))?;
        Ok(tap)
    }

    /// What the tap may hand us: checksums left to do, and segments above the MTU
    /// ([`offload`] bits); it does the rest itself.
    pub fn set_offloads(&self, flags: u32) -> std::io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNSETOFFLOAD as _,
                flags as libc::c_ulong,
            )
        } < 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame (with header); `Ok(None)` when none is waiting.
    pub fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        match self.file.read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Sends one frame (with header).
    pub fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.file.write(frame).map(|_| ())
    }

    /// The descriptor, for epoll.
    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// A second handle on the same tap (to announce a MAC from while the NIC's worker holds
    /// the first).
    pub fn try_clone(&self) -> std::io::Result<Tap> {
        Ok(Tap {
            file: self.file.try_clone()?,
            name: self.name.clone(),
        })
    }

    /// Announces `mac` on the tap's network, as QEMU's announce-self does after a migration:
    /// a RARP frame from it, five times (50, 150, 250, 350 and 450 ms from now), from a thread
    /// of its own, so that switches learn the VM's new port before its guest speaks (after a
    /// failover or a migration the same MAC appears behind another server).
    pub fn announce(&self, mac: [u8; 6]) -> std::io::Result<()> {
        let mut file = self.file.try_clone()?;
        let name = self.name.clone();
        std::thread::Builder::new()
            .name(format!("announce-{name}"))
            .spawn(move || {
                let frame = rarp_announcement(mac);
                for gap in [50, 100, 100, 100, 100] {
                    std::thread::sleep(std::time::Duration::from_millis(gap));
                    // A full tap queue (or a tap not up yet) loses one announcement; the next
                    // one goes.
                    if let Err(e) = file.write(&frame) {
                        tracing::debug!(tap = %name, error = %e, "a MAC announcement was not sent");
                    }
                }
            })?;
        Ok(())
    }
}

/// A RARP "reverse request" from `mac` to everyone, as switches learn a MAC from (RFC 903;
/// what QEMU's announce-self sends), behind an empty virtio-net header, padded to 60 bytes.
pub fn rarp_announcement(mac: [u8; 6]) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend_from_slice(&[0xff; 6]); // to everyone
    f.extend_from_slice(&mac); // from the VM
    f.extend_from_slice(&0x8035u16.to_be_bytes()); // RARP
    f.extend_from_slice(&1u16.to_be_bytes()); // Ethernet
    f.extend_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f.extend_from_slice(&[6, 4]); // address lengths
    f.extend_from_slice(&3u16.to_be_bytes()); // reverse request
    f.extend_from_slice(&mac); // sender hardware address
    f.extend_from_slice(&[0; 4]); // sender protocol address
    f.extend_from_slice(&mac); // target hardware address
    f.extend_from_slice(&[0; 4]); // target protocol address
    f.resize(VNET_HDR_LEN + 60, 0);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rarp_announcement_is_what_switches_learn_from() {
        let mac = [0x02, 0x45, 0x53, 0, 0, 7];
        let f = rarp_announcement(mac);
        assert_eq!(f.len(), VNET_HDR_LEN + 60);
        assert!(
            f[..VNET_HDR_LEN].iter().all(|b| *b == 0),
            "no offloads asked"
        );
        let e = &f[VNET_HDR_LEN..];
        assert_eq!(&e[0..6], &[0xff; 6]);
        assert_eq!(&e[6..12], &mac);
        assert_eq!(&e[12..14], &[0x80, 0x35]);
        assert_eq!(&e[14..22], &[0, 1, 8, 0, 6, 4, 0, 3]);
        assert_eq!(&e[22..28], &mac);
        assert_eq!(&e[32..38], &mac);
    }
}
