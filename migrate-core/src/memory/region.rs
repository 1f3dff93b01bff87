//! One guest-memory region: a guest-physical range backed by a host mapping.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::checksum::xxh3_64;
use memmap2::{MmapOptions, MmapRaw};

use super::read_view::ReadView;
use super::{MemoryError, PageSize, sys};

/// What backs a region's host mapping. Trackers use it to pick a mechanism
/// that works for that kind of memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backing {
    /// Private anonymous memory (`MAP_PRIVATE | MAP_ANONYMOUS`).
    Anonymous,
    /// A shared mapping of a memfd: another thread or process can map and
    /// write the same pages through [`GuestRegion::fd`].
    Memfd,
    /// A shared mapping of a file, e.g. a guest image under `/dev/shm`.
    File(PathBuf),
    /// A shared mapping of a hugetlbfs memfd (2 MiB pages).
    Hugetlb,
    /// A mapping the VMM owns; we never unmap it.
    External,
}

impl Backing {
    /// Short name for logs and reports.
    pub fn name(&self) -> &'static str {
        match self {
            Backing::Anonymous => "anonymous",
            Backing::Memfd => "memfd",
            Backing::File(_) => "file",
            Backing::Hugetlb => "hugetlb",
            Backing::External => "external",
        }
    }
}

/// A guest-physical range `[gpa, gpa + len)` and the host mapping that holds
/// its bytes. Created by one of the constructors, then assembled into a
/// [`GuestMemory`](super::GuestMemory), which checks the layout as a whole.
#[derive(Debug)]
pub struct GuestRegion {
    gpa: u64,
    len: usize,
    page_size: PageSize,
    host: NonNull<u8>,
    backing: Backing,
    /// `None` for external mappings: dropping the region must not unmap them.
    mapping: Option<MmapRaw>,
    file: Option<File>,
    /// Whoever owns an external mapping, kept alive as long as the region.
    owner: Option<Owner>,
    /// Pages [`discard_pages`](Self::discard_pages) dropped, until taken.
    discards: DiscardMarks,
    /// A read-only second mapping of the file, once
    /// [`map_read_view`](Self::map_read_view) made it.
    read_view: std::sync::OnceLock<ReadView>,
}

/// One bit per page, set once the kernel dropped the page (after the
/// `madvise` returned), and how many were set in all.
#[derive(Debug)]
struct DiscardMarks {
    words: Box<[AtomicU64]>,
    total: AtomicU64,
}

impl DiscardMarks {
    fn new(pages: usize) -> Self {
        Self {
            words: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            total: AtomicU64::new(0),
        }
    }

    fn mark(&self, first: usize, count: usize) {
        for p in first..first + count {
            self.words[p / 64].fetch_or(1 << (p % 64), Ordering::Release);
        }
        self.total.fetch_add(count as u64, Ordering::Release);
    }
}

/// Keeps an adopted mapping's owner alive.
struct Owner(#[allow(dead_code)] Arc<dyn Send + Sync>);

impl std::fmt::Debug for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Owner")
    }
}

// SAFETY: the region only hands out raw pointers and copies through them; the
// host mapping stays valid for the region's life (owned `MmapRaw`, or the
// VMM's promise in `from_raw`). Concurrent writers are the normal state of
// guest memory, exactly as for vCPU threads.
unsafe impl Send for GuestRegion {}
// SAFETY: see `Send`; no method mutates the region's own fields through `&self`.
unsafe impl Sync for GuestRegion {}

impl GuestRegion {
    /// Private anonymous memory with 4 KiB pages.
    ///
    /// # Errors
    /// [`MemoryError::ZeroLength`] / unaligned base or length, or
    /// [`MemoryError::Map`] when the kernel refuses the mapping.
    pub fn anonymous(gpa: u64, len: usize) -> Result<Self, MemoryError> {
        check_shape(gpa, len, PageSize::Small)?;
        let map = MmapOptions::new()
            .len(len)
            .map_anon()
            .map_err(|source| MemoryError::Map {
                what: "anonymous",
                len,
                source,
            })?;
        Self::owned(
            gpa,
            len,
            PageSize::Small,
            Backing::Anonymous,
            map.into(),
            None,
        )
    }

    /// Shared memory from a new memfd with 4 KiB pages. The memfd stays open
    /// ([`GuestRegion::file`]) so that it can be mapped again or passed to
    /// another process.
    ///
    /// # Errors
    /// Layout errors as for [`GuestRegion::anonymous`], [`MemoryError::Map`]
    /// when the memfd cannot be created, sized or mapped.
    pub fn memfd(gpa: u64, len: usize, name: &str) -> Result<Self, MemoryError> {
        check_shape(gpa, len, PageSize::Small)?;
        let file = sys::memfd_create(name, 0).map_err(|source| MemoryError::Map {
            what: "memfd",
            len,
            source,
        })?;
        Self::shared_file(gpa, len, PageSize::Small, Backing::Memfd, file)
    }

    /// Shared memory from a new hugetlbfs memfd with 2 MiB pages.
    ///
    /// # Errors
    /// [`MemoryError::HugePagesUnavailable`] when the machine has no (or not
    /// enough) free 2 MiB huge pages; layout errors when `gpa` or `len` are
    /// not 2 MiB multiples.
    pub fn hugetlb(gpa: u64, len: usize, name: &str) -> Result<Self, MemoryError> {
        check_shape(gpa, len, PageSize::Huge2M)?;
        let unavailable = |source| MemoryError::HugePagesUnavailable { len, source };
        // MFD_HUGETLB with the default huge page size (2 MiB on x86-64).
        let file = sys::memfd_create(name, libc::MFD_HUGETLB).map_err(unavailable)?;
        file.set_len(len as u64).map_err(unavailable)?;
        // hugetlbfs reserves at mmap time: a shortage shows up here as ENOMEM.
        let map = MmapOptions::new()
            .len(len)
            .map_raw(&file)
            .map_err(unavailable)?;
        Self::owned(
            gpa,
            len,
            PageSize::Huge2M,
            Backing::Hugetlb,
            map,
            Some(file),
        )
    }

    /// Shared mapping of the file at `path` (e.g. under `/dev/shm`): a new
    /// file is created as by [`GuestRegion::create_file`], an existing one
    /// is opened as by [`GuestRegion::open_file`].
    ///
    /// # Errors
    /// As for [`GuestRegion::create_file`] and [`GuestRegion::open_file`].
    pub fn file(gpa: u64, len: usize, path: impl AsRef<Path>) -> Result<Self, MemoryError> {
        let path = path.as_ref();
        match Self::create_file(gpa, len, path) {
            Err(MemoryError::File { source, .. })
                if source.kind() == std::io::ErrorKind::AlreadyExists =>
            {
                Self::open_file(gpa, len, path)
            }
            other => other,
        }
    }

    /// Shared mapping of a new file at `path`, created for this process's
    /// user alone (mode 0600 whatever the umask: guest memory holds the
    /// guest's keys) and sized to `len` with real blocks. The path must not
    /// exist, not even as a symbolic link (`O_EXCL|O_NOFOLLOW`): nobody can
    /// plant a file or a link there for the guest to adopt.
    ///
    /// # Errors
    /// [`MemoryError::File`] when the file exists (`AlreadyExists`), cannot
    /// be created or cannot be grown (a full disk shows up here), layout
    /// errors as for [`GuestRegion::anonymous`].
    pub fn create_file(gpa: u64, len: usize, path: impl AsRef<Path>) -> Result<Self, MemoryError> {
        let path = path.as_ref().to_path_buf();
        check_shape(gpa, len, PageSize::Small)?;
        let file_err = |source| MemoryError::File {
            path: path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(file_err)?;
        // Reserve the blocks now so that a full disk fails here, not as a
        // SIGBUS when the guest first touches a page.
        if let Err(source) = sys::allocate(&file, len as u64) {
            // Leave nothing half made behind (the file is ours: O_EXCL).
            let _ = std::fs::remove_file(&path);
            return Err(file_err(source));
        }
        Self::shared_file(gpa, len, PageSize::Small, Backing::File(path), file)
    }

    /// Shared mapping of the existing file at `path`, used as it is (its
    /// bytes are the guest's memory). The file must be a regular file (not a
    /// symbolic link), owned by this process's effective user and not
    /// writable by its group or others: a file another user made or can
    /// write is refused, so nobody else can write into the guest. An empty
    /// file is sized to `len`.
    ///
    /// # Errors
    /// [`MemoryError::FileNotTrusted`] for a link, another owner or a group-
    /// or world-writable file, [`MemoryError::FileSize`] when it has another
    /// size, [`MemoryError::File`] when it cannot be opened or grown, layout
    /// errors as for [`GuestRegion::anonymous`].
    pub fn open_file(gpa: u64, len: usize, path: impl AsRef<Path>) -> Result<Self, MemoryError> {
        use std::os::unix::fs::MetadataExt;
        let path = path.as_ref().to_path_buf();
        check_shape(gpa, len, PageSize::Small)?;
        let file_err = |source| MemoryError::File {
            path: path.clone(),
            source,
        };
        let untrusted = |reason: String| MemoryError::FileNotTrusted {
            path: path.clone(),
            reason,
        };
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(file) => file,
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(untrusted("it is a symbolic link".into()));
            }
            Err(e) => return Err(file_err(e)),
        };
        // Checked on the open descriptor: what is mapped is what was checked.
        let meta = file.metadata().map_err(file_err)?;
        if !meta.file_type().is_file() {
            return Err(untrusted("it is not a regular file".into()));
        }
        let euid = sys::effective_uid();
        if meta.uid() != euid {
            return Err(untrusted(format!(
                "it is owned by uid {}, not by this process's uid {euid}",
                meta.uid()
            )));
        }
        if meta.mode() & 0o022 != 0 {
            return Err(untrusted(format!(
                "its mode {:04o} lets other users write it (chmod go-w)",
                meta.mode() & 0o7777
            )));
        }
        let actual = meta.len();
        if actual == 0 {
            sys::allocate(&file, len as u64).map_err(file_err)?;
        } else if actual != len as u64 {
            return Err(MemoryError::FileSize {
                path,
                expected: len as u64,
                actual,
            });
        }
        Self::shared_file(gpa, len, PageSize::Small, Backing::File(path), file)
    }

    /// Adopt a mapping the VMM already owns: `len` bytes at `host`, seen by
    /// the guest at `gpa`. The region never unmaps it.
    ///
    /// # Safety
    /// `host..host + len` must stay mapped readable and writable for as long
    /// as this region (and anything that borrows its memory) lives.
    ///
    /// # Errors
    /// [`MemoryError::NullHost`] for a null pointer; layout errors as for
    /// [`GuestRegion::anonymous`] (the host address must be aligned to the
    /// page size too).
    pub unsafe fn from_raw(
        gpa: u64,
        host: *mut u8,
        len: usize,
        page_size: PageSize,
    ) -> Result<Self, MemoryError> {
        check_shape(gpa, len, page_size)?;
        let host = NonNull::new(host).ok_or(MemoryError::NullHost { gpa })?;
        if host.as_ptr() as usize % page_size.bytes() != 0 {
            return Err(MemoryError::UnalignedHost {
                gpa,
                host: host.as_ptr() as usize,
                page_size,
            });
        }
        Ok(Self {
            gpa,
            len,
            page_size,
            host,
            backing: Backing::External,
            mapping: None,
            file: None,
            owner: None,
            discards: DiscardMarks::new(len / page_size.bytes()),
            read_view: std::sync::OnceLock::new(),
        })
    }

    fn shared_file(
        gpa: u64,
        len: usize,
        page_size: PageSize,
        backing: Backing,
        file: File,
    ) -> Result<Self, MemoryError> {
        let what = backing.name();
        let map_err = |source| MemoryError::Map { what, len, source };
        if file.metadata().map_err(map_err)?.len() < len as u64 {
            file.set_len(len as u64).map_err(map_err)?;
        }
        let map = MmapOptions::new()
            .len(len)
            .map_raw(&file)
            .map_err(map_err)?;
        Self::owned(gpa, len, page_size, backing, map, Some(file))
    }

    fn owned(
        gpa: u64,
        len: usize,
        page_size: PageSize,
        backing: Backing,
        map: MmapRaw,
        file: Option<File>,
    ) -> Result<Self, MemoryError> {
        // mmap never returns null; refuse rather than trust it blindly.
        let host = NonNull::new(map.as_mut_ptr()).ok_or(MemoryError::NullHost { gpa })?;
        Ok(Self {
            gpa,
            len,
            page_size,
            host,
            backing,
            mapping: Some(map),
            file,
            owner: None,
            discards: DiscardMarks::new(len / page_size.bytes()),
            read_view: std::sync::OnceLock::new(),
        })
    }

    /// Keep `owner` (whatever owns an adopted mapping) alive as long as this
    /// region.
    pub fn kept_alive_by(mut self, owner: Arc<dyn Send + Sync>) -> Self {
        self.owner = Some(Owner(owner));
        self
    }

    /// Guest-physical base address.
    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: zero-length regions are refused at construction.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Guest-physical end address (exclusive).
    pub fn end(&self) -> u64 {
        self.gpa + self.len as u64
    }

    /// Page size: the granularity of dirty tracking and transfer.
    pub fn page_size(&self) -> PageSize {
        self.page_size
    }

    /// Number of pages.
    pub fn pages(&self) -> usize {
        self.len / self.page_size.bytes()
    }

    /// What backs the mapping.
    pub fn backing(&self) -> &Backing {
        &self.backing
    }

    /// The backing file or memfd, for a second mapping or another process.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.file.as_ref().map(|f| f.as_fd())
    }

    /// Host address of the first byte. Valid for [`len`](Self::len) bytes
    /// while the region lives; other threads may write through it at any time.
    pub fn as_ptr(&self) -> *mut u8 {
        self.host.as_ptr()
    }

    /// Host address of page `index`.
    ///
    /// # Panics
    /// When `index` is not below [`pages`](Self::pages).
    pub fn page_ptr(&self, index: usize) -> *mut u8 {
        assert!(index < self.pages(), "page {index} outside region");
        self.span(index, 1).0
    }

    /// Read, from now until [`drop_read_view`](Self::drop_read_view), the
    /// pages of a file-backed region (memfd, tmpfs or disk file) that its
    /// mapping does not map yet through a second, read-only mapping of the
    /// file, where the kernel maps 16 pages a read fault instead of the one
    /// a userfaultfd-registered (tracked) mapping gets: what a migration
    /// source does for round 0. [`io_slice`](Self::io_slice), the zero test
    /// and the page hash read through it; the bytes are the same page-cache
    /// pages at every instant, and writes and the trackers stay on the
    /// region's mapping.
    /// Only whole 64 KiB blocks the region's mapping maps none of read
    /// there, so no page counts twice in the process's resident set (see
    /// `read_view.rs`). The pages that read through the view: 0 for
    /// anonymous, hugetlb and external memory, a fully mapped region, or a
    /// kernel that cannot tell which pages are mapped (Linux < 6.7).
    ///
    /// # Errors
    /// The kernel's refusal to map or scan (the region reads as before).
    pub fn map_read_view(&self) -> io::Result<usize> {
        let (Backing::Memfd | Backing::File(_), Some(file)) = (&self.backing, &self.file) else {
            return Ok(0);
        };
        if self.read_view.get().is_none() {
            // A racing call may set one first: this one is then unmapped.
            let _ = self.read_view.set(ReadView::map(file, self.len)?);
        }
        let Some(view) = self.read_view.get() else {
            return Ok(0);
        };
        Ok(view
            .mark_unmapped(self.host.as_ptr() as usize)?
            .unwrap_or(0))
    }

    /// Read everything through the region's own mapping again and unmap
    /// the view's pages (a migration source, once round 0 is read).
    ///
    /// # Errors
    /// The kernel's refusal to unmap (the pages then stay in the view,
    /// unread).
    pub fn drop_read_view(&self) -> io::Result<()> {
        match self.read_view.get() {
            Some(v) => v.empty(),
            None => Ok(()),
        }
    }

    /// Whether page `page` reads through the read view now (see
    /// [`map_read_view`](Self::map_read_view)): a batch's run of pages
    /// stays in one mapping.
    pub(crate) fn reads_through_view(&self, page: usize) -> bool {
        self.read_view.get().is_some_and(|v| v.reads_page(page))
    }

    /// As [`span`](Self::span), through the read view when all `count`
    /// pages read there.
    fn read_span(&self, first: usize, count: usize) -> (*const u8, usize) {
        let (ptr, len) = self.span(first, count);
        match self.read_view.get() {
            Some(v) if v.reads(first, count) => {
                (v.at(ptr as usize - self.host.as_ptr() as usize), len)
            }
            _ => (ptr, len),
        }
    }

    /// Byte range of `count` pages from page `first`, checked.
    ///
    /// # Panics
    /// When the range is outside the region.
    fn span(&self, first: usize, count: usize) -> (*mut u8, usize) {
        let end = first.checked_add(count);
        assert!(
            end.is_some_and(|e| e <= self.pages()),
            "pages {first}+{count} outside a region of {} pages",
            self.pages()
        );
        let ps = self.page_size.bytes();
        (self.byte_span(first * ps, count * ps), count * ps)
    }

    /// A shared view of `count` pages from page `first`, for the two
    /// consumers that need the bytes themselves: the kernel (a vectored
    /// send) and a compressor. vCPUs may write these pages meanwhile; the
    /// reader then sees a torn page, which the dirty tracker has recorded, so
    /// the page goes again. Everything else reads through the copying and
    /// hashing accessors below.
    ///
    /// # Panics
    /// When the range is outside the region.
    pub fn io_slice(&self, first: usize, count: usize) -> IoSlice<'_> {
        let (ptr, len) = self.read_span(first, count);
        // SAFETY: in bounds and mapped for `&self`'s life. Other threads
        // write guest memory only through raw pointers, never through Rust
        // references, so no `&mut` aliases this view; a racing vCPU write
        // changes bytes under it, which the callers tolerate (see above).
        IoSlice::new(unsafe { std::slice::from_raw_parts(ptr, len) })
    }

    /// xxh3-64 of page `index`: the per-page check of the wire protocol and
    /// of `--verify`.
    ///
    /// # Panics
    /// When `index` is outside the region.
    pub fn hash_page(&self, index: usize) -> u64 {
        xxh3_64(&self.io_slice(index, 1))
    }

    /// Whether page `index` reads as all zeros (reading keeps a
    /// never-touched page unallocated).
    ///
    /// # Panics
    /// When `index` is outside the region.
    pub fn is_zero_page(&self, index: usize) -> bool {
        super::is_zero_page(&self.io_slice(index, 1))
    }

    /// Zero page `index` unless it already reads as zeros, so that fresh
    /// memory stays unallocated.
    ///
    /// # Panics
    /// When `index` is outside the region.
    pub fn zero_page(&self, index: usize) {
        if !self.is_zero_page(index) {
            let (ptr, len) = self.span(index, 1);
            // SAFETY: in bounds (checked by `span`), mapped for `&self`'s life.
            unsafe { std::ptr::write_bytes(ptr, 0, len) };
        }
    }

    /// Copy `src` into the region at byte `offset`, as a vCPU or device
    /// would.
    ///
    /// # Panics
    /// When the range is outside the region.
    pub fn write_bytes(&self, offset: usize, src: &[u8]) {
        let ptr = self.byte_span(offset, src.len());
        // SAFETY: `src.len()` bytes in bounds (checked); `src` is a Rust
        // slice, so it cannot be guest memory borrowed mutably elsewhere.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), ptr, src.len()) };
    }

    /// Copy the region's bytes at `offset` into `dst`.
    ///
    /// # Panics
    /// When the range is outside the region.
    pub fn read_bytes(&self, offset: usize, dst: &mut [u8]) {
        let ptr = self.byte_span(offset, dst.len());
        // SAFETY: `dst.len()` bytes in bounds (checked); `dst` is exclusively ours.
        unsafe { std::ptr::copy_nonoverlapping(ptr, dst.as_mut_ptr(), dst.len()) };
    }

    /// Host address of byte `offset`, after checking `len` bytes from it lie
    /// in the region.
    fn byte_span(&self, offset: usize, len: usize) -> *mut u8 {
        assert!(
            offset.checked_add(len).is_some_and(|e| e <= self.len),
            "{len} bytes at {offset:#x} outside a region of {:#x} bytes",
            self.len
        );
        // SAFETY: in bounds of the mapping, checked above.
        unsafe { self.host.as_ptr().add(offset) }
    }

    /// The 8-byte word at byte `offset`, as an atomic: how tests and
    /// built-in guests write guest memory from several threads, as vCPUs do.
    ///
    /// # Panics
    /// When `offset` is not 8-aligned or the word is outside the region.
    pub fn atomic_u64(&self, offset: usize) -> &AtomicU64 {
        assert!(
            offset % 8 == 0 && offset.checked_add(8).is_some_and(|e| e <= self.len),
            "word at {offset:#x} outside a region of {:#x} bytes or unaligned",
            self.len
        );
        let ptr = self.byte_span(offset, 8);
        // SAFETY: 8-aligned (the mapping is page-aligned) and in bounds; the
        // mapping lives as long as `&self`; every other access to guest memory
        // is through raw pointers or atomics, so an `&AtomicU64` is sound.
        unsafe { &*(ptr as *const AtomicU64) }
    }

    /// Allocate every page now, writable (`MADV_POPULATE_WRITE`).
    ///
    /// # Errors
    /// The kernel's refusal (no memory, or no `MADV_POPULATE_WRITE`).
    pub fn populate(&self) -> io::Result<()> {
        sys::populate_write(self.host.as_ptr() as usize, self.len)
    }

    /// Map every page readable now, in one call (`MADV_POPULATE_READ`), so
    /// that a pass reading all of them (the first round's zero check) does
    /// not fault once per page: a tracked (userfaultfd-registered) mapping
    /// gets no fault-around. Reading a hole of shared memory allocates it
    /// (see [`data_pages`](Self::data_pages)); private anonymous holes map
    /// the zero page.
    ///
    /// # Errors
    /// The kernel's refusal (e.g. no `MADV_POPULATE_READ` before 5.14).
    pub fn populate_read(&self) -> io::Result<()> {
        sys::populate_read(self.host.as_ptr() as usize, self.len)
    }

    /// Allocate `count` pages from page `first` now, writable.
    ///
    /// # Errors
    /// The kernel's refusal.
    pub fn populate_write_pages(&self, first: usize, count: usize) -> io::Result<()> {
        let (ptr, len) = self.span(first, count);
        sys::populate_write(ptr as usize, len)
    }

    /// [`populate_read`](Self::populate_read) for those of `count` pages
    /// from page `first` that read through the region's own mapping. The
    /// pages the read view reads (see [`map_read_view`](Self::map_read_view))
    /// are left alone: there the kernel maps 16 of them a fault on their
    /// first read, and mapping them ahead in bulk costs more than that
    /// (`MADV_POPULATE_READ` walks them one by one after the same faults; a
    /// 1 GiB image's round 0 took about 30 ms more CPU with it, 2026-12-07).
    ///
    /// # Errors
    /// The kernel's refusal.
    ///
    /// # Panics
    /// When the range is outside the region.
    pub fn populate_read_pages(&self, first: usize, count: usize) -> io::Result<()> {
        let end = first + count;
        let mut start = first;
        while start < end {
            let view = self.reads_through_view(start);
            let mut next = start + 1;
            while next < end && self.reads_through_view(next) == view {
                next += 1;
            }
            if !view {
                let (ptr, len) = self.span(start, next - start);
                sys::populate_read(ptr as usize, len)?;
            }
            start = next;
        }
        Ok(())
    }

    /// Drop `count` pages from page `first`: a later read finds zeros, or,
    /// under a userfaultfd registered for missing pages, faults (post-copy
    /// fetches them). Shared backings lose the blocks; an external mapping
    /// is tried as shared, then as private. The pages are marked once the
    /// call returns: a running migration's next harvest reports them (the
    /// destination must learn that they read as zeros), whatever tracker
    /// it runs — the exact way to discard during a migration. A VMM that
    /// calls `madvise` itself relies on the uffd trackers' removal events
    /// instead (see the README).
    ///
    /// # Errors
    /// The kernel's refusal (e.g. a private file mapping).
    ///
    /// # Panics
    /// When the range is outside the region.
    pub fn discard_pages(&self, first: usize, count: usize) -> io::Result<()> {
        let (ptr, len) = self.span(first, count);
        let start = ptr as usize;
        match self.backing {
            Backing::Anonymous => sys::discard(start, len, false),
            Backing::Memfd | Backing::File(_) | Backing::Hugetlb => sys::discard(start, len, true),
            Backing::External => {
                sys::discard(start, len, true).or_else(|_| sys::discard(start, len, false))
            }
        }?;
        // Marked once the kernel dropped them: a migration's next harvest
        // reports them ([`GuestMemory::take_discarded`]).
        self.discards.mark(first, count);
        Ok(())
    }

    /// Call `page` for each page [`discard_pages`](Self::discard_pages)
    /// dropped, clearing its mark.
    pub(crate) fn take_discarded(&self, mut page: impl FnMut(usize)) {
        for (i, w) in self.discards.words.iter().enumerate() {
            let mut bits = w.swap(0, Ordering::AcqRel);
            while bits != 0 {
                page(i * 64 + bits.trailing_zeros() as usize);
                bits &= bits - 1;
            }
        }
    }

    /// Pages [`discard_pages`](Self::discard_pages) dropped since the
    /// region was made (a page dropped twice counts twice).
    pub fn discarded_pages(&self) -> u64 {
        self.discards.total.load(Ordering::Acquire)
    }

    /// Bytes of this region resident in RAM now (`mincore`).
    ///
    /// # Errors
    /// The kernel's refusal.
    pub fn resident_bytes(&self) -> io::Result<u64> {
        sys::resident_bytes(self.host.as_ptr() as usize, self.len)
    }

    /// Which of the region's pages are resident (`mincore`); for a shared
    /// file mapping, which pages the file holds in memory.
    ///
    /// # Errors
    /// The kernel's.
    pub fn resident_pages(&self) -> io::Result<Vec<bool>> {
        let per = self.page_size.bytes() / 4096;
        let bytes = sys::resident_pages(self.host.as_ptr() as usize, self.len)?;
        Ok(bytes
            .chunks(per.max(1))
            .map(|c| c.iter().all(|b| b & 1 != 0))
            .collect())
    }

    /// The page ranges of a region backed by a file or memfd that may hold
    /// data, in order; the pages between them are holes of the file: they
    /// read as zeros and, in shared memory, take no memory until written.
    /// Reading a hole allocates it (a tmpfs page, or a page-cache page), so
    /// a pass over the guest skips them. `None` when the region has no file
    /// (anonymous or adopted memory), or its file is not in shared memory
    /// (tmpfs, a memfd: see `sys::data_ranges`), or the lookup failed.
    ///
    /// The answer holds for the moment of the call: pages written later are
    /// the dirty tracker's to report.
    pub fn data_pages(&self) -> Option<Vec<std::ops::Range<usize>>> {
        let file = self.file.as_ref()?;
        let ps = self.page_size.bytes() as u64;
        match sys::data_ranges(file, self.len as u64) {
            Ok(None) => None,
            Ok(Some(ranges)) => {
                let mut pages: Vec<std::ops::Range<usize>> = Vec::with_capacity(ranges.len());
                for r in ranges {
                    let (first, end) = ((r.start / ps) as usize, r.end.div_ceil(ps) as usize);
                    match pages.last_mut() {
                        // Two ranges meeting inside one (huge) page.
                        Some(last) if last.end >= first => last.end = last.end.max(end),
                        _ => pages.push(first..end),
                    }
                }
                Some(pages)
            }
            Err(e) => {
                tracing::debug!(gpa = self.gpa, error = %e, "cannot find the memory file's holes");
                None
            }
        }
    }

    /// Whether the host mapping is ours (dropped with the region).
    pub fn owns_mapping(&self) -> bool {
        self.mapping.is_some()
    }
}

/// Validate a region's shape: non-empty, page-aligned, inside the 64-bit
/// guest-physical space.
pub(super) fn check_shape(gpa: u64, len: usize, page_size: PageSize) -> Result<(), MemoryError> {
    let ps = page_size.bytes() as u64;
    if len == 0 {
        return Err(MemoryError::ZeroLength { gpa });
    }
    if gpa % ps != 0 {
        return Err(MemoryError::UnalignedBase { gpa, page_size });
    }
    if len as u64 % ps != 0 {
        return Err(MemoryError::UnalignedLength {
            gpa,
            len,
            page_size,
        });
    }
    if gpa.checked_add(len as u64).is_none() {
        return Err(MemoryError::AddressOverflow { gpa, len });
    }
    Ok(())
}

/// The pages of `runs` (region index, first page, count) as buffers to
/// receive into, for [`GuestMemory::read_runs_from`](super::GuestMemory::read_runs_from).
///
/// # Panics
/// When a run is outside its region.
pub(super) fn receive_slices<'a>(
    regions: &'a [GuestRegion],
    runs: &[(usize, usize, usize)],
) -> Vec<IoSliceMut<'a>> {
    runs.iter()
        .map(|&(region, first, count)| {
            let (ptr, len) = regions[region].span(first, count);
            // SAFETY: in bounds (checked by `span`) and mapped for the
            // regions' life. Received pages belong to one batch of one stream
            // per round and no vCPU runs on memory being received, so nothing
            // else accesses them while the caller's read fills them.
            IoSliceMut::new(unsafe { std::slice::from_raw_parts_mut(ptr, len) })
        })
        .collect()
}
