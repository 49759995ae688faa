//! The mirror protocol between two `enspeed blockd` processes, over TCP.
//!
//! Every frame is a 48-byte header followed by a payload:
//!
//! ```text
//!  0  magic      u32  "LSY1"
//!  4  kind       u16  Kind
//!  6  flags      u16  FLAG_FUA
//!  8  seq        u64  per-connection sequence number, from 1, one higher each frame
//! 16  generation u64  the sender's generation of the disk
//! 24  offset     u64  byte offset on the disk (Write, ResyncWrite), or the seq an Ack answers
//! 32  len        u32  payload length
//! 36  data_crc   u32  CRC-32 of the payload
//! 40  status     u32  Ack: 0 = done, else an error (payload: message)
//! 44  head_crc   u32  CRC-32 of bytes 0..44
//! ```
//!
//! All integers are little endian. A frame whose magic, header checksum,
//! kind, length or payload checksum is wrong is refused as a whole: nothing
//! in it is used. Hello and Welcome carry JSON ([`Hello`], [`Welcome`]).

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// Frame magic: "LSY1".
pub const MAGIC: u32 = u32::from_le_bytes(*b"LSY1");
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 48;
/// Largest payload accepted: one resync region or one guest request.
pub const MAX_PAYLOAD: u32 = 4 << 20;
/// Write flag: durable before acknowledged (forced unit access).
pub const FLAG_FUA: u16 = 1;

/// What a frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    /// Primary -> backup, first frame: who I am and what I hold (JSON [`Hello`]).
    Hello = 1,
    /// Backup -> primary: accepted, and what I hold (JSON [`Welcome`]).
    Welcome = 2,
    /// A guest write.
    Write = 3,
    /// Make every write before this one durable.
    Flush = 4,
    /// A region copied by resync.
    ResyncWrite = 5,
    /// Resync finished: the backup now holds what the primary holds.
    ResyncDone = 6,
    /// Answer to the frame whose seq is in `offset`.
    Ack = 7,
    /// The connection is refused or ends; the payload says why.
    Error = 8,
    /// Keeps an idle link known alive.
    Ping = 9,
}

impl Kind {
    fn from_u16(v: u16) -> Option<Kind> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::Welcome,
            3 => Kind::Write,
            4 => Kind::Flush,
            5 => Kind::ResyncWrite,
            6 => Kind::ResyncDone,
            7 => Kind::Ack,
            8 => Kind::Error,
            9 => Kind::Ping,
            _ => return None,
        })
    }
}

/// One frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// What it is.
    pub kind: Kind,
    /// FLAG_* bits.
    pub flags: u16,
    /// Sequence number.
    pub seq: u64,
    /// Sender's generation.
    pub generation: u64,
    /// Byte offset, or the acknowledged seq.
    pub offset: u64,
    /// Ack status (0 = done).
    pub status: u32,
    /// Payload.
    pub payload: Vec<u8>,
}

/// A frame that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// Reading or writing the connection failed.
    #[error("link I/O: {0}")]
    Io(#[from] io::Error),
    /// The header does not start with the magic.
    #[error("bad frame magic {0:#010x}")]
    Magic(u32),
    /// The header checksum does not match.
    #[error("frame header checksum mismatch")]
    HeaderChecksum,
    /// The kind is not one this protocol knows.
    #[error("unknown frame kind {0}")]
    UnknownKind(u16),
    /// The payload is longer than any frame may be.
    #[error("frame payload of {0} bytes exceeds the limit of {MAX_PAYLOAD}")]
    TooLong(u32),
    /// The payload checksum does not match.
    #[error("frame payload checksum mismatch (seq {0})")]
    PayloadChecksum(u64),
}

fn crc(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

impl Frame {
    /// A frame of `kind` with no payload and zero fields.
    pub fn new(kind: Kind, seq: u64, generation: u64) -> Frame {
        Frame {
            kind,
            flags: 0,
            seq,
            generation,
            offset: 0,
            status: 0,
            payload: Vec::new(),
        }
    }

    /// The header bytes for this frame.
    pub fn header(&self) -> [u8; HEADER_LEN] {
        self.header_for(&self.payload)
    }

    /// The header bytes for this frame's fields with `payload` as its payload.
    pub fn header_for(&self, payload: &[u8]) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        h[4..6].copy_from_slice(&(self.kind as u16).to_le_bytes());
        h[6..8].copy_from_slice(&self.flags.to_le_bytes());
        h[8..16].copy_from_slice(&self.seq.to_le_bytes());
        h[16..24].copy_from_slice(&self.generation.to_le_bytes());
        h[24..32].copy_from_slice(&self.offset.to_le_bytes());
        h[32..36].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        h[36..40].copy_from_slice(&crc(payload).to_le_bytes());
        h[40..44].copy_from_slice(&self.status.to_le_bytes());
        let hc = crc(&h[0..44]);
        h[44..48].copy_from_slice(&hc.to_le_bytes());
        h
    }

    /// Writes the frame (header and payload) to `w`.
    pub fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        debug_assert!(self.payload.len() <= MAX_PAYLOAD as usize);
        w.write_all(&self.header())?;
        w.write_all(&self.payload)
    }

    /// The frame as one buffer.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(HEADER_LEN + self.payload.len());
        v.extend_from_slice(&self.header());
        v.extend_from_slice(&self.payload);
        v
    }

    /// Reads and checks one frame from `r`.
    pub fn read_from(r: &mut impl Read) -> Result<Frame, FrameError> {
        let mut h = [0u8; HEADER_LEN];
        r.read_exact(&mut h)?;
        let (head, payload_len, data_crc) = parse_header(&h)?;
        let mut payload = vec![0u8; payload_len as usize];
        r.read_exact(&mut payload)?;
        if crc(&payload) != data_crc {
            return Err(FrameError::PayloadChecksum(head.seq));
        }
        Ok(Frame { payload, ..head })
    }

    /// An acknowledgement of `seq`; `error`, if any, becomes the payload.
    pub fn ack(seq: u64, generation: u64, acked: u64, error: Option<&str>) -> Frame {
        let mut f = Frame::new(Kind::Ack, seq, generation);
        f.offset = acked;
        if let Some(e) = error {
            f.status = 1;
            f.payload = e.as_bytes().to_vec();
        }
        f
    }

    /// An Error frame saying `why`.
    pub fn error(seq: u64, generation: u64, why: &str) -> Frame {
        let mut f = Frame::new(Kind::Error, seq, generation);
        f.payload = why.as_bytes().to_vec();
        f
    }

    /// A frame carrying `value` as JSON.
    pub fn json<T: Serialize>(kind: Kind, seq: u64, generation: u64, value: &T) -> Frame {
        let mut f = Frame::new(kind, seq, generation);
        f.payload = serde_json::to_vec(value).expect("protocol structures serialize");
        f
    }

    /// The JSON payload as `T`.
    pub fn parse_json<'a, T: Deserialize<'a>>(&'a self) -> Result<T, String> {
        serde_json::from_slice(&self.payload)
            .map_err(|e| format!("malformed {:?} payload: {e}", self.kind))
    }

    /// The payload read as text (Error frames, failed Acks).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

fn parse_header(h: &[u8; HEADER_LEN]) -> Result<(Frame, u32, u32), FrameError> {
    let u16_at = |o: usize| u16::from_le_bytes([h[o], h[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().unwrap());
    let magic = u32_at(0);
    if magic != MAGIC {
        return Err(FrameError::Magic(magic));
    }
    if crc(&h[0..44]) != u32_at(44) {
        return Err(FrameError::HeaderChecksum);
    }
    let kind = Kind::from_u16(u16_at(4)).ok_or(FrameError::UnknownKind(u16_at(4)))?;
    let len = u32_at(32);
    if len > MAX_PAYLOAD {
        return Err(FrameError::TooLong(len));
    }
    let frame = Frame {
        kind,
        flags: u16_at(6),
        seq: u64_at(8),
        generation: u64_at(16),
        offset: u64_at(24),
        status: u32_at(40),
        payload: Vec::new(),
    };
    Ok((frame, len, u32_at(36)))
}

/// What a primary says of its disk when it connects.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// The disk's name on both servers.
    pub disk: String,
    /// The disk's identity (hex).
    pub disk_id: String,
    /// Size in bytes.
    pub capacity: u64,
    /// Bytes per bitmap region.
    pub region_size: u64,
    /// Generation the primary writes at.
    pub generation: u64,
    /// The generation at which the primary's bitmap of changed regions
    /// started: a backup that holds exactly that generation needs only those
    /// regions; 0 = the primary never had a peer, every region is needed.
    pub bitmap_base: u64,
    /// The full sync the primary's bitmap was set whole for (empty: none): a backup being
    /// filled by that one resumes it.
    #[serde(default)]
    pub fill: String,
    /// The id a full sync begun now takes.
    #[serde(default)]
    pub new_fill: String,
    /// The primary's bitmap marks every region written since its data was all zeros: a new,
    /// empty backup needs only those regions. (Absent when false, for a backup of the version
    /// before, which knows no such field.)
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub from_zeros: bool,
}

/// How the backup answers a Hello it accepts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Welcome {
    /// The generation the backup holds.
    pub generation: u64,
    /// True when the backup's data cannot serve as a base for a partial
    /// resync (new disk, or interrupted full sync).
    pub needs_full_sync: bool,
    /// Regions the backup may hold differently (its own bitmap), as a bitmap
    /// of the same region size; the primary resyncs their union with its own.
    pub bitmap: Vec<u8>,
    /// The backup is being filled by the Hello's `fill`: a full sync that was cut goes on with
    /// the regions still owed.
    #[serde(default)]
    pub resumes_fill: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Frame> {
        let mut w = Frame::new(Kind::Write, 7, 3);
        w.offset = 8192;
        w.flags = FLAG_FUA;
        w.payload = vec![0xab; 4096];
        let hello = Hello {
            disk: "vm1-disk0".into(),
            disk_id: "00ff".into(),
            capacity: 1 << 30,
            region_size: 1 << 20,
            generation: 3,
            bitmap_base: 2,
            fill: "0a1b".into(),
            new_fill: "2c3d".into(),
            from_zeros: true,
        };
        let welcome = Welcome {
            generation: 2,
            needs_full_sync: false,
            bitmap: vec![1, 0, 0x80],
            resumes_fill: true,
        };
        vec![
            Frame::json(Kind::Hello, 1, 3, &hello),
            Frame::json(Kind::Welcome, 1, 2, &welcome),
            w,
            Frame::new(Kind::Flush, 8, 3),
            Frame {
                kind: Kind::ResyncWrite,
                offset: 1 << 20,
                payload: vec![1; 1 << 20],
                ..Frame::new(Kind::ResyncWrite, 9, 3)
            },
            Frame::new(Kind::ResyncDone, 10, 3),
            Frame::ack(11, 3, 7, None),
            Frame::ack(12, 3, 8, Some("disk full")),
            Frame::error(13, 3, "stale generation"),
            Frame::new(Kind::Ping, 14, 3),
        ]
    }

    #[test]
    fn every_kind_round_trips() {
        for f in sample() {
            let bytes = f.to_bytes();
            let back = Frame::read_from(&mut bytes.as_slice()).unwrap();
            assert_eq!(back, f);
        }
        let hello: Hello = sample()[0].parse_json().unwrap();
        assert_eq!(hello.disk, "vm1-disk0");
        let welcome: Welcome = sample()[1].parse_json().unwrap();
        assert_eq!(welcome.bitmap, vec![1, 0, 0x80]);
    }

    #[test]
    fn a_stream_of_frames_reads_back_in_order() {
        let mut stream = Vec::new();
        for f in sample() {
            f.write_to(&mut stream).unwrap();
        }
        let mut r = stream.as_slice();
        for f in sample() {
            assert_eq!(Frame::read_from(&mut r).unwrap(), f);
        }
        assert!(matches!(Frame::read_from(&mut r), Err(FrameError::Io(_))));
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let mut f = Frame::new(Kind::Write, 5, 1);
        f.payload = (0..64u8).collect();
        let good = f.to_bytes();
        for bit in 0..good.len() * 8 {
            let mut bad = good.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(
                Frame::read_from(&mut bad.as_slice()).is_err(),
                "bit {bit} flipped went unnoticed"
            );
        }
    }

    #[test]
    fn truncated_frames_are_errors() {
        let mut f = Frame::new(Kind::Write, 5, 1);
        f.payload = vec![9; 100];
        let good = f.to_bytes();
        for len in 0..good.len() {
            assert!(
                Frame::read_from(&mut &good[..len]).is_err(),
                "{len} bytes accepted"
            );
        }
    }

    #[test]
    fn oversized_and_unknown_frames_are_refused() {
        let f = Frame::new(Kind::Write, 1, 1);
        let mut h = f.header();
        h[32..36].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        let c = crc(&h[0..44]);
        h[44..48].copy_from_slice(&c.to_le_bytes());
        assert!(matches!(
            Frame::read_from(&mut &h[..]),
            Err(FrameError::TooLong(_))
        ));

        let mut h = f.header();
        h[4..6].copy_from_slice(&99u16.to_le_bytes());
        let c = crc(&h[0..44]);
        h[44..48].copy_from_slice(&c.to_le_bytes());
        assert!(matches!(
            Frame::read_from(&mut &h[..]),
            Err(FrameError::UnknownKind(99))
        ));
    }

    #[test]
    fn malformed_json_payloads_are_errors() {
        let mut f = Frame::new(Kind::Hello, 1, 1);
        f.payload = b"{\"disk\": 3}".to_vec();
        assert!(f.parse_json::<Hello>().is_err());
        f.payload = b"{\"disk\":\"a\",\"disk_id\":\"1\",\"capacity\":1,\"region_size\":1,\"generation\":1,\"bitmap_base\":0,\"evil\":1}".to_vec();
        assert!(f.parse_json::<Hello>().is_err());
    }
}
