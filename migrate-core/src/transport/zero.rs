//! What the destination's memory may hold, page by page, as the source
//! knows it: the basis for not sending zero pages a fresh destination
//! already reads as zeros ([`FEATURE_ZERO_SKIP`](crate::protocol::FEATURE_ZERO_SKIP)).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::memory::GuestMemory;

/// One bit per guest page: set where the destination may hold non-zero
/// bytes (the source sent data there, or it never said its memory was
/// fresh), clear where it reads as zeros. Senders consult it per page from
/// any thread; within a round each page is in one batch, so a page's bit
/// is only ever touched by one thread at a time.
#[derive(Debug)]
pub struct DestinationPages {
    /// Per region, its pages' bits.
    regions: Vec<Vec<AtomicU64>>,
}

impl DestinationPages {
    /// For `mem`'s layout: every page clear when the destination said its
    /// memory reads as zeros, else every page set (each zero page is sent).
    pub fn new(mem: &GuestMemory, reads_zero: bool) -> Self {
        let fill = if reads_zero { 0 } else { u64::MAX };
        let regions = mem
            .regions()
            .iter()
            .map(|r| {
                (0..r.pages().div_ceil(64))
                    .map(|_| AtomicU64::new(fill))
                    .collect()
            })
            .collect();
        Self { regions }
    }

    /// Whether zero page `page` of region `region` must be sent as a zero
    /// marker (the destination may hold something else there); it is clear
    /// afterwards, as the marker makes the destination's page zero.
    pub fn zero_needs_sending(&self, region: usize, page: usize) -> bool {
        let (word, bit) = (&self.regions[region][page / 64], 1u64 << (page % 64));
        word.load(Ordering::Relaxed) & bit != 0 && {
            word.fetch_and(!bit, Ordering::Relaxed);
            true
        }
    }

    /// Pages `first..first + count` of `region` are sent with their bytes.
    pub fn sent_data(&self, region: usize, first: usize, count: usize) {
        let words = &self.regions[region];
        let mut p = first;
        let end = first + count;
        while p < end {
            let (w, b) = (p / 64, p % 64);
            let n = (64 - b).min(end - p);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << b
            };
            words[w].fetch_or(mask, Ordering::Relaxed);
            p += n;
        }
    }

    /// Of `pages` of `region`, append those the destination may hold
    /// non-zero bytes in to `out` as ranges, and count them as zero from now
    /// on (the caller sends them zero markers): the range form of
    /// [`zero_needs_sending`](Self::zero_needs_sending), a word at a time.
    pub fn take_nonzero(
        &self,
        region: usize,
        pages: std::ops::Range<usize>,
        out: &mut Vec<crate::protocol::PageRange>,
    ) {
        let words = &self.regions[region];
        let mut p = pages.start;
        while p < pages.end {
            let (w, b) = (p / 64, p % 64);
            let n = (64 - b).min(pages.end - p);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << b
            };
            let mut set = words[w].fetch_and(!mask, Ordering::Relaxed) & mask;
            while set != 0 {
                let lo = set.trailing_zeros() as usize;
                let len = (set >> lo).trailing_ones() as usize;
                push_run(out, region, w * 64 + lo, len);
                set &= !(if len == 64 {
                    u64::MAX
                } else {
                    ((1u64 << len) - 1) << lo
                });
            }
            p += n;
        }
    }

    /// How many pages the destination may hold non-zero bytes in.
    pub fn maybe_nonzero(&self) -> u64 {
        self.regions
            .iter()
            .flatten()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }
}

/// Append `count` pages from `first` to `out`, joining the last range when
/// they continue it (ranges stay within a `u32` count).
fn push_run(out: &mut Vec<crate::protocol::PageRange>, region: usize, first: usize, count: usize) {
    let region = region as u32;
    if let Some(last) = out.last_mut()
        && last.region == region
        && last.first + u64::from(last.count) == first as u64
        && u64::from(last.count) + count as u64 <= u64::from(u32::MAX)
    {
        last.count += count as u32;
        return;
    }
    out.push(crate::protocol::PageRange {
        region,
        first: first as u64,
        count: count as u32,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRegion;

    fn mem(pages: usize) -> GuestMemory {
        GuestMemory::new(vec![GuestRegion::anonymous(0, pages * 4096).unwrap()]).unwrap()
    }

    #[test]
    fn a_fresh_destination_gets_zero_markers_only_where_data_went() {
        let m = mem(200);
        let d = DestinationPages::new(&m, true);
        assert_eq!(d.maybe_nonzero(), 0);
        assert!(!d.zero_needs_sending(0, 5));
        d.sent_data(0, 60, 70);
        assert_eq!(d.maybe_nonzero(), 70);
        assert!(!d.zero_needs_sending(0, 59));
        assert!(d.zero_needs_sending(0, 60));
        // Sent once as zero: the destination's page is zero again.
        assert!(!d.zero_needs_sending(0, 60));
        assert!(d.zero_needs_sending(0, 129));
        assert!(!d.zero_needs_sending(0, 130));
        assert_eq!(d.maybe_nonzero(), 68);
    }

    #[test]
    fn an_unknown_destination_gets_every_zero_page_once() {
        let m = mem(100);
        let d = DestinationPages::new(&m, false);
        assert!(d.zero_needs_sending(0, 99));
        assert!(!d.zero_needs_sending(0, 99));
        d.sent_data(0, 99, 1);
        assert!(d.zero_needs_sending(0, 99));
    }
}
