//! Frames on a byte stream: a 16-byte header, then the payload.
//!
//! ```text
//! kind u8 | flags u8 | reserved u16 = 0 | len u32 | check u64
//! ```
//!
//! `check` is xxh3-64 seeded with [`check_seed`] (kind, flags, length).

use std::io::{self, Read, Write};

use crate::checksum::xxh3_64_with_seed;

use super::{FrameKind, MAGIC, MAX_FRAME, Message, ProtocolError, VERSION};

/// Size of a frame header on the wire.
pub const HEADER_LEN: usize = 16;

/// The seed of a frame's xxh3 check: binds the check to the header's kind,
/// flags and length, so a flipped header bit fails the check too.
pub fn check_seed(kind: FrameKind, flags: u8, len: u32) -> u64 {
    kind as u64 | (flags as u64) << 8 | (len as u64) << 16
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Frame kind.
    pub kind: FrameKind,
    /// Kind-specific flags (page batches: compression).
    pub flags: u8,
    /// Payload length.
    pub len: u32,
    /// xxh3-64 check (what it covers depends on the kind).
    pub check: u64,
}

impl FrameHeader {
    /// Encode to wire bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = self.kind as u8;
        b[1] = self.flags;
        b[4..8].copy_from_slice(&self.len.to_le_bytes());
        b[8..16].copy_from_slice(&self.check.to_le_bytes());
        b
    }

    /// Decode wire bytes.
    ///
    /// # Errors
    /// Unknown kind, non-zero reserved bytes, or a length over [`MAX_FRAME`].
    pub fn from_bytes(b: &[u8; HEADER_LEN]) -> Result<FrameHeader, ProtocolError> {
        let [
            k,
            flags,
            r0,
            r1,
            l0,
            l1,
            l2,
            l3,
            c0,
            c1,
            c2,
            c3,
            c4,
            c5,
            c6,
            c7,
        ] = *b;
        let kind = FrameKind::from_u8(k).ok_or(ProtocolError::UnknownKind(k))?;
        // Only page batches have flags; reserved bytes are always zero.
        if r0 != 0 || r1 != 0 || (kind != FrameKind::Pages && flags != 0) {
            return Err(ProtocolError::Malformed {
                kind,
                detail: "reserved header bits are not zero".into(),
            });
        }
        let len = u32::from_le_bytes([l0, l1, l2, l3]);
        if len > MAX_FRAME {
            return Err(ProtocolError::FrameTooLarge {
                len,
                max: MAX_FRAME,
            });
        }
        Ok(FrameHeader {
            kind,
            flags,
            len,
            check: u64::from_le_bytes([c0, c1, c2, c3, c4, c5, c6, c7]),
        })
    }
}

fn io_err(op: &'static str) -> impl FnOnce(io::Error) -> ProtocolError {
    move |source| {
        if source.kind() == io::ErrorKind::UnexpectedEof {
            ProtocolError::Truncated(op)
        } else {
            ProtocolError::Io { op, source }
        }
    }
}

/// Write the stream preamble: [`MAGIC`] and our [`VERSION`].
///
/// # Errors
/// [`ProtocolError::Io`] when the stream fails.
pub fn write_preamble(w: &mut impl Write) -> Result<(), ProtocolError> {
    let mut b = [0u8; 8];
    b[..6].copy_from_slice(&MAGIC);
    b[6..].copy_from_slice(&VERSION.to_le_bytes());
    w.write_all(&b).map_err(io_err("write preamble"))
}

/// Read and check a stream preamble; returns the peer's version.
///
/// # Errors
/// [`ProtocolError::BadMagic`] for a stream that is not ours.
pub fn read_preamble(r: &mut impl Read) -> Result<u16, ProtocolError> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b).map_err(io_err("read preamble"))?;
    let [m0, m1, m2, m3, m4, m5, v0, v1] = b;
    let found = [m0, m1, m2, m3, m4, m5];
    if found != MAGIC {
        return Err(ProtocolError::BadMagic { found });
    }
    Ok(u16::from_le_bytes([v0, v1]))
}

/// Write a message as one frame (a single write call).
///
/// # Errors
/// [`ProtocolError::Io`] when the stream fails.
pub fn write_message(w: &mut impl Write, msg: &Message) -> Result<(), ProtocolError> {
    let payload = msg.encode();
    write_frame(w, msg.kind(), 0, &payload)
}

/// Write one frame with a check over `payload`.
///
/// # Errors
/// [`ProtocolError::Io`] when the stream fails.
pub fn write_frame(
    w: &mut impl Write,
    kind: FrameKind,
    flags: u8,
    payload: &[u8],
) -> Result<(), ProtocolError> {
    let len = payload.len() as u32;
    let header = FrameHeader {
        kind,
        flags,
        len,
        check: xxh3_64_with_seed(payload, check_seed(kind, flags, len)),
    };
    let mut buf = Vec::with_capacity(HEADER_LEN + payload.len());
    buf.extend_from_slice(&header.to_bytes());
    buf.extend_from_slice(payload);
    w.write_all(&buf).map_err(io_err("write frame"))?;
    w.flush().map_err(io_err("flush frame"))
}

/// Read a frame header.
///
/// # Errors
/// [`ProtocolError::Closed`] when the stream ends before the header's
/// first byte (the peer closed it between frames),
/// [`ProtocolError::Truncated`] when it ends inside the header; as
/// [`FrameHeader::from_bytes`], or I/O errors.
pub fn read_frame_header(r: &mut impl Read) -> Result<FrameHeader, ProtocolError> {
    let mut b = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut b[got..]) {
            Ok(0) if got == 0 => return Err(ProtocolError::Closed("read frame header")),
            Ok(0) => return Err(ProtocolError::Truncated("read frame header")),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err("read frame header")(e)),
        }
    }
    FrameHeader::from_bytes(&b)
}

/// Read the payload of a message frame whose header was read, check it and
/// decode it. Memory grows with the bytes that actually arrive, so a lying
/// length cannot make us allocate up front.
///
/// # Errors
/// Truncation, a failed check ([`ProtocolError::Corrupt`]), or a payload that
/// does not decode.
pub fn read_payload(r: &mut impl Read, h: &FrameHeader) -> Result<Message, ProtocolError> {
    let mut payload = Vec::with_capacity((h.len as usize).min(64 << 10));
    r.take(h.len as u64)
        .read_to_end(&mut payload)
        .map_err(io_err("read frame payload"))?;
    if payload.len() != h.len as usize {
        return Err(ProtocolError::Truncated("frame payload"));
    }
    let found = xxh3_64_with_seed(&payload, check_seed(h.kind, h.flags, h.len));
    // Fuzzing (cargo fuzz sets `cfg(fuzzing)`) skips the check so that
    // random bytes reach the decoders behind it.
    if found != h.check && !cfg!(fuzzing) {
        return Err(ProtocolError::Corrupt {
            kind: h.kind,
            expected: h.check,
            found,
        });
    }
    Message::decode(h.kind, &payload)
}

/// Read one message frame (a control stream never carries page batches).
///
/// # Errors
/// As [`read_payload`]; [`ProtocolError::Unexpected`] for a page batch.
pub fn read_message(r: &mut impl Read) -> Result<Message, ProtocolError> {
    let h = read_frame_header(r)?;
    if h.kind == FrameKind::Pages {
        return Err(ProtocolError::Unexpected {
            got: FrameKind::Pages,
            expected: "a control message",
        });
    }
    read_payload(r, &h)
}
