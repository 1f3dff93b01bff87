//! RDMA transport for live migration: one-sided RDMA WRITE from the source's
//! guest memory straight into the destination's pre-registered guest memory.
//!
//! - The destination registers every guest-memory region for remote write
//!   before the first page ("pin-all"; registration is setup time) and sends
//!   each region's address and rkey; the MRs are deregistered when the
//!   migration ends ([`RdmaDestination::finish`], or drop).
//! - The source registers its guest memory once, when the engine binds it
//!   (`SourceMigration::bind`, before dirty tracking starts) and posts WRITEs straight from guest
//!   pages: contiguous dirty pages coalesce into one work request (up to
//!   [`RdmaConfig::max_write`]), chains of 16 (2 MiB at most) with only the
//!   last signaled, 16 chains a post (one `ibv_post_send`), a bounded
//!   number of chains in flight, over one or more RC queue pairs.
//! - Each round ends with a zero-length WRITE_WITH_IMM(round) per queue pair:
//!   when the destination sees it, every WRITE before it has landed. Zero
//!   pages are not written: their ranges go on the control channel
//!   (`ZeroPages`) and the destination zeroes them.
//! - Control (handshake, layout, queue pairs, rounds, device state, commit)
//!   runs over TCP with the shared protocol; RDMA CM is not used (it does not
//!   work over `lo` with rxe). When either side has no RDMA device, the same
//!   connection carries the pages over TCP instead, with the reason stated.
//!
//! [`verbs`] holds every unsafe verbs call behind a safe API; the rest of
//! the crate is safe Rust (`unsafe_code` is denied outside `verbs`).

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]
#![deny(unsafe_code)]

mod destination;
pub mod gid;
mod postcopy;
mod source;
#[allow(unsafe_code)]
pub mod verbs;

use std::sync::Arc;

use migrate_core::memory::GuestMemory;
use migrate_core::protocol::QpEndpoint;
use migrate_core::transport::TransportError;
use transport_tcp::TcpConfig;

pub use destination::{RdmaDestination, RdmaMigrationListener};
pub use source::RdmaSource;

/// Knobs of the RDMA transport.
#[derive(Debug, Clone, PartialEq)]
pub struct RdmaConfig {
    /// The control connection (and the TCP fallback, with its own
    /// `data_streams`).
    pub tcp: TcpConfig,
    /// RDMA queue pairs (data streams over RDMA).
    pub queue_pairs: u16,
    /// RDMA device name (`None`: the first one).
    pub device: Option<String>,
    /// GID index (`None`: the IPv4-mapped GID of the control connection's
    /// local address, else the first IPv4-mapped one).
    pub gid_index: Option<u32>,
    /// How every queue pair marks its packets (traffic class, service
    /// level); the control connection's DSCP is `tcp.dscp`.
    pub marking: verbs::Marking,
    /// Largest single WRITE, bytes.
    pub max_write: u32,
    /// Fail instead of falling back to TCP when RDMA is not there.
    pub require: bool,
    /// Source: register the guest memory for remote read as well, so that
    /// in post-copy the destination reads the pages its guest faults on by
    /// RDMA READ (the keys go to it only at the switch to post-copy, over
    /// the authenticated control connection). Set it with post-copy on.
    pub postcopy_reads: bool,
}

impl Default for RdmaConfig {
    fn default() -> Self {
        Self {
            tcp: TcpConfig::default(),
            // Two queue pairs: measured faster than one over SoftRoCE in the
            // emulated VM (README, RDMA section).
            queue_pairs: 2,
            device: None,
            gid_index: None,
            marking: verbs::Marking::default(),
            max_write: 1 << 20,
            require: true,
            postcopy_reads: false,
        }
    }
}

pub(crate) fn rdma_err(e: verbs::VerbsError) -> TransportError {
    TransportError::Unavailable {
        reason: e.to_string(),
    }
}

pub(crate) fn endpoint_to_wire(e: &verbs::Endpoint) -> QpEndpoint {
    QpEndpoint {
        qpn: e.qpn,
        psn: e.psn,
        gid: e.gid,
    }
}

pub(crate) fn wire_to_endpoint(e: &QpEndpoint) -> verbs::Endpoint {
    verbs::Endpoint {
        qpn: e.qpn,
        psn: e.psn,
        gid: e.gid,
    }
}

/// Refuse up front, with the numbers, when RLIMIT_MEMLOCK cannot cover the
/// guest (instead of a late ENOMEM from the device). Root with CAP_IPC_LOCK
/// is not limited.
pub(crate) fn check_memlock(needed: u64) -> Result<(), TransportError> {
    match migrate_core::memory::lockable_bytes() {
        Some(limit) if limit < needed => Err(TransportError::Unavailable {
            reason: format!(
                "RLIMIT_MEMLOCK is {limit} bytes but registering the guest memory needs {needed}: \
                 raise it (`ulimit -l unlimited`, or LimitMEMLOCK=infinity for a systemd unit)"
            ),
        }),
        _ => Ok(()),
    }
}

/// Register every region of `mem` with `dev`.
pub(crate) fn register_memory(
    dev: &verbs::Device,
    mem: &Arc<GuestMemory>,
    remote_write: bool,
) -> Result<verbs::RegisteredMemory, TransportError> {
    dev.register(mem, remote_write).map_err(rdma_err)
}
