//! Guest memory: the guest-physical regions a VMM mapped into its process.
//!
//! A [`GuestMemory`] is a sorted, non-overlapping set of [`GuestRegion`]s.
//! Each region is either mapped by us (anonymous, memfd, file, hugetlb) and
//! unmapped when dropped, or adopted from the VMM ([`GuestRegion::from_raw`])
//! and never unmapped. vCPU threads write the memory at any time; everything
//! here reads and writes through raw pointers, never through a `&mut [u8]`
//! that outlives a call.
//!
//! The engine, the transports and the fixtures touch guest bytes only
//! through [`GuestRegion`]'s safe accessors: hash a page, test it for zero,
//! zero it, a vectored slice of a run of pages for the kernel, copy in and
//! out, land received bytes from a reader, an atomic word. The pointer
//! arithmetic behind them is in `region.rs`, the system calls (memfd,
//! fallocate, the one `madvise`, `mincore`, the memlock limit) in `sys.rs`,
//! a source's second, read-only mapping of a memory file in
//! `read_view.rs`: with the vm-memory adapter, these are the module's only
//! `unsafe`.

mod fresh;
#[allow(unsafe_code)]
mod read_view;
#[allow(unsafe_code)]
mod region;
#[allow(unsafe_code)]
mod sys;
#[cfg(feature = "vm-memory")]
#[allow(unsafe_code)]
mod vm_memory;

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

pub use fresh::FreshPages;
pub use region::{Backing, GuestRegion};
pub(crate) use sys::populate_read;
pub use sys::{file_reads_zero, lockable_bytes};
#[cfg(feature = "vm-memory")]
pub use vm_memory::VmMemory;

/// Whether every byte of `page` is zero. Checks 64 bytes at a time with an
/// early exit, which the compiler vectorizes.
pub fn is_zero_page(page: &[u8]) -> bool {
    let mut chunks = page.chunks_exact(64);
    for chunk in &mut chunks {
        let mut acc = 0u64;
        for w in chunk.chunks_exact(8) {
            if let Some(word) = w.first_chunk() {
                acc |= u64::from_ne_bytes(*word);
            }
        }
        if acc != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

/// The non-zero 8-byte words of `page`, as (word index, value), appended to
/// `out` in order, if there are at most `max` of them; `false` (and `out`
/// holds some of them) when there are more. A dense page stops after
/// `max + 1` words, so testing it costs little; a sparse page is read once,
/// 64 bytes at a time (as [`is_zero_page`]), looking closer only where a
/// block is not all zeros.
pub fn sparse_words(page: &[u8], max: usize, out: &mut Vec<(u16, u64)>) -> bool {
    if page.len() % 64 != 0 || page.len() / 8 > usize::from(u16::MAX) + 1 {
        return false;
    }
    let word = |w: &[u8]| w.first_chunk().map_or(0, |w| u64::from_le_bytes(*w));
    // Most pages are dense and fail within their first `max + 1` words:
    // count those branch-free (the compiler vectorizes it) before
    // collecting any.
    let head = (max + 1).div_ceil(8) * 64;
    if head <= page.len()
        && page[..head]
            .chunks_exact(8)
            .filter(|w| word(w) != 0)
            .count()
            > max
    {
        return false;
    }
    let mut found = 0;
    for (b, block) in page.chunks_exact(64).enumerate() {
        if block.chunks_exact(8).fold(0, |acc, w| acc | word(w)) == 0 {
            continue;
        }
        for (j, w) in block.chunks_exact(8).enumerate() {
            let v = word(w);
            if v != 0 {
                found += 1;
                if found > max {
                    return false;
                }
                out.push(((b * 8 + j) as u16, v));
            }
        }
    }
    true
}

/// Page size of a region: the unit of dirty tracking and of transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PageSize {
    /// 4 KiB base pages.
    Small,
    /// 2 MiB huge pages (hugetlbfs).
    Huge2M,
}

impl PageSize {
    /// Size in bytes.
    pub const fn bytes(self) -> usize {
        match self {
            PageSize::Small => 4096,
            PageSize::Huge2M => 2 << 20,
        }
    }

    /// log2 of the size in bytes.
    pub const fn shift(self) -> u32 {
        match self {
            PageSize::Small => 12,
            PageSize::Huge2M => 21,
        }
    }

    /// The page size of `bytes`, if it is one we support.
    pub const fn from_bytes(bytes: usize) -> Option<Self> {
        match bytes {
            4096 => Some(PageSize::Small),
            0x20_0000 => Some(PageSize::Huge2M),
            _ => None,
        }
    }
}

impl fmt::Display for PageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PageSize::Small => f.write_str("4 KiB"),
            PageSize::Huge2M => f.write_str("2 MiB"),
        }
    }
}

/// Why guest memory could not be built or accessed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MemoryError {
    /// A region of length zero.
    #[error("region at GPA {gpa:#x} has zero length")]
    ZeroLength {
        /// Guest-physical base of the region.
        gpa: u64,
    },
    /// A base address that is not a multiple of the page size.
    #[error("region base GPA {gpa:#x} is not aligned to its {page_size} pages")]
    UnalignedBase {
        /// Guest-physical base of the region.
        gpa: u64,
        /// The region's page size.
        page_size: PageSize,
    },
    /// A length that is not a multiple of the page size.
    #[error("region at GPA {gpa:#x} has length {len:#x}, not a multiple of its {page_size} pages")]
    UnalignedLength {
        /// Guest-physical base of the region.
        gpa: u64,
        /// Length in bytes.
        len: usize,
        /// The region's page size.
        page_size: PageSize,
    },
    /// An adopted host mapping that is not aligned to the page size.
    #[error("region at GPA {gpa:#x}: host address {host:#x} is not aligned to {page_size} pages")]
    UnalignedHost {
        /// Guest-physical base of the region.
        gpa: u64,
        /// Host address given.
        host: usize,
        /// The region's page size.
        page_size: PageSize,
    },
    /// A region that runs past the end of the 64-bit address space.
    #[error("region at GPA {gpa:#x} with length {len:#x} wraps the address space")]
    AddressOverflow {
        /// Guest-physical base of the region.
        gpa: u64,
        /// Length in bytes.
        len: usize,
    },
    /// Two regions that share guest-physical addresses.
    #[error(
        "regions overlap: [{first_start:#x}, {first_end:#x}) and [{second_start:#x}, {second_end:#x})"
    )]
    Overlap {
        /// Start of the lower region.
        first_start: u64,
        /// End (exclusive) of the lower region.
        first_end: u64,
        /// Start of the higher region.
        second_start: u64,
        /// End (exclusive) of the higher region.
        second_end: u64,
    },
    /// A guest memory with no regions.
    #[error("guest memory has no regions")]
    NoRegions,
    /// A null host pointer handed to [`GuestRegion::from_raw`].
    #[error("region at GPA {gpa:#x}: host address is null")]
    NullHost {
        /// Guest-physical base of the region.
        gpa: u64,
    },
    /// The kernel refused to create or map memory.
    #[error("could not map {len} bytes of {what} memory: {source}")]
    Map {
        /// Kind of memory.
        what: &'static str,
        /// Length in bytes.
        len: usize,
        /// The OS error.
        source: io::Error,
    },
    /// The kernel could not populate (prefault) a region's pages.
    #[error("could not prefault the region at GPA {gpa:#x} ({len} bytes): {source}")]
    Prefault {
        /// Guest-physical base of the region.
        gpa: u64,
        /// Length in bytes.
        len: usize,
        /// The OS error (`ENOMEM` when the memory is not there).
        source: io::Error,
    },
    /// No (or not enough) free 2 MiB huge pages.
    #[error(
        "could not get {len} bytes of 2 MiB huge pages ({source}); reserve them with \
         `echo N > /proc/sys/vm/nr_hugepages`"
    )]
    HugePagesUnavailable {
        /// Length in bytes.
        len: usize,
        /// The OS error.
        source: io::Error,
    },
    /// A backing file that cannot be opened or grown (a full disk shows here).
    #[error("guest memory file {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// An existing backing file this process must not trust with a guest:
    /// a symbolic link, not a regular file, another user's, or writable by
    /// others (they could write into the guest).
    #[error("guest memory file {path} is refused: {reason}")]
    FileNotTrusted {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// An existing backing file with another size than the region.
    #[error("guest memory file {path} has {actual} bytes, the region needs {expected}")]
    FileSize {
        /// The file.
        path: PathBuf,
        /// Region length.
        expected: u64,
        /// File length.
        actual: u64,
    },
    /// A guest-physical range that is not inside one region.
    #[error("GPA range [{gpa:#x}, +{len:#x}) is not inside one guest memory region")]
    OutOfRange {
        /// Start of the range.
        gpa: u64,
        /// Length of the range.
        len: usize,
    },
}

/// The shape of one region, without its bytes: what two hosts compare to
/// agree that their memories match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RegionLayout {
    /// Guest-physical base.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
    /// Page size.
    pub page_size: PageSize,
}

/// A guest memory's layout: its regions' shapes in GPA order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MemoryLayout {
    /// Regions, sorted by guest-physical address.
    pub regions: Vec<RegionLayout>,
}

impl MemoryLayout {
    /// Total bytes in all regions.
    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.len).sum()
    }
}

/// How the destination's layout differs from the source's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutMismatch {
    /// Different numbers of regions.
    #[error("source has {source_regions} memory regions, destination has {destination_regions}")]
    RegionCount {
        /// Regions on the source.
        source_regions: usize,
        /// Regions on the destination.
        destination_regions: usize,
    },
    /// One region differs.
    #[error(
        "region {index} differs: source GPA {:#x} length {:#x} pages {}, \
         destination GPA {:#x} length {:#x} pages {}",
        source_region.gpa, source_region.len, source_region.page_size,
        destination_region.gpa, destination_region.len, destination_region.page_size
    )]
    Region {
        /// Region index.
        index: usize,
        /// The source's region.
        source_region: RegionLayout,
        /// The destination's region.
        destination_region: RegionLayout,
    },
}

impl MemoryLayout {
    /// Compare the source's layout (`self`) with a destination's; the error
    /// names the first difference.
    ///
    /// # Errors
    /// [`LayoutMismatch`] naming the differing region or count.
    pub fn check_matches(&self, destination: &MemoryLayout) -> Result<(), LayoutMismatch> {
        let source = self;
        if source.regions.len() != destination.regions.len() {
            return Err(LayoutMismatch::RegionCount {
                source_regions: source.regions.len(),
                destination_regions: destination.regions.len(),
            });
        }
        for (index, (s, d)) in source.regions.iter().zip(&destination.regions).enumerate() {
            if s != d {
                return Err(LayoutMismatch::Region {
                    index,
                    source_region: *s,
                    destination_region: *d,
                });
            }
        }
        Ok(())
    }
}

/// A guest's memory: regions sorted by guest-physical address, never
/// overlapping. Shared by the VMM's vCPU threads, the tracker and the sender.
#[derive(Debug)]
pub struct GuestMemory {
    regions: Vec<GuestRegion>,
    /// Kernel dirty trackers tracking it now ([`TrackingMark`]s alive).
    trackers: Arc<AtomicUsize>,
}

/// Held by a kernel dirty tracker (userfaultfd write-protect, KVM's dirty
/// log) for as long as it tracks a [`GuestMemory`]. The engine binds the
/// memory to a transport only while none is held
/// ([`SourceMigration::bind`](crate::SourceMigration::bind)): registering
/// (pinning) memory for RDMA writes to every page, which a tracker that
/// already runs would report as written by the guest, and the whole memory
/// would go twice.
#[derive(Debug)]
pub struct TrackingMark(Arc<AtomicUsize>);

impl Drop for TrackingMark {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl GuestMemory {
    /// Assemble regions into a guest memory, sorted by GPA.
    ///
    /// # Errors
    /// [`MemoryError::NoRegions`] for an empty list, [`MemoryError::Overlap`]
    /// when two regions share guest-physical addresses.
    pub fn new(mut regions: Vec<GuestRegion>) -> Result<Self, MemoryError> {
        if regions.is_empty() {
            return Err(MemoryError::NoRegions);
        }
        regions.sort_by_key(GuestRegion::gpa);
        for pair in regions.windows(2) {
            if pair[1].gpa() < pair[0].end() {
                return Err(MemoryError::Overlap {
                    first_start: pair[0].gpa(),
                    first_end: pair[0].end(),
                    second_start: pair[1].gpa(),
                    second_end: pair[1].end(),
                });
            }
        }
        Ok(Self {
            regions,
            trackers: Arc::default(),
        })
    }

    /// New memory of the same layout (regions, addresses, page sizes),
    /// private to this process and reading as zeros: a shadow to copy
    /// pages into (a protected guest's epoch, a standby's staging area).
    /// Its pages are allocated as they are written.
    ///
    /// # Errors
    /// [`MemoryError`] when a region cannot be mapped (huge pages: none
    /// free).
    pub fn anonymous_like(&self) -> Result<GuestMemory, MemoryError> {
        let regions = self
            .regions
            .iter()
            .map(|r| match r.page_size() {
                PageSize::Small => GuestRegion::anonymous(r.gpa(), r.len()),
                PageSize::Huge2M => GuestRegion::hugetlb(r.gpa(), r.len(), "shadow"),
            })
            .collect::<Result<Vec<_>, _>>()?;
        GuestMemory::new(regions)
    }

    /// Copy `count` pages from page `first` of region `region` of `from`
    /// (a memory of the same layout) into the same pages of this one.
    ///
    /// # Errors
    /// [`MemoryError::OutOfRange`] when the pages are outside either
    /// memory, or the regions' page sizes differ.
    pub fn copy_pages_from(
        &self,
        from: &GuestMemory,
        region: usize,
        first: usize,
        count: usize,
    ) -> Result<(), MemoryError> {
        let (Some(dst), Some(src)) = (self.regions.get(region), from.regions.get(region)) else {
            return Err(MemoryError::OutOfRange { gpa: 0, len: count });
        };
        let fits = |r: &GuestRegion| first.checked_add(count).is_some_and(|e| e <= r.pages());
        if !fits(dst) || !fits(src) || dst.page_size() != src.page_size() {
            return Err(MemoryError::OutOfRange {
                gpa: dst.gpa() + (first * dst.page_size().bytes()) as u64,
                len: count * dst.page_size().bytes(),
            });
        }
        if count > 0 {
            dst.write_bytes(first * dst.page_size().bytes(), &src.io_slice(first, count));
        }
        Ok(())
    }

    /// Mark this memory as tracked until the mark is dropped (a kernel
    /// dirty tracker holds one; a VMM's own tracker of the same kind
    /// should too).
    pub fn mark_tracked(&self) -> TrackingMark {
        self.trackers.fetch_add(1, Ordering::AcqRel);
        TrackingMark(Arc::clone(&self.trackers))
    }

    /// Whether a kernel dirty tracker tracks this memory now.
    pub fn is_tracked(&self) -> bool {
        self.trackers.load(Ordering::Acquire) > 0
    }

    /// The regions, in GPA order. Indices into this slice are the region
    /// numbers used by dirty logs and the wire protocol.
    pub fn regions(&self) -> &[GuestRegion] {
        &self.regions
    }

    /// Read the pages of `runs` (region index, first page, page count), in
    /// that order, from `reader` straight into guest memory: vectored reads,
    /// no bounce buffer (a `BufReader` hands over what it holds, then reads
    /// past its buffer). For a receiver landing a batch of pages whose runs
    /// were validated against this memory's layout; while they land, nothing
    /// else may access those pages (no vCPU runs on memory being received).
    ///
    /// # Errors
    /// The reader's, or `UnexpectedEof` when it ends first.
    ///
    /// # Panics
    /// When a run is outside its region.
    pub fn read_runs_from(
        &self,
        runs: &[(usize, usize, usize)],
        reader: &mut dyn io::Read,
    ) -> io::Result<()> {
        let mut slices = region::receive_slices(&self.regions, runs);
        let mut bufs = &mut slices[..];
        io::IoSliceMut::advance_slices(&mut bufs, 0);
        while !bufs.is_empty() {
            match reader.read_vectored(bufs) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => io::IoSliceMut::advance_slices(&mut bufs, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Call `page(region, page)` for each page [`GuestRegion::discard_pages`]
    /// dropped since the last call, and clear their marks: what a harvest
    /// adds to the tracker's report (the engine does it at every harvest,
    /// `dirty::harvest_with_discards`).
    pub fn take_discarded(&self, mut page: impl FnMut(usize, usize)) {
        for (i, r) in self.regions.iter().enumerate() {
            r.take_discarded(|p| page(i, p));
        }
    }

    /// Pages [`GuestRegion::discard_pages`] dropped in all regions since
    /// they were made.
    pub fn discarded_pages(&self) -> u64 {
        self.regions.iter().map(GuestRegion::discarded_pages).sum()
    }

    /// One 64-bit digest of every page's bytes (xxh3 per page, folded in
    /// page order): two memories with equal layouts and equal bytes have
    /// equal digests. For checking a migration after the fact, e.g. the
    /// source's paused memory against the destination's after the commit.
    pub fn digest(&self) -> u64 {
        self.regions
            .iter()
            .flat_map(|r| (0..r.pages()).map(move |p| r.hash_page(p)))
            .fold(0xcbf2_9ce4_8422_2325u64, |h, p| {
                (h ^ p).wrapping_mul(0x100_0000_01b3)
            })
    }

    /// Total bytes of guest memory.
    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.len() as u64).sum()
    }

    /// Allocate every page now, writable (`MADV_POPULATE_WRITE`, Linux ≥
    /// 5.14), what QEMU's `-mem-prealloc` and Cloud Hypervisor's
    /// `prefault=on` do: the kernel's zeroing of fresh pages then happens
    /// here, before a migration, instead of on each page's first write while
    /// pages arrive. A destination that can spare the time before the source
    /// connects (or that will register the memory for RDMA anyway) trades it
    /// for faster rounds; zero pages are allocated too.
    ///
    /// # Errors
    /// [`MemoryError::Prefault`] when the kernel refuses (no memory, or a
    /// kernel without `MADV_POPULATE_WRITE`).
    pub fn prefault(&self) -> Result<(), MemoryError> {
        for r in &self.regions {
            r.populate().map_err(|source| MemoryError::Prefault {
                gpa: r.gpa(),
                len: r.len(),
                source,
            })?;
        }
        Ok(())
    }

    /// Bytes of guest memory resident in RAM now (`mincore` over every
    /// region; a region the kernel cannot answer for counts as 0).
    pub fn resident_bytes(&self) -> u64 {
        self.regions
            .iter()
            .map(|r| r.resident_bytes().unwrap_or(0))
            .sum()
    }

    /// Total pages over all regions.
    pub fn total_pages(&self) -> usize {
        self.regions.iter().map(GuestRegion::pages).sum()
    }

    /// The layout (shapes only).
    pub fn layout(&self) -> MemoryLayout {
        MemoryLayout {
            regions: self
                .regions
                .iter()
                .map(|r| RegionLayout {
                    gpa: r.gpa(),
                    len: r.len() as u64,
                    page_size: r.page_size(),
                })
                .collect(),
        }
    }

    /// Region index and offset of a range `[gpa, gpa + len)` that lies
    /// inside one region.
    ///
    /// # Errors
    /// [`MemoryError::OutOfRange`] when the range is not inside one region.
    pub fn locate(&self, gpa: u64, len: usize) -> Result<(usize, usize), MemoryError> {
        let out = MemoryError::OutOfRange { gpa, len };
        let idx = self.regions.partition_point(|r| r.end() <= gpa);
        let region = self.regions.get(idx).ok_or(out)?;
        let end = gpa
            .checked_add(len as u64)
            .ok_or(MemoryError::OutOfRange { gpa, len })?;
        if gpa < region.gpa() || end > region.end() {
            return Err(MemoryError::OutOfRange { gpa, len });
        }
        Ok((idx, (gpa - region.gpa()) as usize))
    }

    /// Copy `data` into guest memory at `gpa`, as a vCPU or device would.
    ///
    /// # Errors
    /// [`MemoryError::OutOfRange`] when the range is not inside one region.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        let (idx, off) = self.locate(gpa, data.len())?;
        self.regions[idx].write_bytes(off, data);
        Ok(())
    }

    /// Copy guest memory at `gpa` into `buf`.
    ///
    /// # Errors
    /// [`MemoryError::OutOfRange`] when the range is not inside one region.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let (idx, off) = self.locate(gpa, buf.len())?;
        self.regions[idx].read_bytes(off, buf);
        Ok(())
    }
}

/// One bit per page of every region, set from any thread.
#[derive(Debug)]
pub(crate) struct PageBits {
    regions: Vec<Vec<AtomicU64>>,
}

impl PageBits {
    pub(crate) fn new(mem: &GuestMemory) -> Self {
        Self {
            regions: mem
                .regions()
                .iter()
                .map(|r| {
                    (0..r.pages().div_ceil(64))
                        .map(|_| AtomicU64::new(0))
                        .collect()
                })
                .collect(),
        }
    }

    pub(crate) fn get(&self, region: usize, page: usize) -> bool {
        self.regions[region][page / 64].load(Ordering::Acquire) & (1 << (page % 64)) != 0
    }

    /// Set the bit; whether it was set before.
    pub(crate) fn set(&self, region: usize, page: usize) -> bool {
        let bit = 1 << (page % 64);
        self.regions[region][page / 64].fetch_or(bit, Ordering::AcqRel) & bit != 0
    }
}

#[cfg(test)]
#[allow(unsafe_code)]
pub(crate) mod tests;
