//! Picking the transport: TCP, RDMA, or RDMA-else-TCP with the reason.

use migrate_core::transport::{DestinationTransport, SourceTransport, TransportError};
use transport_rdma::{RdmaConfig, RdmaDestination, RdmaMigrationListener, RdmaSource};
use transport_tcp::{TcpConfig, TcpDestination, TcpMigrationListener, TcpSource, TlsConfig};

use crate::SetupError;
use crate::args::{TransportArgs, TransportChoice};

fn no_rdma(reason: String) -> SetupError {
    SetupError::Option(format!(
        "--transport rdma: {reason}; use --transport tcp or auto"
    ))
}

/// Why RDMA cannot be used from this host, if it cannot.
pub fn rdma_unavailable() -> Option<String> {
    transport_rdma::verbs::device_names()
        .is_empty()
        .then(|| "no RDMA device on this host (libibverbs lists none)".to_string())
}

/// A connected source transport of either kind.
pub enum Source {
    /// TCP only.
    Tcp(Box<TcpSource>),
    /// RDMA, or TCP with a reason in auto mode.
    Rdma(Box<RdmaSource>),
}

impl Source {
    /// The engine's view.
    pub fn as_dyn(&mut self) -> &mut dyn SourceTransport {
        match self {
            Source::Tcp(t) => t.as_mut(),
            Source::Rdma(t) => t.as_mut(),
        }
    }

    /// Why pages went over TCP in auto mode, if they did.
    pub fn fallback_reason(&self) -> Option<String> {
        match self {
            Source::Tcp(_) => None,
            Source::Rdma(t) => t.fallback_reason().map(String::from),
        }
    }
}

/// Connect to `addr` with the chosen transport, authenticated by `tls`
/// when given. RDMA registers the memory when the engine binds it (for
/// remote read too when `postcopy` may happen: the destination then reads
/// faulted pages by RDMA READ).
///
/// # Errors
/// [`SetupError`] when nothing answers at `addr`, or RDMA is required and
/// this host has no device.
pub fn connect(
    addr: &str,
    t: &TransportArgs,
    compress: bool,
    tls: Option<TlsConfig>,
    postcopy: bool,
) -> Result<Source, SetupError> {
    Ok(match t.transport {
        TransportChoice::Tcp => Source::Tcp(Box::new(TcpSource::connect(
            addr,
            tcp_config(t, compress, tls),
        )?)),
        TransportChoice::Rdma => {
            if let Some(reason) = rdma_unavailable() {
                return Err(no_rdma(reason));
            }
            Source::Rdma(Box::new(RdmaSource::connect(
                addr,
                RdmaConfig {
                    postcopy_reads: postcopy,
                    ..rdma_config(t, compress, true, tls)
                },
            )?))
        }
        TransportChoice::Auto => Source::Rdma(Box::new(RdmaSource::connect(
            addr,
            RdmaConfig {
                postcopy_reads: postcopy,
                ..rdma_config(t, compress, false, tls)
            },
        )?)),
    })
}

/// A listener of either kind.
pub enum Listener {
    /// TCP only.
    Tcp(TcpMigrationListener),
    /// RDMA when the source has it too, else TCP.
    Rdma(RdmaMigrationListener),
}

/// An accepted destination transport of either kind.
pub enum Destination {
    /// TCP.
    Tcp(Box<TcpDestination>),
    /// RDMA or TCP.
    Rdma(Box<RdmaDestination>),
}

impl Destination {
    /// The engine's view.
    pub fn as_dyn(&mut self) -> &mut dyn DestinationTransport {
        match self {
            Destination::Tcp(t) => t.as_mut(),
            Destination::Rdma(t) => t.as_mut(),
        }
    }

    /// End RDMA access to the guest memory (rkeys invalid from now on).
    pub fn finish(&mut self) {
        if let Destination::Rdma(t) = self {
            t.finish();
        }
    }
}

impl Listener {
    /// Listen on `addr`; with `tls`, every connection must authenticate.
    ///
    /// # Errors
    /// [`SetupError`] when the address cannot be bound, or RDMA is required
    /// and this host has no device.
    pub fn bind(
        addr: &str,
        t: &TransportArgs,
        tls: Option<TlsConfig>,
    ) -> Result<Listener, SetupError> {
        Ok(match t.transport {
            TransportChoice::Tcp => {
                Listener::Tcp(TcpMigrationListener::bind(addr, tcp_config(t, true, tls))?)
            }
            TransportChoice::Rdma => {
                if let Some(reason) = rdma_unavailable() {
                    return Err(no_rdma(reason));
                }
                Listener::Rdma(RdmaMigrationListener::bind(
                    addr,
                    rdma_config(t, true, true, tls),
                )?)
            }
            TransportChoice::Auto => Listener::Rdma(RdmaMigrationListener::bind(
                addr,
                rdma_config(t, true, false, tls),
            )?),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<std::net::SocketAddr, TransportError> {
        match self {
            Listener::Tcp(l) => l.local_addr(),
            Listener::Rdma(l) => l.local_addr(),
        }
    }

    /// Accept one source.
    pub fn accept(&self) -> Result<Destination, TransportError> {
        Ok(match self {
            Listener::Tcp(l) => Destination::Tcp(Box::new(l.accept()?)),
            Listener::Rdma(l) => Destination::Rdma(Box::new(l.accept()?)),
        })
    }
}

/// TCP settings from the arguments.
pub fn tcp_config(t: &TransportArgs, compress: bool, tls: Option<TlsConfig>) -> TcpConfig {
    TcpConfig {
        data_streams: t.streams.max(1),
        compress,
        sparse: !t.no_sparse,
        io_timeout: t
            .io_timeout
            .unwrap_or_else(|| std::time::Duration::from_secs(t.io_timeout_s.max(1))),
        tls,
        // Without credentials on loopback, only this user's processes may
        // be the peer, unless the operator said --insecure.
        any_local_user: t.insecure,
        dscp: t.dscp,
        ..TcpConfig::default()
    }
}

fn rdma_config(
    t: &TransportArgs,
    compress: bool,
    require: bool,
    tls: Option<TlsConfig>,
) -> RdmaConfig {
    RdmaConfig {
        tcp: tcp_config(t, compress, tls),
        queue_pairs: t.streams.max(1),
        device: t.rdma_device.clone(),
        gid_index: t.gid_index,
        marking: t.marking(),
        require,
        ..RdmaConfig::default()
    }
}
