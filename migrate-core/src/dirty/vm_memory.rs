//! vm-memory's `AtomicBitmap` as a dirty tracker (feature `vm-memory`).

use std::sync::Arc;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MmapRegion};

use super::{DirtyError, DirtyLog, DirtyTracker, TrackerKind};
use crate::memory::{GuestMemory, VmMemory};

/// The dirty bitmap a rust-vmm VMM already has: vm-memory marks it on every
/// write the VMM makes through vm-memory's `Bytes` (device emulation,
/// virtio queues, loading images). Harvest is `AtomicBitmap::get_and_reset`
/// per region, one bit per 4 KiB page.
///
/// It does not see the guest's own writes (KVM maps guest memory directly):
/// union it with [`KvmDirtyLogTracker`](super::KvmDirtyLogTracker) in a
/// [`DirtyUnion`](super::DirtyUnion).
#[derive(Debug)]
pub struct VmMemoryBitmap {
    vm: Arc<VmMemory>,
    /// Our region index for each of vm-memory's regions, in its order.
    regions: Vec<usize>,
    /// 4 KiB pages per page of our region.
    per_page: Vec<usize>,
}

impl VmMemoryBitmap {
    /// Track `vm`'s bitmap for `mem` (built by
    /// [`GuestMemory::from_vm_memory`] from the same `vm`). Pages marked before
    /// this call are discarded: tracking starts now.
    ///
    /// # Errors
    /// [`DirtyError::Unsupported`] when `mem` does not have a region at each of
    /// `vm`'s regions' addresses and lengths.
    pub fn new(vm: &Arc<VmMemory>, mem: &GuestMemory) -> Result<Self, DirtyError> {
        let mut regions = Vec::new();
        let mut per_page = Vec::new();
        for r in vm.iter() {
            let (gpa, len) = (r.start_addr().0, r.len());
            let idx = mem
                .regions()
                .iter()
                .position(|m| m.gpa() == gpa && m.len() as u64 == len)
                .ok_or_else(|| DirtyError::Unsupported {
                    tracker: TrackerKind::VmMemoryBitmap,
                    reason: format!("no guest-memory region at [{gpa:#x}, +{len:#x})"),
                })?;
            regions.push(idx);
            per_page.push(mem.regions()[idx].page_size().bytes() / 4096);
            MmapRegion::bitmap(r).get_and_reset();
        }
        Ok(Self {
            vm: vm.clone(),
            regions,
            per_page,
        })
    }
}

impl DirtyTracker for VmMemoryBitmap {
    fn kind(&self) -> TrackerKind {
        TrackerKind::VmMemoryBitmap
    }

    fn harvest(&self, log: &mut DirtyLog) -> Result<(), DirtyError> {
        for (i, r) in self.vm.iter().enumerate() {
            let words = MmapRegion::bitmap(r).get_and_reset();
            log.mark_small_page_bits(self.regions[i], words, self.per_page[i]);
        }
        Ok(())
    }
}
