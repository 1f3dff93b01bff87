//! Why a transport failed.

use std::io;

use crate::protocol::ProtocolError;

/// Why a transport failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The peer sent something wrong, or the stream broke mid-frame.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// Could not reach the peer.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The address.
        addr: String,
        /// The OS error.
        source: io::Error,
    },
    /// A system call failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// The transport cannot run here (no device, no peer support).
    #[error("transport unavailable: {reason}")]
    Unavailable {
        /// Why.
        reason: String,
    },
    /// The migration was cancelled while the transport was busy.
    #[error("cancelled")]
    Cancelled,
    /// Nothing arrived from the peer, not even a heartbeat, for `secs`.
    #[error(
        "nothing from the peer for {secs:.1} s, not even a heartbeat: it is dead, frozen or cut off"
    )]
    PeerSilent {
        /// How long the peer was silent (the I/O timeout).
        secs: f64,
    },
    /// The peer could not be authenticated, or refused this end's
    /// credentials: nothing of the migration was exchanged with it.
    #[error("authentication failed: {detail}")]
    Auth {
        /// Who refused whom, and why.
        detail: String,
    },
    /// The data plane as a whole broke its contract: streams that did not
    /// join, a round no stream ended, a request outside what the peer
    /// offered.
    #[error("data plane: {detail}")]
    DataPlane {
        /// What happened.
        detail: String,
    },
    /// A connection this end stopped reading (its reader ended after the
    /// failure it reported, or it was handed over): no new error from the
    /// peer behind it.
    #[error("{what} closed")]
    Closed {
        /// Which connection.
        what: &'static str,
    },
    /// One data stream broke or misbehaved.
    #[error("data stream {stream}: {detail}")]
    Stream {
        /// Stream index.
        stream: u16,
        /// What happened.
        detail: String,
    },
}

impl TransportError {
    /// Whether this may pass if tried again later: the peer is unreachable
    /// or silent (a cut link, a rebooting switch), as opposed to refused
    /// (nothing listens: the process is gone), wrong, or unsupported.
    pub fn may_pass(&self) -> bool {
        match self {
            TransportError::Connect { source, .. } => {
                source.kind() != io::ErrorKind::ConnectionRefused
            }
            other => other.is_disconnect(),
        }
    }

    /// Whether a wait with a deadline ran out (nothing else went wrong).
    pub fn is_timeout(&self) -> bool {
        matches!(self, TransportError::Io { source, .. } if source.kind() == io::ErrorKind::TimedOut)
    }

    /// Whether the peer is gone (closed, reset, timed out) rather than wrong.
    pub fn is_disconnect(&self) -> bool {
        match self {
            TransportError::Protocol(p) => p.is_disconnect(),
            TransportError::Io { source, .. } => crate::protocol::is_disconnect_kind(source.kind()),
            TransportError::PeerSilent { .. } => true,
            _ => false,
        }
    }
}
