//! The witness over the network: `migrate-cli witness` serves claims,
//! [`NetWitness`] asks it (a protection's primary or standby).

use std::sync::Arc;

use migrate_core::mirror::witness::claim_over;
use migrate_core::mirror::{Claimant, NoWitness, RunRight, WitnessBook};
use migrate_core::transport::{SourceTransport, TransportError};
use transport_tcp::{TcpConfig, TcpMigrationListener, TcpSource, TlsConfig};

use crate::SetupError;
use crate::args::{TransportArgs, WitnessChoice};
use crate::security;

/// The witness the options name (`--witness`, asked with `tls`), or none
/// (`--no-witness`).
pub fn run_right(
    w: &WitnessChoice,
    t: &TransportArgs,
    tls: Option<TlsConfig>,
) -> Box<dyn RunRight> {
    match &w.witness {
        Some(addr) => Box::new(NetWitness::new(
            addr,
            crate::transport::tcp_config(t, false, tls),
        )),
        None => Box::new(NoWitness),
    }
}

/// One end of a protection: its I/O timeout becomes `failover_after_ms`
/// (the silence after which it counts the other end lost), and the
/// credentials it uses with the other end (`role`) and with the witness.
///
/// # Errors
/// [`SetupError`] as [`security::tls`].
pub fn protection_credentials(
    t: &mut TransportArgs,
    failover_after_ms: u64,
    role: &security::Role<'_>,
    w: &WitnessChoice,
) -> Result<(Option<TlsConfig>, Option<TlsConfig>), SetupError> {
    t.io_timeout = Some(std::time::Duration::from_millis(failover_after_ms.max(10)));
    Ok((security::tls(t, role)?, client_tls(w, t)?))
}

/// The credentials to ask the witness with: a client's, from the same
/// options (the same pre-shared key, or the `client-*.pem` of `--tls-dir`).
///
/// # Errors
/// [`SetupError`] as [`security::tls`] for a source.
pub fn client_tls(w: &WitnessChoice, t: &TransportArgs) -> Result<Option<TlsConfig>, SetupError> {
    let Some(addr) = &w.witness else {
        return Ok(None);
    };
    security::tls(
        t,
        &security::Role::Source {
            connect: addr,
            hostname: None,
        },
    )
}

/// Asks the witness at an address, over a connection authenticated as
/// every other (`cfg`'s TLS or pre-shared key; on loopback without them,
/// this user's processes only).
#[derive(Debug, Clone)]
pub struct NetWitness {
    addr: String,
    cfg: TcpConfig,
}

impl NetWitness {
    /// The witness at `addr` (host:port).
    pub fn new(addr: &str, cfg: TcpConfig) -> Self {
        Self {
            addr: addr.to_string(),
            cfg,
        }
    }
}

impl RunRight for NetWitness {
    fn claim(&mut self, session: u64, claimant: Claimant) -> Result<bool, TransportError> {
        let mut t = TcpSource::connect(&self.addr, self.cfg.clone())?;
        let granted = claim_over(t.control(), session, claimant)?;
        tracing::info!(
            claimant = claimant.name(),
            granted,
            witness = %self.addr,
            "the witness decided"
        );
        Ok(granted)
    }
}

/// Serve claims on `listener` until the process ends: each connection one
/// claim, answered from one book (first claimant of a session wins).
/// Clients that are not claimants, or fail to authenticate, are refused
/// and logged; the witness goes on.
///
/// # Errors
/// [`TransportError`] when accepting fails for good (the socket broke).
pub fn serve(listener: &TcpMigrationListener) -> Result<(), TransportError> {
    let book = Arc::new(WitnessBook::new());
    loop {
        let mut t = match listener.accept() {
            Ok(t) => t,
            Err(e)
                if e.is_disconnect()
                    || matches!(e, TransportError::Protocol(_) | TransportError::Auth { .. }) =>
            {
                tracing::warn!(error = %e, "refused a connection");
                continue;
            }
            Err(e) => return Err(e),
        };
        let book = Arc::clone(&book);
        std::thread::spawn(move || {
            use migrate_core::transport::DestinationTransport;
            match book.serve(t.control()) {
                Ok((session, claimant, granted)) => crate::out!(
                    "session {session:016x}: {} {}",
                    claimant.name(),
                    if granted { "granted" } else { "refused" }
                ),
                Err(e) => tracing::warn!(error = %e, "a claimant failed"),
            }
        });
    }
}
