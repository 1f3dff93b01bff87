//! TCP transport: one control connection and several data connections
//! (like QEMU's multifd and Cloud Hypervisor's `connections`).
//!
//! Pages leave the source's guest memory by vectored writes straight from the
//! mapping (no copy into a send buffer) and land in the destination's guest
//! memory by reads straight into the mapping. Optional zstd compression of
//! page batches trades CPU for bytes on slow links (it copies, by nature).
//!
//! ```no_run
//! use std::sync::Arc;
//! use migrate_core::memory::{GuestMemory, GuestRegion};
//! use transport_tcp::{TcpConfig, TcpSource};
//!
//! let mem = Arc::new(GuestMemory::new(vec![GuestRegion::anonymous(0, 64 << 20)?])?);
//! let mut transport = TcpSource::connect("192.0.2.7:4444", TcpConfig::default())?;
//! // … SourceMigration::new(config).bind(&mut transport, &mem)?, then start
//! // dirty tracking, then .run(&tracker, &mut vm)
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]
#![deny(unsafe_code)]

mod accept;
mod addr;
mod conn;
mod control;
mod destination;
mod fetch;
mod handshake;
mod ktls;
mod local_peer;
mod mark;
pub mod pki;
mod record;
/// Entry points for the fuzz targets (`fuzz/`); not an API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::record::fuzz as tls_records;
}
mod source;
#[allow(unsafe_code)]
mod sys;
mod tls;

use std::time::Duration;

pub use addr::is_loopback;
pub use control::{KillSwitch, TcpControl};
pub use destination::{TcpDestination, TcpMigrationListener};
pub use mark::MAX_DSCP;
pub use source::TcpSource;
pub use tls::{KernelTls, MIN_PSK_LEN, TlsConfig, TlsError};

/// Whether this kernel seals and opens TLS records itself (kTLS: the `tls`
/// module attaches to a connected loopback socket), for
/// [`KernelTls::Auto`] to use.
///
/// # Errors
/// Why not: the kernel's refusal (no `tls` module: "No such file or
/// directory"), or the loopback socket's error.
pub fn kernel_tls_support() -> std::io::Result<()> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let sock = std::net::TcpStream::connect(listener.local_addr()?)?;
    let _peer = listener.accept()?;
    sys::ktls_attach(&sock)
}

/// Data connections used when not told otherwise. Measured on the 2-core
/// machine this project is developed on (see BENCHMARKS.md): 2 streams beat 1
/// by keeping one core sending while the other checksums; 4 gained nothing.
pub const DEFAULT_DATA_STREAMS: u16 = 2;

/// Knobs of the TCP transport.
#[derive(Debug, Clone, PartialEq)]
pub struct TcpConfig {
    /// Data connections (≥ 1), each with its own sender and receiver thread.
    pub data_streams: u16,
    /// Offer zstd compression of page batches (used if the peer agrees).
    pub compress: bool,
    /// zstd level (1 is fast; higher levels rarely pay on a live link).
    pub compress_level: i32,
    /// Offer Sparse page runs: a 4 KiB page with at most 64 non-zero
    /// 8-byte words travels as those words (used if the peer agrees). On by
    /// default: testing a dense page stops at its 65th non-zero word.
    pub sparse: bool,
    /// How long the peer may send nothing at all (heartbeats included)
    /// before it counts as dead, and how long a single write, or a read
    /// inside a frame, may block. A data stream waits for its next frame
    /// as long as the control connection lives: a source may send no frame
    /// for a long time (pages the destination reads as zeros send none).
    pub io_timeout: Duration,
    /// How long connecting (and waiting for data streams to join) may take.
    pub connect_timeout: Duration,
    /// Mutual TLS (certificates or a pre-shared key) on every connection;
    /// `None` is plaintext, for loopback and isolated test networks only.
    pub tls: Option<TlsConfig>,
    /// Without `tls`, on loopback: take a peer process of any user. By
    /// default (`false`) the peer's socket must belong to this process's
    /// user or to root (the kernel says whose it is), so that on a shared
    /// host another user can neither push a guest into a destination nor
    /// pose as one; a peer of another user fails with
    /// [`TransportError::Auth`](migrate_core::transport::TransportError::Auth).
    pub any_local_user: bool,
    /// DSCP (0–63) of every connection's packets, control, data and
    /// resumed ones alike, from the first (SYN, SYN-ACK) on; `None` leaves
    /// the system's default (0).
    pub dscp: Option<u8>,
}

impl Default for TcpConfig {
    fn default() -> Self {
        Self {
            data_streams: DEFAULT_DATA_STREAMS,
            compress: false,
            compress_level: 1,
            sparse: true,
            io_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            tls: None,
            any_local_user: false,
            dscp: None,
        }
    }
}
