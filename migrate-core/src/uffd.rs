//! The userfaultfd and `PAGEMAP_SCAN` system interface, wrapped once, for
//! both of its users: dirty tracking (write-protect, `dirty::uffd`) and
//! post-copy (missing-page faults, `postcopy::fetch`).
//!
//! The libc crate has neither `PAGEMAP_SCAN` nor the write-protect-async
//! uffd features, so the kernel's structs (`include/uapi/linux/userfaultfd.h`,
//! `include/uapi/linux/fs.h`) are defined here. Every `unsafe` block of
//! userfaultfd lives in this module.

use std::fs::File;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const fn ioc(dir: u64, ty: u8, nr: u8, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | ((ty as u64) << 8) | nr as u64
}
const fn iowr(ty: u8, nr: u8, size: usize) -> u64 {
    ioc(3, ty, nr, size)
}

const UFFD_API: u64 = 0xAA;
const UFFDIO: u8 = 0xAA;

/// Feature bits of `struct uffdio_api`.
pub mod features {
    /// Report `madvise(MADV_DONTNEED/MADV_REMOVE/MADV_FREE)` of registered
    /// memory as `UFFD_EVENT_REMOVE` messages; the caller of `madvise` waits
    /// until the message is read.
    pub const EVENT_REMOVE: u64 = 1 << 3;
    /// Write-protect shmem and hugetlbfs memory.
    pub const WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
    /// Write-protect pages that were never populated (pte markers).
    pub const WP_UNPOPULATED: u64 = 1 << 13;
    /// Resolve write-protect faults in the kernel, recording them for
    /// `PAGEMAP_SCAN` instead of messaging user space.
    pub const WP_ASYNC: u64 = 1 << 15;
}

const UFFD_USER_MODE_ONLY: libc::c_int = 1;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_EVENT_REMOVE: u8 = 0x15;
const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// `struct uffd_msg` (32 bytes): the page-fault arm (`flags`, `address`)
/// and the remove arm (`start`, `end` in the same two words).
#[repr(C)]
#[derive(Default)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    flags: u64,
    address: u64,
    ptid: u64,
}

const UFFDIO_API: u64 = iowr(UFFDIO, 0x3F, size_of::<UffdioApi>());
const UFFDIO_REGISTER: u64 = iowr(UFFDIO, 0x00, size_of::<UffdioRegister>());
const UFFDIO_UNREGISTER: u64 = ioc(2, UFFDIO, 0x01, size_of::<UffdioRange>());
const UFFDIO_WAKE: u64 = ioc(2, UFFDIO, 0x02, size_of::<UffdioRange>());
const UFFDIO_COPY: u64 = iowr(UFFDIO, 0x03, size_of::<UffdioCopy>());
const UFFDIO_WRITEPROTECT: u64 = iowr(UFFDIO, 0x06, size_of::<UffdioWriteprotect>());
/// `_IO(0xAA, 0)` on `/dev/userfaultfd`.
const USERFAULTFD_IOC_NEW: u64 = ioc(0, UFFDIO, 0x00, 0);

/// One message read from a userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A page fault at `address` (`flags`: `UFFD_PAGEFAULT_FLAG_*`).
    Fault { address: usize, flags: u64 },
    /// `[start, end)` was discarded (`features::EVENT_REMOVE`): it reads as
    /// zeros, or as the file's bytes, from now on.
    Removed { start: usize, end: usize },
}

/// Whether a fault's flags say it is a write-protect fault.
pub fn is_wp_fault(flags: u64) -> bool {
    flags & UFFD_PAGEFAULT_FLAG_WP != 0
}

/// How the uffd was opened: whether kernel-mode accesses fault to it too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UffdMode {
    /// Only user-space faults are reported (works without privilege).
    UserOnly,
    /// User and kernel faults are reported (needs privilege).
    All,
}

/// An open userfaultfd.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
}

impl Uffd {
    /// Open a non-blocking userfaultfd: through the syscall, or through
    /// `/dev/userfaultfd` where the syscall is refused (unprivileged and
    /// `vm.unprivileged_userfaultfd = 0`).
    pub fn open(mode: UffdMode) -> io::Result<Uffd> {
        let flags = libc::O_CLOEXEC
            | libc::O_NONBLOCK
            | match mode {
                UffdMode::UserOnly => UFFD_USER_MODE_ONLY,
                UffdMode::All => 0,
            };
        // SAFETY: plain syscall with integer flags.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        let fd = if fd >= 0 {
            fd as libc::c_int
        } else {
            let syscall_err = io::Error::last_os_error();
            let dev = match File::options()
                .read(true)
                .write(true)
                .open("/dev/userfaultfd")
            {
                Ok(dev) => dev,
                Err(_) => return Err(syscall_err),
            };
            // SAFETY: USERFAULTFD_IOC_NEW takes the flags as its integer argument.
            let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            fd
        };
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        Ok(Uffd {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// UFFDIO_API handshake asking for `features`; returns the features the
    /// kernel offers. May be called once per fd: probe on a throwaway fd.
    pub fn api(&self, features: u64) -> io::Result<u64> {
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: `api` is a valid, writable uffdio_api for the ioctl's duration.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_API as _, &mut api) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(api.features)
    }

    /// Register `[start, start + len)` for write-protect tracking.
    pub fn register_wp(&self, start: usize, len: usize) -> io::Result<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: start as u64,
                len: len as u64,
            },
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: `reg` is valid for the ioctl; the kernel checks the range.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER as _, &mut reg) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Register `[start, start + len)` for missing-page faults: a touch of
    /// a page that is not there blocks until [`copy`](Self::copy) places it.
    pub fn register_missing(&self, start: usize, len: usize) -> io::Result<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: start as u64,
                len: len as u64,
            },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: `reg` is valid for the ioctl; the kernel checks the range.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER as _, &mut reg) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Stop handling faults in `[start, start + len)`; missing pages read
    /// as zeros again.
    pub fn unregister(&self, start: usize, len: usize) -> io::Result<()> {
        let mut range = UffdioRange {
            start: start as u64,
            len: len as u64,
        };
        // SAFETY: `range` is valid for the ioctl; the kernel checks it.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER as _, &mut range) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Place `src` atomically at `dst` (page-aligned, a whole number of the
    /// region's pages, all missing) and wake the threads waiting on them.
    /// `Ok(false)`: a page was already there (nothing copied past it); the
    /// waiters are woken anyway.
    pub fn copy(&self, dst: usize, src: &[u8]) -> io::Result<bool> {
        let mut at = 0;
        while at < src.len() {
            let done = self.copy_prefix(dst + at, &src[at..])?;
            if done == 0 {
                self.wake(dst + at, src.len() - at)?;
                return Ok(false);
            }
            at += done;
        }
        Ok(true)
    }

    /// Place the missing pages at the start of `src` at `dst` (page-aligned,
    /// a whole number of the region's pages) in one call and wake their
    /// waiters: the bytes placed. Fewer than `src.len()` when the page after
    /// them was already there (0: the first one was; its waiters are not
    /// woken here) or the call was cut short; the caller goes on from there.
    pub fn copy_prefix(&self, dst: usize, src: &[u8]) -> io::Result<usize> {
        loop {
            let mut c = UffdioCopy {
                dst: dst as u64,
                src: src.as_ptr() as u64,
                len: src.len() as u64,
                mode: 0,
                copy: 0,
            };
            // SAFETY: `src` is readable for its length for the ioctl's
            // duration; the kernel checks `dst` against the registered
            // ranges and writes only missing pages there.
            let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY as _, &mut c) };
            if rc == 0 {
                return Ok(src.len());
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                // The mm changed under us (fork, remap): try again.
                Some(libc::EAGAIN) if c.copy <= 0 => continue,
                // Part landed (and was woken): the kernel stopped at a page
                // it could not fill, which the next call names.
                Some(libc::EAGAIN) => return Ok(c.copy as usize),
                Some(libc::EEXIST) => return Ok(0),
                _ => return Err(err),
            }
        }
    }

    /// Wait until an event is pending or `timeout_ms` passed; whether one is.
    pub fn wait(&self, timeout_ms: libc::c_int) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the call's duration.
        let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::EINTR) => Ok(false),
                _ => Err(err),
            };
        }
        Ok(rc > 0)
    }

    /// Wake the threads blocked on faults in `[start, start + len)`.
    pub fn wake(&self, start: usize, len: usize) -> io::Result<()> {
        let mut range = UffdioRange {
            start: start as u64,
            len: len as u64,
        };
        // SAFETY: `range` is valid for the ioctl; the kernel checks it.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE as _, &mut range) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Read one pending event: `Some(address)` for a missing-page fault,
    /// `None` when nothing is pending. Other events are skipped.
    pub fn next_missing_fault(&self) -> io::Result<Option<usize>> {
        self.next_fault(|flags| flags & UFFD_PAGEFAULT_FLAG_WP == 0)
    }

    /// Write-protect (`protect`) or un-protect a range. Un-protecting wakes
    /// threads blocked on a write fault in the range. Retries while the
    /// kernel says `EAGAIN`: only for a uffd without removal events, or
    /// whose events another thread reads (see [`try_write_protect`](Self::try_write_protect)).
    pub fn write_protect(&self, start: usize, len: usize, protect: bool) -> io::Result<()> {
        loop {
            match self.try_write_protect(start, len, protect) {
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {}
                other => return other,
            }
        }
    }

    /// [`write_protect`](Self::write_protect) once: `EAGAIN` when the
    /// address space is changing (a fork, a THP split) or, with
    /// `EVENT_REMOVE`, while a removal event is unread (the discarding
    /// thread waits for that read): the reader must read it before a retry
    /// can succeed.
    pub fn try_write_protect(&self, start: usize, len: usize, protect: bool) -> io::Result<()> {
        let mut wp = UffdioWriteprotect {
            range: UffdioRange {
                start: start as u64,
                len: len as u64,
            },
            mode: if protect {
                UFFDIO_WRITEPROTECT_MODE_WP
            } else {
                0
            },
        };
        // SAFETY: `wp` is valid for the ioctl; the kernel checks the range.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WRITEPROTECT as _, &mut wp) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// The next page fault whose flags `wanted` accepts.
    fn next_fault(&self, wanted: impl Fn(u64) -> bool) -> io::Result<Option<usize>> {
        loop {
            match self.next_event()? {
                None => return Ok(None),
                Some(Event::Fault { address, flags }) if wanted(flags) => return Ok(Some(address)),
                Some(_) => {}
            }
        }
    }

    /// Read one pending message: `None` when nothing is pending. Messages
    /// other than page faults and removals are skipped.
    pub fn next_event(&self) -> io::Result<Option<Event>> {
        loop {
            let mut msg = UffdMsg::default();
            // SAFETY: reading at most one `uffd_msg` into a buffer of that size.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    (&mut msg as *mut UffdMsg).cast(),
                    size_of::<UffdMsg>(),
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                return match err.raw_os_error() {
                    Some(libc::EAGAIN) => Ok(None),
                    Some(libc::EINTR) => continue,
                    _ => Err(err),
                };
            }
            if n as usize != size_of::<UffdMsg>() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("short userfaultfd message: {n} bytes"),
                ));
            }
            match msg.event {
                UFFD_EVENT_PAGEFAULT => {
                    return Ok(Some(Event::Fault {
                        address: msg.address as usize,
                        flags: msg.flags,
                    }));
                }
                UFFD_EVENT_REMOVE => {
                    return Ok(Some(Event::Removed {
                        start: msg.flags as usize,
                        end: msg.address as usize,
                    }));
                }
                _ => {}
            }
        }
    }

    /// The raw descriptor, for poll(2).
    pub fn raw_fd(&self) -> libc::c_int {
        self.fd.as_raw_fd()
    }
}

/// `struct page_region`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct PageRegion {
    /// Start address.
    pub start: u64,
    /// End address (exclusive).
    pub end: u64,
    /// Categories (the `return_mask` subset).
    pub categories: u64,
}

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

const PAGEMAP_SCAN: u64 = iowr(b'f', 16, size_of::<PmScanArg>());
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
const PAGE_IS_WRITTEN: u64 = 1 << 1;
const PAGE_IS_PRESENT: u64 = 1 << 3;

/// `/proc/self/pagemap`, for the `PAGEMAP_SCAN` ioctl.
#[derive(Debug)]
pub struct Pagemap {
    file: File,
    vec: Vec<PageRegion>,
}

impl Pagemap {
    /// Open this process's pagemap with room for `vec_len` regions per call.
    pub fn open(vec_len: usize) -> io::Result<Pagemap> {
        Ok(Pagemap {
            file: File::open("/proc/self/pagemap")?,
            vec: vec![PageRegion::default(); vec_len.max(1)],
        })
    }

    /// Whether the kernel has `PAGEMAP_SCAN` (Linux ≥ 6.7).
    pub fn scan_supported(&mut self) -> io::Result<bool> {
        let probe = vec![0u8; 4096];
        let start = probe.as_ptr() as u64 & !4095;
        let res = self.ioctl(0, start, start + 4096, 0, PAGE_IS_PRESENT);
        match res {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOTTY) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Report every written (not write-protected) range in `[start, end)`
    /// to `found`, re-protecting each atomically as it is reported: the
    /// get-and-clear of the async write-protect tracker.
    pub fn harvest_written(
        &mut self,
        start: usize,
        end: usize,
        found: impl FnMut(usize, usize),
    ) -> io::Result<()> {
        let flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC;
        self.scan(flags, PAGE_IS_WRITTEN, start, end, found)
    }

    /// Report every range of `[start, end)` this process's page tables map
    /// (present pages) to `found`, changing nothing.
    pub fn present(
        &mut self,
        start: usize,
        end: usize,
        found: impl FnMut(usize, usize),
    ) -> io::Result<()> {
        self.scan(0, PAGE_IS_PRESENT, start, end, found)
    }

    /// Every range of `[start, end)` in `category` to `found`, as many
    /// calls as the vector needs.
    fn scan(
        &mut self,
        flags: u64,
        category: u64,
        start: usize,
        end: usize,
        mut found: impl FnMut(usize, usize),
    ) -> io::Result<()> {
        let end = end as u64;
        let mut next = start as u64;
        while next < end {
            let (n, walk_end) = self.ioctl(flags, next, end, category, category)?;
            for r in &self.vec[..n] {
                found(r.start as usize, r.end as usize);
            }
            if n < self.vec.len() {
                break;
            }
            // A full vector: resume after the last region. On 6.18 `walk_end`
            // can come back short of `end` although the walk finished, so
            // never resume before what was already returned.
            next = walk_end.max(self.vec[n - 1].end);
        }
        Ok(())
    }

    fn ioctl(
        &mut self,
        flags: u64,
        start: u64,
        end: u64,
        category_mask: u64,
        return_mask: u64,
    ) -> io::Result<(usize, u64)> {
        let mut arg = PmScanArg {
            size: size_of::<PmScanArg>() as u64,
            flags,
            start,
            end,
            vec: self.vec.as_mut_ptr() as u64,
            vec_len: self.vec.len() as u64,
            category_mask,
            return_mask,
            ..Default::default()
        };
        loop {
            // SAFETY: `arg` is a valid pm_scan_arg whose `vec` points at
            // `vec_len` writable page_region entries owned by `self`.
            let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), PAGEMAP_SCAN as _, &mut arg) };
            if rc >= 0 {
                return Ok((rc as usize, arg.walk_end));
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EINTR) {
                return Err(err);
            }
        }
    }
}

/// Whether `path` lies on tmpfs or hugetlbfs (shared memory, which
/// userfaultfd write-protects only with `WP_HUGETLBFS_SHMEM`).
pub fn is_shmem(path: &std::path::Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs into a zeroed struct with a valid C path.
    unsafe {
        let mut s: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut s) == 0
            && (s.f_type == libc::TMPFS_MAGIC || s.f_type == libc::HUGETLBFS_MAGIC)
    }
}

/// Wait until `uffd` has a message or `stop` is readable; `Ok(true)` when
/// asked to stop.
pub fn wait_fault_or_stop(uffd: &Uffd, stop: libc::c_int) -> io::Result<bool> {
    let mut fds = [
        libc::pollfd {
            fd: uffd.raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfd.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc >= 0 {
            return Ok(fds[1].revents != 0);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(err);
        }
    }
}

/// An eventfd used to tell a handler thread to stop.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Signal an eventfd.
pub fn eventfd_signal(fd: &OwnedFd) -> io::Result<()> {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64.
    let n = unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    if n != 8 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The running kernel's release as (major, minor), for fallback reasons.
pub fn kernel_version() -> Option<(u32, u32)> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let mut parts = release.trim().split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}
