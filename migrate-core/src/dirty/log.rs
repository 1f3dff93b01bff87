//! The harvest result: one bit per page, per region.

use bitvec::prelude::*;

use crate::memory::{GuestMemory, PageSize};

/// A run of consecutive dirty pages in one region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRun {
    /// Region index (into [`GuestMemory::regions`]).
    pub region: usize,
    /// First page of the run, counted from the region's start.
    pub first: usize,
    /// Number of pages.
    pub count: usize,
}

/// Dirty pages of a guest memory: a compact bitmap per region (1 bit per
/// page: 32 KiB per GiB of 4 KiB pages). Harvests OR into it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyLog {
    regions: Vec<BitVec<u64, Lsb0>>,
    page_sizes: Vec<PageSize>,
}

impl DirtyLog {
    /// An all-clean log shaped like `mem`.
    pub fn new(mem: &GuestMemory) -> Self {
        Self {
            regions: mem
                .regions()
                .iter()
                .map(|r| bitvec![u64, Lsb0; 0; r.pages()])
                .collect(),
            page_sizes: mem.regions().iter().map(|r| r.page_size()).collect(),
        }
    }

    /// Number of regions.
    pub fn regions(&self) -> usize {
        self.regions.len()
    }

    /// The bitmap of region `region`.
    ///
    /// # Panics
    /// When `region` is out of range.
    pub fn region(&self, region: usize) -> &BitSlice<u64, Lsb0> {
        &self.regions[region]
    }

    /// The bitmap of region `region`, writable (trackers OR into it).
    ///
    /// # Panics
    /// When `region` is out of range.
    pub fn region_mut(&mut self, region: usize) -> &mut BitSlice<u64, Lsb0> {
        &mut self.regions[region]
    }

    /// Whether page `page` of region `region` is dirty.
    ///
    /// # Panics
    /// When either index is out of range.
    pub fn is_dirty(&self, region: usize, page: usize) -> bool {
        self.regions[region][page]
    }

    /// Mark one page dirty.
    ///
    /// # Panics
    /// When either index is out of range.
    pub fn mark(&mut self, region: usize, page: usize) {
        self.regions[region].set(page, true);
    }

    /// Mark `count` pages from `first` dirty.
    ///
    /// # Panics
    /// When the range is out of the region.
    pub fn mark_range(&mut self, region: usize, first: usize, count: usize) {
        let bits = &mut self.regions[region];
        assert!(first + count <= bits.len(), "page range outside region");
        // Word-wise: harvests call this once per dirty run, often for a
        // single page, and bitvec's generic fill is slow for short ranges.
        let words = bits.as_raw_mut_slice();
        let (mut pos, end) = (first, first + count);
        while pos < end {
            let (w, b) = (pos / 64, pos % 64);
            let n = (end - pos).min(64 - b);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << b
            };
            words[w] |= mask;
            pos += n;
        }
    }

    /// OR a 64-page word (bit *i* is page `64 * word + i`) into a region.
    /// The caller never sets bits past the region's last page.
    pub(crate) fn or_word(&mut self, region: usize, word: usize, bits: u64) {
        self.regions[region].as_raw_mut_slice()[word] |= bits;
    }

    /// OR a kernel-style bitmap into `region`: bit *i* of `words` is 4 KiB
    /// page *i*; `small_per_page` of those make one page of the region (1 for
    /// 4 KiB pages, 512 for 2 MiB).
    #[cfg(any(feature = "kvm", feature = "vm-memory"))]
    pub(crate) fn mark_small_page_bits(
        &mut self,
        region: usize,
        words: impl IntoIterator<Item = u64>,
        small_per_page: usize,
    ) {
        for (w, mut bits) in words.into_iter().enumerate() {
            while bits != 0 {
                let small = w * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                self.mark(region, small / small_per_page.max(1));
            }
        }
    }

    /// Mark every page dirty (round 0 of pre-copy).
    pub fn mark_all(&mut self) {
        self.regions.iter_mut().for_each(|r| r.fill(true));
    }

    /// Clear every bit.
    pub fn clear(&mut self) {
        self.regions.iter_mut().for_each(|r| r.fill(false));
    }

    /// OR another log of the same shape into this one.
    ///
    /// # Panics
    /// When the shapes differ.
    pub fn union_with(&mut self, other: &DirtyLog) {
        assert_eq!(self.page_sizes, other.page_sizes, "dirty log shapes differ");
        for (a, b) in self.regions.iter_mut().zip(&other.regions) {
            *a |= b;
        }
    }

    /// Number of dirty pages.
    pub fn count(&self) -> usize {
        self.regions.iter().map(|r| r.count_ones()).sum()
    }

    /// Dirty bytes (pages times their page size).
    pub fn dirty_bytes(&self) -> u64 {
        self.regions
            .iter()
            .zip(&self.page_sizes)
            .map(|(r, ps)| r.count_ones() as u64 * ps.bytes() as u64)
            .sum()
    }

    /// Whether no page is dirty.
    pub fn is_empty(&self) -> bool {
        self.regions.iter().all(|r| r.not_any())
    }

    /// Dirty pages as maximal runs, in region then page order.
    pub fn runs(&self) -> impl Iterator<Item = PageRun> + '_ {
        self.regions.iter().enumerate().flat_map(|(region, bits)| {
            Runs { bits, pos: 0 }.map(move |(first, count)| PageRun {
                region,
                first,
                count,
            })
        })
    }

    /// Dirty pages one by one as (region, page).
    pub fn pages(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.regions
            .iter()
            .enumerate()
            .flat_map(|(region, bits)| bits.iter_ones().map(move |page| (region, page)))
    }
}

struct Runs<'a> {
    bits: &'a BitSlice<u64, Lsb0>,
    pos: usize,
}

impl Iterator for Runs<'_> {
    type Item = (usize, usize);

    fn next(&mut self) -> Option<(usize, usize)> {
        let rest = &self.bits[self.pos..];
        let start = self.pos + rest.first_one()?;
        let len = self.bits[start..]
            .first_zero()
            .unwrap_or(self.bits.len() - start);
        self.pos = start + len;
        Some((start, len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRegion;

    #[test]
    fn runs_are_maximal() {
        let mem = GuestMemory::new(vec![
            GuestRegion::anonymous(0, 200 * 4096).unwrap(),
            GuestRegion::anonymous(1 << 30, 70 * 4096).unwrap(),
        ])
        .unwrap();
        let mut log = DirtyLog::new(&mem);
        assert!(log.is_empty());
        log.mark_range(0, 3, 4);
        log.mark(0, 63);
        log.mark(0, 64);
        log.mark(0, 199);
        log.mark_range(1, 0, 70);
        let runs: Vec<_> = log.runs().map(|r| (r.region, r.first, r.count)).collect();
        assert_eq!(runs, vec![(0, 3, 4), (0, 63, 2), (0, 199, 1), (1, 0, 70)]);
        assert_eq!(log.count(), 77);
        assert_eq!(log.dirty_bytes(), 77 * 4096);
        let mut other = DirtyLog::new(&mem);
        other.mark(0, 100);
        log.union_with(&other);
        assert!(log.is_dirty(0, 100));
        log.clear();
        assert!(log.is_empty());
        // Ranges across word boundaries, and whole words.
        log.mark_range(0, 60, 70);
        log.mark_range(0, 192, 8);
        let runs: Vec<_> = log.runs().map(|r| (r.first, r.count)).collect();
        assert_eq!(runs, vec![(60, 70), (192, 8)]);
        log.mark_range(0, 0, 200);
        assert_eq!(log.count(), 200);
    }
}
