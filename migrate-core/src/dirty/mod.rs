//! Dirty-page tracking: which guest pages were written since the last harvest.
//!
//! One small trait, [`DirtyTracker`], with a get-and-clear
//! [`harvest`](DirtyTracker::harvest) that ORs the pages written since the
//! previous harvest into a [`DirtyLog`] (one bit per page per region). Because
//! harvests OR into the log, the union of several trackers is just several
//! harvests into the same log; [`DirtyTracking`] does exactly that for the
//! best kernel tracker plus the [`SoftwareDirtyBitmap`] that the VMM marks.
//!
//! | tracker | sees | cost |
//! |---|---|---|
//! | [`UffdAsyncTracker`] (default, Linux ≥ 6.7) | every write by any thread of this process, and the kernel's writes on its behalf | no signal, no handler thread; harvest is one `PAGEMAP_SCAN` walk |
//! | [`UffdSyncTracker`] (fallback, Linux ≥ 5.7 anon / 5.19 shmem) | every user-space write of this process | one fault round trip to a handler thread per first write after a harvest |
//! | [`SoftwareDirtyBitmap`] (always) | what the VMM marks: device emulation, DMA, writes through other mappings | one atomic OR per mark |
//! | `KvmDirtyLogTracker` (feature `kvm`) | what a KVM guest's vCPUs write through their memory slots | no fault in user space; harvest is one `KVM_GET_DIRTY_LOG` per slot |
//! | `VmMemoryBitmap` (feature `vm-memory`) | what a rust-vmm VMM writes through vm-memory | one atomic OR per write, inside vm-memory |
//!
//! [`DirtyUnion`] joins trackers: a KVM VMM harvests KVM's log ∪ its own bitmap.
//!
//! Documented limit of the userfaultfd trackers: they watch *this* mapping.
//! Writes through a second mapping of the same memfd (another process, a
//! vhost-user backend), `pwrite(2)` to the backing file and device DMA into
//! pinned pages are not seen; whoever makes them must mark the software bitmap.

#[cfg(feature = "kvm")]
mod kvm;
mod log;
mod select;
mod software;
pub(crate) mod uffd;
mod union;
#[cfg(feature = "vm-memory")]
mod vm_memory;

#[cfg(any(test, feature = "test-utils"))]
// Test support: a failed check panics, by design.
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
pub mod conformance;

use std::fmt;
use std::io;

#[cfg(feature = "kvm")]
pub use kvm::KvmDirtyLogTracker;
pub use log::{DirtyLog, PageRun};
pub use select::{DirtyTracking, Fallback, TrackerPreference};
pub use software::SoftwareDirtyBitmap;
pub use uffd::{UffdAsyncTracker, UffdSupport, UffdSyncTracker};
pub use union::DirtyUnion;
#[cfg(feature = "vm-memory")]
pub use vm_memory::VmMemoryBitmap;

use crate::memory::{GuestMemory, PageSize};

/// Get-and-clear dirty tracking over a [`GuestMemory`].
///
/// Tracking starts when the tracker is created. Each harvest reports (ORs
/// into `log`) every page written since the previous harvest and clears the
/// tracker's own record. The contract every implementation passes in the
/// shared conformance suite (`dirty::conformance`, feature `test-utils`): a write that lands
/// after harvest *k* returns is reported by harvest *k + 1* at the latest.
pub trait DirtyTracker: Send + Sync {
    /// Which mechanism this is.
    fn kind(&self) -> TrackerKind;

    /// OR the pages written since the previous harvest into `log` and start
    /// a new tracking interval.
    ///
    /// # Errors
    /// [`DirtyError`] when the kernel refuses the scan or re-protection; the
    /// pages already ORed into `log` stay there, so a failed harvest never
    /// loses pages, but the caller should treat tracking as broken.
    fn harvest(&self, log: &mut DirtyLog) -> Result<(), DirtyError>;

    /// Pages the VMM discarded (a balloon: `MADV_DONTNEED`, `MADV_REMOVE`)
    /// since tracking began, as far as this tracker can tell: the uffd
    /// trackers count the kernel's removal events (a page discarded twice
    /// counts twice); those that cannot tell (the software bitmap, KVM's
    /// dirty log) say 0. The engine fails an RDMA migration on a discard:
    /// the NIC reads a registered (pinned) copy that a discard leaves
    /// behind.
    fn discarded_pages(&self) -> u64 {
        0
    }

    /// The VMM dropped `pages` (they read as zeros now, and the harvest that
    /// called this reports them): track them again where dropping a page
    /// undid its tracking (uffd-sync on anonymous memory without pte
    /// markers maps and write-protects them). By default nothing.
    ///
    /// # Errors
    /// As [`harvest`](Self::harvest).
    fn discarded(&self, pages: &DirtyLog) -> Result<(), DirtyError> {
        let _ = pages;
        Ok(())
    }
}

/// One harvest as the engine makes it: the tracker's pages, and those the
/// VMM dropped through [`GuestRegion::discard_pages`](crate::memory::GuestRegion::discard_pages)
/// since the last one (marked once the kernel dropped them, so exact
/// whatever the tracker sees), which the tracker then tracks again.
///
/// # Errors
/// The tracker's.
pub fn harvest_with_discards(
    tracker: &dyn DirtyTracker,
    mem: &GuestMemory,
    log: &mut DirtyLog,
) -> Result<(), DirtyError> {
    tracker.harvest(log)?;
    let mut dropped = DirtyLog::new(mem);
    mem.take_discarded(|region, page| dropped.mark(region, page));
    if dropped.count() > 0 {
        log.union_with(&dropped);
        tracker.discarded(&dropped)?;
    }
    Ok(())
}

/// The tracking mechanisms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TrackerKind {
    /// userfaultfd write-protect in async mode, harvested by `PAGEMAP_SCAN`.
    UffdAsync,
    /// userfaultfd write-protect with a fault-handler thread.
    UffdSync,
    /// A bitmap that the VMM marks itself.
    Software,
    /// KVM's dirty log of the guest's memory slots (feature `kvm`).
    KvmDirtyLog,
    /// vm-memory's `AtomicBitmap`, marked by the VMM's writes through
    /// vm-memory (feature `vm-memory`).
    VmMemoryBitmap,
}

impl TrackerKind {
    /// Short stable name for logs, JSON and CLI flags.
    pub fn name(self) -> &'static str {
        match self {
            TrackerKind::UffdAsync => "uffd-async",
            TrackerKind::UffdSync => "uffd-sync",
            TrackerKind::Software => "software",
            TrackerKind::KvmDirtyLog => "kvm-dirty-log",
            TrackerKind::VmMemoryBitmap => "vm-memory-bitmap",
        }
    }
}

impl fmt::Display for TrackerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a tracker could not be created or harvested.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DirtyError {
    /// The running kernel lacks what the tracker needs.
    #[error("{tracker} tracking is not supported here: {reason}")]
    Unsupported {
        /// The tracker that was asked for.
        tracker: TrackerKind,
        /// What is missing (kernel version, feature, memory type, privilege).
        reason: String,
    },
    /// A system call failed while tracking.
    #[error("{tracker}: {op} failed: {source}")]
    Os {
        /// The tracker.
        tracker: TrackerKind,
        /// The operation (`UFFDIO_REGISTER`, `PAGEMAP_SCAN`, ...).
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// The software bitmap was marked outside guest memory.
    #[error("marked range [{gpa:#x}, +{len:#x}) is outside guest memory")]
    OutOfRange {
        /// Start of the range.
        gpa: u64,
        /// Length of the range.
        len: usize,
    },
    /// No tracker could be used for this memory (each reason is listed).
    #[error("no dirty tracker works for this guest memory: {}", list_fallbacks(.0))]
    NoTracker(Vec<Fallback>),
}

fn list_fallbacks(f: &[Fallback]) -> String {
    f.iter()
        .map(|f| format!("{}: {}", f.tracker, f.reason))
        .collect::<Vec<_>>()
        .join("; ")
}

/// A region's host range as trackers see it: copied out of the guest memory
/// at creation, so trackers hold addresses, never references.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HostRange {
    pub start: usize,
    pub len: usize,
    pub page_size: PageSize,
}

impl HostRange {
    pub fn all(mem: &GuestMemory) -> Vec<HostRange> {
        mem.regions()
            .iter()
            .map(|r| HostRange {
                start: r.as_ptr() as usize,
                len: r.len(),
                page_size: r.page_size(),
            })
            .collect()
    }

    pub fn end(&self) -> usize {
        self.start + self.len
    }
}
