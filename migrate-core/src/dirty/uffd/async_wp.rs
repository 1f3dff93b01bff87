//! userfaultfd write-protect in async mode, harvested with `PAGEMAP_SCAN`.

use std::sync::Mutex;

use super::sys::{Pagemap, Uffd, UffdMode, features};
use super::{check, register_all};
use crate::dirty::{DirtyError, DirtyLog, DirtyTracker, HostRange, TrackerKind};
use crate::memory::GuestMemory;

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
#[derive(Debug)]
pub struct UffdAsyncTracker {
    // Keeps the registration alive; closing it ends tracking.
    _uffd: Uffd,
    pagemap: Mutex<Pagemap>,
    ranges: Vec<HostRange>,
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
            | (offered & features::WP_HUGETLBFS_SHMEM);
        uffd.api(wanted).map_err(os("UFFDIO_API"))?;
        let ranges = HostRange::all(mem);
        register_all(KIND, &uffd, &ranges)?;
        let pagemap = Pagemap::open(SCAN_VEC_LEN).map_err(os("open /proc/self/pagemap"))?;
        Ok(Self {
            _uffd: uffd,
            pagemap: Mutex::new(pagemap),
            ranges,
        })
    }
}

impl DirtyTracker for UffdAsyncTracker {
    fn kind(&self) -> TrackerKind {
        TrackerKind::UffdAsync
    }

    fn harvest(&self, log: &mut DirtyLog) -> Result<(), DirtyError> {
        let mut pagemap = self.pagemap.lock().unwrap_or_else(|p| p.into_inner());
        for (idx, r) in self.ranges.iter().enumerate() {
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
