//! The mirror protocol's frame reader (`blockrepl::proto`) on untrusted bytes, read the way a
//! blockd reads its peer's TCP stream: frame after frame until one is refused or the bytes end.
//!
//! A frame that reads writes back as exactly the bytes it was read from, and a payload that
//! parses as a Hello or a Welcome encodes back to the same value.
//!
//! Checksums stop nearly every mutated input at the header, so an input whose first byte is
//! odd has each frame's checksums made right first (the rest of the input is the stream); with
//! an even first byte the stream is read as it came.

#![no_main]

use blockrepl::proto::{Frame, Hello, Kind, Welcome, HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, stream)) = data.split_first() else {
        return;
    };
    let mut stream = stream.to_vec();
    if mode & 1 == 1 {
        fix_checksums(&mut stream);
    }
    let mut rest = stream.as_slice();
    // Every frame read takes at least a header, so this ends.
    loop {
        let before = rest;
        let Ok(frame) = Frame::read_from(&mut rest) else {
            return;
        };
        let consumed = &before[..before.len() - rest.len()];
        assert_eq!(
            frame.to_bytes(),
            consumed,
            "frame does not write back as read"
        );
        let _ = frame.text();
        if let Ok(hello) = frame.parse_json::<Hello>() {
            let again = Frame::json(Kind::Hello, frame.seq, frame.generation, &hello);
            assert_eq!(again.parse_json::<Hello>(), Ok(hello));
        }
        if let Ok(welcome) = frame.parse_json::<Welcome>() {
            let again = Frame::json(Kind::Welcome, frame.seq, frame.generation, &welcome);
            assert_eq!(again.parse_json::<Welcome>(), Ok(welcome));
        }
    }
});

/// Sets the payload and header checksums of every frame in `stream` to the right values,
/// whatever the rest of its header says.
fn fix_checksums(stream: &mut [u8]) {
    let mut at = 0usize;
    while stream.len() - at >= HEADER_LEN {
        let (head, tail) = stream[at..].split_at_mut(HEADER_LEN);
        let len = u32::from_le_bytes(head[32..36].try_into().unwrap()) as usize;
        let payload = &tail[..len.min(tail.len())];
        head[36..40].copy_from_slice(&crc32fast::hash(payload).to_le_bytes());
        let sum = crc32fast::hash(&head[..44]);
        head[44..48].copy_from_slice(&sum.to_le_bytes());
        at = at
            .saturating_add(HEADER_LEN)
            .saturating_add(len)
            .min(stream.len());
    }
}
