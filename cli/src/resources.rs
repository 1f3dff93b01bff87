//! What a migration costs the process: CPU time and memory beyond the guest.
//!
//! - CPU: the process's user + system time over the migration, less the
//!   built-in guest's own threads (they stand for vCPUs, not for us).
//! - Memory: the peak resident set (`VmHWM`) less what the process held
//!   before the guest existed and less the guest pages resident at the end
//!   (`mincore`); what is left is the engine's own memory — bitmaps,
//!   buffers, queues, thread stacks.
//!
//! The process's clock and the clock tick come from `sys`.

use std::time::Duration;

use migrate_core::memory::GuestMemory;
use migrate_core::report::Resources;

/// Names the built-in guest gives its threads (`fixtures`).
const GUEST_THREADS: [&str; 2] = ["guest-vcpu-", "bank-"];

/// Process CPU time, guest threads' CPU time; each also split into user
/// and system time (clock ticks: coarser).
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSample {
    process: Duration,
    guest: Duration,
    process_split: UserSys,
    guest_split: UserSys,
}

/// User and system CPU time.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct UserSys {
    /// In the process's own code.
    pub user: Duration,
    /// In the kernel on its behalf (system calls, and the network or RDMA
    /// stack's work done in them).
    pub sys: Duration,
}

impl UserSys {
    fn since(self, start: UserSys) -> UserSys {
        UserSys {
            user: self.user.saturating_sub(start.user),
            sys: self.sys.saturating_sub(start.sys),
        }
    }
}

impl CpuSample {
    /// Now.
    pub fn now() -> Self {
        let guest_split = guest_threads_cpu();
        Self {
            process: crate::sys::process_cpu(),
            guest: guest_split.user + guest_split.sys,
            process_split: stat_times("/proc/self/stat").unwrap_or_default(),
            guest_split,
        }
    }
}

/// utime and stime of a `/proc/.../stat` file.
fn stat_times(path: impl AsRef<std::path::Path>) -> Option<UserSys> {
    let hz = crate::sys::clock_ticks().max(1) as f64;
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the ")" that closes the name: state is field 3, utime
    // 14 and stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| {
        f.get(i - 3)
            .and_then(|x| x.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Some(UserSys {
        user: Duration::from_secs_f64(get(14) as f64 / hz),
        sys: Duration::from_secs_f64(get(15) as f64 / hz),
    })
}

/// Sum of the user and system times of the live threads named like guest
/// threads, from `/proc/self/task/*/stat`.
fn guest_threads_cpu() -> UserSys {
    let mut sum = UserSys::default();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return sum;
    };
    for e in dir.flatten() {
        let p = e.path();
        let Ok(comm) = std::fs::read_to_string(p.join("comm")) else {
            continue;
        };
        if !GUEST_THREADS.iter().any(|g| comm.starts_with(g)) {
            continue;
        }
        if let Some(t) = stat_times(p.join("stat")) {
            sum.user += t.user;
            sum.sys += t.sys;
        }
    }
    sum
}

/// The engine's CPU since `start` split into user and system time (the
/// process's less the built-in guest's threads').
pub fn split_since(start: CpuSample) -> UserSys {
    let end = CpuSample::now();
    let process = end.process_split.since(start.process_split);
    let guest = end.guest_split.since(start.guest_split);
    UserSys {
        user: process.user.saturating_sub(guest.user),
        sys: process.sys.saturating_sub(guest.sys),
    }
}

/// The engine's CPU time since `start` (the process's less the built-in
/// guest's threads'), and the guest's.
pub fn since(start: CpuSample) -> (Duration, Duration) {
    let end = CpuSample::now();
    let guest = end.guest.saturating_sub(start.guest);
    let cpu = end
        .process
        .saturating_sub(start.process)
        .saturating_sub(guest);
    (cpu, guest)
}

/// A `/proc/self/status` field in bytes (`VmRSS`, `VmHWM`).
pub fn status_bytes(field: &str) -> u64 {
    migrate_guests::procfs::bytes_field("/proc/self/status", field).unwrap_or(0)
}

/// The `resources` object of a JSON report: `cpu_ms` (the engine's CPU over
/// the migration), `guest_cpu_ms`, `peak_rss_bytes`, `baseline_rss_bytes`,
/// `guest_resident_bytes`, `overhead_bytes`.
pub fn report(start: CpuSample, baseline_rss: u64, mem: Option<&GuestMemory>) -> Resources {
    let (cpu, guest) = since(start);
    let peak = status_bytes("VmHWM");
    let resident = mem.map_or(0, GuestMemory::resident_bytes);
    let mut r = Resources::default();
    r.cpu_ms = Some(cpu.as_secs_f64() * 1e3);
    r.guest_cpu_ms = Some(guest.as_secs_f64() * 1e3);
    r.peak_rss_bytes = Some(peak);
    r.baseline_rss_bytes = Some(baseline_rss);
    r.guest_resident_bytes = Some(resident);
    r.overhead_bytes = Some(peak.saturating_sub(baseline_rss).saturating_sub(resident));
    r
}
