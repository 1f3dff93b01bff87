//! The one conformance suite every [`DirtyTracker`] that host threads can
//! exercise passes, on real mmapped memory written by real threads (feature
//! `test-utils`). KVM's dirty log sees only a vCPU's writes, so mini-vmm's
//! KVM tests check it instead.
//!
//! A tracker proves itself with [`dirty_tracker_suite!`](crate::dirty_tracker_suite),
//! which generates one test per (check, memory kind):
//!
//! - [`scattered_writes_are_exact`]: exactly the written pages are reported,
//!   reads are not, and a second harvest is empty;
//! - [`concurrent_writes_are_never_lost`]: writer threads keep writing
//!   sequence-numbered values while a harvester harvests; every write that
//!   lands after harvest *k* returns is reported by harvest *k + 1* at the
//!   latest, and a shadow copy refreshed from each harvest (what pre-copy
//!   does) ends equal to the memory, byte for byte;
//! - [`discarded_pages_are_reported`]: pages the VMM discards (a balloon)
//!   read as zeros and are reported, and the writes after them too;
//! - [`discards_racing_writes_are_never_lost`]: writes, discards and
//!   harvests at once neither hang nor lose a page;
//! - memory kinds from [`MemoryKind`]: anonymous (two regions with a hole),
//!   memfd, a file under `/dev/shm`, a file on disk, and hugetlb where the
//!   machine has free 2 MiB pages.
//!
//! A check that cannot run here (tracker unsupported by this kernel, no huge
//! pages) prints `SKIP <test>: <reason>` and returns. A tracker's documented
//! refusal of a kind (uffd-sync and disk files), and a disk filesystem that
//! cannot punch holes for the discard checks, are counted `N/A` lines
//! ([`crate::skip::not_applicable`]); any other refusal fails: a tracker
//! that runs on anonymous memory here must run on every kind it claims,
//! except disk files on a kernel without uffd-async (the only tracker of
//! those), a counted skip.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use super::{
    DirtyError, DirtyLog, DirtyTracker, SoftwareDirtyBitmap, TrackerKind, harvest_with_discards,
};
use crate::memory::{GuestMemory, GuestRegion, MemoryError};

/// A tracker under test, and how writes reach it.
pub struct Tracked {
    /// The tracker.
    pub tracker: Box<dyn DirtyTracker>,
    /// For trackers that only know what they are told: what the test
    /// writers mark after each store (as device emulation would).
    pub marker: Option<Arc<dyn DirtyMarker>>,
}

/// Where writers record a write the kernel does not attribute (device
/// emulation marking its own bitmap).
pub trait DirtyMarker: Send + Sync {
    /// Page `page` of region `region` was written.
    fn mark_page(&self, region: usize, page: usize);
}

impl DirtyMarker for SoftwareDirtyBitmap {
    fn mark_page(&self, region: usize, page: usize) {
        SoftwareDirtyBitmap::mark_page(self, region, page)
    }
}

/// Starts a tracker over a memory, or says why it cannot.
pub type TrackerFactory = fn(&GuestMemory) -> Result<Tracked, DirtyError>;

/// A tracker as the suite tests it: how to start one, and the memory kinds
/// it documents it refuses (its claim: it must refuse those with a typed
/// [`DirtyError::Unsupported`], and start on every other kind wherever it
/// starts at all, disk files where uffd-async runs).
#[derive(Clone, Copy)]
pub struct Subject {
    /// Starts the tracker.
    pub start: TrackerFactory,
    /// The kinds it refuses by design.
    pub refuses: &'static [MemoryKind],
}

/// The kinds of memory every tracker is tested on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryKind {
    /// Two anonymous regions with a hole between them.
    Anonymous,
    /// One memfd region.
    Memfd,
    /// A file under `/dev/shm` (tmpfs).
    ShmFile,
    /// A file on a disk filesystem (the system temp dir when it is not tmpfs).
    DiskFile,
    /// 2 MiB hugetlb pages.
    Hugetlb,
}

/// A test memory and the files to remove with it.
pub struct TestMemory {
    /// The memory.
    pub mem: GuestMemory,
    path: Option<PathBuf>,
}

impl Drop for TestMemory {
    fn drop(&mut self) {
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn unique(tag: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "mc-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

impl MemoryKind {
    /// Build a test memory of about `mib` MiB, or `Err(reason)` to skip.
    pub fn build(self, mib: usize) -> Result<TestMemory, String> {
        let len = mib << 20;
        let skip = |e: MemoryError| e.to_string();
        let (regions, path) = match self {
            MemoryKind::Anonymous => (
                vec![
                    GuestRegion::anonymous(0, len / 2).map_err(skip)?,
                    GuestRegion::anonymous(1 << 32, len / 2).map_err(skip)?,
                ],
                None,
            ),
            MemoryKind::Memfd => (
                vec![GuestRegion::memfd(0, len, "conformance").map_err(skip)?],
                None,
            ),
            MemoryKind::ShmFile => {
                let path = PathBuf::from("/dev/shm").join(unique("shm"));
                (
                    vec![GuestRegion::file(0, len, &path).map_err(skip)?],
                    Some(path),
                )
            }
            MemoryKind::DiskFile => {
                // The target dir is on the work disk; /tmp may be tmpfs.
                let dir = std::env::var_os("CARGO_TARGET_TMPDIR")
                    .map(PathBuf::from)
                    .unwrap_or_else(std::env::temp_dir);
                let path = dir.join(unique("disk"));
                (
                    vec![GuestRegion::file(0x8000_0000, len, &path).map_err(skip)?],
                    Some(path),
                )
            }
            MemoryKind::Hugetlb => (
                vec![GuestRegion::hugetlb(0, len.max(8 << 21), "conformance").map_err(skip)?],
                None,
            ),
        };
        Ok(TestMemory {
            mem: GuestMemory::new(regions).map_err(skip)?,
            path,
        })
    }
}

/// Start the tracker, or `None`: when it refuses this kind of memory as it
/// documents (a counted `N/A`), or (a counted skip) when this kernel lacks
/// it altogether, or lacks uffd-async and the kind is a disk file (only
/// uffd-async tracks those). A tracker that starts on anonymous memory here
/// but refuses a kind it claims fails the test, and so does one that starts
/// on a kind it documents it refuses.
fn start(test: &str, kind: MemoryKind, mem: &GuestMemory, subject: Subject) -> Option<Tracked> {
    let by_design = subject.refuses.contains(&kind);
    let refused = match (subject.start)(mem) {
        Ok(_) if by_design => panic!("{test}: started on {kind:?} memory, which it must refuse"),
        Ok(t) => return Some(t),
        Err(DirtyError::Unsupported { reason, .. }) => reason,
        Err(e @ DirtyError::NoTracker(_)) => e.to_string(),
        Err(e) => panic!("{test}: tracker failed to start: {e}"),
    };
    if by_design {
        crate::skip::not_applicable(test, &format!("refused as documented: {refused}"));
        return None;
    }
    if kind != MemoryKind::Anonymous {
        // Does it run on this kernel at all? Then this refusal breaks its
        // claim, unless the claim rests on what this kernel lacks: disk
        // files are tracked by uffd-async alone (Linux 6.7), so where that
        // cannot start, a set that selects among trackers refuses them.
        let probe = MemoryKind::Anonymous
            .build(1)
            .unwrap_or_else(|e| panic!("{test}: cannot build anonymous memory: {e}"));
        if let Ok(t) = (subject.start)(&probe.mem) {
            drop(t);
            match super::UffdAsyncTracker::new(&probe.mem).err() {
                Some(e) if kind == MemoryKind::DiskFile => {
                    let why = format!(
                        "disk files need uffd-async, which this kernel lacks ({e}): {refused}"
                    );
                    crate::skip::skip(test, crate::skip::Need::Uffd, &why);
                    return None;
                }
                _ => panic!(
                    "{test}: refused {kind:?} memory, which it claims, yet runs on anonymous memory here: {refused}"
                ),
            }
        }
    }
    crate::skip::skip(test, crate::skip::Need::Uffd, &refused);
    None
}

/// Build the memory, or `None` (with a SKIP line) when this machine lacks it.
pub fn memory(test: &str, kind: MemoryKind, mib: usize) -> Option<TestMemory> {
    match kind.build(mib) {
        Ok(m) => Some(m),
        Err(reason) if kind == MemoryKind::Hugetlb => {
            crate::skip::skip(test, crate::skip::Need::HugePages, &reason);
            None
        }
        Err(reason) => panic!("{test}: cannot build {kind:?} memory: {reason}"),
    }
}

/// Store `value` at byte `offset` of page `page` of region `region`, as a
/// vCPU would, then mark the software bitmap if the tracker needs it.
fn store(mem: &GuestMemory, t: &Tracked, region: usize, page: usize, offset: usize, value: u64) {
    let r = &mem.regions()[region];
    // Atomic because other test threads read the same memory concurrently.
    r.atomic_u64(page * r.page_size().bytes() + (offset & !7))
        .store(value, Ordering::Release);
    if let Some(m) = &t.marker {
        m.mark_page(region, page);
    }
}

/// A small deterministic generator (splitmix64), so failures replay.
struct Mix(u64);
impl Mix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn harvest(t: &Tracked, mem: &GuestMemory) -> DirtyLog {
    let mut log = DirtyLog::new(mem);
    t.tracker.harvest(&mut log).expect("harvest failed");
    log
}

/// Scattered single writes are reported exactly; reads are not; an idle
/// interval harvests empty; a rewrite of a subset reports that subset.
pub fn scattered_writes_are_exact(test: &str, kind: MemoryKind, subject: Subject) {
    let Some(tm) = memory(test, kind, 8) else {
        return;
    };
    let mem = &tm.mem;
    // Touch some pages before tracking starts: they must not count.
    for r in mem.regions() {
        r.atomic_u64(0).store(1, Ordering::Relaxed);
    }
    let Some(t) = start(test, kind, mem, subject) else {
        return;
    };
    assert!(
        harvest(&t, mem).is_empty(),
        "{test}: dirty before any write"
    );

    let mut rng = Mix(0x5eed ^ kind as u64);
    let mut expected = DirtyLog::new(mem);
    for (ri, r) in mem.regions().iter().enumerate() {
        let pages = r.pages();
        let mut chosen = vec![0, pages - 1];
        chosen.extend((0..pages / 7).map(|_| rng.below(pages)));
        for page in chosen {
            let offset = rng.below(r.page_size().bytes());
            store(mem, &t, ri, page, offset, rng.next() | 1);
            expected.mark(ri, page);
        }
        // Reads of other pages, touched or not, are not writes.
        for _ in 0..pages / 5 {
            let page = rng.below(pages);
            std::hint::black_box(
                r.atomic_u64(page * r.page_size().bytes())
                    .load(Ordering::Relaxed),
            );
        }
    }
    let got = harvest(&t, mem);
    assert_eq!(
        got.count(),
        expected.count(),
        "{test}: reported {} pages, wrote {}",
        got.count(),
        expected.count()
    );
    assert!(
        got == expected,
        "{test}: reported pages differ from written"
    );
    assert!(
        harvest(&t, mem).is_empty(),
        "{test}: second harvest not empty"
    );

    // Rewrite every third written page: exactly those come back.
    let mut subset = DirtyLog::new(mem);
    for (i, (ri, page)) in expected.pages().enumerate().filter(|(i, _)| i % 3 == 0) {
        store(mem, &t, ri, page, (i * 8) % 4096, i as u64);
        subset.mark(ri, page);
    }
    assert!(harvest(&t, mem) == subset, "{test}: rewrite subset differs");
}

/// Pages the VMM discards (a balloon inflating: `MADV_DONTNEED` on
/// anonymous memory, `MADV_REMOVE` on shared memory, through
/// [`GuestRegion::discard_pages`]) read as zeros from then on: the next
/// harvest reports them (or the destination keeps their old bytes), and
/// the writes after them are reported harvest after harvest, as before.
pub fn discarded_pages_are_reported(test: &str, kind: MemoryKind, subject: Subject) {
    let Some((tm, t)) = filled_and_tracked(test, kind, subject) else {
        return;
    };
    let mem = &tm.mem;
    assert!(
        harvest(&t, mem).is_empty(),
        "{test}: dirty before any write"
    );
    let mut discarded = DirtyLog::new(mem);
    for (ri, r) in mem.regions().iter().enumerate() {
        for page in [1, r.pages() / 2, r.pages() - 1] {
            if !discarded_or_na(test, kind, r, page) {
                return;
            }
            if let Some(m) = &t.marker {
                m.mark_page(ri, page);
            }
            assert!(r.is_zero_page(page), "{test}: a discarded page kept data");
            discarded.mark(ri, page);
        }
    }
    assert!(
        harvest(&t, mem) == discarded,
        "{test}: the discarded pages were not reported (the destination would keep their \
         old bytes)"
    );
    // The kernel trackers count them too (an RDMA migration fails on one);
    // the others cannot tell and say 0.
    let counted = t.tracker.discarded_pages();
    if matches!(
        t.tracker.kind(),
        TrackerKind::UffdAsync | TrackerKind::UffdSync
    ) {
        assert!(
            counted >= discarded.count() as u64,
            "{test}: {counted} discarded pages counted of {}",
            discarded.count()
        );
    } else {
        assert_eq!(
            counted, 0,
            "{test}: a tracker that cannot see discards counted some"
        );
    }
    for round in 0..3u64 {
        for (ri, page) in discarded.pages() {
            store(mem, &t, ri, page, 8 * round as usize, 0xd1 + round);
        }
        assert!(
            harvest(&t, mem) == discarded,
            "{test}: write {round} to a page after its discard was not reported"
        );
    }
    assert!(
        harvest(&t, mem).is_empty(),
        "{test}: idle harvest after the discards not empty"
    );
}

/// One write as the writer saw it: harvests completed before it started,
/// harvests started before it finished.
struct WriteRecord {
    region: u32,
    page: u32,
    completed_before: u32,
    started_after: u32,
}

/// Writer threads keep writing while a harvester harvests; nothing is lost.
pub fn concurrent_writes_are_never_lost(test: &str, kind: MemoryKind, subject: Subject) {
    const WRITERS: usize = 3;
    const WRITES_PER_THREAD: usize = 20_000;
    let Some(tm) = memory(test, kind, 8) else {
        return;
    };
    let mem = &tm.mem;
    let Some(t) = start(test, kind, mem, subject) else {
        return;
    };
    // The shadow starts as a full copy (round 0), then follows harvests.
    let mut shadow = copy_all(mem);
    let started = AtomicU64::new(0);
    let completed = AtomicU64::new(0);
    let done = AtomicUsize::new(0);
    let stop_harvester = AtomicBool::new(false);

    let (records, logs) = std::thread::scope(|s| {
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (t, started, completed, done) = (&t, &started, &completed, &done);
                s.spawn(move || {
                    let mut rng = Mix(0xabcd ^ (w as u64) << 32 ^ kind as u64);
                    let mut records = Vec::with_capacity(WRITES_PER_THREAD);
                    for seq in 1..=WRITES_PER_THREAD as u64 {
                        let region = rng.below(mem.regions().len());
                        let page = rng.below(mem.regions()[region].pages());
                        let completed_before = completed.load(Ordering::SeqCst);
                        // Each writer owns one u64 slot per page: the value is
                        // (writer, sequence), so a stale shadow shows.
                        store(mem, t, region, page, w * 8, (w as u64) << 56 | seq);
                        let started_after = started.load(Ordering::SeqCst);
                        records.push(WriteRecord {
                            region: region as u32,
                            page: page as u32,
                            completed_before: completed_before as u32,
                            started_after: started_after as u32,
                        });
                        if seq % 1024 == 0 {
                            std::thread::yield_now();
                        }
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                    records
                })
            })
            .collect();

        let mut logs = Vec::new();
        while done.load(Ordering::SeqCst) < WRITERS && !stop_harvester.load(Ordering::Relaxed) {
            started.fetch_add(1, Ordering::SeqCst);
            let log = harvest(&t, mem);
            completed.fetch_add(1, Ordering::SeqCst);
            copy_dirty(mem, &log, &mut shadow);
            logs.push(log);
        }
        let records: Vec<WriteRecord> = writers
            .into_iter()
            .flat_map(|h| h.join().expect("writer panicked"))
            .collect();
        stop_harvester.store(true, Ordering::Relaxed);
        // The last harvest, after the guest stopped (the pause).
        started.fetch_add(1, Ordering::SeqCst);
        let last = harvest(&t, mem);
        copy_dirty(mem, &last, &mut shadow);
        logs.push(last);
        (records, logs)
    });

    assert!(
        logs.len() >= 3,
        "{test}: only {} harvests overlapped the writers",
        logs.len()
    );
    // Harvest j (1-based) is logs[j - 1]. A write that began after harvest
    // `completed_before` returned, and ended before harvest
    // `started_after + 1` began, must show in one of the harvests between.
    for rec in &records {
        let lo = rec.completed_before as usize + 1;
        let hi = (rec.started_after as usize + 1).min(logs.len());
        let seen = (lo..=hi).any(|j| logs[j - 1].is_dirty(rec.region as usize, rec.page as usize));
        assert!(
            seen,
            "{test}: write to region {} page {} between harvests {} and {} was never reported",
            rec.region, rec.page, lo, hi
        );
    }
    assert_shadow_equal(test, mem, &shadow, "");
    println!(
        "{test}: {} writes, {} harvests, all reported in their window",
        records.len(),
        logs.len()
    );
}

/// Writers write, a balloon discards (through
/// [`GuestRegion::discard_pages`], which marks what it dropped) and a
/// harvester harvests as the engine does ([`harvest_with_discards`]), all
/// at once: nothing hangs (a tracker whose re-protection waits on an
/// unread removal would), and a shadow copy refreshed from each harvest,
/// then from one after the stop, ends equal to the memory: the writes
/// after a discard are tracked too. A watchdog aborts the test binary,
/// loudly, after 120 s.
pub fn discards_racing_writes_are_never_lost(test: &str, kind: MemoryKind, subject: Subject) {
    const WRITERS: usize = 2;
    const WRITES_PER_THREAD: usize = 10_000;
    let Some((tm, t)) = filled_and_tracked(test, kind, subject) else {
        return;
    };
    let mem = &tm.mem;
    if !discarded_or_na(test, kind, &mem.regions()[0], 0) {
        return;
    }
    if let Some(m) = &t.marker {
        m.mark_page(0, 0);
    }
    let mut shadow = copy_all(mem);
    let (finished, watchdog) = std::sync::mpsc::channel::<()>();
    let name = test.to_string();
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
            watchdog.recv_timeout(std::time::Duration::from_secs(120))
        {
            // Past the test harness's capture, which an abort would lose.
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "{name}: HUNG: writers, discards and harvests did not finish in 120 s"
            );
            std::process::abort();
        }
    });
    let done = AtomicUsize::new(0);
    let discards = AtomicU64::new(0);
    let harvests = std::thread::scope(|s| {
        for w in 0..WRITERS {
            let (t, done, discards) = (&t, &done, &discards);
            s.spawn(move || {
                let mut rng = Mix(0x5eed ^ (w as u64) << 32 ^ kind as u64);
                // Past the quota until the balloon has dropped a few pages
                // too: on a fast machine the writers could finish first.
                for seq in 1u64.. {
                    if seq > WRITES_PER_THREAD as u64 && discards.load(Ordering::SeqCst) >= 16 {
                        break;
                    }
                    let region = rng.below(mem.regions().len());
                    let page = rng.below(mem.regions()[region].pages());
                    store(mem, t, region, page, 8 + w * 8, (w as u64) << 56 | seq);
                    if seq % 256 == 0 {
                        std::thread::yield_now();
                    }
                }
                done.fetch_add(1, Ordering::SeqCst);
            });
        }
        {
            let (t, done, discards) = (&t, &done, &discards);
            s.spawn(move || {
                let mut rng = Mix(0xba11 ^ kind as u64);
                while done.load(Ordering::SeqCst) < WRITERS {
                    let region = rng.below(mem.regions().len());
                    let page = rng.below(mem.regions()[region].pages());
                    mem.regions()[region]
                        .discard_pages(page, 1)
                        .expect("discard failed");
                    // A balloon device marks what it drops for the
                    // trackers that only know what they are told.
                    if let Some(m) = &t.marker {
                        m.mark_page(region, page);
                    }
                    discards.fetch_add(1, Ordering::SeqCst);
                    std::thread::yield_now();
                }
            });
        }
        let mut harvests = 0;
        while done.load(Ordering::SeqCst) < WRITERS {
            copy_dirty(mem, &engine_harvest(&t, mem), &mut shadow);
            harvests += 1;
        }
        harvests
    });
    // The pause: every writer and the balloon stopped. The last harvest.
    copy_dirty(mem, &engine_harvest(&t, mem), &mut shadow);
    let _ = finished.send(());
    let discards = discards.load(Ordering::SeqCst);
    assert!(
        discards >= 16,
        "{test}: only {discards} discards raced the writers"
    );
    assert_shadow_equal(
        test,
        mem,
        &shadow,
        &format!(" ({discards} discards, {harvests} harvests)"),
    );
    println!(
        "{test}: at least {} writes, {discards} discards, {harvests} harvests, shadow equal",
        WRITERS * WRITES_PER_THREAD
    );
}

/// A test memory whose every page holds data (its own number) before
/// tracking starts, so that a discard changes its bytes, and the tracker
/// over it; `None` (said why) when this machine cannot.
fn filled_and_tracked(
    test: &str,
    kind: MemoryKind,
    subject: Subject,
) -> Option<(TestMemory, Tracked)> {
    let tm = memory(test, kind, 8)?;
    for r in tm.mem.regions() {
        for p in 0..r.pages() {
            r.atomic_u64(p * r.page_size().bytes())
                .store(p as u64 | 1, Ordering::Relaxed);
        }
    }
    let t = start(test, kind, &tm.mem, subject)?;
    Some((tm, t))
}

/// Discard `page` of `r`, or say (a counted `N/A`) that this memory cannot
/// be discarded here: only a disk file on a filesystem without hole
/// punching may refuse, and only as `EOPNOTSUPP`; any other refusal fails.
fn discarded_or_na(test: &str, kind: MemoryKind, r: &GuestRegion, page: usize) -> bool {
    match r.discard_pages(page, 1) {
        Ok(()) => true,
        Err(e) if kind == MemoryKind::DiskFile && e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
            crate::skip::not_applicable(
                test,
                &format!("this filesystem cannot punch holes, so nothing is discarded: {e}"),
            );
            false
        }
        Err(e) => panic!("{test}: cannot discard page {page} of {kind:?} memory: {e}"),
    }
}

/// A copy of every region's bytes (a shadow's start: round 0).
fn copy_all(mem: &GuestMemory) -> Vec<Vec<u8>> {
    mem.regions()
        .iter()
        .map(|r| {
            let mut v = vec![0u8; r.len()];
            mem.read(r.gpa(), &mut v).unwrap();
            v
        })
        .collect()
}

/// The shadow equals the memory, page for page (else the first stale
/// page, and `context`).
fn assert_shadow_equal(test: &str, mem: &GuestMemory, shadow: &[Vec<u8>], context: &str) {
    for (ri, r) in mem.regions().iter().enumerate() {
        let mut now = vec![0u8; r.len()];
        mem.read(r.gpa(), &mut now).unwrap();
        let ps = r.page_size().bytes();
        if let Some(bad) =
            (0..r.pages()).find(|&p| now[p * ps..(p + 1) * ps] != shadow[ri][p * ps..(p + 1) * ps])
        {
            panic!("{test}: shadow copy of region {ri} is stale at page {bad}{context}");
        }
    }
}

/// A harvest as the engine makes it.
fn engine_harvest(t: &Tracked, mem: &GuestMemory) -> DirtyLog {
    let mut log = DirtyLog::new(mem);
    harvest_with_discards(t.tracker.as_ref(), mem, &mut log).expect("harvest failed");
    log
}

fn copy_dirty(mem: &GuestMemory, log: &DirtyLog, shadow: &mut [Vec<u8>]) {
    for run in log.runs() {
        let r = &mem.regions()[run.region];
        let ps = r.page_size().bytes();
        let off = run.first * ps;
        let len = run.count * ps;
        mem.read(
            r.gpa() + off as u64,
            &mut shadow[run.region][off..off + len],
        )
        .unwrap();
    }
}

/// Generate the conformance tests for one tracker factory: one `#[test]` per
/// check and memory kind. A tracker that documents it refuses a kind says
/// so (`refuses [DiskFile],`): the suite then checks that it does, and
/// fails any other tracker that refuses a kind while it runs here.
///
/// ```ignore
/// migrate_core::dirty_tracker_suite!(uffd_async, |mem| Ok(Tracked {
///     tracker: Box::new(UffdAsyncTracker::new(mem)?),
///     marker: None,
/// }));
/// migrate_core::dirty_tracker_suite!(uffd_sync, refuses [DiskFile], |mem| Ok(Tracked {
///     tracker: Box::new(UffdSyncTracker::new(mem)?),
///     marker: None,
/// }));
/// ```
#[macro_export]
macro_rules! dirty_tracker_suite {
    ($name:ident, refuses [$($refused:ident),*], $factory:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            use $crate::dirty::conformance::{self as c, MemoryKind};
            const FACTORY: c::Subject = c::Subject {
                start: $factory,
                refuses: &[$(MemoryKind::$refused),*],
            };
            $crate::dirty_tracker_suite!(@kinds
                anonymous => Anonymous, memfd => Memfd, shm_file => ShmFile,
                disk_file => DiskFile, hugetlb => Hugetlb);
        }
    };
    ($name:ident, $factory:expr) => {
        $crate::dirty_tracker_suite!($name, refuses [], $factory);
    };
    (@kinds $($kname:ident => $kind:ident),*) => {
        $(
            mod $kname {
                use super::*;
                #[test]
                fn scattered_writes_are_exact() {
                    c::scattered_writes_are_exact(
                        concat!(module_path!(), "::scattered_writes_are_exact"),
                        MemoryKind::$kind,
                        FACTORY,
                    );
                }
                #[test]
                fn discarded_pages_are_reported() {
                    c::discarded_pages_are_reported(
                        concat!(module_path!(), "::discarded_pages_are_reported"),
                        MemoryKind::$kind,
                        FACTORY,
                    );
                }
                #[test]
                fn discards_racing_writes_are_never_lost() {
                    c::discards_racing_writes_are_never_lost(
                        concat!(module_path!(), "::discards_racing_writes_are_never_lost"),
                        MemoryKind::$kind,
                        FACTORY,
                    );
                }
                #[test]
                fn concurrent_writes_are_never_lost() {
                    c::concurrent_writes_are_never_lost(
                        concat!(module_path!(), "::concurrent_writes_are_never_lost"),
                        MemoryKind::$kind,
                        FACTORY,
                    );
                }
            }
        )*
    };
}
