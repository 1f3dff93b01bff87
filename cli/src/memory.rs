//! Guest memory from the command line, or adopted from the source's layout.

use anyhow::{Context, Result, bail};
use migrate_core::memory::{GuestMemory, GuestRegion, MemoryLayout, PageSize};

use crate::args::MemoryArgs;

/// The memory the arguments describe, if any.
pub fn from_args(m: &MemoryArgs) -> Result<Option<GuestMemory>> {
    let region = match (&m.memory_file, m.memory) {
        (Some(path), size) => {
            let size = match size {
                Some(s) => s,
                None => std::fs::metadata(path)
                    .with_context(|| format!("{}: give --memory to create it", path.display()))?
                    .len(),
            };
            GuestRegion::file(0, to_len(size)?, path)?
        }
        (None, Some(size)) => GuestRegion::anonymous(0, to_len(size)?)?,
        (None, None) => return Ok(None),
    };
    Ok(Some(GuestMemory::new(vec![region])?))
}

/// Whether the memory [`from_args`] makes of `m` will read as zeros
/// everywhere (ask before making it): anonymous memory, a file it creates,
/// or a file without data (all holes, e.g. made by `truncate -s`).
#[allow(unsafe_code)]
pub fn reads_zero(m: &MemoryArgs) -> bool {
    let Some(path) = &m.memory_file else {
        return m.memory.is_some();
    };
    let Ok(file) = std::fs::File::open(path) else {
        // Created by `from_args`.
        return !path.exists();
    };
    if file.metadata().map(|md| md.len() == 0).unwrap_or(false) {
        return true;
    }
    // SEEK_DATA from 0 fails with ENXIO when no byte of the file is data.
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on an open descriptor we own; no memory is involved.
    let r = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_DATA) };
    r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO)
}

/// Fresh memory shaped like `layout`: anonymous for 4 KiB regions, hugetlb
/// for 2 MiB ones; refused when it exceeds `max` bytes (nothing allocated).
pub fn adopt(layout: &MemoryLayout, max: u64) -> Result<GuestMemory> {
    let total = layout.total_bytes();
    if total > max {
        bail!(
            "the source's guest has {total} bytes of memory, more than this destination \
             accepts ({max} bytes: raise --max-memory)"
        );
    }
    let regions = layout
        .regions
        .iter()
        .map(|r| {
            let len = to_len(r.len)?;
            Ok(match r.page_size {
                PageSize::Small => GuestRegion::anonymous(r.gpa, len)?,
                PageSize::Huge2M => GuestRegion::hugetlb(r.gpa, len, "adopted")?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(GuestMemory::new(regions)?)
}

/// What `--max-memory` is when not given: the memory available now
/// (`MemAvailable`), or no limit when that cannot be read.
pub fn available() -> u64 {
    fixtures::procfs::bytes_field("/proc/meminfo", "MemAvailable").unwrap_or(u64::MAX)
}

fn to_len(size: u64) -> Result<usize> {
    if size == 0 {
        bail!("guest memory size is zero");
    }
    usize::try_from(size).context("guest memory size does not fit this machine")
}
