//! TLS 1.3 records (RFC 8446 §5) after the handshake, sealed and opened by
//! this crate from the session's own traffic secrets: one key and one lock
//! per direction, so a reader blocked on the socket never stalls a writer,
//! and page bytes are never copied apart from the cipher on the sending
//! side (sealed from guest memory into the send buffer). Where the kernel
//! has TLS (`tls.ko`), [`crate::ktls`] hands the same secrets to it instead
//! and the wire does not change: either end may use either path.
//!
//! **Keys.** rustls runs the handshake and then gives up its secrets
//! (`dangerous_into_kernel_connection`): each direction's key, IV and
//! sequence number, and a [`Ratchet`] that computes the next traffic secret
//! at a key update (RFC 8446 §7.2). One crypto library, aws-lc-rs, for the
//! handshake and the records: it seals from one buffer into another
//! (`seal_out_of_place_scatter`), which ring cannot.
//!
//! **Format.** Standard TLS 1.3 records: a 5-byte header (type 23, version
//! 0x0303, length ≤ 2^14 + 256), then the AEAD of the plaintext (at most
//! 2^14 bytes), its one-byte content type and any zero padding, then the
//! tag. The additional data is the header; the nonce is the direction's IV
//! XOR the record's sequence number, so a record dropped, replayed,
//! reordered or moved to the other direction fails authentication.
//!
//! **Key update.** A direction sends a `KeyUpdate` handshake message and
//! moves to the next traffic secret every [`KEY_UPDATE_RECORDS`] records
//! (64 GiB of full records: far inside AES-GCM's per-key limit, RFC 8446
//! §5.5, 2^24.5 records), and when the peer asks for one
//! (`update_requested`). A receiver moves when the message arrives.
//!
//! **End of stream.** [`Sealer::close_notify`] sends the `close_notify`
//! alert; after it a reader gets end of file. A connection that ends
//! without one is an error ([`io::ErrorKind::UnexpectedEof`]): the stream
//! may have been cut short by anyone on the path. Any other alert, a
//! handshake message other than `KeyUpdate`, a record after `close_notify`,
//! a length outside the bounds or a failed tag is an error, never an
//! allocation or a panic.

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::ConnectionTrafficSecrets;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Plaintext per record at most (RFC 8446 §5.1).
pub(crate) const RECORD_PLAIN: usize = 1 << 14;
/// Ciphertext per record at most (RFC 8446 §5.2).
const RECORD_MAX: usize = RECORD_PLAIN + 256;
/// Records a direction seals with one key before it updates it: 2^22
/// records of at most 16 KiB, 64 GiB.
pub(crate) const KEY_UPDATE_RECORDS: u64 = 1 << 22;
/// The record header.
const HEADER: usize = 5;
/// The AEAD tag (all three suites).
const TAG: usize = 16;
/// Plaintext sealed per socket write at most.
const SEND_PLAIN: usize = 256 << 10;
/// Ciphertext read from the socket at a time at most.
const RECV_CHUNK: usize = 256 << 10;

/// Content types (RFC 8446 §5.1).
pub(crate) const ALERT: u8 = 21;
/// Content type of handshake messages (a `KeyUpdate` after the handshake).
pub(crate) const HANDSHAKE: u8 = 22;
/// Content type of the migration's bytes.
pub(crate) const APPLICATION_DATA: u8 = 23;
/// The `KeyUpdate` handshake message type (RFC 8446 §4.6.3).
const KEY_UPDATE: u8 = 24;
/// A `KeyUpdate` that does not ask the peer to update its own key.
pub(crate) const KEY_UPDATE_MESSAGE: [u8; 5] = [KEY_UPDATE, 0, 0, 1, 0];
/// The `close_notify` alert: level warning, description 0.
pub(crate) const CLOSE_NOTIFY: [u8; 2] = [1, 0];

/// The next traffic secret of each direction (rustls' `KernelConnection`,
/// which knows the session's secrets and hash).
pub(crate) trait Ratchet: Send {
    /// The keys of this end's next sending secret.
    fn next_tx(&mut self) -> Result<ConnectionTrafficSecrets, rustls::Error>;
    /// The keys of the peer's next sending secret.
    fn next_rx(&mut self) -> Result<ConnectionTrafficSecrets, rustls::Error>;
}

impl<D> Ratchet for rustls::kernel::KernelConnection<D>
where
    rustls::kernel::KernelConnection<D>: Send,
{
    fn next_tx(&mut self) -> Result<ConnectionTrafficSecrets, rustls::Error> {
        self.update_tx_secret().map(|(_, s)| s)
    }

    fn next_rx(&mut self) -> Result<ConnectionTrafficSecrets, rustls::Error> {
        self.update_rx_secret().map(|(_, s)| s)
    }
}

/// What both directions of one connection share: the ratchet, and the
/// peer's request that this end update its sending key.
pub(crate) struct Shared {
    ratchet: Mutex<Box<dyn Ratchet>>,
    update_requested: AtomicBool,
}

impl Shared {
    pub(crate) fn new(ratchet: Box<dyn Ratchet>) -> Arc<Self> {
        Arc::new(Self {
            ratchet: Mutex::new(ratchet),
            update_requested: AtomicBool::new(false),
        })
    }

    /// This end's next sending secret (sequence number 0).
    pub(crate) fn next_tx(&self) -> io::Result<Secret> {
        self.next(|r| r.next_tx())
    }

    /// The peer's next sending secret (sequence number 0).
    pub(crate) fn next_rx(&self) -> io::Result<Secret> {
        self.next(|r| r.next_rx())
    }

    fn next(
        &self,
        step: impl FnOnce(&mut dyn Ratchet) -> Result<ConnectionTrafficSecrets, rustls::Error>,
    ) -> io::Result<Secret> {
        let mut r = self.ratchet.lock().unwrap_or_else(|p| p.into_inner());
        let s = step(r.as_mut()).map_err(|e| crypto_error(&format!("key update: {e}")))?;
        Secret::new(0, &s)
    }

    /// Whether the peer asked for a key update since the last call.
    pub(crate) fn take_update_request(&self) -> bool {
        self.update_requested.swap(false, Ordering::Relaxed)
    }
}

pub(crate) fn crypto_error(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS record: {what}"))
}

/// Which AEAD a session's records use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Suite {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
}

/// One direction's traffic keys as rustls gives them: the AEAD, its key
/// and IV, and the next record's sequence number.
#[derive(Clone)]
pub(crate) struct Secret {
    pub(crate) suite: Suite,
    pub(crate) key: Vec<u8>,
    pub(crate) iv: [u8; aead::NONCE_LEN],
    pub(crate) seq: u64,
}

impl Secret {
    /// rustls' keys, at sequence number `seq`.
    pub(crate) fn new(seq: u64, secrets: &ConnectionTrafficSecrets) -> io::Result<Self> {
        let (suite, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (Suite::Aes128Gcm, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (Suite::Aes256Gcm, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (Suite::Chacha20Poly1305, key, iv)
            }
            _ => return Err(crypto_error("a cipher suite this crate does not seal")),
        };
        let iv = <[u8; aead::NONCE_LEN]>::try_from(iv.as_ref())
            .map_err(|_| crypto_error("bad IV length"))?;
        Ok(Self {
            suite,
            key: key.as_ref().to_vec(),
            iv,
            seq,
        })
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Secret")
            .field("suite", &self.suite)
            .field("seq", &self.seq)
            .finish()
    }
}

/// One direction's keys and sequence number.
pub(crate) struct Keys {
    key: LessSafeKey,
    iv: [u8; aead::NONCE_LEN],
    seq: u64,
}

impl Keys {
    /// The sealing or opening keys of `secret`.
    pub(crate) fn new(secret: &Secret) -> io::Result<Self> {
        let alg = match secret.suite {
            Suite::Aes128Gcm => &aead::AES_128_GCM,
            Suite::Aes256Gcm => &aead::AES_256_GCM,
            Suite::Chacha20Poly1305 => &aead::CHACHA20_POLY1305,
        };
        let key = UnboundKey::new(alg, &secret.key).map_err(|_| crypto_error("bad key length"))?;
        Ok(Self {
            key: LessSafeKey::new(key),
            iv: secret.iv,
            seq: secret.seq,
        })
    }

    /// The next record's nonce.
    fn next_nonce(&mut self) -> io::Result<Nonce> {
        if self.seq == u64::MAX {
            return Err(crypto_error("sequence numbers used up"));
        }
        let mut nonce = self.iv;
        for (n, s) in nonce[aead::NONCE_LEN - 8..]
            .iter_mut()
            .zip(self.seq.to_be_bytes())
        {
            *n ^= s;
        }
        self.seq += 1;
        Ok(Nonce::assume_unique_for_key(nonce))
    }
}

/// The header of a record whose ciphertext (content type and tag
/// included) is `len` bytes.
fn header(len: usize) -> io::Result<[u8; HEADER]> {
    let len = u16::try_from(len).map_err(|_| crypto_error("record too long"))?;
    let [a, b] = len.to_be_bytes();
    Ok([APPLICATION_DATA, 3, 3, a, b])
}

/// The sending half: seals plaintext into records in one reused buffer.
///
/// Slices of at least [`DIRECT`] bytes (guest pages) are sealed straight
/// from where they are into the buffer, each in records of its own, so the
/// encryption is the copy; smaller ones (frame headers, tables, sparse
/// words) are gathered into records by copying, then sealed in place.
pub(crate) struct Sealer {
    keys: Keys,
    shared: Arc<Shared>,
    /// Records sealed with one key before it is updated.
    key_update_after: u64,
    /// Key updates sent.
    pub(crate) updates: u64,
    buf: Box<[u8]>,
}

/// A slice this long or longer is sealed where it lies, in its own records.
const DIRECT: usize = 4 << 10;

/// Records one call of [`Sealer::write_vectored`] may seal at most: at most
/// SEND_PLAIN / DIRECT + 1 direct slices, each in records of at most
/// RECORD_PLAIN bytes but for its last; gathered records full but for those
/// a direct slice (or the end) closes; one key update.
const WRITE_RECORDS: usize = 2 * (SEND_PLAIN / DIRECT + 1) + 2 * (SEND_PLAIN / RECORD_PLAIN) + 2;

impl Sealer {
    pub(crate) fn new(keys: Keys, shared: Arc<Shared>) -> Self {
        Self {
            keys,
            shared,
            key_update_after: KEY_UPDATE_RECORDS,
            updates: 0,
            buf: vec![0; SEND_PLAIN + WRITE_RECORDS * (HEADER + 1 + TAG)].into_boxed_slice(),
        }
    }

    /// Update the key every `records` records instead (tests, fuzzing).
    pub(crate) fn key_update_every(&mut self, records: u64) {
        self.key_update_after = records.max(WRITE_RECORDS as u64 + 1);
    }

    /// Seal up to [`SEND_PLAIN`] bytes of `bufs` and write the records to
    /// `sock`; returns the plaintext bytes taken. A key update, when due,
    /// goes first.
    pub(crate) fn write_vectored(
        &mut self,
        sock: &mut dyn Write,
        bufs: &[io::IoSlice<'_>],
    ) -> io::Result<usize> {
        let mut at = 0; // bytes of `buf` filled
        if self.keys.seq + WRITE_RECORDS as u64 > self.key_update_after
            || self.shared.take_update_request()
        {
            at = self.seal_control(HANDSHAKE, &KEY_UPDATE_MESSAGE, at)?;
            self.keys = Keys::new(&self.shared.next_tx()?)?;
            self.updates += 1;
        }
        let mut taken = 0;
        // The record being gathered from small slices: where its body starts.
        let mut open: Option<usize> = None;
        for b in bufs.iter().map(|b| &b[..]).filter(|b| !b.is_empty()) {
            if taken == SEND_PLAIN {
                break;
            }
            if b.len() >= DIRECT {
                if let Some(body) = open.take() {
                    at = self.seal_gathered(body, at)?;
                }
                let mut rest = &b[..b.len().min(SEND_PLAIN - taken)];
                while !rest.is_empty() {
                    let n = rest.len().min(RECORD_PLAIN);
                    at = self.seal_from(&rest[..n], at)?;
                    taken += n;
                    rest = &rest[n..];
                }
                continue;
            }
            let mut rest = b;
            while !rest.is_empty() && taken < SEND_PLAIN {
                let body = *open.get_or_insert_with(|| {
                    at += HEADER;
                    at
                });
                let n = rest
                    .len()
                    .min(RECORD_PLAIN - (at - body))
                    .min(SEND_PLAIN - taken);
                self.buf[at..at + n].copy_from_slice(&rest[..n]);
                at += n;
                taken += n;
                rest = &rest[n..];
                if at - body == RECORD_PLAIN {
                    at = self.seal_gathered(body, at)?;
                    open = None;
                }
            }
        }
        if let Some(body) = open {
            at = self.seal_gathered(body, at)?;
        }
        sock.write_all(&self.buf[..at])?;
        Ok(taken)
    }

    /// Send `close_notify`: the peer's reads end cleanly after it.
    pub(crate) fn close_notify(&mut self, sock: &mut dyn Write) -> io::Result<()> {
        let at = self.seal_control(ALERT, &CLOSE_NOTIFY, 0)?;
        sock.write_all(&self.buf[..at])
    }

    /// Seal the plaintext gathered at `buf[body..at]` in place as
    /// application data, header before it, content type and tag after;
    /// returns the new fill.
    fn seal_gathered(&mut self, body: usize, at: usize) -> io::Result<usize> {
        self.buf[at] = APPLICATION_DATA;
        let end = at + 1;
        let header = header(end - body + TAG)?;
        self.buf[body - HEADER..body].copy_from_slice(&header);
        let nonce = self.keys.next_nonce()?;
        let tag = self
            .keys
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(header), &mut self.buf[body..end])
            .map_err(|_| crypto_error("sealing failed"))?;
        self.buf[end..end + TAG].copy_from_slice(tag.as_ref());
        Ok(end + TAG)
    }

    /// Seal `plain` from where it lies into a record of content type `kind`
    /// at `buf[at..]`; returns the new fill.
    fn seal_record(&mut self, kind: u8, plain: &[u8], at: usize) -> io::Result<usize> {
        let header = header(plain.len() + 1 + TAG)?;
        let body = at + HEADER;
        let end = body + plain.len();
        self.buf[at..body].copy_from_slice(&header);
        let nonce = self.keys.next_nonce()?;
        let (out, kind_and_tag) = self.buf[body..end + 1 + TAG].split_at_mut(plain.len());
        self.keys
            .key
            .seal_out_of_place_scatter(nonce, Aad::from(header), plain, out, &[kind], kind_and_tag)
            .map_err(|_| crypto_error("sealing failed"))?;
        Ok(end + 1 + TAG)
    }

    fn seal_from(&mut self, plain: &[u8], at: usize) -> io::Result<usize> {
        self.seal_record(APPLICATION_DATA, plain, at)
    }

    fn seal_control(&mut self, kind: u8, message: &[u8], at: usize) -> io::Result<usize> {
        self.seal_record(kind, message, at)
    }
}

/// What a record that is not application data means to the reader.
pub(crate) enum Control {
    /// `close_notify`: the stream ends here.
    Closed,
    /// A `KeyUpdate`: the peer's next records use its next key.
    KeyUpdate,
}

/// The meaning of a control record's plaintext (`kind` is its content
/// type); any other alert, handshake message or content type is an error.
/// A `KeyUpdate` that asks for one in return sets the shared request.
pub(crate) fn control(kind: u8, plain: &[u8], shared: &Shared) -> io::Result<Control> {
    match (kind, plain) {
        (ALERT, [_, 0]) => Ok(Control::Closed),
        (ALERT, [level, description]) => Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            format!("the peer sent TLS alert {description} (level {level})"),
        )),
        (HANDSHAKE, [KEY_UPDATE, 0, 0, 1, request @ (0 | 1)]) => {
            if *request == 1 {
                shared.update_requested.store(true, Ordering::Relaxed);
            }
            Ok(Control::KeyUpdate)
        }
        (HANDSHAKE, [t, ..]) => Err(crypto_error(&format!(
            "an unexpected handshake message (type {t}, {} bytes) after the handshake",
            plain.len()
        ))),
        _ => Err(crypto_error(&format!(
            "an unexpected record (content type {kind}, {} bytes)",
            plain.len()
        ))),
    }
}

/// The content type and plaintext length of an opened record's inner
/// plaintext (RFC 8446 §5.4: content, type, zero padding).
fn inner(plain: &[u8]) -> io::Result<(u8, usize)> {
    match plain.iter().rposition(|&b| b != 0) {
        Some(at) => Ok((plain[at], at)),
        None => Err(crypto_error("a record without a content type")),
    }
}

/// The receiving half: ciphertext read in large chunks; an application
/// data record whose plaintext and content type fit the caller's current
/// buffer is opened straight into it (the decryption is the copy), any
/// other is opened in place and handed out from there. Bytes of the
/// caller's buffer past what a read returns may hold scratch, as
/// [`Read`] allows.
pub(crate) struct Opener {
    keys: Keys,
    shared: Arc<Shared>,
    buf: Vec<u8>,
    /// Ciphertext not yet opened: `buf[start..end]`.
    start: usize,
    end: usize,
    /// Plaintext not yet handed out: `buf[plain.0..plain.1]`.
    plain: (usize, usize),
    /// `close_notify` arrived.
    closed: bool,
    /// Records opened straight into the caller's buffers.
    pub(crate) direct: u64,
    /// Key updates received.
    pub(crate) updates: u64,
}

impl Opener {
    pub(crate) fn new(keys: Keys, shared: Arc<Shared>) -> Self {
        Self {
            keys,
            shared,
            buf: vec![0; RECV_CHUNK + HEADER + RECORD_MAX],
            start: 0,
            end: 0,
            plain: (0, 0),
            closed: false,
            direct: 0,
            updates: 0,
        }
    }

    /// Plaintext into `bufs` in order; reads the socket only when nothing
    /// is buffered, and then once. `Ok(0)` after `close_notify`.
    pub(crate) fn read_vectored(
        &mut self,
        sock: &mut dyn Read,
        bufs: &mut [io::IoSliceMut<'_>],
    ) -> io::Result<usize> {
        if bufs.iter().all(|b| b.is_empty()) {
            return Ok(0);
        }
        let mut copied = 0;
        for out in bufs.iter_mut() {
            let mut out: &mut [u8] = out;
            while !out.is_empty() {
                if self.plain.0 == self.plain.1 {
                    if self.closed {
                        return Ok(copied);
                    }
                    let Some(len) = self.next_record(sock, copied == 0)? else {
                        return Ok(copied);
                    };
                    let inner_len = len - TAG;
                    if inner_len <= out.len() {
                        let n = self.open_into(len, &mut out[..inner_len])?;
                        copied += n;
                        out = &mut out[n..];
                        continue;
                    }
                    self.open_in_place(len)?;
                    if self.closed {
                        return Ok(copied);
                    }
                }
                let (a, b) = self.plain;
                let n = out.len().min(b - a);
                out[..n].copy_from_slice(&self.buf[a..a + n]);
                self.plain.0 += n;
                copied += n;
                out = &mut out[n..];
            }
        }
        Ok(copied)
    }

    /// The length of the next record (ciphertext and tag), once all of it
    /// is buffered at `buf[start..]`. Without `may_block`, only a record
    /// already buffered (`None` if there is none).
    fn next_record(&mut self, sock: &mut dyn Read, may_block: bool) -> io::Result<Option<usize>> {
        loop {
            let header = self.buf[self.start..self.end]
                .first_chunk::<HEADER>()
                .copied();
            if let Some([kind, major, minor, a, b]) = header {
                let len = usize::from(u16::from_be_bytes([a, b]));
                if kind != APPLICATION_DATA || [major, minor] != [3, 3] {
                    return Err(crypto_error(&format!(
                        "a record of type {kind}, version {major}.{minor} (a peer that is not TLS 1.3, or a corrupted stream)"
                    )));
                }
                if !(TAG + 1..=RECORD_MAX).contains(&len) {
                    return Err(crypto_error(&format!(
                        "a record of {len} bytes (a peer that is not TLS 1.3, or a corrupted stream)"
                    )));
                }
                if self.end - self.start >= HEADER + len {
                    return Ok(Some(len));
                }
            }
            if !may_block {
                return Ok(None);
            }
            // Read more: first make room for a whole record after `start`.
            if self.start == self.end {
                self.start = 0;
                self.end = 0;
            } else if self.buf.len() - self.start < HEADER + RECORD_MAX {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let n = sock.read(&mut self.buf[self.end..])?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    if self.start == self.end {
                        "the peer closed the connection without close_notify (the stream may have been cut short)"
                    } else {
                        "the peer closed the connection in the middle of a record"
                    },
                ));
            }
            self.end += n;
        }
    }

    /// The buffered record's header and body range, and the nonce; the
    /// record counts as consumed.
    fn take_record(&mut self, len: usize) -> io::Result<([u8; HEADER], usize, Nonce)> {
        let mut header = [0; HEADER];
        header.copy_from_slice(&self.buf[self.start..self.start + HEADER]);
        let body = self.start + HEADER;
        self.start = body + len;
        Ok((header, body, self.keys.next_nonce()?))
    }

    /// Open the buffered record of `len` bytes into `out` (its inner
    /// plaintext's size); returns the application bytes it gave (0 for a
    /// control record, which is handled here).
    fn open_into(&mut self, len: usize, out: &mut [u8]) -> io::Result<usize> {
        let (header, body, nonce) = self.take_record(len)?;
        let (ciphertext, tag) = self.buf[body..body + len].split_at(len - TAG);
        self.keys
            .key
            .open_separate_gather(nonce, Aad::from(header), ciphertext, tag, out)
            .map_err(|_| forged())?;
        let (kind, n) = inner(out)?;
        if kind == APPLICATION_DATA {
            self.direct += 1;
            return Ok(n);
        }
        self.handle(kind, &out[..n])?;
        Ok(0)
    }

    /// Open the buffered record of `len` bytes where it lies; application
    /// data is handed out from there.
    fn open_in_place(&mut self, len: usize) -> io::Result<()> {
        let (header, body, nonce) = self.take_record(len)?;
        let plain = self
            .keys
            .key
            .open_in_place(nonce, Aad::from(header), &mut self.buf[body..body + len])
            .map_err(|_| forged())?
            .len();
        let (kind, n) = inner(&self.buf[body..body + plain])?;
        if kind == APPLICATION_DATA {
            self.plain = (body, body + n);
            return Ok(());
        }
        let message = self.buf[body..body + n].to_vec();
        self.handle(kind, &message)
    }

    /// A control record: `close_notify` ends the stream, a `KeyUpdate`
    /// moves to the peer's next key.
    fn handle(&mut self, kind: u8, plain: &[u8]) -> io::Result<()> {
        match control(kind, plain, &self.shared)? {
            Control::Closed => self.closed = true,
            Control::KeyUpdate => {
                self.keys = Keys::new(&self.shared.next_rx()?)?;
                self.updates += 1;
            }
        }
        Ok(())
    }

    /// Whether `close_notify` arrived.
    #[cfg(test)]
    pub(crate) fn closed(&self) -> bool {
        self.closed
    }
}

fn forged() -> io::Error {
    crypto_error("a record failed authentication (corrupted, replayed or forged)")
}

/// For the fuzz target (`fuzz/fuzz_targets/tls_records.rs`): `data`'s
/// first byte picks the suite and the mode; the keys come from one real
/// TLS session per suite, made once. Mode 0 opens the rest as a peer's byte
/// stream (a stranger's or a corrupted one: it must end in an error or the
/// end of the stream, never a panic, never more plaintext than it holds);
/// mode 1 seals the rest in writes of sizes taken from it, with a key
/// update every few writes and `close_notify` at the end, and opens the
/// result, which must give back the same bytes and end cleanly.
pub fn fuzz(data: &[u8]) {
    use std::sync::OnceLock;
    type Ends = (Secret, Arc<Shared>, Secret, Arc<Shared>);
    static SESSIONS: OnceLock<Vec<Ends>> = OnceLock::new();
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let sessions = SESSIONS.get_or_init(|| {
        [Suite::Aes128Gcm, Suite::Aes256Gcm, Suite::Chacha20Poly1305]
            .into_iter()
            .filter_map(|suite| crate::tls::session_pair(suite).ok())
            .map(|(c, s)| (c.tx, Shared::new(c.ratchet), s.rx, Shared::new(s.ratchet)))
            .collect()
    });
    let Some((tx, tx_shared, rx, rx_shared)) = sessions.get(usize::from(first % 3)) else {
        return;
    };
    let (Ok(k1), Ok(k2)) = (Keys::new(tx), Keys::new(rx)) else {
        return;
    };
    let mut opener = Opener::new(k2, Arc::clone(rx_shared));
    let mut out = vec![0u8; 3 * RECORD_PLAIN];
    let mut plain = Vec::new();
    let mut open_all = |wire: &[u8], plain: &mut Vec<u8>| -> io::Result<()> {
        let mut src = wire;
        loop {
            let (a, b) = out.split_at_mut(RECORD_PLAIN / 2 + 1);
            let n = opener.read_vectored(
                &mut src,
                &mut [io::IoSliceMut::new(a), io::IoSliceMut::new(b)],
            )?;
            if n == 0 {
                return Ok(());
            }
            plain.extend_from_slice(&out[..n]);
            assert!(plain.len() <= wire.len(), "more plaintext than bytes");
        }
    };
    if first / 3 % 2 == 0 {
        let _ = open_all(rest, &mut plain);
        return;
    }
    let mut sealer = Sealer::new(k1, Arc::clone(tx_shared));
    sealer.key_update_every(0);
    let mut wire = Vec::new();
    let mut left = rest;
    let mut sizes = rest.iter().cycle();
    while !left.is_empty() {
        let size = (usize::from(*sizes.next().unwrap_or(&1)) * 1031 % (4 * RECORD_PLAIN)).max(1);
        let now = &left[..size.min(left.len())];
        let (x, y) = now.split_at(now.len() / 2);
        let took = sealer
            .write_vectored(&mut wire, &[io::IoSlice::new(x), io::IoSlice::new(y)])
            .unwrap_or(0);
        assert!(took > 0, "a write of {} bytes sealed nothing", now.len());
        left = &left[took..];
    }
    assert!(sealer.close_notify(&mut wire).is_ok(), "close_notify");
    let end = open_all(&wire, &mut plain);
    assert!(end.is_ok(), "the stream's end: {end:?}");
    assert!(plain == rest, "sealed and opened bytes differ");
    assert_eq!(opener.updates, sealer.updates, "key updates");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handshake::Session;
    use std::net::{TcpListener, TcpStream};

    /// The fuzz target's two modes on a few inputs (the target itself runs
    /// in the test command's fuzz smoke).
    #[test]
    fn fuzz_entry_round_trips_and_survives_garbage() {
        let mut input: Vec<u8> = (0..200_000u32).map(|i| (i * 31 % 253) as u8).collect();
        for first in 0..6u8 {
            input[0] = first;
            fuzz(&input);
            fuzz(&input[..1000]);
        }
        fuzz(&[]);
        fuzz(&[0, 23, 3, 3, 0, 16]);
    }

    pub(crate) fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    }

    /// The client's sending half and the server's receiving half of one
    /// real session.
    fn halves(suite: Suite) -> (Sealer, Opener, Session, Session) {
        let (c, s) = crate::tls::session_pair(suite).unwrap();
        let sealer = Sealer::new(Keys::new(&c.tx).unwrap(), Shared::new(c.ratchet));
        let opener = Opener::new(Keys::new(&s.rx).unwrap(), Shared::new(s.ratchet));
        let (c2, s2) = crate::tls::session_pair(suite).unwrap();
        (sealer, opener, c2, s2)
    }

    /// Real sockets: vectored writes of odd sizes come out byte for byte,
    /// across records, socket reads and key updates, and `close_notify`
    /// ends the stream cleanly.
    #[test]
    fn records_carry_every_byte_across_key_updates() {
        for suite in [Suite::Aes128Gcm, Suite::Aes256Gcm, Suite::Chacha20Poly1305] {
            let (a, b) = pair();
            let (mut sealer, mut opener, ..) = halves(suite);
            sealer.key_update_every(0);
            let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
            let sent = data.clone();
            let writer = std::thread::spawn(move || {
                let mut off = 0;
                while off < sent.len() {
                    let end = (off + 100_003).min(sent.len());
                    let mid = off + (end - off) / 3;
                    let slices = [
                        io::IoSlice::new(&sent[off..mid]),
                        io::IoSlice::new(&sent[mid..end]),
                    ];
                    off += sealer.write_vectored(&mut &a, &slices).unwrap();
                }
                sealer.close_notify(&mut &a).unwrap();
                sealer.updates
            });
            let mut got = vec![0u8; data.len()];
            let mut off = 0;
            while off < got.len() {
                let half = ((got.len() - off) / 2).max(1);
                let (x, y) = got[off..].split_at_mut(half);
                let mut bufs = [io::IoSliceMut::new(x), io::IoSliceMut::new(y)];
                off += opener.read_vectored(&mut &b, &mut bufs).unwrap();
            }
            let mut more = [0u8; 10];
            assert_eq!(
                opener
                    .read_vectored(&mut &b, &mut [io::IoSliceMut::new(&mut more)])
                    .unwrap(),
                0,
                "{suite:?}: close_notify ends the stream"
            );
            assert!(opener.closed());
            let updates = writer.join().unwrap();
            assert!(updates >= 10, "{suite:?}: {updates} key updates");
            assert_eq!(opener.updates, updates, "{suite:?}");
            assert!(got == data, "{suite:?}: bytes differ");
        }
    }

    /// Batches as the TCP transport writes them (a small header and table,
    /// then page runs straight from memory, then sparse words), read into
    /// the same slices as the destination does: every record of a run but
    /// its last opens straight into the run, and the bytes are the same.
    #[test]
    fn page_runs_open_straight_into_their_slices() {
        let mut sizes: Vec<usize> = vec![44, 16 << 10, 3, 20 << 10, 100, 64 << 10, 1, 200 << 10];
        for i in 0..12 {
            sizes.extend([5 + 2 * i, 4096 * (1 + i % 3)]);
        }
        sizes.extend([4096, 300]);
        let total: usize = sizes.iter().sum();
        let data: Vec<u8> = (0..total).map(|i| (i * 13 % 241) as u8).collect();
        let (a, b) = pair();
        let (mut sealer, mut opener, ..) = halves(Suite::Aes128Gcm);
        let sent = data.clone();
        let cuts = sizes.clone();
        let writer = std::thread::spawn(move || {
            let mut slices = Vec::new();
            let mut off = 0;
            for n in &cuts {
                slices.push(&sent[off..off + n]);
                off += n;
            }
            // Whole slices per write: what the transport's write loop does.
            let mut i = 0;
            while i < slices.len() {
                let iov: Vec<io::IoSlice<'_>> =
                    slices[i..].iter().map(|s| io::IoSlice::new(s)).collect();
                let mut took = sealer.write_vectored(&mut &a, &iov).unwrap();
                while took > 0 {
                    if took >= slices[i].len() {
                        took -= slices[i].len();
                        i += 1;
                    } else {
                        slices[i] = &slices[i][took..];
                        took = 0;
                    }
                }
            }
        });
        let mut got = vec![0u8; total];
        let mut outs: Vec<&mut [u8]> = Vec::new();
        let mut rest = &mut got[..];
        for n in &sizes {
            let (x, y) = rest.split_at_mut(*n);
            outs.push(x);
            rest = y;
        }
        let mut i = 0;
        while i < outs.len() {
            let mut iov: Vec<io::IoSliceMut<'_>> = outs[i..]
                .iter_mut()
                .map(|s| io::IoSliceMut::new(s))
                .collect();
            let mut n = opener.read_vectored(&mut &b, &mut iov).unwrap();
            drop(iov);
            while n > 0 {
                if n >= outs[i].len() {
                    n -= outs[i].len();
                    i += 1;
                } else {
                    let cut = std::mem::take(&mut outs[i]);
                    outs[i] = &mut cut[n..];
                    n = 0;
                }
            }
        }
        writer.join().unwrap();
        assert!(got == data, "bytes differ");
        let straight: u64 = sizes
            .iter()
            .filter(|&&n| n >= DIRECT)
            .map(|n| n.div_ceil(RECORD_PLAIN) as u64 - 1)
            .sum();
        assert_eq!(straight, 16);
        assert!(
            opener.direct >= straight,
            "{} of {straight} page records opened straight into their slices",
            opener.direct
        );
    }

    /// A flipped bit, other keys, a forged length or type, a record of the
    /// other direction and a cut stream are errors; `close_notify` is not.
    #[test]
    fn tampering_other_keys_and_cuts_are_refused() {
        let (sealer, _, c2, s2) = halves(Suite::Aes128Gcm);
        let client_shared = Shared::new(c2.ratchet);
        let seal = |mut sealer: Sealer, bytes: &[u8], close: bool| {
            let mut wire = Vec::new();
            sealer
                .write_vectored(&mut wire, &[io::IoSlice::new(bytes)])
                .unwrap();
            if close {
                sealer.close_notify(&mut wire).unwrap();
            }
            wire
        };
        // Opened by the session the records belong to, or another.
        let (c, s) = crate::tls::session_pair(Suite::Aes128Gcm).unwrap();
        let right = || Opener::new(Keys::new(&s.rx).unwrap(), Shared::new(Box::new(NoRatchet)));
        let sealer = {
            drop(sealer);
            Sealer::new(Keys::new(&c.tx).unwrap(), Shared::new(c.ratchet))
        };
        let wire = seal(sealer, b"the guest's memory", true);
        let open = |mut opener: Opener, wire: &[u8]| {
            let mut out = vec![0u8; 1000];
            let mut src = wire;
            let n = opener.read_vectored(&mut src, &mut [io::IoSliceMut::new(&mut out)])?;
            let end = opener.read_vectored(&mut src, &mut [io::IoSliceMut::new(&mut out)])?;
            Ok::<_, io::Error>((n, end))
        };
        assert_eq!(open(right(), &wire).unwrap(), (18, 0));
        let mut flipped = wire.clone();
        flipped[10] ^= 1;
        let e = open(right(), &flipped).unwrap_err();
        assert!(e.to_string().contains("failed authentication"), "{e}");
        let other = Opener::new(Keys::new(&s2.rx).unwrap(), Shared::new(Box::new(NoRatchet)));
        let e = open(other, &wire).unwrap_err();
        assert!(e.to_string().contains("failed authentication"), "{e}");
        // The server's own sending keys (the other direction).
        let reverse = Opener::new(Keys::new(&s.tx).unwrap(), Arc::clone(&client_shared));
        assert!(open(reverse, &wire).is_err());
        let mut long = wire.clone();
        long[3..5].copy_from_slice(&u16::MAX.to_be_bytes());
        let e = open(right(), &long).unwrap_err();
        assert!(e.to_string().contains("65535 bytes"), "{e}");
        let mut typed = wire.clone();
        typed[0] = HANDSHAKE;
        let e = open(right(), &typed).unwrap_err();
        assert!(e.to_string().contains("a record of type 22"), "{e}");
        // Cut inside a record, and cut at a record boundary before
        // close_notify: both are errors, never a clean end.
        let e = open(right(), &wire[..wire.len() - 1]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        let first = HEADER + usize::from(u16::from_be_bytes([wire[3], wire[4]]));
        let mut opener = right();
        let mut out = vec![0u8; 100];
        let mut src = &wire[..first];
        assert_eq!(
            opener
                .read_vectored(&mut src, &mut [io::IoSliceMut::new(&mut out)])
                .unwrap(),
            18
        );
        let e = opener
            .read_vectored(&mut src, &mut [io::IoSliceMut::new(&mut out)])
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(e.to_string().contains("without close_notify"), "{e}");
    }

    /// A receiver that never sees a key update.
    struct NoRatchet;

    impl Ratchet for NoRatchet {
        fn next_tx(&mut self) -> Result<ConnectionTrafficSecrets, rustls::Error> {
            Err(rustls::Error::General("no key update expected".into()))
        }
        fn next_rx(&mut self) -> Result<ConnectionTrafficSecrets, rustls::Error> {
            Err(rustls::Error::General("no key update expected".into()))
        }
    }
}
