//! Core of the live-migration engine: the guest's memory as the VMM mapped it,
//! and the dirty-page trackers that tell the pre-copy scheduler what changed.
//!
//! The data path reads top to bottom: [`memory`] (guest regions mapped into
//! this process) → [`dirty`] (which pages were written since the last harvest).
//! Scheduler, protocol and transports build on these two seams.
//!
//! ```
//! use migrate_core::memory::{GuestMemory, GuestRegion};
//! use migrate_core::dirty::{DirtyLog, DirtyTracker, DirtyTracking, TrackerPreference};
//!
//! // 4 MiB of anonymous guest memory at guest-physical address 0.
//! let mem = GuestMemory::new(vec![GuestRegion::anonymous(0, 4 << 20)?])?;
//! // Best tracker this kernel offers for this memory, plus the software bitmap.
//! let tracking = DirtyTracking::new(&mem, TrackerPreference::Best)?;
//! mem.write(0x2000, b"vCPU writes")?;
//! let mut log = DirtyLog::new(&mem);
//! tracking.harvest(&mut log)?;
//! assert!(log.is_dirty(0, 2));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod dirty;
pub mod memory;
