//! The sealed record layer every TLS connection uses once its handshake is
//! over: one AEAD key per direction, derived from the TLS session's
//! exporter (RFC 8446 §7.5), so reading and writing never share a lock or a
//! state, and page bytes are never copied apart from the cipher: they are
//! sealed from guest memory into the send buffer and opened from the
//! receive buffer into guest memory (rustls' buffers copied each byte three
//! or four times).
//!
//! **Why aws-lc-rs** (for the handshake too, one crypto library): it
//! seals from one buffer into another and opens likewise
//! (`seal_out_of_place_scatter`, `open_separate_gather`), which ring cannot,
//! and its AES-GCM uses AVX-512 where the CPU has it: 1.5× ring's 0.17
//! (AES-128-GCM, 64 KiB records, this machine).
//!
//! **Why not TLS records after the handshake.** rustls keeps both
//! directions in one state (one lock for a reader thread and a writer
//! thread) and copies application data through its own buffers; kernel TLS
//! would avoid both but this project's kernels often lack it. Deriving the
//! data keys from the exporter is the pattern of NTS (RFC 8915, Network
//! Time Security), which keys its own AEAD records from a TLS 1.3 session:
//! the keys are as secret and as bound to the authenticated handshake as
//! the session's own (the exporter secret comes from the same ECDHE
//! exchange both certificates, or both PSK proofs, vouch for).
//!
//! **Format.** A record is a 4-byte big-endian length `n` (16 ≤ `n` ≤
//! [`RECORD_PLAIN`] + 16), then `n` bytes of ciphertext and tag. The AEAD
//! is the one of the negotiated TLS suite (AES-128-GCM, AES-256-GCM or
//! ChaCha20-Poly1305); the additional data is the length header; the
//! nonce is the direction's IV XOR the record's sequence number, so a
//! record dropped, replayed, reordered or moved to the other direction
//! fails authentication.
//!
//! **Limits.** Every [`REKEY_RECORDS`] records a direction moves to the
//! next key epoch (key and IV expanded by HKDF from the direction's
//! secret with the epoch number): both ends count records, so no message
//! is needed. That keeps AES-GCM far inside its per-key confidentiality
//! limit (RFC 8446 §5.5: 2^24.5 full TLS records, about 2^38.5 bytes;
//! an epoch carries at most 2^36). A length outside the bounds or a
//! failed tag is an error, never an allocation or a panic.

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::hkdf;
use std::io::{self, Read, Write};

/// Plaintext per record at most.
pub(crate) const RECORD_PLAIN: usize = 64 << 10;
/// Records per key epoch: 2^20 records of at most 64 KiB, 64 GiB.
pub(crate) const REKEY_RECORDS: u64 = 1 << 20;
/// The length header.
const HEADER: usize = 4;
/// The AEAD tag (all three suites).
const TAG: usize = 16;
/// Plaintext sealed per socket write at most.
const SEND_PLAIN: usize = 256 << 10;
/// Ciphertext read from the socket at a time at most.
const RECV_CHUNK: usize = 256 << 10;

/// Which AEAD the records use (the negotiated TLS suite's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Suite {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
}

impl Suite {
    fn algorithm(self) -> &'static aead::Algorithm {
        match self {
            Suite::Aes128Gcm => &aead::AES_128_GCM,
            Suite::Aes256Gcm => &aead::AES_256_GCM,
            Suite::Chacha20Poly1305 => &aead::CHACHA20_POLY1305,
        }
    }
}

/// Which end this is: the source seals with the source's key and opens
/// with the destination's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    FromSource,
    FromDestination,
}

impl Direction {
    fn label(self) -> &'static [u8] {
        match self {
            Direction::FromSource => b"live-migration records v1: source to destination",
            Direction::FromDestination => b"live-migration records v1: destination to source",
        }
    }
}

/// One direction's keys: the secret, the epoch, the sequence number.
pub(crate) struct Keys {
    secret: hkdf::Prk,
    suite: Suite,
    epoch: u64,
    seq: u64,
    key: LessSafeKey,
    iv: [u8; aead::NONCE_LEN],
}

/// The length HKDF is asked to expand to.
struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

fn crypto_error(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("sealed record: {what}"))
}

impl Keys {
    /// The keys of `direction`, from the 32 bytes exported from the TLS
    /// session.
    pub(crate) fn new(exported: &[u8; 32], suite: Suite, direction: Direction) -> io::Result<Self> {
        let secret = hkdf::Salt::new(hkdf::HKDF_SHA256, direction.label()).extract(exported);
        let (key, iv) = Self::epoch_keys(&secret, suite, 0)?;
        Ok(Self {
            secret,
            suite,
            epoch: 0,
            seq: 0,
            key,
            iv,
        })
    }

    fn epoch_keys(
        secret: &hkdf::Prk,
        suite: Suite,
        epoch: u64,
    ) -> io::Result<(LessSafeKey, [u8; aead::NONCE_LEN])> {
        let alg = suite.algorithm();
        let epoch = epoch.to_be_bytes();
        let mut bytes = [0u8; 32 + aead::NONCE_LEN];
        let want = alg.key_len() + aead::NONCE_LEN;
        let info: [&[u8]; 2] = [b"key and iv of epoch", &epoch];
        secret
            .expand(&info, Len(want))
            .and_then(|okm| okm.fill(&mut bytes[..want]))
            .map_err(|_| crypto_error("key derivation failed"))?;
        let key = UnboundKey::new(alg, &bytes[..alg.key_len()])
            .map_err(|_| crypto_error("bad key length"))?;
        let mut iv = [0u8; aead::NONCE_LEN];
        iv.copy_from_slice(&bytes[alg.key_len()..want]);
        Ok((LessSafeKey::new(key), iv))
    }

    /// The next record's nonce; moves to the next epoch when this one is
    /// used up.
    fn next_nonce(&mut self) -> io::Result<Nonce> {
        if self.seq == REKEY_RECORDS {
            self.epoch += 1;
            let (key, iv) = Self::epoch_keys(&self.secret, self.suite, self.epoch)?;
            self.key = key;
            self.iv = iv;
            self.seq = 0;
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

/// The sending half: seals plaintext into records in one reused buffer.
///
/// Slices of at least [`DIRECT`] bytes (guest pages) are sealed straight
/// from where they are into the buffer, each in records of its own, so the
/// encryption is the copy; smaller ones (frame headers, tables, sparse
/// words) are gathered into records by copying, then sealed in place. A
/// receiver reading into the same slices (the page runs of a batch, as the
/// destination does) then opens each page record straight into guest
/// memory.
pub(crate) struct Sealer {
    keys: Keys,
    buf: Box<[u8]>,
}

/// A slice this long or longer is sealed where it lies, in its own records.
const DIRECT: usize = 16 << 10;

impl Sealer {
    pub(crate) fn new(keys: Keys) -> Self {
        // Room for SEND_PLAIN bytes however the slices fall: at most
        // SEND_PLAIN / DIRECT + 1 direct slices, each in records of at most
        // RECORD_PLAIN bytes but for its last; gathered records full but for
        // those a direct slice (or the end) closes.
        let records = 2 * (SEND_PLAIN / DIRECT + 1) + 2 * (SEND_PLAIN / RECORD_PLAIN) + 1;
        let overhead = records * (HEADER + TAG);
        Self {
            keys,
            buf: vec![0; SEND_PLAIN + overhead].into_boxed_slice(),
        }
    }

    /// Seal up to [`SEND_PLAIN`] bytes of `bufs` and write the records to
    /// `sock`; returns the plaintext bytes taken.
    pub(crate) fn write_vectored(
        &mut self,
        sock: &mut dyn Write,
        bufs: &[io::IoSlice<'_>],
    ) -> io::Result<usize> {
        let mut at = 0; // bytes of `buf` filled
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

    /// The record header for `plain` bytes of plaintext.
    fn header(plain: usize) -> io::Result<[u8; HEADER]> {
        u32::try_from(plain + TAG)
            .map(u32::to_be_bytes)
            .map_err(|_| crypto_error("record too long"))
    }

    /// Seal the plaintext gathered at `buf[body..at]` in place, header before
    /// it and tag after; returns the new fill.
    fn seal_gathered(&mut self, body: usize, at: usize) -> io::Result<usize> {
        let header = Self::header(at - body)?;
        self.buf[body - HEADER..body].copy_from_slice(&header);
        let nonce = self.keys.next_nonce()?;
        let tag = self
            .keys
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(header), &mut self.buf[body..at])
            .map_err(|_| crypto_error("sealing failed"))?;
        self.buf[at..at + TAG].copy_from_slice(tag.as_ref());
        Ok(at + TAG)
    }

    /// Seal `plain` from where it lies into a record at `buf[at..]`; returns
    /// the new fill.
    fn seal_from(&mut self, plain: &[u8], at: usize) -> io::Result<usize> {
        let header = Self::header(plain.len())?;
        let body = at + HEADER;
        let end = body + plain.len();
        self.buf[at..body].copy_from_slice(&header);
        let nonce = self.keys.next_nonce()?;
        let (out, tag) = self.buf[body..end + TAG].split_at_mut(plain.len());
        self.keys
            .key
            .seal_out_of_place_scatter(nonce, Aad::from(header), plain, out, &[], tag)
            .map_err(|_| crypto_error("sealing failed"))?;
        Ok(end + TAG)
    }
}

/// The receiving half: ciphertext read in large chunks; a record whose
/// plaintext fits the caller's current buffer is opened straight into it
/// (the decryption is the copy), any other is opened in place and handed
/// out from there.
pub(crate) struct Opener {
    keys: Keys,
    buf: Vec<u8>,
    /// Ciphertext not yet opened: `buf[start..end]`.
    start: usize,
    end: usize,
    /// Plaintext not yet handed out: `buf[plain.0..plain.1]`.
    plain: (usize, usize),
    /// Records opened straight into the caller's buffers.
    pub(crate) direct: u64,
}

impl Opener {
    pub(crate) fn new(keys: Keys) -> Self {
        Self {
            keys,
            buf: vec![0; RECV_CHUNK + HEADER + RECORD_PLAIN + TAG],
            start: 0,
            end: 0,
            plain: (0, 0),
            direct: 0,
        }
    }

    /// Plaintext into `bufs` in order; reads the socket only when nothing
    /// is buffered, and then once.
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
                    let Some(len) = self.next_record(sock, copied == 0)? else {
                        return Ok(copied);
                    };
                    let plain = len - TAG;
                    if plain <= out.len() {
                        self.open_into(len, &mut out[..plain])?;
                        copied += plain;
                        out = &mut out[plain..];
                        continue;
                    }
                    self.open_in_place(len)?;
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
            if let Some(header) = header {
                let len = u32::from_be_bytes(header) as usize;
                if !(TAG..=RECORD_PLAIN + TAG).contains(&len) {
                    return Err(crypto_error(&format!(
                        "a record of {len} bytes (a peer that is not this program, or a corrupted stream)"
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
            } else if self.buf.len() - self.start < HEADER + RECORD_PLAIN + TAG {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let n = sock.read(&mut self.buf[self.end..])?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    if self.start == self.end {
                        "the peer closed the connection"
                    } else {
                        "the peer closed the connection in the middle of a record"
                    },
                ));
            }
            self.end += n;
        }
    }

    /// The buffered record's header, body range, and the nonce; the record
    /// counts as consumed.
    fn take_record(&mut self, len: usize) -> io::Result<([u8; HEADER], usize, Nonce)> {
        let mut header = [0; HEADER];
        header.copy_from_slice(&self.buf[self.start..self.start + HEADER]);
        let body = self.start + HEADER;
        self.start = body + len;
        Ok((header, body, self.keys.next_nonce()?))
    }

    /// Open the buffered record of `len` bytes into `out` (its plaintext's
    /// exact size).
    fn open_into(&mut self, len: usize, out: &mut [u8]) -> io::Result<()> {
        let (header, body, nonce) = self.take_record(len)?;
        let (ciphertext, tag) = self.buf[body..body + len].split_at(len - TAG);
        self.keys
            .key
            .open_separate_gather(nonce, Aad::from(header), ciphertext, tag, out)
            .map_err(|_| forged())?;
        self.direct += 1;
        Ok(())
    }

    /// Open the buffered record of `len` bytes where it lies; its plaintext
    /// is handed out from there.
    fn open_in_place(&mut self, len: usize) -> io::Result<()> {
        let (header, body, nonce) = self.take_record(len)?;
        let plain = self
            .keys
            .key
            .open_in_place(nonce, Aad::from(header), &mut self.buf[body..body + len])
            .map_err(|_| forged())?
            .len();
        self.plain = (body, body + plain);
        Ok(())
    }
}

fn forged() -> io::Error {
    crypto_error("a record failed authentication (corrupted, replayed or forged)")
}

/// For the fuzz target (`fuzz/fuzz_targets/sealed_records.rs`): `data`'s
/// first byte picks the suite and the mode. Mode 0 opens the rest as a
/// peer's byte stream (a stranger's or a corrupted one: it must end in an
/// error or the end of the stream, never a panic, never more plaintext
/// than it holds); mode 1 seals the rest in writes of sizes taken from it
/// and opens the result, which must give back the same bytes.
pub fn fuzz(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let suite =
        [Suite::Aes128Gcm, Suite::Aes256Gcm, Suite::Chacha20Poly1305][usize::from(first % 3)];
    let keys = || Keys::new(&[7; 32], suite, Direction::FromSource);
    let (Ok(k1), Ok(k2)) = (keys(), keys()) else {
        return;
    };
    let mut opener = Opener::new(k2);
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
            plain.extend_from_slice(&out[..n]);
            assert!(plain.len() <= wire.len(), "more plaintext than bytes");
        }
    };
    if first / 3 % 2 == 0 {
        let _ = open_all(rest, &mut plain);
        return;
    }
    let mut sealer = Sealer::new(k1);
    let mut wire = Vec::new();
    let mut left = rest;
    let mut sizes = rest.iter().cycle();
    while !left.is_empty() {
        let size = (usize::from(*sizes.next().unwrap_or(&1)) * 1031 % (2 * RECORD_PLAIN)).max(1);
        let now = &left[..size.min(left.len())];
        let (x, y) = now.split_at(now.len() / 2);
        let took = sealer
            .write_vectored(&mut wire, &[io::IoSlice::new(x), io::IoSlice::new(y)])
            .unwrap_or(0);
        assert!(took > 0, "a write of {} bytes sealed nothing", now.len());
        left = &left[took..];
    }
    let end = open_all(&wire, &mut plain).err().map(|e| e.kind());
    assert_eq!(end, Some(io::ErrorKind::UnexpectedEof), "the stream's end");
    assert!(plain == rest, "sealed and opened bytes differ");
}

#[cfg(test)]
mod tests {
    use super::*;
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
        fuzz(&[0, 0, 0, 0, 16]);
    }

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    }

    fn keys(seed: u8, suite: Suite) -> (Sealer, Opener) {
        let exported = [seed; 32];
        (
            Sealer::new(Keys::new(&exported, suite, Direction::FromSource).unwrap()),
            Opener::new(Keys::new(&exported, suite, Direction::FromSource).unwrap()),
        )
    }

    /// Real sockets: vectored writes of odd sizes come out byte for byte,
    /// across records, socket reads and a key epoch change.
    #[test]
    fn records_carry_every_byte_across_epochs() {
        for suite in [Suite::Aes128Gcm, Suite::Aes256Gcm, Suite::Chacha20Poly1305] {
            let (a, b) = pair();
            let (mut sealer, mut opener) = keys(3, suite);
            // Start near the end of epoch 0 so the test crosses into epoch 1.
            sealer.keys.seq = REKEY_RECORDS - 5;
            opener.keys.seq = REKEY_RECORDS - 5;
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
                sealer.keys.epoch
            });
            let mut got = vec![0u8; data.len()];
            let mut off = 0;
            while off < got.len() {
                let half = ((got.len() - off) / 2).max(1);
                let (x, y) = got[off..].split_at_mut(half);
                let mut bufs = [io::IoSliceMut::new(x), io::IoSliceMut::new(y)];
                off += opener.read_vectored(&mut &b, &mut bufs).unwrap();
            }
            assert_eq!(writer.join().unwrap(), 1, "{suite:?}: the epoch changed");
            assert_eq!(opener.keys.epoch, 1);
            assert!(got == data, "{suite:?}: bytes differ");
        }
    }

    /// Batches as the TCP transport writes them (a small header and table,
    /// then page runs straight from memory, then sparse words), read into
    /// the same slices as the destination does: every page record opens
    /// straight into its run, and the bytes are the same. Alternating small
    /// and page-sized slices in one write fill the send buffer's worst
    /// case.
    #[test]
    fn page_runs_open_straight_into_their_slices() {
        let sizes: Vec<usize> = vec![
            44,
            16 << 10,
            3,
            20 << 10,
            100,
            64 << 10,
            1,
            200 << 10,
            5,
            16 << 10,
            7,
            16 << 10,
            9,
            16 << 10,
            11,
            16 << 10,
            13,
            16 << 10,
            15,
            16 << 10,
            17,
            16 << 10,
            19,
            16 << 10,
            21,
            16 << 10,
            23,
            16 << 10,
            25,
            16 << 10,
            4096,
            300,
        ];
        let total: usize = sizes.iter().sum();
        let data: Vec<u8> = (0..total).map(|i| (i * 13 % 241) as u8).collect();
        let (a, b) = pair();
        let (mut sealer, mut opener) = keys(9, Suite::Aes128Gcm);
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
        // Every record of a slice of 16 KiB or more opened straight into it.
        let page_records: u64 = sizes
            .iter()
            .filter(|&&n| n >= DIRECT)
            .map(|n| n.div_ceil(RECORD_PLAIN) as u64)
            .sum();
        assert_eq!(page_records, 18);
        assert!(
            opener.direct >= page_records,
            "{} of {page_records} page records opened straight into their slices",
            opener.direct
        );
    }

    /// A flipped bit, a wrong key and a forged length are errors.
    #[test]
    fn tampering_and_wrong_keys_are_refused() {
        let seal = |bytes: &[u8]| {
            let (a, b) = pair();
            let (mut sealer, _) = keys(1, Suite::Aes128Gcm);
            sealer
                .write_vectored(&mut &a, &[io::IoSlice::new(bytes)])
                .unwrap();
            drop(a);
            let mut wire = Vec::new();
            (&b).read_to_end(&mut wire).unwrap();
            wire
        };
        let open = |wire: Vec<u8>, seed: u8| {
            let (a, b) = pair();
            (&a).write_all(&wire).unwrap();
            drop(a);
            let (_, mut opener) = keys(seed, Suite::Aes128Gcm);
            let mut out = vec![0u8; 1000];
            opener.read_vectored(&mut &b, &mut [io::IoSliceMut::new(&mut out)])
        };
        let wire = seal(b"the guest's memory");
        assert_eq!(open(wire.clone(), 1).unwrap(), 18);
        let mut flipped = wire.clone();
        flipped[10] ^= 1;
        let e = open(flipped, 1).unwrap_err();
        assert!(e.to_string().contains("failed authentication"), "{e}");
        let e = open(wire.clone(), 2).unwrap_err();
        assert!(e.to_string().contains("failed authentication"), "{e}");
        let mut long = wire.clone();
        long[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        let e = open(long, 1).unwrap_err();
        assert!(e.to_string().contains("4294967295 bytes"), "{e}");
        let e = open(wire[..wire.len() - 1].to_vec(), 1).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        // A record of the other direction does not open.
        let (a, b) = pair();
        (&a).write_all(&wire).unwrap();
        drop(a);
        let mut other =
            Opener::new(Keys::new(&[1; 32], Suite::Aes128Gcm, Direction::FromDestination).unwrap());
        let mut out = vec![0u8; 100];
        assert!(
            other
                .read_vectored(&mut &b, &mut [io::IoSliceMut::new(&mut out)])
                .is_err()
        );
    }
}
