//! userfaultfd write-protect with a fault-handler thread (Linux ≥ 5.7).

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use bitvec::prelude::*;

use super::sys::{self, Uffd, UffdMode, features};
use super::{Failure, check, register_all, spawn_tracker_thread};
use crate::dirty::{DirtyError, DirtyLog, DirtyTracker, HostRange, TrackerKind};
use crate::memory::GuestMemory;

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
    dirty: Mutex<Vec<BitVec<u64, Lsb0>>>,
    /// The handler's fatal error, reported by the next harvest.
    failure: Failure,
}

impl Shared {
    fn lock_dirty(&self) -> MutexGuard<'_, Vec<BitVec<u64, Lsb0>>> {
        self.dirty.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Fallback for kernels without async write-protect: pages are
/// write-protected, the first write to one blocks its thread on a fault that
/// a handler thread resolves (record the page, un-protect, wake; ≈ 6–11 µs),
/// and a harvest re-protects the pages it reports.
///
/// It does not see discards (`MADV_DONTNEED`, `MADV_REMOVE`: a balloon):
/// removal events would stall its own re-protection (`UFFDIO_WRITEPROTECT`
/// fails with `EAGAIN` while one is unread, and only this handler reads
/// them), so a discarded page keeps its old bytes at the destination, and
/// on anonymous memory later writes to it go unseen. Keep the balloon still
/// while a migration runs on this tracker (the README says so).
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
        let wanted = offered & (features::WP_UNPOPULATED | features::WP_HUGETLBFS_SHMEM);
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
        let dirty = Mutex::new(
            ranges
                .iter()
                .map(|r| bitvec![u64, Lsb0; 0; r.len / r.page_size.bytes()])
                .collect(),
        );
        let shared = Arc::new(Shared {
            uffd,
            ranges,
            dirty,
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
            let event = shared.uffd.next_event()?;
            let Some(addr) = (match event {
                Some(sys::Event::Fault { address, flags }) if sys::is_wp_fault(flags) => {
                    Some(address)
                }
                Some(_) => continue,
                None => None,
            }) else {
                if idle_since.elapsed() < SPIN {
                    std::hint::spin_loop();
                    continue;
                }
                break;
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
            let mut dirty = shared.lock_dirty();
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
        let mut dirty = self.shared.lock_dirty();
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
