//! Why a migration failed: the engine's error, on the ground floor.
//!
//! Every layer below has its own error, which this one wraps: memory
//! ([`LayoutMismatch`]), dirty tracking ([`DirtyError`]), the protocol
//! ([`ProtocolError`]), a transport ([`TransportError`]), the VMM
//! ([`VmError`]). Each end has its own: an outgoing migration (the
//! source) fails with a [`MigrationError`], an incoming one (the
//! destination, [`IncomingMigration`](crate::IncomingMigration)) with an
//! [`IncomingError`]; what only one end can meet (a commit left
//! unacknowledged, tracking before bind, a verification) is only in its
//! enum.

use std::time::Duration;

use crate::dirty::DirtyError;
use crate::memory::{LayoutMismatch, MemoryError};
use crate::protocol::{ProtocolError, RefusalCode};
use crate::transport::TransportError;
use crate::vm::VmError;

/// Why an outgoing migration (the source's) failed. Unless it is
/// [`MigrationError::CommitUnknown`] or
/// [`MigrationError::PostcopyInterrupted`], the source guest is running
/// when the source sees this.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrationError {
    /// The transport broke (dead peer, cut link, timeout).
    #[error("transport: {0}")]
    Transport(#[from] TransportError),
    /// The peer sent something that breaks the protocol.
    #[error("protocol: {0}")]
    Protocol(#[from] ProtocolError),
    /// The destination refused (version, layout, setup, device state).
    #[error("destination refused ({code:?}): {message}")]
    Refused {
        /// Category.
        code: RefusalCode,
        /// The destination's reason.
        message: String,
    },
    /// The destination's memory layout differs from the source's.
    #[error("memory layout mismatch: {0}")]
    Layout(#[from] LayoutMismatch),
    /// The peer aborted.
    #[error("peer aborted: {reason}")]
    PeerAborted {
        /// The peer's reason.
        reason: String,
    },
    /// Cancelled through a [`MigrationHandle`](crate::MigrationHandle).
    #[error("migration cancelled")]
    Cancelled,
    /// The overall timeout expired (policy: cancel).
    #[error("migration timed out after {0:?}")]
    Timeout(Duration),
    /// A kernel dirty tracker was tracking the memory before it was bound
    /// to the transport ([`SourceMigration::bind`](crate::SourceMigration::bind)
    /// comes first): nothing was sent, the guest runs on.
    #[error(
        "dirty tracking started before the memory was bound to the transport: bind first \
         (SourceMigration::bind), then start tracking, then run"
    )]
    TrackedBeforeBind,
    /// The VMM failed to pause, resume, save or load.
    #[error("VMM: {0}")]
    Vm(#[from] VmError),
    /// Memory the engine needs of its own (a protected guest's shadow)
    /// could not be had.
    #[error("memory: {0}")]
    Memory(#[from] MemoryError),
    /// Dirty tracking failed.
    #[error("dirty tracking: {0}")]
    Dirty(#[from] DirtyError),
    /// The VMM discarded guest memory (a balloon) while the transport read
    /// it from a registered, pinned copy (RDMA): the discarded pages' old
    /// bytes would have gone. The source guest runs on.
    #[error(
        "{pages} guest pages were discarded (a balloon) while the memory was registered for \
         RDMA, which would send their old bytes: stop discards for an RDMA migration (as QEMU \
         does), or migrate over TCP"
    )]
    DiscardedWhilePinned {
        /// Pages discarded, as the tracker counted them.
        pages: u64,
    },
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
    /// The engine asked itself for a step its phase does not allow: a bug
    /// in this library, reported instead of a panic. The guest is handled
    /// as for any failure in that phase.
    #[error("engine bug: {0}")]
    EngineBug(String),
    /// Commit was sent but its acknowledgement never came. The source guest
    /// stays paused: the destination may be running it.
    #[error(
        "commit sent but not acknowledged ({0}); the source guest stays paused: \
         check whether the destination runs it before resuming"
    )]
    CommitUnknown(Box<MigrationError>),
    /// The connection broke during post-copy: the destination runs the
    /// guest but lacks some of its pages, which only the source holds. The
    /// source guest stays paused and its memory intact.
    #[error(
        "post-copy interrupted ({0}): the destination runs the guest without all of its \
         pages; the source keeps its paused guest and memory"
    )]
    PostcopyInterrupted(Box<MigrationError>),
}

/// Why an incoming migration (the destination's) failed. Nothing was
/// resumed here unless it is [`IncomingError::PostcopyInterrupted`]: the
/// memory received is to be discarded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IncomingError {
    /// The transport broke (dead peer, cut link, timeout).
    #[error("transport: {0}")]
    Transport(#[from] TransportError),
    /// The source sent something that breaks the protocol.
    #[error("protocol: {0}")]
    Protocol(#[from] ProtocolError),
    /// This end refused the source (version, layout, set-up, device state)
    /// and told it so.
    #[error("refused the source ({code:?}): {message}")]
    Refused {
        /// Category, as sent.
        code: RefusalCode,
        /// The reason, as sent.
        message: String,
    },
    /// The source's memory layout differs from this end's.
    #[error("memory layout mismatch: {0}")]
    Layout(#[from] LayoutMismatch),
    /// The source aborted (it was cancelled, timed out or failed).
    #[error("source aborted: {reason}")]
    PeerAborted {
        /// The source's reason.
        reason: String,
    },
    /// Cancelled through an [`IncomingHandle`](crate::IncomingHandle).
    #[error("migration cancelled")]
    Cancelled,
    /// The VMM failed to load the device state or resume the guest.
    #[error("VMM: {0}")]
    Vm(#[from] VmError),
    /// Memory the engine needs of its own (a standby's staging area) could
    /// not be had.
    #[error("memory: {0}")]
    Memory(#[from] MemoryError),
    /// The connection broke during post-copy: the guest runs here without
    /// all of its pages, which only the source holds.
    #[error(
        "post-copy interrupted ({0}): the guest runs here without all of its pages; \
         the source keeps its paused guest and memory"
    )]
    PostcopyInterrupted(Box<IncomingError>),
}

/// What either end's error can say about the control channel: the peer's
/// abort or refusal and a local cancel (the control helpers are shared).
pub(crate) trait ControlFailure: From<TransportError> + From<ProtocolError> {
    /// The peer sent `Abort`.
    fn aborted(reason: String) -> Self;
    /// The peer sent `Refused`.
    fn refused(code: RefusalCode, message: String) -> Self;
    /// This end was cancelled while it waited.
    fn cancelled() -> Self;
}

impl ControlFailure for MigrationError {
    fn aborted(reason: String) -> Self {
        Self::PeerAborted { reason }
    }
    fn refused(code: RefusalCode, message: String) -> Self {
        Self::Refused { code, message }
    }
    fn cancelled() -> Self {
        Self::Cancelled
    }
}

impl ControlFailure for IncomingError {
    fn aborted(reason: String) -> Self {
        Self::PeerAborted { reason }
    }
    fn refused(code: RefusalCode, message: String) -> Self {
        Self::Refused { code, message }
    }
    fn cancelled() -> Self {
        Self::Cancelled
    }
}
