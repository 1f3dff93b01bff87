//! rust-vmm adapter (feature `vm-memory`): a VMM built on
//! `vm_memory::GuestMemoryMmap<AtomicBitmap>` (Cloud Hypervisor, Firecracker)
//! hands its guest memory and its dirty bitmap over in two calls.
//!
//! ```
//! use std::sync::Arc;
//! use migrate_core::dirty::{DirtyLog, DirtyTracker, VmMemoryBitmap};
//! use migrate_core::memory::GuestMemory;
//! use vm_memory::bitmap::AtomicBitmap;
//! use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
//!
//! // The VMM's memory, as it already has it: 2 MiB at 0 and 2 MiB at 4 GiB.
//! let vmm_mem: Arc<GuestMemoryMmap<AtomicBitmap>> = Arc::new(GuestMemoryMmap::from_ranges(&[
//!     (GuestAddress(0), 2 << 20),
//!     (GuestAddress(1 << 32), 2 << 20),
//! ])?);
//! // Ours: the same mappings (nothing copied or remapped; kept alive by the Arc).
//! let mem = GuestMemory::from_vm_memory(&vmm_mem)?;
//! // vm-memory's bitmap is a dirty tracker: the VMM's own writes through
//! // `Bytes` (device emulation, virtio) are marked in it.
//! let bitmap = VmMemoryBitmap::new(&vmm_mem, &mem)?;
//! vmm_mem.write_slice(b"virtio used ring", GuestAddress((1 << 32) + 0x3000))?;
//! let mut log = DirtyLog::new(&mem);
//! bitmap.harvest(&mut log)?;
//! assert!(log.is_dirty(1, 3));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! A KVM-based VMM unions this bitmap with KVM's dirty log
//! ([`KvmDirtyLogTracker`](crate::dirty::KvmDirtyLogTracker), feature `kvm`)
//! in a [`DirtyUnion`](crate::dirty::DirtyUnion): the guest's writes and the
//! VMM's, as Cloud Hypervisor does.

use std::sync::Arc;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::{GuestMemory, GuestRegion, MemoryError, PageSize};

/// The guest memory type of rust-vmm VMMs, with its dirty bitmap.
pub type VmMemory = GuestMemoryMmap<AtomicBitmap>;

impl GuestMemory {
    /// The regions of a vm-memory guest memory, as they are mapped: the same
    /// host addresses, nothing copied or remapped. The returned memory keeps
    /// `vm` alive, so the mappings outlive it.
    ///
    /// # Errors
    /// Layout errors as for [`GuestMemory::new`] (vm-memory allows shapes
    /// we refuse, e.g. a length that is not a whole number of pages).
    pub fn from_vm_memory(vm: &Arc<VmMemory>) -> Result<Self, MemoryError> {
        let owner: Arc<dyn Send + Sync> = vm.clone();
        let regions = vm
            .iter()
            .map(|r| {
                let host = r.as_ptr();
                // SAFETY: the mapping belongs to `vm`, which the region keeps
                // alive through `owner`; vm-memory never unmaps a live region.
                unsafe {
                    GuestRegion::from_raw(r.start_addr().0, host, r.len() as usize, PageSize::Small)
                }
                .map(|g| g.kept_alive_by(owner.clone()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        GuestMemory::new(regions)
    }
}
