//! The sealed record layer every TLS connection uses once its handshake is
//! over: one AEAD key per direction, derived from the TLS session's
//! exporter (RFC 8446 §7.5), so reading and writing never share a lock or a
//! state, and a byte is copied once on each side of the socket (into the
//! send buffer, out of the receive buffer) instead of three or four times
//! through rustls' buffers.
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

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;
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
pub(crate) struct Sealer {
    keys: Keys,
    buf: Vec<u8>,
}

impl Sealer {
    pub(crate) fn new(keys: Keys) -> Self {
        Self {
            keys,
            buf: Vec::with_capacity(SEND_PLAIN + SEND_PLAIN / RECORD_PLAIN * (HEADER + TAG) + 64),
        }
    }

    /// Seal up to [`SEND_PLAIN`] bytes of `bufs` and write the records to
    /// `sock`; returns the plaintext bytes taken.
    pub(crate) fn write_vectored(
        &mut self,
        sock: &mut dyn Write,
        bufs: &[io::IoSlice<'_>],
    ) -> io::Result<usize> {
        self.buf.clear();
        let mut taken = 0;
        let mut slices = bufs.iter().map(|b| &b[..]).filter(|b| !b.is_empty());
        let mut cur: &[u8] = slices.next().unwrap_or(&[]);
        while !cur.is_empty() && taken < SEND_PLAIN {
            // One record: header, plaintext gathered from the slices, tag.
            let head = self.buf.len();
            self.buf.extend_from_slice(&[0; HEADER]);
            let body = self.buf.len();
            while !cur.is_empty() && self.buf.len() - body < RECORD_PLAIN && taken < SEND_PLAIN {
                let room = (RECORD_PLAIN - (self.buf.len() - body)).min(SEND_PLAIN - taken);
                let n = room.min(cur.len());
                self.buf.extend_from_slice(&cur[..n]);
                taken += n;
                cur = &cur[n..];
                if cur.is_empty() {
                    cur = slices.next().unwrap_or(&[]);
                }
            }
            let len = u32::try_from(self.buf.len() - body + TAG)
                .map_err(|_| crypto_error("record too long"))?;
            self.buf[head..body].copy_from_slice(&len.to_be_bytes());
            let header: [u8; HEADER] = len.to_be_bytes();
            let nonce = self.keys.next_nonce()?;
            let tag = self
                .keys
                .key
                .seal_in_place_separate_tag(nonce, Aad::from(header), &mut self.buf[body..])
                .map_err(|_| crypto_error("sealing failed"))?;
            self.buf.extend_from_slice(tag.as_ref());
        }
        sock.write_all(&self.buf)?;
        Ok(taken)
    }
}

/// The receiving half: ciphertext read in large chunks, each record opened
/// in place, its plaintext handed out from there.
pub(crate) struct Opener {
    keys: Keys,
    buf: Vec<u8>,
    /// Ciphertext not yet opened: `buf[start..end]`.
    start: usize,
    end: usize,
    /// Plaintext not yet handed out: `buf[plain.0..plain.1]`.
    plain: (usize, usize),
}

impl Opener {
    pub(crate) fn new(keys: Keys) -> Self {
        Self {
            keys,
            buf: vec![0; RECV_CHUNK + HEADER + RECORD_PLAIN + TAG],
            start: 0,
            end: 0,
            plain: (0, 0),
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
                if self.plain.0 == self.plain.1 && !self.open_next(sock, copied == 0)? {
                    return Ok(copied);
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

    /// Open the next record with plaintext in it. Without `may_block`,
    /// only a record already buffered (`false` if there is none).
    fn open_next(&mut self, sock: &mut dyn Read, may_block: bool) -> io::Result<bool> {
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
                    let body = self.start + HEADER;
                    let nonce = self.keys.next_nonce()?;
                    let plain = self
                        .keys
                        .key
                        .open_in_place(nonce, Aad::from(header), &mut self.buf[body..body + len])
                        .map_err(|_| {
                            crypto_error(
                                "a record failed authentication (corrupted, replayed or forged)",
                            )
                        })?
                        .len();
                    self.plain = (body, body + plain);
                    self.start = body + len;
                    if plain > 0 {
                        return Ok(true);
                    }
                    continue;
                }
            }
            if !may_block {
                return Ok(false);
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
