//! userfaultfd write-protect in async mode, harvested with `PAGEMAP_SCAN`.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::uffd::{self as sys, Event, Pagemap, Uffd, UffdMode, features};

use super::{
    Failure, PageBits, check, mark_removed, page_bits, register_all, runs, spawn_tracker_thread,
};
use crate::dirty::{DirtyError, DirtyLog, DirtyTracker, HostRange, TrackerKind};
use crate::memory::{GuestMemory, TrackingMark};

/// Regions returned per `PAGEMAP_SCAN` call: 64 KiB of buffer, a handful of
/// calls for a 1 GiB guest even when dirty pages are scattered.
const SCAN_VEC_LEN: usize = 4096;

/// The default tracker (Linux ≥ 6.7): every guest page is write-protected
/// with userfaultfd in async mode, so the first write to a page is resolved
/// by the kernel itself (no signal, no handler thread, ≈ 1 µs) and leaves the
/// page "written". A harvest is one `PAGEMAP_SCAN` walk that reports the
/// written pages and re-protects them atomically, page-table lock held.
///
/// Sees writes by every thread of this process and the kernel's writes on
/// its behalf (e.g. `read(2)` into guest memory). Works on anonymous, memfd,
/// file and hugetlb memory (hugetlb at 2 MiB granularity).
///
/// A discard of guest memory (`MADV_DONTNEED`, `MADV_REMOVE`: a balloon)
/// changes pages without writing them; a small thread reads the kernel's
/// removal events (the `madvise` caller waits for that read) and the next
/// harvest reports those pages.
#[derive(Debug)]
pub struct UffdAsyncTracker {
    shared: Arc<Shared>,
    pagemap: Mutex<Pagemap>,
    /// Tells the removal-event thread to stop.
    stop: OwnedFd,
    events: Option<JoinHandle<()>>,
    _tracking: TrackingMark,
}

/// What the tracker and its removal-event thread share.
#[derive(Debug)]
struct Shared {
    // Keeps the registration alive; closing it ends tracking.
    uffd: Uffd,
    ranges: Vec<HostRange>,
    /// Pages discarded since the last harvest, and those the last harvest
    /// reported. The kernel sends a removal before it drops the pages, so a
    /// harvest between the two reports the page before it changes: each
    /// discarded page is reported by two harvests.
    removed: Mutex<(PageBits, PageBits)>,
    /// Pages discarded since tracking began.
    discarded: AtomicU64,
    /// The event thread's fatal error, reported by the next harvest.
    failure: Failure,
}

impl UffdAsyncTracker {
    /// Register and write-protect all of `mem` (≈ 13 ms per GiB here).
    ///
    /// # Errors
    /// [`DirtyError::Unsupported`] with the reason (kernel too old, feature
    /// missing, memory type refused); [`DirtyError::Os`] for other failures.
    pub fn new(mem: &GuestMemory) -> Result<Self, DirtyError> {
        const KIND: TrackerKind = TrackerKind::UffdAsync;
        let support = check(KIND, mem)?;
        let offered = support.features.as_ref().copied().unwrap_or(0);
        let os = |op| {
            move |source| DirtyError::Os {
                tracker: KIND,
                op,
                source,
            }
        };
        // User-mode-only works without privilege, and async mode still
        // records kernel-side writes (they never reach user space as faults).
        let uffd = Uffd::open(UffdMode::UserOnly).map_err(os("userfaultfd"))?;
        let wanted = features::WP_ASYNC
            | features::WP_UNPOPULATED
            | (offered & (features::WP_HUGETLBFS_SHMEM | features::EVENT_REMOVE));
        uffd.api(wanted).map_err(os("UFFDIO_API"))?;
        let ranges = HostRange::all(mem);
        let pagemap = Pagemap::open(SCAN_VEC_LEN).map_err(os("open /proc/self/pagemap"))?;
        let stop = sys::eventfd().map_err(os("eventfd"))?;
        let shared = Arc::new(Shared {
            removed: Mutex::new((page_bits(&ranges), page_bits(&ranges))),
            discarded: AtomicU64::new(0),
            uffd,
            ranges,
            failure: Failure::default(),
        });
        // The thread reads removal events from the start (a discard during
        // registration must not wait for it).
        let stop_fd = stop.as_raw_fd();
        let events = spawn_tracker_thread(
            "uffd-remove-events",
            &shared,
            |s| &s.failure,
            move |s| read_removals(s, stop_fd),
        )
        .map_err(os("spawn removal-event thread"))?;
        let tracker = Self {
            shared,
            pagemap: Mutex::new(pagemap),
            stop,
            events: Some(events),
            _tracking: mem.mark_tracked(),
        };
        register_all(KIND, &tracker.shared.uffd, &tracker.shared.ranges)?;
        Ok(tracker)
    }
}

/// Record every removal event until told to stop.
fn read_removals(shared: &Shared, stop: libc::c_int) -> std::io::Result<()> {
    loop {
        if sys::wait_fault_or_stop(&shared.uffd, stop)? {
            return Ok(());
        }
        // Each message is read under the lock: reading a removal lets its
        // `madvise` return, and a harvest right after must find its pages.
        loop {
            let mut removed = shared.removed.lock().unwrap_or_else(|p| p.into_inner());
            match shared.uffd.next_event()? {
                Some(Event::Removed { start, end }) => mark_removed(
                    &mut removed.0,
                    &shared.ranges,
                    start,
                    end,
                    &shared.discarded,
                ),
                Some(Event::Fault { .. }) => {}
                None => break,
            }
        }
    }
}

impl Drop for UffdAsyncTracker {
    fn drop(&mut self) {
        if sys::eventfd_signal(&self.stop).is_ok() {
            if let Some(h) = self.events.take() {
                let _ = h.join();
            }
        }
    }
}

impl DirtyTracker for UffdAsyncTracker {
    fn kind(&self) -> TrackerKind {
        TrackerKind::UffdAsync
    }

    fn discarded_pages(&self) -> u64 {
        self.shared.discarded.load(Ordering::Relaxed)
    }

    fn harvest(&self, log: &mut DirtyLog) -> Result<(), DirtyError> {
        self.shared
            .failure
            .check(TrackerKind::UffdAsync, "removal-event reader")?;
        // Discarded pages first: a discard's `madvise` returned only once
        // its event was read, so one that returned before this harvest is
        // in these bits (and again in the next harvest's: see `removed`).
        {
            let mut removed = self
                .shared
                .removed
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let (now, before) = &mut *removed;
            for (idx, (now, before)) in now.iter_mut().zip(before.iter_mut()).enumerate() {
                for (first, count) in runs(now).into_iter().chain(runs(before)) {
                    log.mark_range(idx, first, count);
                }
                before.copy_from_bitslice(now);
                now.fill(false);
            }
        }
        let mut pagemap = self.pagemap.lock().unwrap_or_else(|p| p.into_inner());
        for (idx, r) in self.shared.ranges.iter().enumerate() {
            let shift = r.page_size.shift();
            pagemap
                .harvest_written(r.start, r.end(), |start, end| {
                    // Clamp: a huge page or THP may be reported wider than
                    // the range we asked about.
                    let (start, end) = (start.max(r.start), end.min(r.end()));
                    if start < end {
                        let first = (start - r.start) >> shift;
                        let last = (end - 1 - r.start) >> shift;
                        log.mark_range(idx, first, last - first + 1);
                    }
                })
                .map_err(|source| DirtyError::Os {
                    tracker: TrackerKind::UffdAsync,
                    op: "PAGEMAP_SCAN",
                    source,
                })?;
        }
        Ok(())
    }
}
