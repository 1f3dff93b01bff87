//! Many migrations, one after another, through one long-lived listener in
//! one process — what a VMM that migrates guests for months does. Every
//! migration is verified (destination memory equal to the paused source,
//! page for page), and the process's open files, threads and memory come
//! back to where they were: nothing a migration leaves behind accumulates.
//!
//! `SOAK_MIGRATIONS` sets how many (the test command runs 20;
//! `scripts/soak.sh` runs 200 and prints the figures).

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use fixtures::WorkloadConfig;
use fixtures::transport_suite::{Scenario, TransportPair, Workload, kill_slot, run};
use migrate_core::SourceConfig;
use migrate_core::transport::{DestinationTransport, SourceTransport};
use transport_tcp::{TcpConfig, TcpMigrationListener, TcpSource};

fn cfg() -> TcpConfig {
    TcpConfig {
        io_timeout: Duration::from_secs(10),
        ..TcpConfig::default()
    }
}

/// The destination's one listener, for every migration.
fn listener() -> &'static TcpMigrationListener {
    static LISTENER: OnceLock<TcpMigrationListener> = OnceLock::new();
    LISTENER.get_or_init(|| TcpMigrationListener::bind("127.0.0.1:0", cfg()).unwrap())
}

fn pair() -> TransportPair {
    let addr = listener().local_addr().unwrap().to_string();
    let (slot, kill) = kill_slot::<Box<dyn Fn() + Send + Sync>>();
    TransportPair {
        source: Box::new(move || {
            Ok(Box::new(TcpSource::connect(&addr, cfg())?) as Box<dyn SourceTransport>)
        }),
        destination: Box::new(move || {
            let d = listener().accept()?;
            let k = d.kill_switch();
            *slot.lock().unwrap() = Some(Box::new(move || k.kill()));
            Ok(Box::new(d) as Box<dyn DestinationTransport>)
        }),
        kill_destination: kill,
    }
}

fn entries(dir: &str) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.count())
}

fn resident() -> u64 {
    fixtures::procfs::resident_bytes(std::process::id())
}

/// Wait (at most 10 s) until `count()` is at most `limit`; the last count.
fn settles(count: impl Fn() -> usize, limit: usize) -> usize {
    let start = Instant::now();
    loop {
        let n = count();
        if n <= limit || start.elapsed() > Duration::from_secs(10) {
            return n;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Wait (at most 10 s) until `count()` has not changed for 300 ms (threads
/// and sockets of the last migration closing); that count.
fn steady(count: impl Fn() -> usize) -> usize {
    let start = Instant::now();
    let (mut last, mut since) = (count(), Instant::now());
    loop {
        std::thread::sleep(Duration::from_millis(10));
        let n = count();
        if n != last {
            (last, since) = (n, Instant::now());
        } else if since.elapsed() >= Duration::from_millis(300)
            || start.elapsed() > Duration::from_secs(10)
        {
            return n;
        }
    }
}

#[test]
fn migrations_leave_nothing_behind() {
    let n: usize = std::env::var("SOAK_MIGRATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let migrate = || {
        let o = run(
            pair,
            Scenario {
                mib: 8,
                workload: Workload::Dirty(WorkloadConfig {
                    threads: 1,
                    pages_per_sec: 2_000,
                    ..WorkloadConfig::default()
                }),
                config: SourceConfig {
                    verify: true,
                    ..SourceConfig::default()
                },
                ..Scenario::default()
            },
        );
        assert!(o.assert_migrated().verified);
        o.source_vm.stop();
    };
    // Warm up: the listener, the allocator's arenas, lazily started things.
    for _ in 0..3 {
        migrate();
    }
    let (fds, threads, rss) = (
        steady(|| entries("/proc/self/fd")),
        steady(|| entries("/proc/self/task")),
        resident(),
    );
    let (fd_limit, thread_limit) = (fds + 2, threads + 2);
    let mut peak_rss = rss;
    for i in 0..n {
        migrate();
        let f = settles(|| entries("/proc/self/fd"), fd_limit);
        let t = settles(|| entries("/proc/self/task"), thread_limit);
        peak_rss = peak_rss.max(resident());
        assert!(
            f <= fd_limit,
            "migration {i}: {f} open files, {fds} after warm-up"
        );
        assert!(
            t <= thread_limit,
            "migration {i}: {t} threads, {threads} after warm-up"
        );
    }
    println!(
        "{n} migrations: open files {fds} → {}, threads {threads} → {}, RSS {} → {} MiB (peak {} MiB)",
        entries("/proc/self/fd"),
        entries("/proc/self/task"),
        rss >> 20,
        resident() >> 20,
        peak_rss >> 20
    );
    // Bounds from the 200-migration soak (SOAK_MIGRATIONS=200, 2026-12-06):
    // RSS 7 → 9 MiB after warm-up, peak 9 MiB between migrations (each
    // moves an 8 MiB guest between two 8 MiB memories). Four times that
    // growth, and the peak a guest above it, leave room for the allocator
    // and catch a leak of even one guest's memory per migration.
    assert!(
        resident() < rss + (8 << 20),
        "RSS grew from {} to {} MiB over {n} migrations",
        rss >> 20,
        resident() >> 20
    );
    assert!(
        peak_rss < rss + (12 << 20),
        "RSS peaked at {} MiB between migrations ({} MiB after warm-up)",
        peak_rss >> 20,
        rss >> 20
    );
}
