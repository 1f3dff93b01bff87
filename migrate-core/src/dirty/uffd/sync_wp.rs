//! userfaultfd write-protect with a fault-handler thread (Linux ≥ 5.7).

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use super::sys::{self, Event, Uffd, UffdMode, features};
use super::{
    Failure, PageBits, check, mark_removed, page_bits, register_all, runs, spawn_tracker_thread,
};
use crate::dirty::{DirtyError, DirtyLog, DirtyTracker, HostRange, TrackerKind};
use crate::memory::{Backing, GuestMemory};

const KIND: TrackerKind = TrackerKind::UffdSync;
/// How long the handler keeps polling for the next fault of a burst.
const SPIN: std::time::Duration = std::time::Duration::from_micros(50);

#[derive(Debug)]
struct Shared {
    uffd: Uffd,
    ranges: Vec<HostRange>,
    /// Pages un-protected by the handler since the last harvest. The handler
    /// sets a bit and un-protects under this lock; the harvest takes the bits
    /// and re-protects under it too, so a page can never be un-protected
    /// without its bit reaching the next harvest.
    dirty: Mutex<PageBits>,
    /// Pages discarded since the last harvest (also in `dirty`), when this
    /// kernel cannot protect an unpopulated anonymous page (a discard drops
    /// its protection with it; shared memory keeps a marker): the harvest
    /// faults them in before it re-protects them. `None` with pte markers
    /// for anonymous memory too.
    repopulate: Option<Mutex<PageBits>>,
    /// Per range: anonymous memory.
    anonymous: Vec<bool>,
    /// The handler's fatal error, reported by the next harvest.
    failure: Failure,
}

impl Shared {
    fn lock_dirty(&self) -> MutexGuard<'_, PageBits> {
        self.dirty.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `[start, end)` was discarded: its pages changed (to zeros) without a
    /// fault, and an anonymous page lost its protection with its contents.
    fn removed(&self, dirty: &mut PageBits, start: usize, end: usize) {
        mark_removed(dirty, &self.ranges, start, end);
        if let Some(r) = &self.repopulate {
            let mut r = r.lock().unwrap_or_else(|p| p.into_inner());
            mark_removed(&mut r, &self.ranges, start, end);
        }
    }
}

/// Fallback for kernels without async write-protect: pages are
/// write-protected, the first write to one blocks its thread on a fault that
/// a handler thread resolves (record the page, un-protect, wake; ≈ 6–11 µs),
/// and a harvest re-protects the pages it reports. A discard of guest
/// memory (`MADV_DONTNEED`, `MADV_REMOVE`: a balloon) arrives as a removal
/// event: the pages are reported and protected again.
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
        if offered & features::WP_UNPOPULATED == 0 {
            // Without pte markers, protecting a never-touched page does
            // nothing and its first write would go unseen: fault all in.
            for r in mem.regions() {
                r.populate().map_err(os("MADV_POPULATE_WRITE"))?;
            }
        }
        register_all(KIND, &uffd, &ranges)?;
        let dirty = Mutex::new(page_bits(&ranges));
        let repopulate =
            (offered & features::WP_UNPOPULATED == 0).then(|| Mutex::new(page_bits(&ranges)));
        let anonymous = mem
            .regions()
            .iter()
            .map(|r| matches!(r.backing(), Backing::Anonymous | Backing::External))
            .collect();
        let shared = Arc::new(Shared {
            uffd,
            ranges,
            dirty,
            repopulate,
            anonymous,
            failure: Failure::default(),
        });
        let stop = sys::eventfd().map_err(os("eventfd"))?;
        let stop_fd = stop.as_raw_fd();
        let handler = spawn_tracker_thread(
            "uffd-wp-handler",
            &shared,
            |s| &s.failure,
            move |s| handle_faults(s, stop_fd),
        )
        .map_err(os("spawn handler thread"))?;
        Ok(Self {
            shared,
            stop,
            handler: Some(handler),
            user_mode_only,
        })
    }

    /// Whether only user-space writes are tracked (no privilege for more):
    /// then a kernel write into a protected page fails with `EFAULT`.
    pub fn user_mode_only(&self) -> bool {
        self.user_mode_only
    }
}

/// The handler loop: resolve write faults until told to stop. On an error it
/// un-protects everything first, so that no guest thread stays blocked.
fn handle_faults(shared: &Shared, stop: libc::c_int) -> std::io::Result<()> {
    let result = (|| loop {
        if sys::wait_fault_or_stop(&shared.uffd, stop)? {
            return Ok(());
        }
        // Faults come in bursts (a vCPU sweeping memory): keep reading for a
        // short while before sleeping in poll again, so the next fault of a
        // burst does not pay a thread wake-up.
        let mut idle_since = std::time::Instant::now();
        loop {
            // Each message is read under the dirty lock: reading a removal
            // lets its `madvise` return, and a harvest right after must
            // find its pages marked.
            let mut dirty = shared.lock_dirty();
            let addr = match shared.uffd.next_event()? {
                Some(Event::Fault { address, flags }) if sys::is_wp_fault(flags) => address,
                Some(Event::Removed { start, end }) => {
                    shared.removed(&mut dirty, start, end);
                    continue;
                }
                Some(Event::Fault { .. }) => continue,
                None => {
                    drop(dirty);
                    if idle_since.elapsed() < SPIN {
                        std::hint::spin_loop();
                        continue;
                    }
                    break;
                }
            };
            idle_since = std::time::Instant::now();
            let Some((idx, r)) = shared
                .ranges
                .iter()
                .enumerate()
                .find(|(_, r)| (r.start..r.end()).contains(&addr))
            else {
                continue;
            };
            let page = (addr - r.start) >> r.page_size.shift();
            let page_start = r.start + (page << r.page_size.shift());
            dirty[idx].set(page, true);
            shared
                .uffd
                .write_protect(page_start, r.page_size.bytes(), false)?;
        }
    })();
    if result.is_err() {
        for r in &shared.ranges {
            let _ = shared.uffd.write_protect(r.start, r.len, false);
        }
    }
    result
}

impl DirtyTracker for UffdSyncTracker {
    fn kind(&self) -> TrackerKind {
        KIND
    }

    fn harvest(&self, log: &mut DirtyLog) -> Result<(), DirtyError> {
        self.shared.failure.check(KIND, "fault handler")?;
        let os = |op| {
            move |source| DirtyError::Os {
                tracker: KIND,
                op,
                source,
            }
        };
        // Without pte markers a discarded anonymous page stays unprotected
        // until it is there again: fault it in (as zeros), then report and
        // protect it below (a write since its discard, unseen, is in that
        // report). Outside the dirty lock: a page that still carries a
        // marker faults to the handler, which must be free to take it.
        let mut again: Vec<Vec<(usize, usize)>> = Vec::new();
        if let Some(repopulate) = &self.shared.repopulate {
            let mut bits = repopulate.lock().unwrap_or_else(|p| p.into_inner());
            for (idx, b) in bits.iter_mut().enumerate() {
                again.push(if self.shared.anonymous[idx] {
                    runs(b)
                } else {
                    Vec::new()
                });
                b.fill(false);
            }
        }
        for (runs, r) in again.iter().zip(&self.shared.ranges) {
            let shift = r.page_size.shift();
            for &(first, count) in runs {
                sys::populate_write(r.start + (first << shift), count << shift)
                    .map_err(os("MADV_POPULATE_WRITE"))?;
            }
        }
        let mut dirty = self.shared.lock_dirty();
        for (bits, runs) in dirty.iter_mut().zip(&again) {
            for &(first, count) in runs {
                bits[first..first + count].fill(true);
            }
        }
        for (idx, (bits, r)) in dirty.iter_mut().zip(&self.shared.ranges).enumerate() {
            let shift = r.page_size.shift();
            let mut pos = 0;
            while let Some(off) = bits[pos..].first_one() {
                let first = pos + off;
                let count = bits[first..].first_zero().unwrap_or(bits.len() - first);
                // Into the log before re-protecting: on error nothing is lost.
                log.mark_range(idx, first, count);
                bits[first..first + count].fill(false);
                self.shared
                    .uffd
                    .write_protect(r.start + (first << shift), count << shift, true)
                    .map_err(|source| DirtyError::Os {
                        tracker: KIND,
                        op: "UFFDIO_WRITEPROTECT",
                        source,
                    })?;
                pos = first + count;
            }
        }
        Ok(())
    }
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
