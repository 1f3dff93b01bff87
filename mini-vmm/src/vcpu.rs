//! One vCPU on its own thread, controlled the way a VMM controls vCPUs:
//! pause (with pending I/O completed, so the saved registers are
//! consistent), resume, throttle, stop.
//!
//! The guest exits to the VMM after every [`PAGES_PER_REPORT`] table pages
//! it writes ([`PORT_PAGE`]), so a pause waits for that much guest work;
//! a VMM whose guest does not exit often kicks the vCPU with a signal
//! instead. Pacing and throttling put the vCPU thread to sleep at those
//! exits.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::program::{PAGES_PER_REPORT, PORT_PAGE, PORT_PASS, PORT_RESULT};
use crate::state::{DeviceState, VmState};

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

/// A running vCPU thread.
#[derive(Debug)]
pub struct VcpuRunner {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl VcpuRunner {
    /// Load `state` into `fd` and start running it, at most `pages_per_sec`
    /// table pages per second (0: as fast as it can).
    ///
    /// # Errors
    /// [`VcpuError::Kvm`] when KVM refuses the registers.
    pub fn start(fd: VcpuFd, state: &VmState, pages_per_sec: u64) -> Result<Self, VcpuError> {
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
            }),
            cv: Condvar::new(),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("vcpu0".into())
            .spawn(move || vcpu_loop(fd, &s, pages_per_sec))
            .expect("spawn vCPU thread");
        Ok(Self {
            shared,
            thread: Some(thread),
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
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn vcpu_loop(mut fd: VcpuFd, s: &Shared, pages_per_sec: u64) {
    let start = Instant::now();
    let mut paced_pages = 0u64;
    let mut ran_since = Instant::now();
    loop {
        // Honour pause and stop; a halted or failed vCPU parks here too.
        {
            let mut c = s.lock();
            loop {
                match c.want {
                    Want::Stop => return,
                    Want::Pause if c.paused.is_none() => {
                        let st = save(&mut fd, c.device);
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
        }
        let exit = match fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                let mut v = [0u8; 4];
                let n = data.len().min(4);
                v[..n].copy_from_slice(&data[..n]);
                Ok((port, u32::from_le_bytes(v)))
            }
            Ok(VcpuExit::Hlt) => Err(None),
            Ok(other) => Err(Some(format!("unexpected vCPU exit {other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => Err(Some(format!("KVM_RUN: {e}"))),
        };
        let mut c = s.lock();
        match exit {
            Ok((PORT_PAGE, _)) => {
                c.device.pages += u64::from(PAGES_PER_REPORT);
                let throttle = c.throttle;
                // Pacing and throttle: sleep (wakeable by pause/stop).
                paced_pages += u64::from(PAGES_PER_REPORT);
                let mut wake = Instant::now();
                if pages_per_sec > 0 {
                    let due =
                        start + Duration::from_secs_f64(paced_pages as f64 / pages_per_sec as f64);
                    wake = wake.max(due);
                }
                if throttle > 0 {
                    let ran = ran_since.elapsed();
                    wake += ran.mul_f64(f64::from(throttle) / f64::from(100 - throttle));
                }
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
                ran_since = Instant::now();
            }
            Ok((PORT_PASS, v)) => c.device.passes = v,
            Ok((PORT_RESULT, v)) => c.device.result = Some(v),
            Ok((port, v)) => {
                c.failed = Some(format!("write of {v:#x} to unknown port {port:#x}"));
            }
            Err(None) => c.device.halted = true,
            Err(Some(msg)) => c.failed = Some(msg),
        }
        s.cv.notify_all();
    }
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
