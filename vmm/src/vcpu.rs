//! vCPU threads: each runs KVM_RUN and dispatches exits to the buses. The
//! VM parks them for pause and stops them for power-off or reboot by
//! setting a shared state and kicking them out of KVM_RUN with a signal.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::bus::{lock, Bus};
use crate::vm::VmEvent;

/// What the VM wants its vCPUs to do.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum Run {
    /// Run the guest.
    Go = 0,
    /// Park until told otherwise.
    Pause = 1,
    /// Leave the thread.
    Exit = 2,
}

/// State shared by the VM and all its vCPU threads.
pub struct Control {
    want: AtomicU8,
    parked: Mutex<usize>,
    changed: Condvar,
    /// Percent of each [`THROTTLE_PERIOD`] the vCPUs sleep instead of running the guest.
    throttle: AtomicU8,
}

/// The period over which a throttled vCPU runs, then sleeps its share.
pub const THROTTLE_PERIOD: Duration = Duration::from_millis(10);

impl Control {
    /// Everyone running.
    pub fn new() -> Arc<Self> {
        Self::with(Run::Go)
    }

    /// Every vCPU parked from the start (a VM taking a migrated state before it runs).
    pub fn parked_at_start() -> Arc<Self> {
        Self::with(Run::Pause)
    }

    fn with(run: Run) -> Arc<Self> {
        Arc::new(Control {
            want: AtomicU8::new(run as u8),
            parked: Mutex::new(0),
            changed: Condvar::new(),
            throttle: AtomicU8::new(0),
        })
    }

    fn want(&self) -> Run {
        match self.want.load(Ordering::SeqCst) {
            0 => Run::Go,
            1 => Run::Pause,
            _ => Run::Exit,
        }
    }

    /// Sets what vCPUs should do and wakes parked ones.
    pub fn set(&self, run: Run) {
        self.want.store(run as u8, Ordering::SeqCst);
        let _g = lock(&self.parked);
        self.changed.notify_all();
    }

    /// Parks the vCPUs for a stop the guest itself caused (halt, triple fault, power event),
    /// unless they were already told something else: the VM may have heard of the stop and set
    /// `Exit` before this runs, and a `Pause` over it would leave the vCPU parked forever
    /// while the VM waits for it to end (a reboot then hangs).
    fn pause_if_running(&self) {
        let (go, pause) = (Run::Go as u8, Run::Pause as u8);
        if self
            .want
            .compare_exchange(go, pause, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            let _g = lock(&self.parked);
            self.changed.notify_all();
        }
    }

    /// Holds the vCPUs back `pct` percent of the time (at most 99; 0: they run freely). A
    /// vCPU sleeps when it leaves KVM_RUN after running its share: a guest that never exits
    /// needs kicks every [`THROTTLE_PERIOD`] to be held back.
    pub fn set_throttle(&self, pct: u8) {
        self.throttle.store(pct.min(99), Ordering::SeqCst);
    }

    /// The share of the time the vCPUs are held back, percent.
    pub fn throttle(&self) -> u8 {
        self.throttle.load(Ordering::SeqCst)
    }

    /// How many vCPUs are parked.
    pub fn parked(&self) -> usize {
        *lock(&self.parked)
    }
}

fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the no-op handler whose only job is to make KVM_RUN return EINTR.
pub fn install_kick_handler() -> std::io::Result<()> {
    register_signal_handler(kick_signal(), noop_handler)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// The size of each access in the port I/O exit `run` describes (1, 2 or 4 bytes; a string
/// instruction's exit carries several).
fn pio_access_size(run: *const kvm_bindings::kvm_run) -> usize {
    // SAFETY: `run` is the vCPU's kvm_run mapping, alive for the vCPU's life, and the exit
    // being handled is KVM_EXIT_IO, so the `io` member of the union is the valid one. Only
    // its `size` field is read, through a raw pointer: the exit's data (a different part of
    // the mapping) is borrowed mutably meanwhile.
    let size = unsafe { std::ptr::addr_of!((*run).__bindgen_anon_1.io.size).read() };
    match size {
        1 | 2 | 4 => usize::from(size),
        _ => 1,
    }
}

/// A running vCPU thread.
pub struct VcpuThread {
    handle: JoinHandle<()>,
    /// Held by the thread while it runs the guest; free while it is parked, when the VM may
    /// take or put back the vCPU's state.
    fd: Arc<Mutex<VcpuFd>>,
}

impl VcpuThread {
    /// Starts vCPU `id`.
    pub fn spawn(
        id: u8,
        fd: VcpuFd,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        control: Arc<Control>,
        events: Sender<VmEvent>,
    ) -> std::io::Result<VcpuThread> {
        let fd = Arc::new(Mutex::new(fd));
        let shared = fd.clone();
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                // SIGRTMIN is blocked by default in no thread; nothing to unblock.
                let mut running_since = std::time::Instant::now();
                loop {
                    match control.want() {
                        Run::Exit => return,
                        Run::Pause => {
                            let mut parked = lock(&control.parked);
                            *parked += 1;
                            control.changed.notify_all();
                            while control.want() == Run::Pause {
                                parked = control
                                    .changed
                                    .wait(parked)
                                    .unwrap_or_else(|p| p.into_inner());
                            }
                            *parked -= 1;
                            continue;
                        }
                        Run::Go => {}
                    }
                    let pct = u32::from(control.throttle());
                    if pct > 0 && running_since.elapsed() >= THROTTLE_PERIOD * (100 - pct) / 100 {
                        std::thread::sleep(THROTTLE_PERIOD * pct / 100);
                        running_since = std::time::Instant::now();
                    } else if pct == 0 {
                        running_since = std::time::Instant::now();
                    }
                    let mut fd = lock(&shared);
                    let run_area: *const kvm_bindings::kvm_run = fd.get_kvm_run();
                    match fd.run() {
                        Ok(exit) => match exit {
                            // A string instruction (`rep insb`) exits once for many
                            // accesses: each goes to the device on its own, as the
                            // guest made them (fw_cfg's data port is read this way).
                            VcpuExit::IoIn(port, data) => {
                                for one in data.chunks_mut(pio_access_size(run_area)) {
                                    pio.read(u64::from(port), one);
                                }
                            }
                            VcpuExit::IoOut(port, data) => {
                                for one in data.chunks(pio_access_size(run_area)) {
                                    pio.write(u64::from(port), one);
                                }
                            }
                            VcpuExit::MmioRead(addr, data) => {
                                tracing::trace!(vcpu = id, addr, len = data.len(), "mmio read");
                                if !mmio.read(addr, data) {
                                    data.fill(0);
                                }
                            }
                            VcpuExit::MmioWrite(addr, data) => {
                                tracing::trace!(vcpu = id, addr, ?data, "mmio write");
                                mmio.write(addr, data);
                            }
                            VcpuExit::Hlt => {
                                // With an in-kernel LAPIC, HLT reaches us only when
                                // the guest halted for good (interrupts off).
                                tracing::info!(vcpu = id, "guest halted the CPU");
                                control.pause_if_running();
                                let _ = events.send(VmEvent::Halted(id));
                            }
                            VcpuExit::Shutdown => {
                                // A triple fault: what a PC does is reset.
                                tracing::warn!(vcpu = id, "guest triple-faulted; resetting");
                                control.pause_if_running();
                                let _ = events.send(VmEvent::Reset);
                            }
                            VcpuExit::SystemEvent(kind, _) => {
                                let ev = if kind == kvm_bindings::KVM_SYSTEM_EVENT_RESET {
                                    VmEvent::Reset
                                } else {
                                    VmEvent::PowerOff
                                };
                                control.pause_if_running();
                                let _ = events.send(ev);
                            }
                            VcpuExit::FailEntry(reason, cpu) => {
                                let _ = events.send(VmEvent::VcpuFailed(format!(
                                "vCPU {id}: KVM entry failed, reason {reason:#x} on host CPU {cpu}"
                            )));
                                return;
                            }
                            VcpuExit::InternalError => {
                                // SAFETY: for KVM_EXIT_INTERNAL_ERROR the union holds `internal`.
                                let (sub, data) = unsafe {
                                    let i = &fd.get_kvm_run().__bindgen_anon_1.internal;
                                    (i.suberror, i.data[..(i.ndata as usize).min(16)].to_vec())
                                };
                                let _ = events.send(VmEvent::VcpuFailed(format!(
                                    "vCPU {id}: KVM internal error, suberror {sub}, data {data:x?}"
                                )));
                                return;
                            }
                            VcpuExit::Intr => {}
                            other => {
                                tracing::debug!(vcpu = id, exit = ?other, "unhandled vCPU exit");
                            }
                        },
                        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                        Err(e) => {
                            let _ = events.send(VmEvent::VcpuFailed(format!(
                                "vCPU {id}: KVM_RUN failed: {e}"
                            )));
                            return;
                        }
                    }
                }
            })?;
        Ok(VcpuThread { handle, fd })
    }

    /// The vCPU's fd, for its state: lock it only while the vCPU is parked.
    pub fn fd(&self) -> &Arc<Mutex<VcpuFd>> {
        &self.fd
    }

    /// Interrupts KVM_RUN so the thread looks at its orders.
    pub fn kick(&self) {
        let _ = self.handle.kill(kick_signal());
    }

    /// Whether the thread has ended.
    pub fn finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Waits for the thread to end.
    pub fn join(self) {
        let _ = self.handle.join();
    }
}

/// Kicks `threads` until `done` holds: a kick that lands just before
/// KVM_RUN starts is lost, so one is not enough.
pub fn kick_until(threads: &[VcpuThread], done: impl Fn() -> bool) {
    while !done() {
        for t in threads {
            t.kick();
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vcpus_own_stop_does_not_undo_the_vms_exit() {
        // The VM heard of the triple fault and told the vCPUs to leave before the vCPU that
        // saw it parked them: they must still leave.
        let c = Control::new();
        c.set(Run::Exit);
        c.pause_if_running();
        assert_eq!(c.want(), Run::Exit);
        // Running: the vCPU's stop parks them.
        let c = Control::new();
        c.pause_if_running();
        assert_eq!(c.want(), Run::Pause);
    }
}
