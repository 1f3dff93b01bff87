//! A lock-free bitmap that the VMM marks itself.

use std::sync::atomic::{AtomicU64, Ordering};

use super::{DirtyError, DirtyLog, DirtyTracker, TrackerKind};
use crate::memory::GuestMemory;

#[derive(Debug)]
struct RegionBits {
    gpa: u64,
    len: u64,
    page_shift: u32,
    words: Box<[AtomicU64]>,
}

/// Dirty bitmap marked by the VMM: device emulation, virtio queues, DMA,
/// writes through a second mapping. Marking is one atomic OR, from any
/// thread, with no lock (like rust-vmm's `AtomicBitmap`).
///
/// It only knows what it is told: on its own it tracks a guest whose every
/// write goes through [`mark`](Self::mark). [`DirtyTracking`](super::DirtyTracking)
/// always unions it with a kernel tracker.
#[derive(Debug)]
pub struct SoftwareDirtyBitmap {
    regions: Vec<RegionBits>,
}

impl SoftwareDirtyBitmap {
    /// An all-clean bitmap shaped like `mem`.
    pub fn new(mem: &GuestMemory) -> Self {
        Self {
            regions: mem
                .regions()
                .iter()
                .map(|r| RegionBits {
                    gpa: r.gpa(),
                    len: r.len() as u64,
                    page_shift: r.page_size().shift(),
                    words: (0..r.pages().div_ceil(64))
                        .map(|_| AtomicU64::new(0))
                        .collect(),
                })
                .collect(),
        }
    }

    /// Mark every page that `[gpa, gpa + len)` touches. A range may span
    /// adjacent regions; an empty range marks nothing.
    ///
    /// # Errors
    /// [`DirtyError::OutOfRange`] when part of the range is outside guest
    /// memory; the pages inside are still marked, so nothing is lost.
    pub fn mark(&self, gpa: u64, len: usize) -> Result<(), DirtyError> {
        let end = gpa.saturating_add(len as u64);
        let mut covered = 0u64;
        for (idx, r) in self.regions.iter().enumerate() {
            let lo = gpa.max(r.gpa);
            let hi = end.min(r.gpa + r.len);
            if lo >= hi {
                continue;
            }
            covered += hi - lo;
            let first = ((lo - r.gpa) >> r.page_shift) as usize;
            let last = ((hi - 1 - r.gpa) >> r.page_shift) as usize;
            for page in first..=last {
                self.mark_page(idx, page);
            }
        }
        if covered != len as u64 {
            return Err(DirtyError::OutOfRange { gpa, len });
        }
        Ok(())
    }

    /// Mark page `page` of region `region`.
    ///
    /// # Panics
    /// When the indices are out of range.
    pub fn mark_page(&self, region: usize, page: usize) {
        let r = &self.regions[region];
        assert!(
            (page as u64) < r.len >> r.page_shift,
            "page {page} outside region {region}"
        );
        // Release pairs with the harvest's Acquire swap: a harvest that sees
        // the bit also sees the writes the marker made before marking.
        r.words[page / 64].fetch_or(1 << (page % 64), Ordering::Release);
    }
}

impl DirtyTracker for SoftwareDirtyBitmap {
    fn kind(&self) -> TrackerKind {
        TrackerKind::Software
    }

    fn harvest(&self, log: &mut DirtyLog) -> Result<(), DirtyError> {
        for (idx, r) in self.regions.iter().enumerate() {
            for (w, word) in r.words.iter().enumerate() {
                // Cheap load first: most words are clean, and a swap would
                // pull every cache line exclusive.
                if word.load(Ordering::Relaxed) != 0 {
                    log.or_word(idx, w, word.swap(0, Ordering::AcqRel));
                }
            }
        }
        Ok(())
    }
}

/// Shared handles harvest the same bitmap (the VMM keeps one to mark).
impl<T: DirtyTracker + ?Sized> DirtyTracker for std::sync::Arc<T> {
    fn kind(&self) -> TrackerKind {
        (**self).kind()
    }

    fn harvest(&self, log: &mut DirtyLog) -> Result<(), DirtyError> {
        (**self).harvest(log)
    }

    fn discarded_pages(&self) -> u64 {
        (**self).discarded_pages()
    }

    fn discarded(&self, pages: &DirtyLog) -> Result<(), DirtyError> {
        (**self).discarded(pages)
    }
}
