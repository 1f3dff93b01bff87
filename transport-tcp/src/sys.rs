//! What the kernel knows of a TCP connection, wrapped once: the crate's
//! only `unsafe`.

use std::net::TcpStream;
use std::os::fd::AsRawFd;

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
