//! A second, read-only mapping of a file-backed region's file (memfd,
//! tmpfs or disk file) through which a migration source reads the pages
//! its guest's own mapping does not map yet.
//!
//! **Why.** A tracked mapping is registered with a userfaultfd, and there
//! the kernel maps one page per read fault (no fault-around; uffd-wp's
//! markers make each fault slower still). The view has no userfaultfd on
//! it: the kernel maps the 16 pages of a 64 KiB block per fault. Reading a
//! guest whose memory file this process has not mapped yet (an image
//! another process wrote or restored, a guest that never touched some of
//! its memory through this mapping) then costs a fraction of the faults.
//! Pages the guest's mapping already maps cost no fault at all there and
//! are read there.
//!
//! **What it must not do: count a page twice.** A page mapped in both
//! mappings counts twice in the process's resident set (its peak RSS, the
//! report's overhead, the OOM killer's badness) although it is one page of
//! memory. So the view reads only the blocks of its fault-around windows
//! (64 KiB, aligned in the view's addresses: the kernel's default
//! `fault_around_bytes`) that the guest's mapping maps none of when it is
//! made, and it is
//! emptied (`MADV_DONTNEED`: the pages stay in the file and in the guest's
//! mapping where it has them) when the migration goes on past round 1 or
//! fails; everything reads through the guest's mapping again from then on.
//! A migration that completes by then leaves the view to the memory's
//! teardown (its guest runs elsewhere now). Left counted twice, until then:
//! the pages of those blocks the guest itself touches meanwhile and a
//! round reads again.
//!
//! Where the kernel cannot say which pages a mapping maps (no
//! `PAGEMAP_SCAN`: Linux < 6.7), no view is made.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::{MmapOptions, MmapRaw};

/// Pages of 4 KiB per block the view reads: the kernel's default
/// fault-around window (`fault_around_bytes`, 64 KiB).
const BLOCK_PAGES: usize = 16;

/// The view and which pages read through it.
#[derive(Debug)]
pub(super) struct ReadView {
    map: MmapRaw,
    /// One bit per page: read through the view.
    through: Box<[AtomicU64]>,
    /// Pages from the view's start to the first 64 KiB boundary of its
    /// address, modulo a block: the kernel's fault-around window is
    /// aligned in virtual addresses, so blocks are too.
    shift: usize,
}

impl ReadView {
    /// Map `file`'s first `len` bytes (4 KiB pages) read-only.
    pub(super) fn map(file: &File, len: usize) -> io::Result<Self> {
        let map = MmapOptions::new().len(len).map_raw_read_only(file)?;
        let shift = (map.as_ptr() as usize / 4096) % BLOCK_PAGES;
        Ok(Self {
            map,
            through: (0..(len / 4096).div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            shift,
        })
    }

    /// The block (of the view's fault-around windows) page `page` is in.
    fn block(&self, page: usize) -> usize {
        (page + self.shift) / BLOCK_PAGES
    }

    /// Mark for reading through the view every whole block of pages the
    /// guest's mapping at `host` (of the view's length) maps none of, and
    /// clear the rest; the pages marked. `Ok(None)` when the kernel cannot
    /// tell (nothing marked).
    pub(super) fn mark_unmapped(&self, host: usize) -> io::Result<Option<usize>> {
        let pages = self.map.len() / 4096;
        let mut mapped = vec![false; self.block(pages) + 1];
        let mut scan = crate::uffd::Pagemap::open(512)?;
        if !scan.scan_supported()? {
            return Ok(None);
        }
        scan.present(host, host + self.map.len(), |start, end| {
            let (first, last) = ((start - host) / 4096, (end - host).div_ceil(4096));
            mapped[self.block(first)..=self.block(last - 1)].fill(true);
        })?;
        // A fault before the view's first 64 KiB boundary maps the 16 pages
        // from the view's start (the kernel clips the window to the
        // mapping, then takes 16 pages from there): across that boundary.
        // That partial first block never reads through the view.
        if self.shift != 0 {
            mapped[0] = true;
        }
        let mut marked = 0;
        for (w, word) in self.through.iter().enumerate() {
            let mut bits = 0u64;
            for bit in 0..64 {
                let page = w * 64 + bit;
                if page < pages && !mapped[self.block(page)] {
                    bits |= 1 << bit;
                    marked += 1;
                }
            }
            word.store(bits, Ordering::Release);
        }
        Ok(Some(marked))
    }

    /// Whether pages `[first, first + count)` all read through the view.
    pub(super) fn reads(&self, first: usize, count: usize) -> bool {
        (first..first + count).all(|p| self.reads_page(p))
    }

    /// Whether page `page` reads through the view.
    pub(super) fn reads_page(&self, page: usize) -> bool {
        self.through[page / 64].load(Ordering::Acquire) & (1 << (page % 64)) != 0
    }

    /// The view's address of byte `offset`.
    pub(super) fn at(&self, offset: usize) -> *const u8 {
        debug_assert!(offset <= self.map.len());
        // SAFETY: callers pass offsets checked against the region's length,
        // which is the view's.
        unsafe { self.map.as_ptr().add(offset) }
    }

    /// Read nothing through the view any more and unmap its pages from it
    /// (they stay in the file, and in the guest's mapping where it maps
    /// them); the mapping itself stays for a later
    /// [`mark_unmapped`](Self::mark_unmapped).
    pub(super) fn empty(&self) -> io::Result<()> {
        for w in self.through.iter() {
            w.store(0, Ordering::Release);
        }
        // SAFETY: a read-only shared mapping we own; dropping its page
        // table entries changes no byte (the next read maps the file's page
        // again).
        let rc = unsafe {
            libc::madvise(
                self.map.as_mut_ptr().cast(),
                self.map.len(),
                libc::MADV_DONTNEED,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}
