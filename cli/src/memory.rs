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

/// Whether `--memory-file` names something that exists (a file, or a
/// link [`from_args`] will refuse): memory that is not new.
pub fn existing_file(m: &MemoryArgs) -> bool {
    m.memory_file
        .as_ref()
        .is_some_and(|p| p.symlink_metadata().is_ok())
}

/// Whether the memory [`from_args`] makes of `m` will read as zeros
/// everywhere (ask before making it): anonymous memory, a file it creates,
/// or a file without data (all holes, e.g. made by `truncate -s`).
pub fn reads_zero(m: &MemoryArgs) -> bool {
    let Some(path) = &m.memory_file else {
        return m.memory.is_some();
    };
    match std::fs::File::open(path) {
        Ok(file) => migrate_core::memory::file_reads_zero(&file),
        // Created by `from_args`.
        Err(_) => !path.exists(),
    }
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
    migrate_guests::procfs::bytes_field("/proc/meminfo", "MemAvailable").unwrap_or(u64::MAX)
}

fn to_len(size: u64) -> Result<usize> {
    if size == 0 {
        bail!("guest memory size is zero");
    }
    usize::try_from(size).context("guest memory size does not fit this machine")
}
