//! Dirty tracking costs: harvest of a 1 GiB guest at 0 / 1 / 10 / 100 % dirty
//! for each tracker, and the cost of a guest's first write to a page after a
//! harvest (the write-fault overhead), against untracked memory.
//!
//! `HARVEST_BENCH_MIB` changes the guest size (default 1024).
//! Dirty pages are spread evenly (every 100th page at 1 %), the worst layout
//! for harvest: no two dirty pages are adjacent below 100 %.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use criterion::{
    BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use migrate_core::dirty::{
    DirtyLog, DirtyTracker, SoftwareDirtyBitmap, UffdAsyncTracker, UffdSyncTracker,
};
use migrate_core::memory::{GuestMemory, GuestRegion};

fn guest_mib() -> usize {
    std::env::var("HARVEST_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        // Debug builds (`cargo test --benches`) only check that it runs.
        .unwrap_or(if cfg!(debug_assertions) { 64 } else { 1024 })
}

/// Populated anonymous memory, so first-touch costs stay out of the numbers.
fn memory(mib: usize) -> GuestMemory {
    let mem = GuestMemory::new(vec![GuestRegion::anonymous(0, mib << 20).unwrap()]).unwrap();
    let r = &mem.regions()[0];
    for p in 0..r.pages() {
        r.atomic_u64(p * 4096).store(1, Ordering::Relaxed);
    }
    mem
}

struct Subject {
    name: &'static str,
    tracker: Box<dyn DirtyTracker>,
    marker: Option<Arc<SoftwareDirtyBitmap>>,
}

/// Start the tracker `name` on `mem`, or say why it cannot run here.
fn subject(mem: &GuestMemory, name: &'static str) -> Option<Subject> {
    let made: Result<Box<dyn DirtyTracker>, _> = match name {
        "uffd-async" => UffdAsyncTracker::new(mem).map(|t| Box::new(t) as _),
        "uffd-sync" => UffdSyncTracker::new(mem).map(|t| Box::new(t) as _),
        _ => {
            let bitmap = Arc::new(SoftwareDirtyBitmap::new(mem));
            return Some(Subject {
                name,
                tracker: Box::new(Arc::clone(&bitmap)),
                marker: Some(bitmap),
            });
        }
    };
    match made {
        Ok(tracker) => Some(Subject {
            name,
            tracker,
            marker: None,
        }),
        Err(e) => {
            // A logged, counted skip (a failure where the test command
            // checked that this machine has the trackers).
            fixtures::skip(
                &format!("dirty_tracking bench: {name}"),
                fixtures::Need::Uffd,
                &format!("the {name} tracker cannot start here: {e}"),
            );
            None
        }
    }
}

/// Write every `every`-th page (`every == 0`: none), marking if needed.
fn dirty(mem: &GuestMemory, s: &Subject, every: usize, value: u8) {
    if every == 0 {
        return;
    }
    let r = &mem.regions()[0];
    for p in (0..r.pages()).step_by(every) {
        r.atomic_u64(p * 4096)
            .store(value as u64, Ordering::Relaxed);
        if let Some(m) = &s.marker {
            m.mark_page(0, p);
        }
    }
}

fn harvest(c: &mut Criterion) {
    let mib = guest_mib();
    let mem = memory(mib);
    let mut log = DirtyLog::new(&mem);
    // Each tracker gets the memory alone: two trackers on one range would
    // share its write-protection.
    for s in ["uffd-async", "uffd-sync", "software"] {
        let subject = match subject(&mem, s) {
            Some(x) => x,
            None => continue,
        };
        let mut group = c.benchmark_group(format!("harvest_{mib}MiB"));
        group.sampling_mode(SamplingMode::Flat);
        group.sample_size(10);
        group.warm_up_time(Duration::from_millis(500));
        group.measurement_time(Duration::from_secs(2));
        for (pct, every) in [(0, 0), (1, 100), (10, 10), (100, 1)] {
            group.bench_with_input(
                BenchmarkId::new(subject.name, format!("{pct}%")),
                &every,
                |b, &every| {
                    let mut value = 2u8;
                    b.iter_custom(|iters| {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            subject.tracker.harvest(&mut log).unwrap();
                            value = value.wrapping_add(1);
                            dirty(&mem, &subject, every, value);
                            log.clear();
                            let t = Instant::now();
                            subject.tracker.harvest(black_box(&mut log)).unwrap();
                            total += t.elapsed();
                            assert_eq!(
                                log.count(),
                                if every == 0 {
                                    0
                                } else {
                                    mem.total_pages().div_ceil(every)
                                }
                            );
                        }
                        total
                    })
                },
            );
        }
        group.finish();
        drop(subject);
    }
}

fn write_fault(c: &mut Criterion) {
    const PAGES: usize = 16 * 1024; // 64 MiB
    let mem = memory((PAGES * 4096) >> 20);
    let mut log = DirtyLog::new(&mem);
    let mut group = c.benchmark_group("first_write_after_harvest");
    group.throughput(Throughput::Elements(PAGES as u64));
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    let untracked = Subject {
        name: "untracked",
        tracker: Box::new(Arc::new(SoftwareDirtyBitmap::new(&mem))),
        marker: None,
    };
    for name in ["untracked", "uffd-async", "uffd-sync", "software"] {
        let subject = if name == "untracked" {
            None
        } else {
            match subject(&mem, name) {
                Some(s) => Some(s),
                None => continue,
            }
        };
        let s = subject.as_ref().unwrap_or(&untracked);
        group.bench_function(name, |b| {
            let mut value = 0u8;
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    s.tracker.harvest(&mut log).unwrap(); // re-protect
                    value = value.wrapping_add(1);
                    let t = Instant::now();
                    dirty(&mem, s, 1, value);
                    total += t.elapsed();
                }
                total
            })
        });
    }
    group.finish();
}

criterion_group!(benches, harvest, write_fault);
criterion_main!(benches);
