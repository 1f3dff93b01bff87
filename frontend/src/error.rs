//! Why a command could not start.

use std::path::PathBuf;

use migrate_core::transport::TransportError;
use transport_tcp::TlsError;

/// A set-up error: an option, a credential or a path that cannot work.
/// Nothing was sent when a front end reports one (exit status 2).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SetupError {
    /// An option's value cannot work here (the message names the option
    /// and says why).
    #[error("{0}")]
    Option(String),
    /// The credentials an option names cannot be used.
    #[error("{option}: {source}")]
    Credentials {
        /// `--tls-dir` or `--psk-file`.
        option: &'static str,
        /// What is wrong with them.
        source: TlsError,
    },
    /// Plaintext off loopback without `--insecure`.
    #[error(
        "refusing to {what} {addr} without authentication: give --tls-dir DIR (mutual TLS) or \
         --psk-file FILE (pre-shared key), or --insecure on an isolated test network"
    )]
    Unauthenticated {
        /// `send a guest's memory to` or `listen on`.
        what: &'static str,
        /// The address.
        addr: String,
    },
    /// A transport could not be set up (bind, connect, no device).
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// An output file (report, event log) cannot be written safely.
    #[error("{}: {detail}", path.display())]
    Output {
        /// The file.
        path: PathBuf,
        /// Why not.
        detail: String,
        /// The system's error, if one.
        #[source]
        source: Option<std::io::Error>,
    },
}
