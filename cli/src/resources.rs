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

/// Process CPU time, guest threads' CPU time.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSample {
    process: Duration,
    guest: Duration,
}

impl CpuSample {
    /// Now.
    pub fn now() -> Self {
        Self {
            process: crate::sys::process_cpu(),
            guest: guest_threads_cpu(),
        }
    }
}

/// Sum of utime + stime of the live threads named like guest threads, from
/// `/proc/self/task/*/stat` (clock ticks).
fn guest_threads_cpu() -> Duration {
    let hz = crate::sys::clock_ticks().max(1) as f64;
    let mut ticks = 0u64;
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return Duration::ZERO;
    };
    for e in dir.flatten() {
        let p = e.path();
        let Ok(comm) = std::fs::read_to_string(p.join("comm")) else {
            continue;
        };
        if !GUEST_THREADS.iter().any(|g| comm.starts_with(g)) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(p.join("stat")) else {
            continue;
        };
        // Fields after the ")" that closes the name: state is field 3,
        // utime 14 and stime 15.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let get = |i: usize| {
            f.get(i - 3)
                .and_then(|x| x.parse::<u64>().ok())
                .unwrap_or(0)
        };
        ticks += get(14) + get(15);
    }
    Duration::from_secs_f64(ticks as f64 / hz)
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
