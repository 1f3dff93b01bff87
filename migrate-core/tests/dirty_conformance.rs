//! Every dirty tracker passes the one conformance suite, on every memory
//! kind this machine has: the kernel trackers, the software bitmap, the
//! selected set, a union, and vm-memory's bitmap. (KVM's dirty log sees only
//! a vCPU's writes, which host threads cannot make: mini-vmm's KVM tests
//! check it with a real guest.) Tests print `SKIP <test>: <reason>` for what this
//! kernel or machine cannot run.

use std::sync::Arc;

use migrate_core::dirty::conformance::{DirtyMarker, Tracked};
use migrate_core::dirty::{
    DirtyError, DirtyTracking, DirtyUnion, SoftwareDirtyBitmap, TrackerKind, TrackerPreference,
    UffdAsyncTracker, UffdSyncTracker, VmMemoryBitmap,
};
use migrate_core::dirty_tracker_suite;
use migrate_core::memory::{GuestMemory, VmMemory};
use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MmapRegion,
};

dirty_tracker_suite!(uffd_async, |mem| Ok(Tracked {
    tracker: Box::new(UffdAsyncTracker::new(mem)?),
    marker: None,
}));

// Documented: sync write-protect has no disk files (the README says so).
dirty_tracker_suite!(uffd_sync, refuses[DiskFile], |mem| Ok(Tracked {
    tracker: Box::new(UffdSyncTracker::new(mem)?),
    marker: None,
}));

dirty_tracker_suite!(software_bitmap, |mem| {
    let bitmap = Arc::new(SoftwareDirtyBitmap::new(mem));
    Ok(Tracked {
        tracker: Box::new(Arc::clone(&bitmap)),
        marker: Some(bitmap),
    })
});

// The selected tracker as the scheduler sees it (kernel tracker ∪ software
// bitmap), with writers that never mark: the kernel tracker must carry it.
dirty_tracker_suite!(selected_best, |mem| Ok(Tracked {
    tracker: Box::new(DirtyTracking::new(mem, TrackerPreference::Best)?),
    marker: None,
}));

// Two trackers as one, each seeing part of the writes: the kernel tracker
// sees every store, the bitmap only what the writers mark. Nothing either
// saw may be lost.
dirty_tracker_suite!(union_of_kernel_and_bitmap, |mem| {
    let bitmap = Arc::new(SoftwareDirtyBitmap::new(mem));
    let union = DirtyUnion::new(vec![
        Box::new(DirtyTracking::new(mem, TrackerPreference::Best)?),
        Box::new(Arc::clone(&bitmap)),
    ]);
    Ok(Tracked {
        tracker: Box::new(union),
        marker: Some(bitmap),
    })
});

/// vm-memory's view of the suite's memory: the same mappings, adopted as a
/// VMM's `GuestMemoryMmap<AtomicBitmap>`, whose bitmap the writers mark as
/// vm-memory's `Bytes` would.
struct VmMemoryMarker {
    vm: Arc<VmMemory>,
    page_bytes: Vec<usize>,
}

impl VmMemoryMarker {
    fn adopt(mem: &GuestMemory) -> Result<Self, DirtyError> {
        let unsupported = |e: &dyn std::fmt::Display| DirtyError::Unsupported {
            tracker: TrackerKind::VmMemoryBitmap,
            reason: e.to_string(),
        };
        let regions = mem
            .regions()
            .iter()
            .map(|r| {
                // SAFETY: the suite keeps `mem` (and so its mappings) alive
                // for as long as the tracker and this marker live; vm-memory
                // never unmaps a raw region.
                let map = unsafe {
                    MmapRegion::<AtomicBitmap>::build_raw(
                        r.as_ptr(),
                        r.len(),
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_SHARED,
                    )
                }
                .map_err(|e| unsupported(&e))?;
                GuestRegionMmap::new(map, GuestAddress(r.gpa())).ok_or_else(|| {
                    unsupported(&format_args!("region at {:#x} does not fit", r.gpa()))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let vm = GuestMemoryMmap::from_regions(regions).map_err(|e| unsupported(&e))?;
        Ok(Self {
            vm: Arc::new(vm),
            page_bytes: mem
                .regions()
                .iter()
                .map(|r| r.page_size().bytes())
                .collect(),
        })
    }
}

impl DirtyMarker for VmMemoryMarker {
    fn mark_page(&self, region: usize, page: usize) {
        let r = self.vm.iter().nth(region).expect("same regions");
        let len = self.page_bytes[region];
        r.bitmap().mark_dirty(page * len, len);
    }
}

dirty_tracker_suite!(vm_memory_bitmap, |mem| {
    let marker = VmMemoryMarker::adopt(mem)?;
    Ok(Tracked {
        tracker: Box::new(VmMemoryBitmap::new(&marker.vm, mem)?),
        marker: Some(Arc::new(marker)),
    })
});
