//! The backup's side of a mirror link: it checks the primary's Hello,
//! answers with what it holds, then applies frames in the order they arrive
//! and acknowledges each once it is done (durably, for Flush, FUA writes and
//! ResyncDone).
//!
//! Refused, with an Error frame and the connection closed, and without
//! touching the disk: a primary of another disk, of another size, or of an
//! older generation (a stale primary); a frame carrying another generation
//! than the session's; any frame that fails its checks; any frame once this
//! copy was promoted or a newer session replaced this one.

use std::io::{BufReader, BufWriter, Write};
use std::net::Shutdown;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use crate::meta::{DataState, Role};
use crate::net::MirrorStream;
use crate::proto::{Frame, Hello, Kind, Welcome, FLAG_FUA, HEADER_LEN};
use crate::replica::{lock, Replica};
use crate::store::{check_range, write_or_punch};

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// Serves the primary that said `hello` on `stream` until the link ends.
pub fn serve(r: Arc<Replica>, stream: MirrorStream, hello: Hello) {
    let mut out = match stream.try_clone() {
        Ok(s) => BufWriter::with_capacity(64 << 10, s),
        Err(e) => {
            tracing::warn!(disk = %r.name(), error = %e, "mirror session");
            return;
        }
    };
    let generation = hello.generation;
    let (session, welcome) = match accept(&r, &hello) {
        Ok(x) => x,
        Err(why) => {
            tracing::warn!(disk = %r.name(), generation, why = %why, "primary refused");
            let _ = Frame::error(1, generation, &why)
                .write_to(&mut out)
                .and_then(|()| out.flush());
            return;
        }
    };
    tracing::info!(disk = %r.name(), generation, full = welcome.needs_full_sync, "serving primary");
    // A resumed full sync is still one: the copy stays "full sync cut" until it ends.
    let full = welcome.needs_full_sync || welcome.resumes_fill;
    let sent = Frame::json(Kind::Welcome, 1, welcome.generation, &welcome)
        .write_to(&mut out)
        .and_then(|()| out.flush());
    if sent.is_ok() {
        let why = run(&r, session, &stream, out, generation, full);
        tracing::warn!(disk = %r.name(), why = %why, "mirror session ended");
    }
    let _ = stream.shutdown(Shutdown::Both);
    let mut core = r.core();
    if core.serving_session == Some(session) {
        core.serving_session = None;
    }
}

/// Checks `hello` against this copy; on success the session is the current one.
fn accept(r: &Replica, hello: &Hello) -> Result<(u64, Welcome), String> {
    let mut meta = lock(&r.meta);
    let m = meta.get().clone();
    if m.role != Role::Backup {
        return Err(format!(
            "disk {} is {:?} here, not a backup",
            m.name, m.role
        ));
    }
    if hello.capacity != m.capacity || hello.region_size != m.region_size {
        return Err(format!(
            "disk {} here has {} bytes in regions of {}, the primary's has {} in regions of {}",
            m.name, m.capacity, m.region_size, hello.capacity, hello.region_size
        ));
    }
    if hello.generation < m.generation {
        return Err(format!(
            "stale primary: its generation {} is older than this copy's {}",
            hello.generation, m.generation
        ));
    }
    if m.data == DataState::Empty {
        if hello.disk_id.is_empty() {
            return Err("the primary's disk has no identity".into());
        }
        if !m.disk_id.is_empty() && m.disk_id != hello.disk_id {
            // Made for one disk: a primary of another by the same name never fills it.
            return Err(format!(
                "disk {} here was made for disk identity {}, the primary's is {}",
                m.name, m.disk_id, hello.disk_id
            ));
        }
        if m.disk_id != hello.disk_id {
            meta.update(|m| m.disk_id = hello.disk_id.clone())
                .map_err(|e| e.to_string())?;
        }
    } else if m.disk_id != hello.disk_id {
        return Err(format!(
            "disk {} here is {}, the primary's is {}",
            m.name, m.disk_id, hello.disk_id
        ));
    }
    // A partial resync is enough when this copy holds exactly the generation
    // the primary's bitmap runs from, or the primary's own generation; or when it is being
    // filled by the full sync the primary's bitmap was set whole for, which then goes on; or
    // when it is new (all zeros) and the primary's bitmap marks all it wrote since its own
    // data was all zeros.
    let resumes_fill = m.data == (DataState::Inconsistent { full: true })
        && !m.fill.is_empty()
        && m.fill == hello.fill;
    let needs_full_sync = !resumes_fill
        && match m.data {
            DataState::Empty => !hello.from_zeros,
            DataState::Inconsistent { full: true } => true,
            _ => {
                hello.bitmap_base == 0
                    || !(m.generation == hello.generation || m.generation == hello.bitmap_base)
            }
        };
    if needs_full_sync {
        // Filled by a new full sync from now on: only that one may resume here.
        if hello.new_fill.is_empty() || hello.new_fill.len() > 64 {
            return Err("the primary names no id for a full sync".into());
        }
        meta.update(|m| m.fill = hello.new_fill.clone())
            .map_err(|e| e.to_string())?;
    }
    let session = NEXT_SESSION.fetch_add(1, Ordering::Relaxed);
    r.core().serving_session = Some(session);
    let bitmap = lock(&r.bitmap).to_bytes();
    Ok((
        session,
        Welcome {
            generation: m.generation,
            needs_full_sync,
            bitmap,
            resumes_fill,
        },
    ))
}

/// Answers waiting to be sent.
#[derive(Default)]
struct Pending {
    /// (seq answered, error) in arrival order.
    acks: Vec<(u64, Option<String>)>,
    /// A write or flush among them must be durable before it is answered.
    sync: bool,
    /// A thread is answering a batch now.
    busy: bool,
    /// The session ended: answer what is queued, then stop.
    closed: bool,
    /// Why answering failed, once it did.
    failed: Option<String>,
}

/// Group commit: the applier queues the answer to every applied frame; a
/// batch (all that is queued) is made durable with one fdatasync when any of
/// it needs it, then answered. The syncer thread answers batches while the
/// applier goes on with frames that arrive meanwhile; when nothing else is
/// buffered and no batch is being answered, the applier answers its own
/// batch at once (one thread wake-up less for a lone synchronous write).
/// Nothing is answered before what it promises is done, and a flush's
/// fdatasync comes after every write applied before it.
struct Answers<'a> {
    pending: Mutex<Pending>,
    cond: Condvar,
    r: &'a Replica,
    /// The connection and the seq of the last frame sent on it.
    out: Mutex<(BufWriter<MirrorStream>, u64)>,
    stream: &'a MirrorStream,
    generation: u64,
}

type Batch = (Vec<(u64, Option<String>)>, bool);

impl Answers<'_> {
    fn push(&self, seq: u64, error: Option<String>, sync: bool) -> Result<(), String> {
        let mut p = lock(&self.pending);
        if let Some(f) = &p.failed {
            return Err(f.clone());
        }
        p.acks.push((seq, error));
        p.sync |= sync;
        Ok(())
    }

    /// Lets the syncer answer what is queued.
    fn wake_syncer(&self) {
        self.cond.notify_all();
    }

    fn close(&self) {
        lock(&self.pending).closed = true;
        self.cond.notify_all();
    }

    /// Takes the queued answers when no batch is being answered (waiting for
    /// that with `wait`); None when there is nothing to take (or, waiting,
    /// once the session closed and everything was answered).
    fn take(&self, wait: bool) -> Option<Batch> {
        let mut p = lock(&self.pending);
        loop {
            if !p.busy && !p.acks.is_empty() && p.failed.is_none() {
                p.busy = true;
                let sync = std::mem::take(&mut p.sync);
                return Some((std::mem::take(&mut p.acks), sync));
            }
            if !wait || p.failed.is_some() || (p.closed && p.acks.is_empty() && !p.busy) {
                return None;
            }
            p = self.cond.wait(p).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Makes a taken batch durable if it asks for it and sends its answers.
    fn answer(&self, (acks, sync): Batch) {
        let synced = if sync {
            self.r.sync_local().map_err(|e| format!("flushing: {e}"))
        } else {
            Ok(())
        };
        let sent = {
            let mut guard = lock(&self.out);
            let (w, seq) = &mut *guard;
            acks.into_iter()
                .try_for_each(|(acked, error)| {
                    *seq += 1;
                    let error = error.or_else(|| synced.as_ref().err().cloned());
                    Frame::ack(*seq, self.generation, acked, error.as_deref()).write_to(w)
                })
                .and_then(|()| w.flush())
        };
        let mut p = lock(&self.pending);
        p.busy = false;
        if let Err(e) = sent {
            p.failed = Some(format!("acknowledging to the primary: {e}"));
            let _ = self.stream.shutdown(Shutdown::Both);
        }
        drop(p);
        self.cond.notify_all();
    }

    /// The syncer's loop.
    fn run(&self) {
        while let Some(batch) = self.take(true) {
            self.answer(batch);
        }
    }
}

/// Applies frames in arrival order on this thread; a syncer thread answers
/// them (see [`Answers`]).
fn run(
    r: &Replica,
    session: u64,
    stream: &MirrorStream,
    out: BufWriter<MirrorStream>,
    generation: u64,
    full: bool,
) -> String {
    let reader = match stream.try_clone() {
        Ok(s) => s,
        Err(e) => return e.to_string(),
    };
    let _ = reader.set_read_timeout(Some(r.timing.link_timeout));
    let mut reader = BufReader::with_capacity(256 << 10, reader);
    let answers = Answers {
        pending: Mutex::default(),
        cond: Condvar::new(),
        r,
        out: Mutex::new((out, 1)),
        stream,
        generation,
    };
    std::thread::scope(|scope| {
        scope.spawn(|| answers.run());
        let why = apply(r, session, &mut reader, &answers, generation, full);
        answers.close();
        if let Some(refusal) = &why.1 {
            let mut guard = lock(&answers.out);
            let w = &mut guard.0;
            let _ = Frame::error(0, generation, refusal)
                .write_to(w)
                .and_then(|()| w.flush());
        }
        why.0
    })
}

/// Applies frames until the link ends; returns why, and the refusal to send
/// the primary if it ended for a frame it sent.
fn apply(
    r: &Replica,
    session: u64,
    reader: &mut BufReader<MirrorStream>,
    answers: &Answers<'_>,
    generation: u64,
    full: bool,
) -> (String, Option<String>) {
    let mut marked = false;
    let mut synced = false;
    let refuse = |why: String| (why.clone(), Some(why));
    loop {
        let frame = match Frame::read_from(reader) {
            Ok(f) => f,
            Err(e) => return refuse(format!("receiving from the primary: {e}")),
        };
        {
            let core = r.core();
            if core.role != Role::Backup {
                return refuse(format!("disk {} is no longer a backup here", r.name()));
            }
            if core.serving_session != Some(session) {
                return refuse("a newer connection from the primary replaced this one".into());
            }
        }
        if frame.generation != generation {
            return refuse(format!(
                "frame of generation {} in a session of generation {generation}",
                frame.generation
            ));
        }
        let queued = match frame.kind {
            Kind::Write | Kind::ResyncWrite => {
                if !marked && !synced {
                    // Writes before ResyncDone mix two histories.
                    if let Err(e) =
                        lock(&r.meta).update(|m| m.data = DataState::Inconsistent { full })
                    {
                        return refuse(e.to_string());
                    }
                    marked = true;
                }
                // Between two writes, a snapshot may start (`snapshot`): the gate holds it off
                // while this one, and the copy before it, are applied.
                let _gate = lock(&r.gate);
                let snapshot = lock(&r.snapshot).clone();
                // A resync's runs of zeros (most of a new disk) become holes, not dirty pages.
                let done = check_range(r.capacity, frame.offset, frame.payload.len())
                    .and_then(|()| match &snapshot {
                        Some(s) => s.preserve(&r.data, frame.offset, frame.payload.len() as u64),
                        None => Ok(()),
                    })
                    .and_then(|()| match frame.kind {
                        Kind::ResyncWrite => write_or_punch(&r.data, &frame.payload, frame.offset),
                        _ => r.data.write_all_at(&frame.payload, frame.offset),
                    })
                    .map_err(|e| {
                        format!(
                            "writing {} bytes at {}: {e}",
                            frame.payload.len(),
                            frame.offset
                        )
                    });
                let sync = done.is_ok() && frame.flags & FLAG_FUA != 0;
                answers.push(frame.seq, done.err(), sync)
            }
            Kind::Flush => answers.push(frame.seq, None, true),
            Kind::Ping => answers.push(frame.seq, None, false),
            Kind::ResyncDone => {
                // Everything applied so far becomes durable here, before the
                // record says this copy is consistent.
                let done = r
                    .sync_local()
                    .map_err(|e| format!("flushing: {e}"))
                    .and_then(|()| {
                        lock(&r.meta)
                            .update(|m| {
                                m.generation = generation;
                                m.data = DataState::Consistent;
                                m.bitmap_base = generation;
                            })
                            .map_err(|e| e.to_string())
                    })
                    .and_then(|()| {
                        let mut bm = lock(&r.bitmap);
                        let all = bm.set_regions();
                        bm.clear(&all).map_err(|e| e.to_string())
                    });
                if done.is_ok() {
                    r.core().generation = generation;
                    synced = true;
                    tracing::info!(disk = %r.name(), generation, "in sync with the primary");
                }
                answers.push(frame.seq, done.err(), false)
            }
            other => return refuse(format!("unexpected {other:?} frame from the primary")),
        };
        if let Err(e) = queued {
            return (e, None);
        }
        if reader.buffer().len() >= HEADER_LEN {
            // More frames are here: the syncer answers while they are applied.
            answers.wake_syncer();
        } else if let Some(batch) = answers.take(false) {
            // Nothing more to apply and no batch being answered: answer now.
            answers.answer(batch);
        } else {
            answers.wake_syncer();
        }
    }
}
