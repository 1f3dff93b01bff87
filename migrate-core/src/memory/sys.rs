//! The memory system calls, wrapped once: memfd creation, block
//! reservation, population, residency and the locked-memory limit. With
//! [`region`](super::region)'s pointer arithmetic, this is all the `unsafe`
//! of the memory module.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};

/// A new memfd named `name` (NULs replaced), close-on-exec, with `flags`.
pub(super) fn memfd_create(name: &str, flags: libc::c_uint) -> io::Result<File> {
    let name = CString::new(name.replace('\0', "_"))
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `name` is a valid C string; the call has no other inputs.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// The process's effective user id (the owner a guest memory file must have).
pub(super) fn effective_uid() -> u32 {
    // SAFETY: geteuid takes nothing and cannot fail.
    unsafe { libc::geteuid() }
}

/// Grow `file` to `len` with real blocks (posix_fallocate), so that ENOSPC is
/// an error now; falls back to a sparse `set_len` where the filesystem cannot
/// allocate ahead (EOPNOTSUPP).
pub(super) fn allocate(file: &File, len: u64) -> io::Result<()> {
    // SAFETY: valid fd, plain integer arguments.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) };
    match rc {
        0 => Ok(()),
        libc::EOPNOTSUPP | libc::EINVAL => file.set_len(len),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

/// `MADV_POPULATE_WRITE` (Linux ≥ 5.14) over `[start, start + len)`: every
/// page allocated and writable now, bytes unchanged (prefaulting a
/// destination, and the uffd-sync tracker on kernels without
/// `WP_UNPOPULATED`), reached through
/// [`GuestRegion::populate`](super::GuestRegion::populate).
pub(super) fn populate_write(start: usize, len: usize) -> io::Result<()> {
    populate(start, len, libc::MADV_POPULATE_WRITE)
}

/// `MADV_POPULATE_READ` (Linux ≥ 5.14) over `[start, start + len)`: every
/// page mapped readable now, in one call, bytes unchanged; reached through
/// [`GuestRegion::populate_read`](super::GuestRegion::populate_read).
pub(crate) fn populate_read(start: usize, len: usize) -> io::Result<()> {
    populate(start, len, libc::MADV_POPULATE_READ)
}

fn populate(start: usize, len: usize, advice: libc::c_int) -> io::Result<()> {
    // SAFETY: populating changes no byte and no mapping; on a range that is
    // not mapped the kernel answers ENOMEM instead of touching anything.
    let rc = unsafe { libc::madvise(start as *mut libc::c_void, len, advice) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Give the pages of `[start, start + len)` back: a later touch finds them
/// missing (zeros, or a userfaultfd fault). Shared memory (memfd, tmpfs or
/// hugetlbfs files) loses its blocks (`MADV_REMOVE`); private memory its
/// pages (`MADV_DONTNEED`).
pub(super) fn discard(start: usize, len: usize, shared: bool) -> io::Result<()> {
    let advice = if shared {
        libc::MADV_REMOVE
    } else {
        libc::MADV_DONTNEED
    };
    // SAFETY: the range lies inside a mapping the caller owns; dropping
    // its pages changes their bytes (to zeros or to "missing"), never the
    // mapping, and the caller wants exactly that.
    let rc = unsafe { libc::madvise(start as *mut libc::c_void, len, advice) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Bytes of `[start, start + len)` resident in RAM (`mincore`).
pub(super) fn resident_bytes(start: usize, len: usize) -> io::Result<u64> {
    let vec = resident_pages(start, len)?;
    Ok(vec.iter().filter(|&&b| b & 1 != 0).count() as u64 * base_page_size() as u64)
}

fn base_page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as usize
}

/// One byte per base page of `[start, start + len)`, bit 0 set where the
/// page is resident (`mincore`; for a shared file mapping: the file holds
/// the page in memory).
pub(super) fn resident_pages(start: usize, len: usize) -> io::Result<Vec<u8>> {
    let mut vec = vec![0u8; len.div_ceil(base_page_size())];
    // SAFETY: `vec` holds one byte per page of the range; the kernel checks
    // the range itself (ENOMEM when unmapped).
    let rc = unsafe { libc::mincore(start as *mut libc::c_void, len, vec.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(vec)
}

/// How many bytes this process may lock (pin) in RAM: `None` when it is not
/// limited (unlimited `RLIMIT_MEMLOCK`, or root, which has CAP_IPC_LOCK), or
/// when the limit cannot be read.
pub fn lockable_bytes() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } != 0 {
        return None;
    }
    // SAFETY: plain syscall without arguments.
    let root = unsafe { libc::geteuid() } == 0;
    (!root && lim.rlim_cur != libc::RLIM_INFINITY).then_some(lim.rlim_cur)
}

/// Whether `file` holds no data at all: empty, or only holes (`SEEK_DATA`
/// from offset 0 fails with `ENXIO`), so every byte of it reads as zero.
/// A filesystem that cannot answer counts as holding data.
pub fn file_reads_zero(file: &File) -> bool {
    if file.metadata().is_ok_and(|m| m.len() == 0) {
        return true;
    }
    // SAFETY: lseek on a descriptor `file` keeps open; no memory involved.
    let r = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_DATA) };
    r < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO)
}

/// The byte ranges of `file`'s first `len` bytes that may hold data, in
/// order (`SEEK_DATA` / `SEEK_HOLE`): everything else is a hole, which
/// reads as zeros and takes no memory until written. `None` unless the
/// file lives in shared memory (tmpfs, a memfd): the only memory a read
/// of a hole allocates for good, and a file system that answers from the
/// pages themselves (a page swapped out counts as data) — a FUSE server,
/// say, might not know of pages written through a mapping and not yet
/// written back. The file is reopened for the lookup, so the offset it
/// shares with every copy of its descriptor does not move.
pub(super) fn data_ranges(file: &File, len: u64) -> io::Result<Option<Vec<std::ops::Range<u64>>>> {
    const TMPFS_MAGIC: libc::c_long = 0x0102_1994;
    // SAFETY: `statfs` is plain integers, for which all zeros is valid.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs fills the struct we pass; the descriptor is open.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if st.f_type as libc::c_long != TMPFS_MAGIC {
        return Ok(None);
    }
    let own = File::open(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
    let fd = own.as_raw_fd();
    let seek = |from: u64, whence| -> io::Result<Option<u64>> {
        // SAFETY: lseek on a descriptor `own` keeps open; no memory involved.
        let r = unsafe { libc::lseek(fd, from as libc::off_t, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = io::Error::last_os_error();
        // ENXIO: no data at or after `from` (or `from` past the end).
        if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        }
    };
    let mut out = Vec::new();
    let mut at = 0;
    while at < len {
        let Some(start) = seek(at, libc::SEEK_DATA)? else {
            break;
        };
        if start >= len {
            break;
        }
        let end = seek(start, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        // A hole never starts where data does; guard against a kernel
        // that says so anyway rather than loop.
        let end = end.max(start + 1);
        out.push(start..end);
        at = end;
    }
    Ok(Some(out))
}
