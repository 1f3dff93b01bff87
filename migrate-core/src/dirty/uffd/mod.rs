//! userfaultfd write-protect trackers: async mode with `PAGEMAP_SCAN`, and
//! sync mode with a fault-handler thread for older kernels.

mod async_wp;
mod sync_wp;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

use bitvec::prelude::*;

pub use async_wp::UffdAsyncTracker;
pub use sync_wp::UffdSyncTracker;

use super::{DirtyError, HostRange, TrackerKind};
use crate::memory::{Backing, GuestMemory};
use crate::uffd as sys;
use sys::{Pagemap, Uffd, UffdMode, features};

/// What this kernel offers for userfaultfd write-protect tracking, probed
/// once per process on throwaway descriptors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UffdSupport {
    /// Running kernel (major, minor), when readable.
    pub kernel: Option<(u32, u32)>,
    /// Feature bits offered by `UFFDIO_API`, or why no uffd could be opened.
    pub features: Result<u64, String>,
    /// Whether the `PAGEMAP_SCAN` ioctl exists.
    pub pagemap_scan: bool,
}

impl UffdSupport {
    /// Probe (cached after the first call).
    pub fn get() -> &'static UffdSupport {
        static SUPPORT: OnceLock<UffdSupport> = OnceLock::new();
        SUPPORT.get_or_init(|| {
            let features = Uffd::open(UffdMode::UserOnly)
                .and_then(|u| u.api(0))
                .map_err(|e| format!("cannot open a userfaultfd: {e}"));
            let pagemap_scan = Pagemap::open(1)
                .and_then(|mut p| p.scan_supported())
                .unwrap_or(false);
            UffdSupport {
                kernel: sys::kernel_version(),
                features,
                pagemap_scan,
            }
        })
    }

    fn kernel_str(&self) -> String {
        match self.kernel {
            Some((a, b)) => format!("Linux {a}.{b}"),
            None => "this kernel".into(),
        }
    }

    /// Why `tracker` cannot run on this kernel for `mem`, or `None` if it can.
    pub fn unsupported_reason(&self, tracker: TrackerKind, mem: &GuestMemory) -> Option<String> {
        let offered = match &self.features {
            Ok(f) => *f,
            Err(e) => return Some(e.clone()),
        };
        let needs_shmem_wp = mem.regions().iter().any(|r| {
            matches!(
                r.backing(),
                Backing::Memfd | Backing::Hugetlb | Backing::File(_)
            )
        });
        match tracker {
            TrackerKind::UffdAsync => {
                if offered & features::WP_ASYNC == 0 {
                    return Some(format!(
                        "{} lacks UFFD_FEATURE_WP_ASYNC (needs Linux >= 6.7)",
                        self.kernel_str()
                    ));
                }
                if !self.pagemap_scan {
                    return Some(format!(
                        "{} lacks the PAGEMAP_SCAN ioctl (needs Linux >= 6.7)",
                        self.kernel_str()
                    ));
                }
                None
            }
            TrackerKind::UffdSync => {
                if needs_shmem_wp && offered & features::WP_HUGETLBFS_SHMEM == 0 {
                    return Some(format!(
                        "{} cannot write-protect shared or hugetlb memory \
                         (UFFD_FEATURE_WP_HUGETLBFS_SHMEM needs Linux >= 5.19)",
                        self.kernel_str()
                    ));
                }
                if let Some(r) = mem
                    .regions()
                    .iter()
                    .find(|r| matches!(r.backing(), Backing::File(p) if !sys::is_shmem(p)))
                {
                    return Some(format!(
                        "sync write-protect works on anonymous, shmem and hugetlb memory only, \
                         not on the disk file behind GPA {:#x}",
                        r.gpa()
                    ));
                }
                None
            }
            TrackerKind::Software | TrackerKind::KvmDirtyLog | TrackerKind::VmMemoryBitmap => None,
        }
    }
}

/// A tracker thread's fatal error, kept for the next harvest to report.
#[derive(Debug, Default)]
struct Failure(Mutex<Option<std::io::Error>>);

impl Failure {
    /// The kept error, as the harvest's (once).
    fn check(&self, tracker: TrackerKind, op: &'static str) -> Result<(), DirtyError> {
        match self.0.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(source) => Err(DirtyError::Os {
                tracker,
                op,
                source,
            }),
            None => Ok(()),
        }
    }
}

/// Start the thread `name` running `body` over `shared`; its error is
/// logged and kept in the failure `failure` picks out of `shared`.
fn spawn_tracker_thread<S: Send + Sync + 'static>(
    name: &str,
    shared: &Arc<S>,
    failure: fn(&S) -> &Failure,
    body: impl FnOnce(&S) -> std::io::Result<()> + Send + 'static,
) -> std::io::Result<JoinHandle<()>> {
    let shared = Arc::clone(shared);
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            if let Err(e) = body(&shared) {
                tracing::error!(error = %e, thread = %std::thread::current().name().unwrap_or(""), "userfaultfd tracker thread failed");
                *failure(&shared).0.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
            }
        })
}

/// Register every range with a fresh uffd and write-protect it.
fn register_all(tracker: TrackerKind, uffd: &Uffd, ranges: &[HostRange]) -> Result<(), DirtyError> {
    let os = |op| {
        move |source| DirtyError::Os {
            tracker,
            op,
            source,
        }
    };
    for r in ranges {
        uffd.register_wp(r.start, r.len).map_err(|e| {
            if e.raw_os_error() == Some(libc::EINVAL) {
                DirtyError::Unsupported {
                    tracker,
                    reason: format!(
                        "the kernel refused to write-protect the {} byte mapping at {:#x} \
                         (memory type not supported: {e})",
                        r.len, r.start
                    ),
                }
            } else {
                os("UFFDIO_REGISTER")(e)
            }
        })?;
        uffd.write_protect(r.start, r.len, true)
            .map_err(os("UFFDIO_WRITEPROTECT"))?;
    }
    Ok(())
}

fn check(tracker: TrackerKind, mem: &GuestMemory) -> Result<&'static UffdSupport, DirtyError> {
    let support = UffdSupport::get();
    match support.unsupported_reason(tracker, mem) {
        Some(reason) => Err(DirtyError::Unsupported { tracker, reason }),
        None => Ok(support),
    }
}

/// Per range, one bit per page.
pub(super) type PageBits = Vec<BitVec<u64, Lsb0>>;

/// No page of `ranges` marked.
pub(super) fn page_bits(ranges: &[HostRange]) -> PageBits {
    ranges
        .iter()
        .map(|r| bitvec![u64, Lsb0; 0; r.len / r.page_size.bytes()])
        .collect()
}

/// Mark in `bits` every page of `ranges` that `[start, end)` touches (a
/// removal event's range), and count them in `total`.
pub(super) fn mark_removed(
    bits: &mut PageBits,
    ranges: &[HostRange],
    start: usize,
    end: usize,
    total: &AtomicU64,
) {
    for (b, r) in bits.iter_mut().zip(ranges) {
        let (s, e) = (start.max(r.start), end.min(r.end()));
        if s < e {
            let shift = r.page_size.shift();
            let (first, last) = ((s - r.start) >> shift, (e - 1 - r.start) >> shift);
            b[first..=last].fill(true);
            total.fetch_add((last - first + 1) as u64, Ordering::Relaxed);
        }
    }
}

/// The runs of set bits of `bits`, as (first, count).
pub(super) fn runs(bits: &BitSlice<u64, Lsb0>) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut pos = 0;
    while let Some(off) = bits[pos..].first_one() {
        let first = pos + off;
        let count = bits[first..].first_zero().unwrap_or(bits.len() - first);
        out.push((first, count));
        pos = first + count;
    }
    out
}
