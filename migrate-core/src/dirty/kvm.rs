//! KVM's dirty log (feature `kvm`): the pages a guest's vCPUs wrote, per
//! memory slot, read and cleared with `KVM_GET_DIRTY_LOG`.
//!
//! KVM logs what the *guest* writes through its memory slots. Writes the VMM
//! makes itself (loading a program, device emulation, virtio rings) are not
//! in it: union this tracker with a bitmap the VMM marks
//! ([`SoftwareDirtyBitmap`](super::SoftwareDirtyBitmap), or vm-memory's
//! `AtomicBitmap` through [`VmMemoryBitmap`](super::VmMemoryBitmap)) with
//! [`DirtyUnion`](super::DirtyUnion).

use std::io;
use std::sync::Arc;

use kvm_ioctls::VmFd;

use super::{DirtyError, DirtyLog, DirtyTracker, TrackerKind};
use crate::memory::{GuestMemory, TrackingMark};

/// KVM logs at the host page size, 4 KiB on x86-64.
const KVM_PAGE: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct Slot {
    slot: u32,
    region: usize,
    len: usize,
    /// KVM pages per page of the region (1 for 4 KiB, 512 for 2 MiB).
    per_page: usize,
}

/// Dirty tracking by `KVM_GET_DIRTY_LOG` over the memory slots that map a
/// [`GuestMemory`]'s regions.
///
/// Each slot must have been created with `KVM_MEM_LOG_DIRTY_PAGES` at the
/// region's guest-physical address. Tracking starts at [`new`](Self::new),
/// which reads and discards the log once. `KVM_GET_DIRTY_LOG` fetches and
/// clears a slot's log atomically and first flushes the vCPUs' page-modification
/// logs, so every guest write that completed before a harvest is in that
/// harvest or the next one.
#[derive(Debug)]
pub struct KvmDirtyLogTracker {
    vm: Arc<VmFd>,
    slots: Vec<Slot>,
    _tracking: TrackingMark,
}

impl KvmDirtyLogTracker {
    /// Track `mem`, whose region `i` is KVM memory slot `slots[i]`.
    ///
    /// # Errors
    /// [`DirtyError::Unsupported`] when `slots` does not give one slot per
    /// region; [`DirtyError::Os`] when KVM refuses the first read (no such
    /// slot, or dirty logging not enabled on it: `ENOENT`).
    pub fn new(vm: Arc<VmFd>, mem: &GuestMemory, slots: &[u32]) -> Result<Self, DirtyError> {
        if slots.len() != mem.regions().len() {
            return Err(DirtyError::Unsupported {
                tracker: TrackerKind::KvmDirtyLog,
                reason: format!(
                    "{} memory slots given for {} regions",
                    slots.len(),
                    mem.regions().len()
                ),
            });
        }
        let slots = mem
            .regions()
            .iter()
            .zip(slots)
            .enumerate()
            .map(|(region, (r, &slot))| Slot {
                slot,
                region,
                len: r.len(),
                per_page: r.page_size().bytes() / KVM_PAGE,
            })
            .collect();
        let t = Self {
            vm,
            slots,
            _tracking: mem.mark_tracked(),
        };
        // Start a fresh interval (and prove every slot logs).
        t.harvest(&mut DirtyLog::new(mem))?;
        Ok(t)
    }
}

impl DirtyTracker for KvmDirtyLogTracker {
    fn kind(&self) -> TrackerKind {
        TrackerKind::KvmDirtyLog
    }

    fn harvest(&self, log: &mut DirtyLog) -> Result<(), DirtyError> {
        for s in &self.slots {
            let words = self
                .vm
                .get_dirty_log(s.slot, s.len)
                .map_err(|e| DirtyError::Os {
                    tracker: TrackerKind::KvmDirtyLog,
                    op: "KVM_GET_DIRTY_LOG",
                    source: io::Error::from_raw_os_error(e.errno()),
                })?;
            log.mark_small_page_bits(s.region, words, s.per_page);
        }
        Ok(())
    }
}
