//! Who may connect: TLS credentials from the arguments, and the rule that
//! nothing crosses a non-loopback network without authentication unless
//! the operator says `--insecure`.

use transport_tcp::{KernelTls, TlsConfig, is_loopback};

use crate::SetupError;
use crate::args::{KernelTlsArg, TransportArgs};

/// Which end, with what it needs to pick its credentials.
pub enum Role<'a> {
    /// Connects to `connect`; the destination's certificate must name
    /// `hostname` (default: the host of `connect`).
    Source {
        /// host:port.
        connect: &'a str,
        /// `--tls-hostname`.
        hostname: Option<&'a str>,
    },
    /// Listens on `listen`; accepts the sources in `allow` (empty: any).
    Destination {
        /// host:port.
        listen: &'a str,
        /// `--tls-allow`.
        allow: &'a [String],
    },
}

/// The TLS configuration to use, `None` for plaintext (loopback, or
/// `--insecure`). Read before any memory is allocated: bad credentials
/// fail at once.
///
/// # Errors
/// [`SetupError`]: an address that cannot work, unreadable or invalid
/// credentials, plaintext on a non-loopback address without `--insecure`.
pub fn tls(t: &TransportArgs, role: &Role<'_>) -> Result<Option<TlsConfig>, SetupError> {
    // What is wrong with the address is said first, whatever the
    // credentials: a typo is not an authentication problem.
    match role {
        Role::Source { connect, .. } => {
            resolve("--connect", connect)?;
        }
        Role::Destination { listen, .. } => {
            for a in resolve("--listen", listen)? {
                // Port 0: whether the address is this host's, not whether
                // the port is free (bind says that, naming it).
                std::net::TcpListener::bind(std::net::SocketAddr::new(a.ip(), 0)).map_err(|e| {
                    SetupError::Option(format!(
                        "--listen {listen}: {} is not an address of this host: {e}",
                        a.ip()
                    ))
                })?;
            }
        }
    }
    let kernel = match t.kernel_tls {
        KernelTlsArg::Auto => KernelTls::Auto,
        KernelTlsArg::Off => KernelTls::Off,
        KernelTlsArg::On => {
            if t.tls_dir.is_none() && t.psk_file.is_none() {
                return Err(SetupError::Option(
                    "--kernel-tls on: there is no TLS without --tls-dir or --psk-file".into(),
                ));
            }
            transport_tcp::kernel_tls_support().map_err(|e| {
                SetupError::Option(format!(
                    "--kernel-tls on: this kernel cannot seal TLS records (no tls module?): {e}"
                ))
            })?;
            KernelTls::On
        }
    };
    if let Some(dir) = &t.tls_dir {
        let config = match role {
            Role::Source { connect, hostname } => {
                let name = hostname.map_or_else(|| host_of(connect), str::to_string);
                TlsConfig::source_from_dir(dir, &name)
            }
            Role::Destination { allow, .. } => TlsConfig::destination_from_dir(dir, allow),
        };
        return Ok(Some(config.map_err(tls_dir)?.with_kernel_tls(kernel)));
    }
    if let Some(file) = &t.psk_file {
        let key = TlsConfig::read_psk(file).map_err(psk_file)?;
        let config = match role {
            Role::Source { .. } => TlsConfig::source_psk(key),
            Role::Destination { .. } => TlsConfig::destination_psk(key),
        };
        return Ok(Some(config.map_err(psk_file)?.with_kernel_tls(kernel)));
    }
    let (addr, what) = match role {
        Role::Source { connect, .. } => (*connect, "send a guest's memory to"),
        Role::Destination { listen, .. } => (*listen, "listen on"),
    };
    if t.insecure {
        tracing::warn!(%addr, "--insecure: no authentication, no encryption");
        return Ok(None);
    }
    if is_loopback(addr) {
        return Ok(None);
    }
    Err(SetupError::Unauthenticated {
        what,
        addr: addr.to_string(),
    })
}

fn tls_dir(source: transport_tcp::TlsError) -> SetupError {
    SetupError::Credentials {
        option: "--tls-dir",
        source,
    }
}

fn psk_file(source: transport_tcp::TlsError) -> SetupError {
    SetupError::Credentials {
        option: "--psk-file",
        source,
    }
}

/// The addresses `addr` (host:port) names, or an error saying what is
/// wrong with it: no port, a port that is no number, a host that does not
/// resolve.
fn resolve(option: &str, addr: &str) -> Result<Vec<std::net::SocketAddr>, SetupError> {
    use std::net::ToSocketAddrs;
    let bad = |detail: String| SetupError::Option(format!("{option} {addr}: {detail}"));
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err(bad(format!("no port (give host:port, e.g. {addr}:4444)")));
    };
    if port.parse::<u16>().is_err() {
        return Err(bad(format!(
            "the port {port:?} is not a number from 0 to 65535"
        )));
    }
    let all: Vec<_> = addr
        .to_socket_addrs()
        .map_err(|e| bad(format!("cannot resolve the host {host:?}: {e}")))?
        .collect();
    if all.is_empty() {
        return Err(bad(format!("the host {host:?} has no address")));
    }
    Ok(all)
}

/// The host part of host:port (brackets of an IPv6 literal removed).
fn host_of(addr: &str) -> String {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_and_loopback() {
        assert_eq!(host_of("dest.example:4444"), "dest.example");
        assert_eq!(host_of("[::1]:4444"), "::1");
        assert_eq!(host_of("10.0.0.2:1"), "10.0.0.2");
    }
}
