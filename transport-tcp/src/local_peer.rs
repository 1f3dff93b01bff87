//! Who is at the other end of a loopback connection: the user that owns
//! the peer's socket (`sock_i_uid`), asked of the kernel's socket
//! diagnostics over netlink for that one socket (sock_diag(7): an exact
//! lookup, as cheap on a host with a hundred thousand connections as on an
//! idle one), or, where that is not available, found in `/proc/net/tcp`
//! and `/proc/net/tcp6` (a scan of every socket: milliseconds per
//! connection on a busy host). An accepted socket keeps the owner of its
//! listener, so a source learns who runs the destination just as the
//! destination learns who runs the source.
//!
//! Used where a connection has no credentials: plaintext is allowed on
//! loopback only, and there only between processes of one user (or root),
//! so that on a shared host another user can neither push a guest into a
//! destination nor pose as one.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};

use migrate_core::transport::TransportError;

use crate::control::io;

/// Check that the peer of a loopback `stream` belongs to this process's
/// user or to root; a peer on another address is not judged here.
///
/// # Errors
/// [`TransportError::Auth`] for another user's process, or when the kernel
/// no longer lists the peer's socket; [`TransportError::Io`] when the
/// tables cannot be read.
pub(crate) fn check_same_user(stream: &TcpStream) -> Result<(), TransportError> {
    let ours = stream.local_addr().map_err(io("local address"))?;
    let theirs = stream.peer_addr().map_err(io("peer address"))?;
    if !theirs.ip().is_loopback() && unmapped(theirs.ip()) != unmapped(ours.ip()) {
        return Ok(());
    }
    let me = crate::sys::effective_uid();
    let detail = match socket_owner(theirs, ours)? {
        Some(uid) if uid == me || uid == 0 => return Ok(()),
        Some(uid) => format!(
            "the local process at {theirs} runs as uid {uid}, not as this process's uid {me} \
             or root: without credentials only the same user's processes may be the peer \
             (give --tls-dir or --psk-file, or --insecure)"
        ),
        None => format!("the local peer at {theirs} is not in the kernel's socket table"),
    };
    // The peer hears why, in its own protocol, before the connection ends.
    crate::tls::refuse_in_protocol(
        stream,
        "refused: on loopback without credentials only a process of the same user (or root) \
         may be the peer (--tls-dir, --psk-file, or --insecure)",
    );
    Err(TransportError::Auth { detail })
}

/// The owner of the TCP socket whose local address is `local` and whose
/// remote address is `remote`, if the kernel lists one.
fn socket_owner(local: SocketAddr, remote: SocketAddr) -> Result<Option<u32>, TransportError> {
    match diag_owner(local, remote) {
        Ok(Some(uid)) => return Ok(Some(uid)),
        // Not found, or no socket diagnostics here: the tables say.
        Ok(None) => {}
        Err(e) => tracing::debug!(error = %e, "no socket diagnostics; reading /proc/net/tcp"),
    }
    table_owner(local, remote)
}

/// `SOCK_DIAG_BY_FAMILY` (linux/sock_diag.h).
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `INET_DIAG_NOCOOKIE`: match the socket by its addresses only.
const NO_COOKIE: u32 = !0;

/// The owner of the TCP socket `local` ↔ `remote`, by an exact
/// `inet_diag` lookup over `NETLINK_SOCK_DIAG` (no dump: the kernel finds
/// the one socket in its hash). `Ok(None)` when the kernel has no such
/// socket (or no handler for the family).
fn diag_owner(local: SocketAddr, remote: SocketAddr) -> std::io::Result<Option<u32>> {
    use socket2::{Domain, Protocol, Socket, Type};
    use std::io::{Read, Write};
    let nl = Socket::new(
        Domain::from(libc::AF_NETLINK),
        Type::RAW,
        Some(Protocol::from(libc::NETLINK_SOCK_DIAG)),
    )?;
    nl.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
    (&nl).write_all(&diag_request(local, remote))?;
    let mut reply = [0u8; 512];
    let n = (&nl).read(&mut reply)?;
    Ok(diag_uid(&reply[..n]))
}

/// The request: a netlink header and an `inet_diag_req_v2` naming the
/// socket by its two ends (ports and addresses in network order).
fn diag_request(local: SocketAddr, remote: SocketAddr) -> Vec<u8> {
    let (local_ip, remote_ip) = (unmapped(local.ip()), unmapped(remote.ip()));
    let family = match (local_ip, remote_ip) {
        (IpAddr::V4(_), IpAddr::V4(_)) => libc::AF_INET,
        _ => libc::AF_INET6,
    };
    let octets = |ip: IpAddr| -> [u8; 16] {
        match (ip, family) {
            (IpAddr::V4(v4), libc::AF_INET) => {
                let mut b = [0u8; 16];
                b[..4].copy_from_slice(&v4.octets());
                b
            }
            (IpAddr::V4(v4), _) => v4.to_ipv6_mapped().octets(),
            (IpAddr::V6(v6), _) => v6.octets(),
        }
    };
    let mut m = Vec::with_capacity(72);
    m.extend_from_slice(&72u32.to_ne_bytes()); // nlmsg_len
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // seq
    m.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel fills it
    m.extend_from_slice(&[family as u8, libc::IPPROTO_TCP as u8, 0, 0]);
    m.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    m.extend_from_slice(&local.port().to_be_bytes());
    m.extend_from_slice(&remote.port().to_be_bytes());
    m.extend_from_slice(&octets(local_ip));
    m.extend_from_slice(&octets(remote_ip));
    m.extend_from_slice(&0u32.to_ne_bytes()); // any interface
    m.extend_from_slice(&NO_COOKIE.to_ne_bytes());
    m.extend_from_slice(&NO_COOKIE.to_ne_bytes());
    debug_assert_eq!(m.len(), 72);
    m
}

/// The uid in an `inet_diag_msg` reply, or `None` for an error reply (the
/// kernel has no such socket) or anything shorter than one.
fn diag_uid(reply: &[u8]) -> Option<u32> {
    let u32_at = |at: usize| Some(u32::from_ne_bytes(*reply.get(at..at + 4)?.first_chunk()?));
    let kind = u16::from_ne_bytes(*reply.get(4..6)?.first_chunk()?);
    // An error reply (`NLMSG_ERROR`: no such socket) or a short one.
    if kind != SOCK_DIAG_BY_FAMILY || (u32_at(0)? as usize) < 16 + 72 {
        return None;
    }
    // nlmsghdr (16), then family, state, timer, retrans (4), the socket id
    // (48), expires, rqueue, wqueue (12): the uid.
    u32_at(16 + 4 + 48 + 12)
}

/// [`socket_owner`] from the text tables.
fn table_owner(local: SocketAddr, remote: SocketAddr) -> Result<Option<u32>, TransportError> {
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = match std::fs::read_to_string(table) {
            Ok(t) => t,
            // A kernel without IPv6 has no tcp6 table.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io("read the kernel's socket table")(e)),
        };
        if let Some(uid) = find_owner(&text, local, remote) {
            return Ok(Some(uid));
        }
    }
    Ok(None)
}

/// In the text of a `/proc/net/tcp{,6}` table, the uid of the socket
/// `local` ↔ `remote`.
fn find_owner(table: &str, local: SocketAddr, remote: SocketAddr) -> Option<u32> {
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (l, r, uid) = (fields.get(1)?, fields.get(2)?, fields.get(7)?);
        (same(parse_addr(l)?, local) && same(parse_addr(r)?, remote)).then(|| uid.parse().ok())?
    })
}

fn same(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && unmapped(a.ip()) == unmapped(b.ip())
}

/// An IPv4-mapped IPv6 address as IPv4.
fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6): the kernel
/// prints each 32-bit word of the address as a number in this machine's
/// byte order, and the port in host order.
fn parse_addr(text: &str) -> Option<SocketAddr> {
    let (addr, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let hex = addr.get(i * 8..i * 8 + 8)?;
        Some(u32::from_str_radix(hex, 16).ok()?.to_ne_bytes())
    };
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_names_the_owner_of_both_ends() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        let me = crate::sys::effective_uid();
        // The source's socket, as the destination looks it up, and the
        // destination's (accepted) socket, as the source does.
        let peer = |x: &TcpStream| socket_owner(x.peer_addr().unwrap(), x.local_addr().unwrap());
        assert_eq!(peer(&s).unwrap(), Some(me));
        assert_eq!(peer(&c).unwrap(), Some(me));
        // Both ways of asking agree: the netlink lookup and the tables.
        for x in [&s, &c] {
            let (theirs, ours) = (x.peer_addr().unwrap(), x.local_addr().unwrap());
            assert_eq!(diag_owner(theirs, ours).unwrap(), Some(me));
            assert_eq!(table_owner(theirs, ours).unwrap(), Some(me));
        }
        // Over IPv6 loopback too.
        let l6 = std::net::TcpListener::bind("[::1]:0").unwrap();
        let c6 = TcpStream::connect(l6.local_addr().unwrap()).unwrap();
        let (s6, _) = l6.accept().unwrap();
        for x in [&s6, &c6] {
            let (theirs, ours) = (x.peer_addr().unwrap(), x.local_addr().unwrap());
            assert_eq!(diag_owner(theirs, ours).unwrap(), Some(me));
            check_same_user(x).unwrap();
        }
        // A socket nobody has: not found either way.
        let nobody: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(diag_owner(nobody, s.local_addr().unwrap()).unwrap(), None);
        assert_eq!(table_owner(nobody, s.local_addr().unwrap()).unwrap(), None);
        check_same_user(&s).unwrap();
        check_same_user(&c).unwrap();
    }

    #[test]
    fn table_lines_parse() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
            0: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000   65534        0 12345 1\n";
        let (local, remote) = if cfg!(target_endian = "little") {
            ("127.0.0.1:8080", "127.0.0.1:54321")
        } else {
            ("1.0.0.127:8080", "1.0.0.127:54321")
        };
        assert_eq!(
            find_owner(table, local.parse().unwrap(), remote.parse().unwrap()),
            Some(65534)
        );
        assert_eq!(
            find_owner(table, remote.parse().unwrap(), local.parse().unwrap()),
            None
        );
        let v6 = "00000000000000000000000001000000:1F90";
        assert_eq!(
            parse_addr(v6),
            cfg!(target_endian = "little").then(|| "[::1]:8080".parse().unwrap())
        );
    }
}
