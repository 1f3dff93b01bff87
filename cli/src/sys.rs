//! The process's identity, its peers' and its CPU clock, from the kernel,
//! through rustix's safe calls.

use std::os::unix::net::UnixStream;
use std::time::Duration;

/// The process's effective user id (who its files and peers must be).
pub fn effective_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// The user id of the process at the other end of a Unix socket, as the
/// kernel recorded it when that process connected (`SO_PEERCRED`).
pub fn peer_uid(stream: &UnixStream) -> std::io::Result<u32> {
    Ok(rustix::net::sockopt::socket_peercred(stream)?.uid.as_raw())
}

/// CPU time of the whole process, all threads, user and system.
pub fn process_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// Clock ticks per second, the unit of `/proc/*/stat`'s times.
pub fn clock_ticks() -> u64 {
    rustix::param::clock_ticks_per_second()
}
