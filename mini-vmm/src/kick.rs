//! Kicking a vCPU thread out of `KVM_RUN`: a real-time signal whose
//! handler does nothing, so the ioctl returns `EINTR` and the thread looks
//! at what the VMM wants (how Firecracker and Cloud Hypervisor pause vCPUs
//! of guests that do not exit on their own).

use std::os::unix::thread::JoinHandleExt;
use std::sync::OnceLock;
use std::thread::JoinHandle;

use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

/// The kick signal.
fn signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Install the kick signal's handler (once per process).
///
/// # Errors
/// What `sigaction` said.
pub fn prepare() -> Result<(), String> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| register_signal_handler(signal(), on_kick).map_err(|e| e.to_string()))
        .clone()
}

/// Kicks one thread.
pub struct Kicker(libc::pthread_t);

impl Kicker {
    /// A kicker for `thread`. The owner must not join `thread` while it
    /// still kicks (a joined thread's id may name another thread).
    pub fn new<T>(thread: &JoinHandle<T>) -> Self {
        Self(thread.as_pthread_t() as libc::pthread_t)
    }

    /// Send the kick (a thread that has exited but is not joined yet
    /// ignores it).
    pub fn kick(&self) {
        // SAFETY: the id came from a JoinHandle the owner has not joined
        // yet (see `new`), so it names that thread, running or exited; the
        // signal's handler is installed by `prepare` before any vCPU
        // thread starts, so it cannot kill the process.
        unsafe {
            libc::pthread_kill(self.0, signal());
        }
    }
}
