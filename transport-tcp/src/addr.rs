//! Addresses: which stay on this host.

use std::net::ToSocketAddrs;

/// Whether every address `addr` (host:port) resolves to is a loopback
/// address: the one place plaintext needs no `--insecure`. An address that
/// does not resolve is not loopback.
pub fn is_loopback(addr: &str) -> bool {
    match addr.to_socket_addrs() {
        Ok(all) => {
            let all: Vec<_> = all.collect();
            !all.is_empty() && all.iter().all(|a| a.ip().is_loopback())
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_is_loopback() {
        assert!(is_loopback("127.0.0.1:4444"));
        assert!(is_loopback("[::1]:4444"));
        assert!(!is_loopback("0.0.0.0:4444"));
        assert!(!is_loopback("10.0.0.2:4444"));
        assert!(!is_loopback("no-such-host.invalid:1"));
    }
}
