//! The primary's connector: it keeps a link to the backup, brings the backup
//! up to date after every (re)connection, and in sync clears the bitmap bits
//! both copies hold.
//!
//! Resync copies the union of the primary's bitmap and the backup's (the
//! regions either may hold differently), or every region when the backup is
//! new or its history does not match. It runs in the background while the
//! guest writes: a region being copied holds back writes to it, and frames
//! are ordered on the link, so a copy never overwrites a newer write on the
//! backup. When the backup acknowledged ResyncDone (it made everything
//! durable), writes that stalled while the link was down complete, and the
//! copy is a mirrored Primary again.

use std::collections::VecDeque;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Instant;

use crate::bitmap::regions_in;
use crate::link::{self, Link};
use crate::meta::Role;
use crate::proto::{Hello, Kind, Welcome, MAX_PAYLOAD};
use crate::replica::{lock, run_done, Replica};

/// Resync frames in flight at once.
const WINDOW: usize = 8;
/// A resync makes its progress durable on the backup (a flush) and clears the bits of what it
/// copied at least this often (and after `Timing::checkpoint_regions` regions).
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Starts the connector thread of `replica`; it ends when the replica stops.
pub fn start(replica: &Arc<Replica>) -> std::io::Result<std::thread::JoinHandle<()>> {
    let r = replica.clone();
    std::thread::Builder::new()
        .name(format!("connector-{}", replica.name()))
        .spawn(move || run(r))
}

fn run(r: Arc<Replica>) {
    let mut last_clean = Instant::now();
    while !r.is_stopping() {
        let m = r.meta();
        let linked = r.core().link.clone();
        match (m.role, &m.peer, linked) {
            (Role::Backup, _, _) | (_, None, _) => r.wait_a_while(r.timing.retry_interval),
            (_, Some(_), Some(link)) => {
                if r.core().in_sync && last_clean.elapsed() >= r.timing.clean_interval {
                    if let Err(e) = clean(&r, &link) {
                        tracing::warn!(disk = %r.name(), error = %e, "bitmap clean pass failed");
                    }
                    last_clean = Instant::now();
                }
                r.wait_a_while(r.timing.clean_interval);
            }
            (_, Some(peer), None) => {
                if let Err(e) = connect_and_resync(&r, peer) {
                    tracing::warn!(disk = %r.name(), peer = %peer, error = %e, "mirror link");
                    r.core().last_error = Some(e);
                    r.set_progress(None);
                    r.wait_a_while(r.timing.retry_interval);
                }
            }
        }
    }
}

fn connect_and_resync(r: &Arc<Replica>, peer: &str) -> Result<(), String> {
    let m = r.meta();
    let hello = Hello {
        disk: m.name.clone(),
        disk_id: m.disk_id.clone(),
        capacity: m.capacity,
        region_size: m.region_size,
        generation: m.generation,
        bitmap_base: m.bitmap_base,
        fill: m.fill.clone(),
        new_fill: crate::replica::random_id().map_err(|e| format!("reading /dev/urandom: {e}"))?,
        from_zeros: m.from_zeros,
    };
    let (link, welcome) = link::connect(r, peer, &hello)?;
    let changed = {
        let mut core = r.core();
        let changed =
            core.generation != m.generation || core.role == Role::Backup || r.is_stopping();
        if !changed {
            core.link = Some(link.clone());
            core.in_sync = false;
            core.last_error = None;
        }
        changed
    };
    if changed {
        // Killed outside the lock: a dying link reports to the replica.
        link.kill();
        return Err("the disk changed while connecting".into());
    }
    tracing::info!(disk = %r.name(), peer, generation = m.generation, full = welcome.needs_full_sync, resumes = welcome.resumes_fill, "mirror link up");
    let result = resync(r, &link, &welcome, &hello.new_fill);
    if let Err(e) = &result {
        link.kill();
        r.set_progress(None);
        return Err(format!("resync to {peer}: {e}"));
    }
    Ok(())
}

fn resync(
    r: &Arc<Replica>,
    link: &Arc<Link>,
    welcome: &Welcome,
    new_fill: &str,
) -> Result<(), String> {
    let regions_total = r.capacity.div_ceil(r.region_size);
    let full = welcome.needs_full_sync;
    // Everything owed is marked in our own bitmap first, so that a crash
    // mid-resync still owes it.
    let regions: Vec<u64> = {
        let mut bm = lock(&r.bitmap);
        if full {
            bm.set_all().map_err(|e| e.to_string())?;
        } else {
            for reg in regions_in(&welcome.bitmap, regions_total) {
                bm.set_range(reg, reg).map_err(|e| e.to_string())?;
            }
        }
        let owed = bm.set_regions();
        // Every owed region is marked and will be copied: what counts as touched from here on
        // is what the guest writes during the copy (a checkpoint leaves those marked).
        r.reset_touched();
        owed
    };
    if full {
        // After the bits (a crash between leaves the old id, so no resume on half a bitmap):
        // this full sync is the one the bitmap was set for, and the backup's too.
        lock(&r.meta)
            .update(|m| m.fill = new_fill.to_string())
            .map_err(|e| e.to_string())?;
    } else if !welcome.resumes_fill {
        // A partial resync to a backup other than the one a full sync was filling clears bits
        // that one may not hold: that full sync can no longer resume (before any bit is
        // cleared).
        let mut meta = lock(&r.meta);
        if !meta.get().fill.is_empty() {
            meta.update(|m| m.fill.clear()).map_err(|e| e.to_string())?;
        }
    }
    let owed: u64 = regions.iter().map(|&reg| region_len(r, reg)).sum();
    // A full sync, begun now or resumed, counts the whole disk: what earlier tries copied is
    // done already, so its percentage goes on from there. Progress counts what the backup
    // holds durably (at each checkpoint), never what a cut could take back.
    let whole = full || welcome.resumes_fill;
    let (total, before) = if whole {
        (r.capacity, r.capacity - owed)
    } else {
        (owed, 0)
    };
    let started = Instant::now();
    let mut copied = 0u64;
    let progress = |copied: u64| Replica::progress(whole, total, before + copied, copied, started);
    r.set_progress(Some(progress(0)));
    tracing::info!(disk = %r.name(), regions = regions.len(), bytes = owed, full, resumed = welcome.resumes_fill, "resync starts");
    // Regions copied since the last checkpoint.
    let mut unsaved: Vec<u64> = Vec::new();
    let mut saved_at = Instant::now();
    let mut window = VecDeque::new();
    let chunk = u64::from(MAX_PAYLOAD).min(r.region_size);
    let mut buf = vec![0u8; chunk as usize];
    for &reg in &regions {
        if link.is_dead() || r.is_stopping() {
            return Err("link went down".into());
        }
        let start = reg * r.region_size;
        let len = region_len(r, reg);
        r.begin_copy(reg);
        let sent = (|| {
            let mut off = start;
            while off < start + len {
                let n = chunk.min(start + len - off) as usize;
                r.data
                    .read_exact_at(&mut buf[..n], off)
                    .map_err(|e| format!("reading region {reg}: {e}"))?;
                window.push_back(link.send_waited(Kind::ResyncWrite, off, &buf[..n])?);
                off += n as u64;
                while window.len() > WINDOW {
                    link::wait(window.pop_front().expect("non-empty"))?;
                }
            }
            Ok::<(), String>(())
        })();
        r.end_copy();
        sent?;
        copied += len;
        unsaved.push(reg);
        if unsaved.len() >= r.timing.checkpoint_regions || saved_at.elapsed() >= CHECKPOINT_EVERY {
            checkpoint(r, link, &mut window, &unsaved)?;
            unsaved.clear();
            saved_at = Instant::now();
            r.set_progress(Some(progress(copied)));
        }
    }
    for rx in window {
        link::wait(rx)?;
    }
    r.reset_touched();
    link.call(Kind::ResyncDone, &[])?;
    finish(r, link, &regions)?;
    tracing::info!(
        disk = %r.name(),
        bytes = total,
        secs = started.elapsed().as_secs_f64(),
        "resync done: in sync"
    );
    Ok(())
}

/// Makes what the resync copied so far durable on the backup and clears those regions' bits
/// (those no write touched meanwhile): a resync cut after this owes only the rest.
fn checkpoint(
    r: &Arc<Replica>,
    link: &Arc<Link>,
    window: &mut VecDeque<std::sync::mpsc::Receiver<Result<(), String>>>,
    copied: &[u64],
) -> Result<(), String> {
    for rx in window.drain(..) {
        link::wait(rx)?;
    }
    link.call(Kind::Flush, &[])?;
    r.forget_zeros()?;
    let mut bm = lock(&r.bitmap);
    let clean = r.still_clean(copied);
    bm.clear(&clean).map_err(|e| e.to_string())?;
    r.reset_touched();
    Ok(())
}

fn region_len(r: &Replica, reg: u64) -> u64 {
    r.region_size.min(r.capacity - reg * r.region_size)
}

/// The backup holds everything: clear what is safe, become a mirrored
/// Primary, complete the writes that stalled.
fn finish(r: &Arc<Replica>, link: &Arc<Link>, copied: &[u64]) -> Result<(), String> {
    let mut meta = lock(&r.meta);
    if meta.get().from_zeros {
        meta.update(|m| m.from_zeros = false)
            .map_err(|e| e.to_string())?;
    }
    {
        let mut bm = lock(&r.bitmap);
        let clean = r.still_clean(copied);
        bm.clear(&clean).map_err(|e| e.to_string())?;
    }
    let generation = meta.get().generation;
    if generation != link.generation() {
        return Err("the generation changed during resync".into());
    }
    meta.update(|m| {
        m.role = Role::Primary;
        m.bitmap_base = generation;
    })
    .map_err(|e| e.to_string())?;
    let done = {
        let mut core = r.core();
        if core.link.as_ref().map(|l| l.id()) != Some(link.id()) {
            return Err("link went down".into());
        }
        core.role = Role::Primary;
        core.in_sync = true;
        core.last_resync = core.resync.take();
        r.complete_stalled(&mut core, Some(link.id()))
    };
    drop(meta);
    run_done(done);
    Ok(())
}

/// Clears the bits of regions both copies hold durably: those with no write
/// since the last pass, after a flush of both sides.
fn clean(r: &Arc<Replica>, link: &Arc<Link>) -> Result<(), String> {
    let set = lock(&r.bitmap).set_regions();
    let candidates = r.clean_candidates(&set);
    if candidates.is_empty() {
        return Ok(());
    }
    r.sync_local()
        .map_err(|e| format!("flushing locally: {e}"))?;
    link.call(Kind::Flush, &[])?;
    r.forget_zeros()?;
    let mut bm = lock(&r.bitmap);
    let clean = r.still_clean(&candidates);
    bm.clear(&clean).map_err(|e| e.to_string())?;
    tracing::debug!(disk = %r.name(), cleared = clean.len(), "bitmap clean pass");
    Ok(())
}
