//! What the kernel knows of a TCP connection, and its TLS, wrapped once:
//! the crate's only `unsafe`.

use std::io;
use std::net::TcpStream;
use std::os::fd::AsRawFd;

use crate::record::{Secret, Suite};

/// The process's effective user id.
pub(crate) fn effective_uid() -> u32 {
    // SAFETY: geteuid takes nothing and cannot fail.
    unsafe { libc::geteuid() }
}

/// The bytes the peer has sent on `stream` so far, read by us or not
/// (`TCP_INFO`'s `tcpi_bytes_received`, Linux ≥ 4.1); `None` where the
/// kernel does not say.
pub(crate) fn bytes_received(stream: &TcpStream) -> Option<u64> {
    // SAFETY: tcp_info is plain integers; all zeros is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a valid socket, a `tcp_info` to write and its true length;
    // the kernel writes at most `len` bytes and says how many.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    let end_of_field = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_received) + 8;
    (rc == 0 && len as usize >= end_of_field).then_some(info.tcpi_bytes_received)
}

/// `<linux/tls.h>` (not all in the libc crate's public API).
const SOL_TLS: libc::c_int = 282;
const TLS_TX: libc::c_int = 1;
const TLS_RX: libc::c_int = 2;
const TLS_SET_RECORD_TYPE: libc::c_int = 1;
const TLS_GET_RECORD_TYPE: libc::c_int = 2;
const TLS_1_3_VERSION: u16 = 0x0304;
const TLS_CIPHER_AES_GCM_128: u16 = 51;
const TLS_CIPHER_AES_GCM_256: u16 = 52;
const TLS_CIPHER_CHACHA20_POLY1305: u16 = 54;

/// Which direction of a socket the kernel's TLS seals or opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KtlsDir {
    /// What this end sends.
    Tx,
    /// What this end receives.
    Rx,
}

fn setsockopt(
    sock: &TcpStream,
    level: libc::c_int,
    name: libc::c_int,
    value: &[u8],
) -> io::Result<()> {
    let len = libc::socklen_t::try_from(value.len())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: a valid socket and `len` readable bytes at `value`; the
    // kernel copies them and checks their size for the option.
    let rc = unsafe { libc::setsockopt(sock.as_raw_fd(), level, name, value.as_ptr().cast(), len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Attach the kernel's TLS layer to a connected socket (`TCP_ULP` "tls");
/// until a direction gets its keys, the socket carries bytes as before.
pub(crate) fn ktls_attach(sock: &TcpStream) -> io::Result<()> {
    setsockopt(sock, libc::IPPROTO_TCP, libc::TCP_ULP, b"tls")
}

/// Hand one direction's TLS 1.3 keys to the kernel (`struct
/// tls12_crypto_info_*`: version, cipher, IV, key, salt, record sequence
/// number). A second call for a direction is a key update, which only
/// newer kernels take.
pub(crate) fn ktls_keys(sock: &TcpStream, dir: KtlsDir, secret: &Secret) -> io::Result<()> {
    let (cipher, salt_len) = match secret.suite {
        Suite::Aes128Gcm => (TLS_CIPHER_AES_GCM_128, 4),
        Suite::Aes256Gcm => (TLS_CIPHER_AES_GCM_256, 4),
        Suite::Chacha20Poly1305 => (TLS_CIPHER_CHACHA20_POLY1305, 0),
    };
    let (salt, iv) = secret.iv.split_at(salt_len);
    let mut info = Vec::with_capacity(64);
    info.extend_from_slice(&TLS_1_3_VERSION.to_ne_bytes());
    info.extend_from_slice(&cipher.to_ne_bytes());
    info.extend_from_slice(iv);
    info.extend_from_slice(&secret.key);
    info.extend_from_slice(salt);
    info.extend_from_slice(&secret.seq.to_be_bytes());
    let name = match dir {
        KtlsDir::Tx => TLS_TX,
        KtlsDir::Rx => TLS_RX,
    };
    let result = setsockopt(sock, SOL_TLS, name, &info);
    info.fill(0);
    result
}

/// Send `data` as one record of content type `kind` through the kernel's
/// TLS (a control record: an alert or a handshake message).
pub(crate) fn ktls_send_record(sock: &TcpStream, kind: u8, data: &[u8]) -> io::Result<()> {
    // u64 words: the control buffer aligned as cmsghdr needs.
    let mut control = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain integers and pointers; all zeros is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(1) } as _;
    // SAFETY: the control buffer (64 bytes) holds CMSG_SPACE(1); the
    // header pointer CMSG_FIRSTHDR returns lies inside it.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null() {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        (*cmsg).cmsg_level = SOL_TLS;
        (*cmsg).cmsg_type = TLS_SET_RECORD_TYPE;
        (*cmsg).cmsg_len = libc::CMSG_LEN(1) as _;
        *libc::CMSG_DATA(cmsg) = kind;
    }
    loop {
        // SAFETY: a valid socket and a msghdr whose iovec and control
        // buffer outlive the call.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, 0) };
        if n >= 0 {
            // The kernel takes a record this small whole or not at all.
            return if n as usize == data.len() {
                Ok(())
            } else {
                Err(io::Error::other("kernel TLS sent part of a control record"))
            };
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Receive through the kernel's TLS into `bufs`: the bytes and the content
/// type of the record they come from (the kernel never mixes types in one
/// call). `(0, 23)` is the end of the TCP stream.
pub(crate) fn ktls_recv(
    sock: &TcpStream,
    bufs: &mut [io::IoSliceMut<'_>],
) -> io::Result<(usize, u8)> {
    let mut control = [0u64; 8];
    // SAFETY: msghdr is plain integers and pointers; all zeros is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // IoSliceMut is ABI-compatible with iovec on Unix (std guarantees it).
    msg.msg_iov = bufs.as_mut_ptr().cast();
    msg.msg_iovlen = bufs.len().min(1024) as _;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    let n = loop {
        // SAFETY: a valid socket; the iovecs point into `bufs`, which
        // outlive the call, and the control buffer is ours.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, 0) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut kind = crate::record::APPLICATION_DATA;
    // SAFETY: the kernel filled msg_controllen bytes of our buffer with
    // well-formed cmsg headers; CMSG_FIRSTHDR/NXTHDR stay inside it.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == SOL_TLS && (*cmsg).cmsg_type == TLS_GET_RECORD_TYPE {
                kind = *libc::CMSG_DATA(cmsg);
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok((n, kind))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_kernel_counts_what_the_peer_sent() {
        use std::io::Write;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        assert_eq!(super::bytes_received(&s), Some(0));
        c.write_all(&[7u8; 1000]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        // Counted before anything reads it.
        assert_eq!(super::bytes_received(&s), Some(1000));
    }
}
