//! What the kernel knows of a TCP connection, wrapped once: the crate's
//! only `unsafe`.

use std::net::TcpStream;
use std::os::fd::AsRawFd;

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
