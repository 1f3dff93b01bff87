//! Core of the live-migration engine.
//!
//! The data path reads top to bottom: [`memory`] (guest regions mapped into
//! this process) → [`dirty`] (which pages were written since the last
//! harvest) → [`source`] (pre-copy rounds and switch-over) → [`protocol`]
//! (every message on the wire) → [`transport`] (the seam TCP and RDMA fill)
//! → [`destination`] (landing pages, commit). [`vm`] is the seam to the VMM.
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

#![deny(unsafe_code)]

mod cancel;
mod control;
pub mod destination;
pub mod dirty;
pub mod memory;
pub mod protocol;
pub mod source;
pub mod stats;
pub mod transport;
pub mod vm;

use std::time::Duration;

pub use cancel::CancelToken;
pub use destination::{DestinationReport, IncomingMigration};
pub use dirty::{DirtyTracker, DirtyTracking, TrackerPreference};
pub use memory::{GuestMemory, GuestRegion};
pub use source::{MigrationHandle, SourceConfig, SourceMigration, TimeoutPolicy};
pub use stats::{MigrationEvent, MigrationStats, MigrationStatus};
pub use transport::{DestinationTransport, SourceTransport};
pub use vm::{DestinationVm, SourceVm, VmError};

/// Why a migration failed. Unless it is [`MigrationError::CommitUnknown`],
/// the source guest is running when the source sees this.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrationError {
    /// The transport broke (dead peer, cut link, timeout).
    #[error("transport: {0}")]
    Transport(#[from] transport::TransportError),
    /// The peer sent something that breaks the protocol.
    #[error("protocol: {0}")]
    Protocol(#[from] protocol::ProtocolError),
    /// The destination refused (version, layout, setup, device state).
    #[error("destination refused ({code:?}): {message}")]
    Refused {
        /// Category.
        code: protocol::RefusalCode,
        /// The destination's reason.
        message: String,
    },
    /// The destination's memory layout differs from the source's.
    #[error("memory layout mismatch: {0}")]
    Layout(#[from] memory::LayoutMismatch),
    /// The peer aborted.
    #[error("peer aborted: {reason}")]
    PeerAborted {
        /// The peer's reason.
        reason: String,
    },
    /// Cancelled through a [`MigrationHandle`].
    #[error("migration cancelled")]
    Cancelled,
    /// The overall timeout expired (policy: cancel).
    #[error("migration timed out after {0:?}")]
    Timeout(Duration),
    /// The VMM failed to pause, resume, save or load.
    #[error("VMM: {0}")]
    Vm(#[from] vm::VmError),
    /// Dirty tracking failed.
    #[error("dirty tracking: {0}")]
    Dirty(#[from] dirty::DirtyError),
    /// Pages kept failing their check with the guest paused: corruption.
    #[error(
        "{pages} pages still failed their integrity check after {retries} re-sends with the guest paused"
    )]
    Integrity {
        /// Pages failing.
        pages: u64,
        /// Re-sends tried.
        retries: u32,
    },
    /// Verification found destination pages that differ from the source's.
    #[error("verification failed: {pages} pages differ (first: region {region} page {page})")]
    VerifyFailed {
        /// Pages that differ.
        pages: u64,
        /// Region of the first.
        region: usize,
        /// Page of the first.
        page: usize,
    },
    /// Commit was sent but its acknowledgement never came. The source guest
    /// stays paused: the destination may be running it.
    #[error(
        "commit sent but not acknowledged ({0}); the source guest stays paused: \
         check whether the destination runs it before resuming"
    )]
    CommitUnknown(Box<MigrationError>),
}
