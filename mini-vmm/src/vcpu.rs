//! One vCPU on its own thread, controlled the way a VMM controls vCPUs:
//! pause (with pending I/O completed, so the saved registers are
//! consistent), resume, throttle, stop.
//!
//! A guest may never exit on its own (a boot sector sweeping memory in a
//! loop), so pause and throttle kick the vCPU out of `KVM_RUN` with a
//! signal ([`crate::kick`]), again every millisecond until it is paused
//! (a kick that lands just before `KVM_RUN` is lost), and every 10 ms while
//! it is throttled; after each return from `KVM_RUN` a throttled vCPU
//! sleeps its share of the time it ran. The table program also exits after
//! every [`PAGES_PER_REPORT`] pages ([`PORT_PAGE`]), where pacing sleeps.
//!
//! Port I/O reaches the table program's ports, then the PC devices
//! ([`crate::pc`]: COM1, whose bytes go to the serial sink, and port
//! 0x92); any other port reads as all ones and ignores writes, logged once
//! per port. A triple fault, or an exit this VMM does not handle, stops the
//! vCPU with an error that says which.

use std::collections::BTreeSet;
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::kick::Kicker;
use crate::pc::Written;
use crate::program::{PAGES_PER_REPORT, PORT_PAGE, PORT_PASS, PORT_RESULT};
use crate::state::{DeviceState, VmState};

/// Where the guest's serial bytes go.
pub type SerialSink = Box<dyn Write + Send>;

/// How often a throttled vCPU is kicked out of `KVM_RUN` to take its sleep.
const THROTTLE_PERIOD: Duration = Duration::from_millis(10);

/// What the VMM wants of the vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Run,
    Pause,
    Stop,
}

#[derive(Debug)]
struct Ctl {
    want: Want,
    /// Registers saved at the last pause (set while paused).
    paused: Option<VmState>,
    device: DeviceState,
    /// Why the vCPU cannot run any more (an exit the VMM does not handle).
    failed: Option<String>,
    throttle: u8,
    /// The vCPU thread has left its loop (no more kicks needed).
    stopped: bool,
}

#[derive(Debug)]
struct Shared {
    ctl: Mutex<Ctl>,
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A vCPU error the VMM reports.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// The vCPU stopped on something this VMM does not emulate.
    #[error("vCPU failed: {0}")]
    Failed(String),
    /// A KVM ioctl failed.
    #[error("{what}: {source}")]
    Kvm {
        /// The ioctl.
        what: &'static str,
        /// Its error.
        source: kvm_ioctls::Error,
    },
}

/// A running vCPU thread, and the thread that kicks it while it is to be
/// paused or throttled.
pub struct VcpuRunner {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    kicker: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for VcpuRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuRunner")
            .field("ctl", &*self.shared.lock())
            .finish()
    }
}

impl VcpuRunner {
    /// Load `state` into `fd` and start running it, at most `pages_per_sec`
    /// table pages per second (0: as fast as it can); the guest's serial
    /// bytes go to `serial` (dropped without one).
    ///
    /// # Errors
    /// [`VcpuError::Kvm`] when KVM refuses the registers, [`VcpuError::Failed`]
    /// when a thread cannot be started.
    pub fn start(
        fd: VcpuFd,
        state: &VmState,
        pages_per_sec: u64,
        serial: Option<SerialSink>,
    ) -> Result<Self, VcpuError> {
        fd.set_sregs(&state.sregs)
            .map_err(|source| VcpuError::Kvm {
                what: "KVM_SET_SREGS",
                source,
            })?;
        fd.set_regs(&state.regs).map_err(|source| VcpuError::Kvm {
            what: "KVM_SET_REGS",
            source,
        })?;
        let shared = Arc::new(Shared {
            ctl: Mutex::new(Ctl {
                want: Want::Run,
                paused: None,
                device: state.device,
                failed: None,
                throttle: 0,
                stopped: false,
            }),
            cv: Condvar::new(),
        });
        crate::kick::prepare().map_err(|e| VcpuError::Failed(format!("kick signal: {e}")))?;
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("vcpu0".into())
            .spawn(move || vcpu_loop(fd, &s, pages_per_sec, serial))
            .map_err(|e| VcpuError::Failed(format!("cannot start the vCPU thread: {e}")))?;
        let kick = Kicker::new(&thread);
        let s = shared.clone();
        let kicker = std::thread::Builder::new()
            .name("vcpu0-kick".into())
            .spawn(move || kick_loop(&s, &kick));
        let kicker = match kicker {
            Ok(k) => k,
            Err(e) => {
                shared.lock().want = Want::Stop;
                shared.cv.notify_all();
                let kick = Kicker::new(&thread);
                while !thread.is_finished() {
                    kick.kick();
                    std::thread::sleep(Duration::from_millis(1));
                }
                let _ = thread.join();
                return Err(VcpuError::Failed(format!(
                    "cannot start the kick thread: {e}"
                )));
            }
        };
        Ok(Self {
            shared,
            thread: Some(thread),
            kicker: Some(kicker),
        })
    }

    /// Stop the vCPU and return its state once it is stopped (registers
    /// consistent: pending port I/O completed).
    ///
    /// # Errors
    /// [`VcpuError::Failed`] when the vCPU had failed.
    pub fn pause(&self) -> Result<VmState, VcpuError> {
        let mut c = self.shared.lock();
        c.want = Want::Pause;
        self.shared.cv.notify_all();
        loop {
            if let Some(f) = &c.failed {
                return Err(VcpuError::Failed(f.clone()));
            }
            if let Some(st) = c.paused {
                return Ok(st);
            }
            c = self.shared.cv.wait(c).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Let a paused vCPU run again.
    pub fn resume(&self) {
        let mut c = self.shared.lock();
        c.want = Want::Run;
        self.shared.cv.notify_all();
    }

    /// Slow the vCPU: it sleeps `percent` % of the time (0: full speed).
    pub fn throttle(&self, percent: u8) {
        self.shared.lock().throttle = percent.min(99);
        self.shared.cv.notify_all();
    }

    /// What the guest has reported so far.
    pub fn device(&self) -> DeviceState {
        self.shared.lock().device
    }

    /// Wait until the guest halts (or the vCPU fails), at most `timeout`.
    ///
    /// # Errors
    /// [`VcpuError::Failed`] when the vCPU failed; `Ok(None)` on timeout.
    pub fn wait_halted(&self, timeout: Duration) -> Result<Option<DeviceState>, VcpuError> {
        let deadline = Instant::now() + timeout;
        let mut c = self.shared.lock();
        loop {
            if let Some(f) = &c.failed {
                return Err(VcpuError::Failed(f.clone()));
            }
            if c.device.halted {
                return Ok(Some(c.device));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            c = self
                .shared
                .cv
                .wait_timeout(c, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

impl Drop for VcpuRunner {
    fn drop(&mut self) {
        self.shared.lock().want = Want::Stop;
        self.shared.cv.notify_all();
        // The kicker first: it signals the vCPU thread, which must not
        // have been joined while it does.
        if let Some(k) = self.kicker.take() {
            let _ = k.join();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Kick the vCPU out of `KVM_RUN` while it is to stop, pause (every
/// millisecond until it has) or be throttled (every [`THROTTLE_PERIOD`]).
fn kick_loop(s: &Shared, kick: &Kicker) {
    let mut c = s.lock();
    loop {
        let (kick_now, wait) = match c.want {
            // Until the vCPU thread has left KVM_RUN for good (a kick that
            // lands just before KVM_RUN is lost).
            Want::Stop if !c.stopped => (true, Duration::from_millis(1)),
            Want::Stop => return,
            Want::Pause if c.paused.is_none() && c.failed.is_none() => {
                (true, Duration::from_millis(1))
            }
            Want::Run if c.throttle > 0 => (true, THROTTLE_PERIOD),
            _ => (false, Duration::from_secs(1)),
        };
        if kick_now {
            kick.kick();
        }
        c =
            s.cv.wait_timeout(c, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
    }
}

fn vcpu_loop(fd: VcpuFd, s: &Shared, pages_per_sec: u64, serial: Option<SerialSink>) {
    let mut v = Vcpu {
        fd,
        start: Instant::now(),
        paced_pages: 0,
        pages_per_sec,
        serial,
        ran_since: Instant::now(),
        unclaimed: BTreeSet::new(),
    };
    while v.wait_to_run(s) {
        if let Some(exit) = v.run_once(s) {
            v.handle(s, exit);
        }
    }
}

/// The vCPU thread's own state.
struct Vcpu {
    fd: VcpuFd,
    /// When the guest started (pacing counts from here).
    start: Instant,
    /// Pages the guest reported written (pacing).
    paced_pages: u64,
    pages_per_sec: u64,
    serial: Option<SerialSink>,
    /// When the last stretch in `KVM_RUN` began (the throttle's share).
    ran_since: Instant,
    /// Ports nobody emulates that the guest touched (warned once each).
    unclaimed: BTreeSet<u16>,
}

impl Vcpu {
    /// Honour pause and stop (a halted or failed vCPU parks here too) and
    /// a throttle's sleep; whether to run (false: stopped).
    fn wait_to_run(&mut self, s: &Shared) -> bool {
        let mut c = s.lock();
        loop {
            match c.want {
                Want::Stop => {
                    c.stopped = true;
                    s.cv.notify_all();
                    return false;
                }
                Want::Pause if c.paused.is_none() => {
                    let st = save(&mut self.fd, c.device);
                    match st {
                        Ok(st) => c.paused = Some(st),
                        Err(e) => c.failed = Some(e.to_string()),
                    }
                    s.cv.notify_all();
                }
                Want::Run if !c.device.halted && c.failed.is_none() => {
                    c.paused = None;
                    break;
                }
                Want::Run => c.paused = None,
                Want::Pause => {}
            }
            c = s.cv.wait(c).unwrap_or_else(|p| p.into_inner());
        }
        // A throttled vCPU sleeps its share of the time it ran (wakeable by
        // pause and stop). `ran_since` restarts at every return from
        // KVM_RUN, so the share is of the last stretch only (never of time
        // before the throttle was set).
        let throttle = c.throttle;
        let ran = self.ran_since.elapsed();
        if throttle > 0 {
            let wake =
                Instant::now() + ran.mul_f64(f64::from(throttle) / f64::from(100 - throttle));
            drop(sleep_until(s, c, wake));
        }
        self.ran_since = Instant::now();
        // Paused or stopped during the sleep: `run_once` does not run, and
        // the next call honours it.
        true
    }

    /// One `KVM_RUN`: the exit to handle, or none (port reads answered, a
    /// signal's kick).
    fn run_once(&mut self, s: &Shared) -> Option<Exit> {
        if s.lock().want != Want::Run {
            return None;
        }
        Some(match self.fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => Exit::Out(port, le_u32(data)),
            Ok(VcpuExit::IoIn(port, data)) => {
                let c = s.lock();
                for b in data.iter_mut() {
                    *b = c.device.pc.read(port).unwrap_or_else(|| {
                        if self.unclaimed.insert(port) {
                            tracing::warn!(
                                port = format_args!("{port:#x}"),
                                "guest reads a port nobody emulates: it reads as 0xff (logged once)"
                            );
                        }
                        0xff
                    });
                }
                return None;
            }
            Ok(VcpuExit::Hlt) => Exit::Halt,
            Ok(VcpuExit::Shutdown) => Exit::Failed(
                "the guest shut down (triple fault): its state is lost, as on a PC that resets"
                    .into(),
            ),
            Ok(other) => Exit::Failed(format!("unexpected vCPU exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => return None,
            Err(e) => Exit::Failed(format!("KVM_RUN: {e}")),
        })
    }

    /// What the guest asked by its exit.
    fn handle(&mut self, s: &Shared, exit: Exit) {
        let mut c = s.lock();
        match exit {
            Exit::Out(PORT_PAGE, _) => {
                c.device.pages += u64::from(PAGES_PER_REPORT);
                // Pacing: sleep (wakeable by pause/stop) until the pages
                // written are due.
                self.paced_pages += u64::from(PAGES_PER_REPORT);
                if self.pages_per_sec > 0 {
                    let due = self.start
                        + Duration::from_secs_f64(
                            self.paced_pages as f64 / self.pages_per_sec as f64,
                        );
                    drop(sleep_until(s, c, due));
                }
            }
            Exit::Out(PORT_PASS, v) => c.device.passes = v,
            Exit::Out(PORT_RESULT, v) => c.device.result = Some(v),
            Exit::Out(port, v) => match c.device.pc.write(port, v as u8) {
                Written::Register => {}
                Written::Serial(b) => {
                    if let Some(out) = self.serial.as_mut() {
                        // The serial line has no flow control to the host:
                        // a sink that fails loses the byte, as a
                        // disconnected terminal would.
                        let _ = out.write_all(&[b]).and_then(|()| out.flush());
                    }
                }
                Written::Unclaimed => {
                    if self.unclaimed.insert(port) {
                        tracing::warn!(
                            port = format_args!("{port:#x}"),
                            value = v,
                            "guest writes a port nobody emulates: ignored (logged once)"
                        );
                    }
                }
            },
            Exit::Halt => c.device.halted = true,
            Exit::Failed(msg) => c.failed = Some(msg),
        }
        s.cv.notify_all();
    }
}

/// Why `KVM_RUN` returned, once the guest's port reads are answered.
enum Exit {
    Out(u16, u32),
    Halt,
    Failed(String),
}

fn le_u32(data: &[u8]) -> u32 {
    let mut v = [0u8; 4];
    let n = data.len().min(4);
    v[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(v)
}

/// Sleep until `wake` or until the VMM wants something else than running.
fn sleep_until<'a>(
    s: &'a Shared,
    mut c: MutexGuard<'a, Ctl>,
    wake: Instant,
) -> MutexGuard<'a, Ctl> {
    while c.want == Want::Run {
        let left = wake.saturating_duration_since(Instant::now());
        if left < Duration::from_micros(200) {
            break;
        }
        c =
            s.cv.wait_timeout(c, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
    }
    c
}

/// Complete pending port I/O (KVM finishes it on the next `KVM_RUN`; with
/// `immediate_exit` that run returns at once), then read the registers.
fn save(fd: &mut VcpuFd, device: DeviceState) -> Result<VmState, VcpuError> {
    fd.set_kvm_immediate_exit(1);
    let r = fd.run().map(|_| ());
    fd.set_kvm_immediate_exit(0);
    match r {
        Ok(()) => {}
        Err(e) if e.errno() == libc::EINTR => {}
        Err(source) => {
            return Err(VcpuError::Kvm {
                what: "KVM_RUN (completing I/O)",
                source,
            });
        }
    }
    Ok(VmState {
        regs: fd.get_regs().map_err(|source| VcpuError::Kvm {
            what: "KVM_GET_REGS",
            source,
        })?,
        sregs: fd.get_sregs().map_err(|source| VcpuError::Kvm {
            what: "KVM_GET_SREGS",
            source,
        })?,
        device,
    })
}
