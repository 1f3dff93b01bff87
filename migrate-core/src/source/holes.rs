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

/// Per region, the page ranges that were holes of its memory file when
/// [`Holes::find`] looked.
#[derive(Debug, Default)]
pub(super) struct Holes {
    regions: Vec<Vec<Range<usize>>>,
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
        Self { regions }
    }

    /// How many pages are holes.
    pub fn pages(&self) -> u64 {
        self.regions.iter().flatten().map(|r| r.len() as u64).sum()
    }

    /// How many bytes of guest memory they are.
    pub fn bytes(&self, mem: &GuestMemory) -> u64 {
        self.regions
            .iter()
            .zip(mem.regions())
            .map(|(h, r)| {
                h.iter().map(|h| h.len() as u64).sum::<u64>() * r.page_size().bytes() as u64
            })
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
    /// destination may hold something else (none for a fresh destination).
    /// Asked once per round that carries the holes.
    pub fn zero_ranges(&self, dest_pages: &DestinationPages) -> Vec<PageRange> {
        let mut out = Vec::new();
        for (region, holes) in self.regions.iter().enumerate() {
            for h in holes {
                dest_pages.take_nonzero(region, h.clone(), &mut out);
            }
        }
        out
    }

    /// The round that carried the holes was lost: their markers may not
    /// have landed, so the destination may hold anything there again.
    pub fn unsent(&self, dest_pages: &DestinationPages) {
        for (region, holes) in self.regions.iter().enumerate() {
            for h in holes {
                dest_pages.sent_data(region, h.start, h.len());
            }
        }
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
        assert_eq!(holes.bytes(&mem), holes.pages() * 4096);
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
    fn holes_need_markers_only_where_the_destination_may_hold_data() {
        let mem = GuestMemory::new(vec![GuestRegion::memfd(0, 200 * 4096, "m").unwrap()]).unwrap();
        mem.regions()[0].write_bytes(0, &[1]);
        mem.regions()[0].write_bytes(150 * 4096, &[1]);
        let holes = Holes::find(&mem);
        assert_eq!(holes.of(0), &[1..150, 151..200]);
        let fresh = DestinationPages::new(&mem, true);
        assert!(holes.zero_ranges(&fresh).is_empty());
        fresh.sent_data(0, 60, 70);
        let r = holes.zero_ranges(&fresh);
        assert_eq!(
            r,
            vec![PageRange {
                region: 0,
                first: 60,
                count: 70
            }]
        );
        // Once marked, zero; lost, and marked again.
        assert!(holes.zero_ranges(&fresh).is_empty());
        holes.unsent(&fresh);
        assert_eq!(
            holes
                .zero_ranges(&fresh)
                .iter()
                .map(|r| r.count)
                .sum::<u32>(),
            198
        );
        let stale = DestinationPages::new(&mem, false);
        assert_eq!(
            holes.zero_ranges(&stale),
            vec![
                PageRange {
                    region: 0,
                    first: 1,
                    count: 149
                },
                PageRange {
                    region: 0,
                    first: 151,
                    count: 49
                },
            ]
        );
    }
}
