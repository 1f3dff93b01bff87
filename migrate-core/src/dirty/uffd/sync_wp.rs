//! userfaultfd write-protect with a fault-handler thread (Linux ≥ 5.7).

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use super::{
    Failure, PageBits, check, mark_removed, page_bits, register_all, runs, spawn_tracker_thread,
};
use crate::dirty::{DirtyError, DirtyLog, DirtyTracker, HostRange, TrackerKind};
use crate::memory::{Backing, GuestMemory, TrackingMark};
use crate::uffd::{self as sys, Event, Uffd, UffdMode, features};

const KIND: TrackerKind = TrackerKind::UffdSync;
/// How long the handler keeps polling for the next fault of a burst.
const SPIN: std::time::Duration = std::time::Duration::from_micros(50);

#[derive(Debug)]
struct Shared {
    uffd: Uffd,
    ranges: Vec<HostRange>,
    /// Per range: whether a discarded page must be mapped again before it
    /// can be protected (anonymous memory on a kernel without
    /// `WP_UNPOPULATED`, where protecting an empty page does nothing).
    repopulate: Vec<bool>,
    /// What the handler records and the harvest takes, under one lock.
    state: Mutex<State>,
    /// Pages discarded since tracking began.
    discarded: AtomicU64,
    /// The handler's fatal error, reported by the next harvest.
    failure: Failure,
}

/// The pages to report.
#[derive(Debug)]
struct State {
    /// Pages un-protected by the handler since the last harvest. The handler
    /// sets a bit and un-protects under the lock; the harvest takes the bits
    /// and re-protects under it too, so a page can never be un-protected
    /// without its bit reaching the next harvest.
    dirty: PageBits,
    /// Pages discarded since the last harvest, and those the last harvest
    /// reported: the kernel sends a removal before it drops the pages, so
    /// each discarded page is reported (and re-protected) by two harvests,
    /// as in [`UffdAsyncTracker`](super::UffdAsyncTracker).
    removed: (PageBits, PageBits),
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Read every pending message while the handler holds the lock (its
    /// own `UFFDIO_WRITEPROTECT` failed with `EAGAIN`: a removal is
    /// unread): removals are recorded, faults kept for later.
    fn drain(&self, state: &mut State, faults: &mut VecDeque<usize>) -> std::io::Result<()> {
        while let Some(event) = self.uffd.next_event()? {
            match event {
                Event::Removed { start, end } => mark_removed(
                    &mut state.removed.0,
                    &self.ranges,
                    start,
                    end,
                    &self.discarded,
                ),
                Event::Fault { address, flags } if sys::is_wp_fault(flags) => {
                    faults.push_back(address)
                }
                Event::Fault { .. } => {}
            }
        }
        Ok(())
    }
}

/// Fallback for kernels without async write-protect: pages are
/// write-protected, the first write to one blocks its thread on a fault that
/// a handler thread resolves (record the page, un-protect, wake; ≈ 6–11 µs),
/// and a harvest re-protects the pages it reports.
///
/// A discard of guest memory (`MADV_DONTNEED`, `MADV_REMOVE`: a balloon)
/// changes pages without writing them: the handler also reads the kernel's
/// removal events, and the next two harvests report those pages and
/// protect them again. While a removal is unread, `UFFDIO_WRITEPROTECT`
/// fails with `EAGAIN`: the handler then reads the pending messages itself
/// (keeping the faults for after), and a harvest lets go of the lock so
/// that the handler can. On anonymous memory without `WP_UNPOPULATED`
/// (before Linux 6.4) a discarded page is mapped again before it is
/// protected (read-only, the zero page), so its later writes fault; pages
/// dropped through [`GuestRegion::discard_pages`](crate::memory::GuestRegion::discard_pages)
/// get that after the drop for sure ([`DirtyTracker::discarded`]).
///
/// Opened with kernel faults included where the process may (root or
/// `vm.unprivileged_userfaultfd = 1`), so `read(2)` into guest memory is
/// tracked too; otherwise user-mode only, where such a kernel write to a
/// protected page fails with `EFAULT` — see [`user_mode_only`](Self::user_mode_only).
#[derive(Debug)]
pub struct UffdSyncTracker {
    shared: Arc<Shared>,
    stop: OwnedFd,
    handler: Option<JoinHandle<()>>,
    user_mode_only: bool,
    _tracking: TrackingMark,
}

impl UffdSyncTracker {
    /// Register and write-protect all of `mem`, and start the handler thread.
    ///
    /// # Errors
    /// [`DirtyError::Unsupported`] with the reason (kernel too old, memory
    /// type refused); [`DirtyError::Os`] for other failures.
    pub fn new(mem: &GuestMemory) -> Result<Self, DirtyError> {
        let support = check(KIND, mem)?;
        let offered = support.features.as_ref().copied().unwrap_or(0);
        let os = |op| {
            move |source| DirtyError::Os {
                tracker: KIND,
                op,
                source,
            }
        };
        let (uffd, user_mode_only) = match Uffd::open(UffdMode::All) {
            Ok(u) => (u, false),
            Err(_) => (
                Uffd::open(UffdMode::UserOnly).map_err(os("userfaultfd"))?,
                true,
            ),
        };
        let wanted = offered
            & (features::WP_UNPOPULATED | features::WP_HUGETLBFS_SHMEM | features::EVENT_REMOVE);
        uffd.api(wanted).map_err(os("UFFDIO_API"))?;
        let ranges = HostRange::all(mem);
        let unpopulated = offered & features::WP_UNPOPULATED != 0;
        if !unpopulated {
            // Without pte markers, protecting a never-touched page does
            // nothing and its first write would go unseen: fault all in.
            for r in mem.regions() {
                r.populate().map_err(os("MADV_POPULATE_WRITE"))?;
            }
        }
        let repopulate = mem
            .regions()
            .iter()
            .map(|r| !unpopulated && matches!(r.backing(), Backing::Anonymous | Backing::External))
            .collect();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                dirty: page_bits(&ranges),
                removed: (page_bits(&ranges), page_bits(&ranges)),
            }),
            discarded: AtomicU64::new(0),
            uffd,
            ranges,
            repopulate,
            failure: Failure::default(),
        });
        // The handler reads removal events from the start: a discard during
        // registration waits for that read, and the registration's own
        // protection fails until it happened.
        let stop = sys::eventfd().map_err(os("eventfd"))?;
        let stop_fd = stop.as_raw_fd();
        let handler = spawn_tracker_thread(
            "uffd-wp-handler",
            &shared,
            |s| &s.failure,
            move |s| handle_faults(s, stop_fd),
        )
        .map_err(os("spawn handler thread"))?;
        let tracker = Self {
            shared,
            stop,
            handler: Some(handler),
            user_mode_only,
            _tracking: mem.mark_tracked(),
        };
        register_all(KIND, &tracker.shared.uffd, &tracker.shared.ranges)?;
        Ok(tracker)
    }

    /// Whether only user-space writes are tracked (no privilege for more):
    /// then a kernel write into a protected page fails with `EFAULT`.
    pub fn user_mode_only(&self) -> bool {
        self.user_mode_only
    }
}

/// Resolve write faults and record removals until told to stop (`Ok`) or
/// an error.
fn serve_faults(
    shared: &Shared,
    stop: libc::c_int,
    queued: &mut VecDeque<usize>,
) -> std::io::Result<()> {
    loop {
        if queued.is_empty() && sys::wait_fault_or_stop(&shared.uffd, stop)? {
            return Ok(());
        }
        // Faults come in bursts (a vCPU sweeping memory): keep reading for a
        // short while before sleeping in poll again, so the next fault of a
        // burst does not pay a thread wake-up.
        let mut idle_since = std::time::Instant::now();
        loop {
            if let Some(address) = queued.pop_front() {
                resolve(shared, address, queued)?;
                idle_since = std::time::Instant::now();
                continue;
            }
            // Each message is read under the lock: reading a removal lets
            // its `madvise` return, and a harvest right after must find its
            // pages (the last one, with the guest paused, is the last
            // chance).
            let event = {
                let mut state = shared.lock();
                match shared.uffd.next_event()? {
                    Some(Event::Removed { start, end }) => {
                        mark_removed(
                            &mut state.removed.0,
                            &shared.ranges,
                            start,
                            end,
                            &shared.discarded,
                        );
                        continue;
                    }
                    other => other,
                }
            };
            match event {
                Some(Event::Fault { address, flags }) if sys::is_wp_fault(flags) => {
                    resolve(shared, address, queued)?;
                    idle_since = std::time::Instant::now();
                }
                Some(_) => {}
                None if idle_since.elapsed() < SPIN => std::hint::spin_loop(),
                None => break,
            }
        }
    }
}

/// The handler loop: resolve write faults and record removals until told
/// to stop. On an error it un-protects everything first, so that no guest
/// thread stays blocked.
fn handle_faults(shared: &Shared, stop: libc::c_int) -> std::io::Result<()> {
    // Faults read while draining messages for a retry, resolved next.
    let mut queued = VecDeque::new();
    let result = serve_faults(shared, stop, &mut queued);
    if result.is_err() {
        // Un-protect everything, reading what blocks it (a removal unread
        // makes the kernel refuse; its discard waits for the read), a
        // bounded number of times: this thread is the only reader.
        for r in &shared.ranges {
            for _ in 0..10_000 {
                match shared.uffd.try_write_protect(r.start, r.len, false) {
                    Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                        while let Ok(Some(_)) = shared.uffd.next_event() {}
                        std::thread::yield_now();
                    }
                    _ => break,
                }
            }
        }
    }
    result
}

/// Record the page written at `addr` and un-protect it (waking the writer).
fn resolve(shared: &Shared, addr: usize, queued: &mut VecDeque<usize>) -> std::io::Result<()> {
    let Some((idx, r)) = shared
        .ranges
        .iter()
        .enumerate()
        .find(|(_, r)| (r.start..r.end()).contains(&addr))
    else {
        return Ok(());
    };
    let page = (addr - r.start) >> r.page_size.shift();
    let page_start = r.start + (page << r.page_size.shift());
    let mut state = shared.lock();
    state.dirty[idx].set(page, true);
    loop {
        match shared
            .uffd
            .try_write_protect(page_start, r.page_size.bytes(), false)
        {
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                shared.drain(&mut state, queued)?;
                std::thread::yield_now();
            }
            other => return other,
        }
    }
}

impl DirtyTracker for UffdSyncTracker {
    fn kind(&self) -> TrackerKind {
        KIND
    }

    fn discarded_pages(&self) -> u64 {
        self.shared.discarded.load(Ordering::Relaxed)
    }

    fn harvest(&self, log: &mut DirtyLog) -> Result<(), DirtyError> {
        let shared = &*self.shared;
        shared.failure.check(KIND, "fault handler")?;
        let os = |op| {
            move |source| DirtyError::Os {
                tracker: KIND,
                op,
                source,
            }
        };
        // Discarded pages that must be mapped again to be protected, outside
        // the lock: read-mapped (the zero page), so that a page not yet
        // dropped, or protected again already, does not fault (a kernel
        // write fault on a protected page is EFAULT to a user-mode-only
        // uffd), and the balloon's memory stays free.
        let refill: Vec<(usize, Vec<(usize, usize)>)> = {
            let state = shared.lock();
            let (now, before) = &state.removed;
            (0..shared.ranges.len())
                .filter(|&i| shared.repopulate[i])
                .map(|i| (i, runs(&(now[i].clone() | &before[i]))))
                .collect()
        };
        for (idx, runs) in &refill {
            let r = &shared.ranges[*idx];
            let shift = r.page_size.shift();
            for &(first, count) in runs {
                crate::memory::populate_read(r.start + (first << shift), count << shift)
                    .map_err(os("MADV_POPULATE_READ"))?;
            }
        }
        let mut state = shared.lock();
        // What to report and protect again: the pages written (un-protected
        // by the handler) and those discarded since the last two harvests.
        let mut todo = Vec::new();
        {
            let State { dirty, removed } = &mut *state;
            let (now, before) = removed;
            for (idx, bits) in dirty.iter_mut().enumerate() {
                let mut all = bits.clone();
                all |= &now[idx];
                all |= &before[idx];
                for (first, count) in runs(&all) {
                    // Into the log before re-protecting: on error nothing
                    // is lost.
                    log.mark_range(idx, first, count);
                    todo.push((idx, first, count));
                }
                bits.fill(false);
                before[idx].copy_from_bitslice(&now[idx]);
                now[idx].fill(false);
            }
        }
        protect(shared, state, &todo)
    }

    fn discarded(&self, pages: &DirtyLog) -> Result<(), DirtyError> {
        let shared = &*self.shared;
        // Only where dropping a page dropped its protection for good.
        let todo: Vec<(usize, usize, usize)> = pages
            .runs()
            .filter(|run| shared.repopulate.get(run.region).copied().unwrap_or(false))
            .map(|run| (run.region, run.first, run.count))
            .collect();
        if todo.is_empty() {
            return Ok(());
        }
        // Read-mapped first, outside the lock (see `harvest`).
        for &(idx, first, count) in &todo {
            let r = &shared.ranges[idx];
            let shift = r.page_size.shift();
            crate::memory::populate_read(r.start + (first << shift), count << shift).map_err(
                |source| DirtyError::Os {
                    tracker: KIND,
                    op: "MADV_POPULATE_READ",
                    source,
                },
            )?;
        }
        protect(shared, shared.lock(), &todo)
    }
}

/// Write-protect each (range, first page, count) of `todo`, holding
/// `state`'s lock but for the moments the kernel refuses while a removal
/// is unread (the handler must take the lock to read it).
fn protect<'a>(
    shared: &'a Shared,
    mut state: MutexGuard<'a, State>,
    todo: &[(usize, usize, usize)],
) -> Result<(), DirtyError> {
    for &(idx, first, count) in todo {
        let r = &shared.ranges[idx];
        let shift = r.page_size.shift();
        loop {
            match shared
                .uffd
                .try_write_protect(r.start + (first << shift), count << shift, true)
            {
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                    drop(state);
                    std::thread::yield_now();
                    state = shared.lock();
                }
                other => {
                    other.map_err(|source| DirtyError::Os {
                        tracker: KIND,
                        op: "UFFDIO_WRITEPROTECT",
                        source,
                    })?;
                    break;
                }
            }
        }
    }
    drop(state);
    Ok(())
}

impl Drop for UffdSyncTracker {
    fn drop(&mut self) {
        if sys::eventfd_signal(&self.stop).is_ok() {
            if let Some(h) = self.handler.take() {
                let _ = h.join();
            }
        }
        // Closing the uffd (last Arc) drops the registration and wakes any
        // thread still blocked on a fault.
    }
}
