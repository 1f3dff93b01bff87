//! Marked sockets: every TCP connection of a migration carries the
//! operator's DSCP (`TcpConfig::dscp`) from its first packet (the SYN, or
//! the listener's SYN-ACK) to its last, so that a fabric can put migration
//! traffic in its own class, shape it and count it.
//!
//! The class is set before `connect` and on the listening socket (whose
//! accepted connections inherit it); std can set options only on a socket
//! it already connected, hence `socket2`.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Largest DSCP (six bits).
pub const MAX_DSCP: u8 = 63;

/// The IPv4 TOS / IPv6 traffic-class byte for `dscp`: the DSCP in the six
/// high bits, the ECN bits (the kernel's for TCP) zero.
fn tos(dscp: u8) -> u32 {
    u32::from(dscp.min(MAX_DSCP)) << 2
}

fn mark(socket: &Socket, v6: bool, dscp: Option<u8>) -> io::Result<()> {
    let Some(d) = dscp else { return Ok(()) };
    if v6 {
        socket.set_tclass_v6(tos(d))?;
        // A dual-stack socket's IPv4 traffic takes IP_TOS; a v6-only one
        // refuses nothing here either way.
        let _ = socket.set_tos_v4(tos(d));
        Ok(())
    } else {
        socket.set_tos_v4(tos(d))
    }
}

/// Connect to `addr` within `timeout`, marked with `dscp`.
pub(crate) fn connect(
    addr: &SocketAddr,
    timeout: Duration,
    dscp: Option<u8>,
) -> io::Result<TcpStream> {
    let socket = Socket::new(
        Domain::for_address(*addr),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    mark(&socket, addr.is_ipv6(), dscp)?;
    socket.connect_timeout(&SockAddr::from(*addr), timeout)?;
    Ok(socket.into())
}

/// Listen on the first of `addrs` that binds (as std's `bind` does),
/// marked with `dscp`; the address may be reused at once after a previous
/// listener (`SO_REUSEADDR`, as std sets it).
pub(crate) fn listen(addrs: &[SocketAddr], dscp: Option<u8>) -> io::Result<TcpListener> {
    let mut last = io::Error::new(
        io::ErrorKind::InvalidInput,
        "the address resolved to nothing",
    );
    for addr in addrs {
        let bound = (|| {
            let socket = Socket::new(
                Domain::for_address(*addr),
                Type::STREAM,
                Some(Protocol::TCP),
            )?;
            socket.set_reuse_address(true)?;
            mark(&socket, addr.is_ipv6(), dscp)?;
            socket.bind(&SockAddr::from(*addr))?;
            socket.listen(128)?;
            Ok::<_, io::Error>(socket.into())
        })();
        match bound {
            Ok(l) => return Ok(l),
            Err(e) => last = e,
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn tos_of(s: impl AsFd) -> u32 {
        socket2::SockRef::from(&s).tos_v4().unwrap()
    }

    #[test]
    fn both_ends_of_a_connection_carry_the_class() {
        let l = listen(&["127.0.0.1:0".parse().unwrap()], Some(46)).unwrap();
        assert_eq!(tos_of(&l), 46 << 2);
        let c = connect(&l.local_addr().unwrap(), Duration::from_secs(5), Some(46)).unwrap();
        let (a, _) = l.accept().unwrap();
        assert_eq!(tos_of(&c), 46 << 2);
        assert_eq!(tos_of(&a), 46 << 2, "an accepted connection inherits it");
    }

    #[test]
    fn unmarked_by_default() {
        let l = listen(&["127.0.0.1:0".parse().unwrap()], None).unwrap();
        let c = connect(&l.local_addr().unwrap(), Duration::from_secs(5), None).unwrap();
        assert_eq!(tos_of(&c), 0);
    }

    #[test]
    fn ipv6_takes_the_traffic_class() {
        let l = listen(&["[::1]:0".parse().unwrap()], Some(10)).unwrap();
        let c = connect(&l.local_addr().unwrap(), Duration::from_secs(5), Some(10)).unwrap();
        assert_eq!(socket2::SockRef::from(&c).tclass_v6().unwrap(), 10 << 2);
    }
}
