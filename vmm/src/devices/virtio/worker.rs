//! The thread that runs a device's queues: an epoll loop over the queue
//! eventfds, any extra descriptors the device watches (a tap), and a stop
//! eventfd.

use std::os::fd::{AsRawFd, RawFd};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// What a device does when woken.
pub trait QueueHandler: Send + 'static {
    /// Queue `index` was notified by the guest.
    fn queue_notified(&mut self, index: usize);
    /// Descriptors besides the queues to watch for input.
    fn extra_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }
    /// Extra descriptor `index` (in [`QueueHandler::extra_fds`] order) is readable.
    fn extra_ready(&mut self, _index: usize) {}
}

const STOP_TOKEN: u64 = u64::MAX;
const EXTRA_BASE: u64 = 1 << 32;

/// A running worker; stopping it joins the thread and hands the handler back.
pub struct Worker<H> {
    stop: EventFd,
    handle: Option<JoinHandle<H>>,
}

impl<H: QueueHandler> Worker<H> {
    /// Starts `handler` on a thread named `name`, woken by `queue_evts`.
    pub fn spawn(
        name: String,
        mut handler: H,
        queue_evts: Vec<EventFd>,
    ) -> std::io::Result<Worker<H>> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        let add = |fd: RawFd, token: u64| {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
        };
        add(stop.as_raw_fd(), STOP_TOKEN)?;
        for (i, e) in queue_evts.iter().enumerate() {
            add(e.as_raw_fd(), i as u64)?;
        }
        // Edge-triggered: a device with nowhere to put input stops reading
        // and resumes when its queue is refilled, instead of spinning.
        for (i, fd) in handler.extra_fds().into_iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(
                    EventSet::IN | EventSet::EDGE_TRIGGERED,
                    EXTRA_BASE + i as u64,
                ),
            )?;
        }
        let handle = std::thread::Builder::new().name(name.clone()).spawn(move || {
            // Requests queued before DRIVER_OK are served without waiting for a kick.
            for i in 0..queue_evts.len() {
                handler.queue_notified(i);
            }
            let mut events = vec![EpollEvent::default(); 16];
            loop {
                let n = match epoll.wait(-1, &mut events) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::error!(worker = %name, error = %e, "epoll failed; device stops");
                        return handler;
                    }
                };
                for ev in &events[..n] {
                    match ev.data() {
                        STOP_TOKEN => return handler,
                        t if t >= EXTRA_BASE => handler.extra_ready((t - EXTRA_BASE) as usize),
                        t => {
                            let _ = queue_evts[t as usize].read();
                            handler.queue_notified(t as usize);
                        }
                    }
                }
            }
        })?;
        Ok(Worker {
            stop,
            handle: Some(handle),
        })
    }

    /// Stops the thread, waits for it, and returns its handler (`None` if
    /// the thread panicked).
    pub fn stop(mut self) -> Option<H> {
        self.halt()
    }

    fn halt(&mut self) -> Option<H> {
        let h = self.handle.take()?;
        let _ = self.stop.write(1);
        h.join().ok()
    }
}

impl<H> Drop for Worker<H> {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            let _ = self.stop.write(1);
            let _ = h.join();
        }
    }
}
