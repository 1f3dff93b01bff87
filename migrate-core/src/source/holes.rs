//! The holes of the guest's memory files: pages the first round sends as
//! zero pages without reading them.
//!
//! A memfd or a file under `/dev/shm` backing guest memory is sparse until
//! the guest writes it, and reading a hole allocates it: round 0, which
//! reads every page to tell zero pages from the rest, would grow a 64 GiB
//! guest that uses 2 GiB to 64 GiB of host memory on the source, the host
//! that is being evacuated. `SEEK_DATA`/`SEEK_HOLE` name the holes without
//! touching them. They are looked up once tracking runs, so a page the
//! guest writes afterwards is dirty and goes in a later round; a page
//! written before is data in the file. `mincore` would not do: a page
//! swapped out of shared memory is not resident but holds data.

use std::ops::Range;

use crate::dirty::DirtyLog;
use crate::memory::GuestMemory;
use crate::protocol::PageRange;
use crate::transport::DestinationPages;

/// What the holes add to round 0: the zero markers they need, and the
/// hole pages (and their bytes) the round does not read.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct HoleRound {
    pub markers: Vec<PageRange>,
    pub pages: u64,
    pub bytes: u64,
}

impl HoleRound {
    /// The round that carried these markers was lost: they may not have
    /// landed, so the destination may hold anything there again.
    pub fn unsent(&self, dest_pages: &DestinationPages) {
        for m in &self.markers {
            dest_pages.sent_data(m.region as usize, m.first as usize, m.count as usize);
        }
    }
}

/// Per region, the page ranges that were holes of its memory file when
/// [`Holes::find`] looked.
#[derive(Debug, Default)]
pub(super) struct Holes {
    regions: Vec<Vec<Range<usize>>>,
    /// Per region, its page size in bytes.
    page_bytes: Vec<u64>,
}

impl Holes {
    /// The holes of `mem`'s file-backed regions now. Regions without a
    /// file (anonymous, adopted) or whose file system cannot tell have
    /// none. Dirty tracking must already run.
    pub fn find(mem: &GuestMemory) -> Self {
        let regions = mem
            .regions()
            .iter()
            .map(|r| match r.data_pages() {
                Some(data) => complement(&data, r.pages()),
                None => Vec::new(),
            })
            .collect();
        let page_bytes = mem
            .regions()
            .iter()
            .map(|r| r.page_size().bytes() as u64)
            .collect();
        Self {
            regions,
            page_bytes,
        }
    }

    /// How many pages are holes.
    pub fn pages(&self) -> u64 {
        self.regions.iter().flatten().map(|r| r.len() as u64).sum()
    }

    /// How many bytes of guest memory they are.
    pub fn bytes(&self) -> u64 {
        self.regions
            .iter()
            .zip(&self.page_bytes)
            .map(|(h, ps)| h.iter().map(|h| h.len() as u64).sum::<u64>() * ps)
            .sum()
    }

    /// Region `region`'s holes.
    pub fn of(&self, region: usize) -> &[Range<usize>] {
        self.regions.get(region).map_or(&[], Vec::as_slice)
    }

    /// The ranges of region `region`'s `pages` pages that are not holes.
    pub fn data_between(&self, region: usize, pages: usize) -> Vec<Range<usize>> {
        complement(self.of(region), pages)
    }

    /// Whether page `page` of region `region` is in a hole.
    pub fn contains(&self, region: usize, page: usize) -> bool {
        let holes = self.of(region);
        let i = holes.partition_point(|h| h.end <= page);
        holes.get(i).is_some_and(|h| h.contains(&page))
    }

    /// Take the holes out of `log` (round 0's: every page).
    pub fn clear_from(&self, log: &mut DirtyLog) {
        for (region, holes) in self.regions.iter().enumerate() {
            for h in holes {
                log.region_mut(region)[h.clone()].fill(false);
            }
        }
    }

    /// The zero markers the holes need: those of their pages where the
    /// destination may hold something else (none for a fresh destination),
    /// leaving out the pages `log` sends with their bytes (after a lost
    /// round 0, those the guest wrote into holes meanwhile: a marker racing
    /// their bytes could zero them). The bits of the pages returned are
    /// clear afterwards (see [`HoleRound::unsent`]).
    pub fn zero_ranges(&self, dest_pages: &DestinationPages, log: &DirtyLog) -> HoleRound {
        let mut out = HoleRound::default();
        for (region, holes) in self.regions.iter().enumerate() {
            let dirty = log.region(region);
            let page_bytes = self.page_bytes[region];
            for h in holes {
                let bits = &dirty[h.clone()];
                let mut i = 0;
                while let Some(clean) = bits[i..].first_zero() {
                    let start = i + clean;
                    let end = bits[start..].first_one().map_or(bits.len(), |d| start + d);
                    dest_pages.take_nonzero(
                        region,
                        h.start + start..h.start + end,
                        &mut out.markers,
                    );
                    out.pages += (end - start) as u64;
                    out.bytes += (end - start) as u64 * page_bytes;
                    i = end;
                }
            }
        }
        out
    }
}

/// The ranges of `0..pages` outside `data` (sorted, disjoint).
fn complement(data: &[Range<usize>], pages: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut at = 0;
    for d in data {
        let start = d.start.min(pages);
        if start > at {
            out.push(at..start);
        }
        at = at.max(d.end.min(pages));
    }
    if at < pages {
        out.push(at..pages);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRegion;

    #[test]
    fn complement_of_data_ranges() {
        assert_eq!(complement(&[], 10), vec![0..10]);
        assert_eq!(complement(&[0..4, 4..10], 10), Vec::<Range<usize>>::new());
        assert_eq!(complement(&[2..4, 6..7], 10), vec![0..2, 4..6, 7..10]);
        assert_eq!(complement(&[0..3, 8..12], 10), vec![3..8]);
    }

    #[test]
    fn the_holes_of_a_memfd_are_its_unwritten_pages() {
        let mem = GuestMemory::new(vec![
            GuestRegion::anonymous(0, 64 * 4096).unwrap(),
            GuestRegion::memfd(1 << 32, 256 * 4096, "holes").unwrap(),
        ])
        .unwrap();
        let r = &mem.regions()[1];
        for p in [0, 1, 2, 100, 255] {
            r.write_bytes(p * 4096 + 17, &[1]);
        }
        // Written zeros are data too: only the file system's holes count.
        r.write_bytes(50 * 4096, &[0]);
        let holes = Holes::find(&mem);
        assert!(holes.of(0).is_empty(), "anonymous memory has no file");
        assert_eq!(holes.of(1), &[3..50, 51..100, 101..255]);
        assert_eq!(holes.pages(), 47 + 49 + 154);
        assert_eq!(holes.bytes(), holes.pages() * 4096);
        // Looking did not allocate them.
        assert_eq!(Holes::find(&mem).of(1), holes.of(1));
        let mut log = DirtyLog::new(&mem);
        log.mark_all();
        holes.clear_from(&mut log);
        assert_eq!(log.count() as u64, 64 + 256 - holes.pages());
        assert!(log.is_dirty(1, 50) && !log.is_dirty(1, 51));
        assert_eq!(
            holes.data_between(1, 256),
            vec![0..3, 50..51, 100..101, 255..256]
        );
        assert_eq!(holes.data_between(0, 64), vec![0..64]);
        assert!(holes.contains(1, 3) && holes.contains(1, 49) && holes.contains(1, 254));
        assert!(!holes.contains(1, 2) && !holes.contains(1, 50) && !holes.contains(1, 255));
        assert!(!holes.contains(0, 10));
    }

    #[test]
    fn a_wholly_written_memfd_has_no_holes_until_one_page_is_punched() {
        let mem =
            GuestMemory::new(vec![GuestRegion::memfd(0, 64 * 4096, "full").unwrap()]).unwrap();
        let r = &mem.regions()[0];
        for p in 0..64 {
            r.write_bytes(p * 4096, &[0]);
        }
        assert!(Holes::find(&mem).of(0).is_empty());
        // One page fewer allocated: the lookup walks the file again.
        r.discard_pages(40, 1).unwrap();
        let holes = Holes::find(&mem);
        assert_eq!((holes.of(0).len(), holes.of(0)[0].clone()), (1, 40..41));
    }

    #[test]
    fn holes_need_markers_only_where_the_destination_may_hold_data() {
        let mem = GuestMemory::new(vec![GuestRegion::memfd(0, 200 * 4096, "m").unwrap()]).unwrap();
        mem.regions()[0].write_bytes(0, &[1]);
        mem.regions()[0].write_bytes(150 * 4096, &[1]);
        let holes = Holes::find(&mem);
        assert_eq!(holes.of(0), &[1..150, 151..200]);
        let none = DirtyLog::new(&mem);
        let fresh = DestinationPages::new(&mem, true);
        let round = |d: &DestinationPages, log: &DirtyLog| {
            let r = holes.zero_ranges(d, log);
            assert_eq!(r.bytes, r.pages * 4096);
            (r.markers, r.pages)
        };
        assert_eq!(round(&fresh, &none), (vec![], 198));
        fresh.sent_data(0, 60, 70);
        let (r, zero) = round(&fresh, &none);
        assert_eq!(
            (r.clone(), zero),
            (
                vec![PageRange {
                    region: 0,
                    first: 60,
                    count: 70
                }],
                198
            )
        );
        // Once marked, zero; lost, and marked again (those only).
        assert!(round(&fresh, &none).0.is_empty());
        HoleRound {
            markers: r.clone(),
            ..HoleRound::default()
        }
        .unsent(&fresh);
        assert_eq!(round(&fresh, &none).0, r);
        let stale = DestinationPages::new(&mem, false);
        // Pages the log sends with their bytes get no marker.
        let mut log = DirtyLog::new(&mem);
        log.mark_range(0, 10, 5);
        log.mark(0, 149);
        log.mark(0, 199);
        assert_eq!(
            round(&stale, &log),
            (
                vec![
                    PageRange {
                        region: 0,
                        first: 1,
                        count: 9
                    },
                    PageRange {
                        region: 0,
                        first: 15,
                        count: 134
                    },
                    PageRange {
                        region: 0,
                        first: 151,
                        count: 48
                    },
                ],
                191
            )
        );
    }
}
