//! TLS records sealed and opened by the kernel (`tls.ko`, Linux ≥ 4.13 for
//! sending, 4.17 for receiving, TLS 1.3 from 5.1): the same records as
//! [`crate::record`] makes, so either end may use either path. Page bytes
//! then cross into and out of the kernel once, as over plain TCP, and the
//! kernel encrypts them on the way.
//!
//! Alerts and handshake messages travel as records of their own content
//! type (`TLS_SET_RECORD_TYPE` / `TLS_GET_RECORD_TYPE` control messages).
//! A key update hands the kernel the direction's next key; kernels before
//! Linux 6.14 cannot take one (a clear error then, never a wrong byte), and
//! a key update is due only every [`KEY_UPDATE_RECORDS`] records (64 GiB
//! of full records per direction per connection).

use std::io::{self, Write};
use std::net::TcpStream;
use std::sync::Arc;

use crate::record::{
    self, ALERT, APPLICATION_DATA, CLOSE_NOTIFY, Control, HANDSHAKE, KEY_UPDATE_MESSAGE,
    KEY_UPDATE_RECORDS, RECORD_PLAIN, Secret, Shared,
};
use crate::sys::{self, KtlsDir};

/// Which of a connection's directions the kernel seals and opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Offload {
    /// The kernel seals what this end sends.
    pub(crate) tx: bool,
    /// The kernel opens what this end receives.
    pub(crate) rx: bool,
}

/// Offer `sock`'s directions to the kernel's TLS: each direction the
/// kernel takes is sealed or opened there from then on. The socket must be
/// at a record boundary in both directions with nothing of the peer's
/// records read ahead.
pub(crate) fn offload(sock: &TcpStream, tx: &Secret, rx: &Secret) -> io::Result<Offload> {
    sys::ktls_attach(sock)?;
    let tx = sys::ktls_keys(sock, KtlsDir::Tx, tx).map(|()| true);
    let rx = sys::ktls_keys(sock, KtlsDir::Rx, rx).map(|()| true);
    match (tx, rx) {
        (Err(e), Err(_)) => Err(e),
        (tx, rx) => Ok(Offload {
            tx: tx.unwrap_or(false),
            rx: rx.unwrap_or(false),
        }),
    }
}

fn no_key_update(e: io::Error) -> io::Error {
    io::Error::new(
        e.kind(),
        format!(
            "this kernel's TLS cannot take a key update (Linux 6.14 or later can; or run without kernel TLS): {e}"
        ),
    )
}

/// The sending half when the kernel seals.
pub(crate) struct KernelTx {
    shared: Arc<Shared>,
    /// Records sealed with the current key, counted from above.
    records: u64,
    key_update_after: u64,
    /// Key updates sent.
    pub(crate) updates: u64,
}

impl KernelTx {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            records: 0,
            key_update_after: KEY_UPDATE_RECORDS,
            updates: 0,
        }
    }

    /// Update the key every `records` records instead (tests).
    #[cfg(test)]
    pub(crate) fn key_update_every(&mut self, records: u64) {
        self.key_update_after = records;
    }

    /// Write `bufs` (the kernel makes the records); a key update, when
    /// due, goes first.
    pub(crate) fn write_vectored(
        &mut self,
        sock: &TcpStream,
        bufs: &[io::IoSlice<'_>],
    ) -> io::Result<usize> {
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        let most = (len / RECORD_PLAIN + 1) as u64;
        if self.records + most > self.key_update_after || self.shared.take_update_request() {
            sys::ktls_send_record(sock, HANDSHAKE, &KEY_UPDATE_MESSAGE)?;
            let next = self.shared.next_tx()?;
            sys::ktls_keys(sock, KtlsDir::Tx, &next).map_err(no_key_update)?;
            self.records = 0;
            self.updates += 1;
        }
        let n = (&*sock).write_vectored(bufs)?;
        self.records += (n / RECORD_PLAIN + 1) as u64;
        Ok(n)
    }

    /// Send `close_notify`.
    pub(crate) fn close_notify(&mut self, sock: &TcpStream) -> io::Result<()> {
        sys::ktls_send_record(sock, ALERT, &CLOSE_NOTIFY)
    }
}

/// Caller buffers smaller than this read through a scratch buffer, so a
/// control record always arrives whole.
const SMALL: usize = 64;

/// The receiving half when the kernel opens.
pub(crate) struct KernelRx {
    shared: Arc<Shared>,
    closed: bool,
    /// Application bytes read through the scratch buffer, not yet handed
    /// out: `scratch[pending.0..pending.1]`.
    scratch: [u8; SMALL],
    pending: (usize, usize),
    /// Key updates received.
    pub(crate) updates: u64,
}

impl KernelRx {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            closed: false,
            scratch: [0; SMALL],
            pending: (0, 0),
            updates: 0,
        }
    }

    /// Application bytes into `bufs`; `Ok(0)` after `close_notify`, an
    /// error at an end of stream without it.
    pub(crate) fn read_vectored(
        &mut self,
        sock: &TcpStream,
        bufs: &mut [io::IoSliceMut<'_>],
    ) -> io::Result<usize> {
        let want: usize = bufs.iter().map(|b| b.len()).sum();
        if want == 0 {
            return Ok(0);
        }
        loop {
            if self.pending.0 < self.pending.1 {
                return Ok(self.hand_out(bufs));
            }
            if self.closed {
                return Ok(0);
            }
            let (n, kind) = if want < SMALL {
                let (n, kind) = sys::ktls_recv(sock, &mut [io::IoSliceMut::new(&mut self.scratch)])
                    .map_err(kernel_error)?;
                if kind == APPLICATION_DATA {
                    self.pending = (0, n);
                }
                (n, kind)
            } else {
                sys::ktls_recv(sock, bufs).map_err(kernel_error)?
            };
            if kind == APPLICATION_DATA {
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer closed the connection without close_notify (the stream may have been cut short)",
                    ));
                }
                if want < SMALL {
                    continue;
                }
                return Ok(n);
            }
            let message = if want < SMALL {
                self.scratch[..n].to_vec()
            } else {
                gather(bufs, n)
            };
            match record::control(kind, &message, &self.shared)? {
                Control::Closed => self.closed = true,
                Control::KeyUpdate => {
                    let next = self.shared.next_rx()?;
                    sys::ktls_keys(sock, KtlsDir::Rx, &next).map_err(no_key_update)?;
                    self.updates += 1;
                }
            }
        }
    }

    fn hand_out(&mut self, bufs: &mut [io::IoSliceMut<'_>]) -> usize {
        let mut copied = 0;
        for b in bufs.iter_mut() {
            let (a, z) = self.pending;
            let n = b.len().min(z - a);
            b[..n].copy_from_slice(&self.scratch[a..a + n]);
            self.pending.0 += n;
            copied += n;
        }
        copied
    }
}

/// The first `n` bytes of `bufs`, copied out.
fn gather(bufs: &[io::IoSliceMut<'_>], n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n);
    for b in bufs {
        let take = b.len().min(n - out.len());
        out.extend_from_slice(&b[..take]);
    }
    out
}

/// The kernel's refusal of a record as what it means.
fn kernel_error(e: io::Error) -> io::Error {
    if e.raw_os_error() == Some(libc::EBADMSG) {
        record::crypto_error(
            "a record failed authentication in the kernel (corrupted, replayed or forged)",
        )
    } else {
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::{Receiving, Sending, TlsConn};
    use crate::record::{Keys, Opener, Sealer, Suite};
    use migrate_core::skip::{Need, skip};

    fn pair() -> (TcpStream, TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    }

    /// One session, its client end sealed and opened by the kernel, its
    /// server end by this crate.
    fn kernel_and_user(suite: Suite) -> (TlsConn, TlsConn) {
        let (c, s) = crate::tls::session_pair(suite).unwrap();
        let (a, b) = pair();
        let offload = offload(&a, &c.tx, &c.rx).unwrap();
        assert_eq!(offload, Offload { tx: true, rx: true }, "{suite:?}");
        let cs = Shared::new(c.ratchet);
        let kernel = TlsConn::new(
            a,
            Sending::Kernel(KernelTx::new(Arc::clone(&cs))),
            Receiving::Kernel(KernelRx::new(cs)),
        );
        let ss = Shared::new(s.ratchet);
        let user = TlsConn::new(
            b,
            Sending::User(Sealer::new(Keys::new(&s.tx).unwrap(), Arc::clone(&ss))),
            Receiving::User(Opener::new(Keys::new(&s.rx).unwrap(), ss)),
        );
        (kernel, user)
    }

    fn send_all(conn: &TlsConn, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let n = conn.write_vectored(&[io::IoSlice::new(&data[..data.len().min(100_003)])])?;
            data = &data[n..];
        }
        Ok(())
    }

    fn read_to_end(conn: &TlsConn) -> io::Result<Vec<u8>> {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 70_000];
        loop {
            match conn.read(&mut buf)? {
                0 => return Ok(got),
                n => got.extend_from_slice(&buf[..n]),
            }
        }
    }

    /// Where the kernel has TLS: its records and this crate's are the same
    /// records. Bytes both ways at once between a kernel end and a
    /// userspace end, for every suite, each stream ended by close_notify;
    /// then key updates: taken where the kernel can, else a clear error
    /// (never a wrong byte).
    #[test]
    fn the_kernel_and_this_crate_read_each_others_records() {
        if let Err(e) = crate::kernel_tls_support() {
            skip(
                "ktls::the_kernel_and_this_crate_read_each_others_records",
                Need::KernelTls,
                &format!("no kernel TLS here: {e}"),
            );
            return;
        }
        let data: Vec<u8> = (0..1_500_000u32).map(|i| (i * 7 % 251) as u8).collect();
        for suite in [Suite::Aes128Gcm, Suite::Aes256Gcm, Suite::Chacha20Poly1305] {
            let (kernel, user) = kernel_and_user(suite);
            std::thread::scope(|s| {
                let k = s.spawn(|| {
                    send_all(&kernel, &data).unwrap();
                    kernel.close().unwrap();
                    read_to_end(&kernel).unwrap()
                });
                send_all(&user, &data).unwrap();
                user.close().unwrap();
                let from_kernel = read_to_end(&user).unwrap();
                assert!(from_kernel == data, "{suite:?}: kernel to user");
                assert!(k.join().unwrap() == data, "{suite:?}: user to kernel");
            });
        }
        // Key updates, each way.
        for kernel_sends in [false, true] {
            let (kernel, user) = kernel_and_user(Suite::Aes128Gcm);
            let (from, to) = if kernel_sends {
                (&kernel, &user)
            } else {
                (&user, &kernel)
            };
            from.key_update_every(1);
            let outcome = std::thread::scope(|s| {
                let r = s.spawn(|| {
                    let r = read_to_end(to);
                    if r.is_err() {
                        // The sender's writes fail instead of blocking.
                        let _ = to.socket().shutdown(std::net::Shutdown::Both);
                    }
                    r
                });
                let sent = send_all(from, &data).and_then(|()| from.close());
                if sent.is_err() {
                    let _ = to.socket().shutdown(std::net::Shutdown::Both);
                }
                (sent, r.join().unwrap())
            });
            match outcome {
                (Ok(()), Ok(got)) => {
                    assert!(got == data, "kernel sends: {kernel_sends}");
                    let (sent, received) = (from.key_updates().0, to.key_updates().1);
                    assert!(
                        sent >= 10 && sent == received,
                        "{sent} sent, {received} received"
                    );
                }
                (sent, received) => {
                    let e = sent.err().or(received.err()).unwrap().to_string();
                    println!("key update under kernel TLS (kernel sends: {kernel_sends}): {e}");
                    assert!(
                        e.contains("cannot take a key update"),
                        "kernel sends: {kernel_sends}: {e}"
                    );
                }
            }
        }
    }
}
