//! The engine's side of the control channel: receive with the peer's
//! `Abort` and `Refused` turned into errors, and [`expect!`](crate::expect)
//! for "the next message must be this one". Source and destination share it,
//! so an out-of-order message is the same typed error on both sides.

use crate::error::ControlFailure;
use crate::protocol::{Message, ProtocolError};
use crate::transport::{ControlChannel, TransportError};

/// The next control message; the peer's `Abort` and `Refused` are errors.
///
/// # Errors
/// The peer's abort or refusal ([`ControlFailure`]), or the channel's
/// error.
pub(crate) fn recv<E: ControlFailure>(ctl: &mut dyn ControlChannel) -> Result<Message, E> {
    said(ctl.recv()?)
}

/// `m`, unless it is the peer's `Abort` or `Refused`.
fn said<E: ControlFailure>(m: Message) -> Result<Message, E> {
    match m {
        Message::Abort { reason } => Err(E::aborted(reason)),
        Message::Refused { code, message } => Err(E::refused(code, message)),
        m => Ok(m),
    }
}

/// The longest a wait goes without looking at a cancel.
pub(crate) const CANCEL_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// As [`recv`], waiting in slices of at most [`CANCEL_POLL`] and failing with
/// a cancel once `cancel` is set.
///
/// # Errors
/// As [`recv`], or the cancel.
pub(crate) fn recv_unless<E: ControlFailure>(
    ctl: &mut dyn ControlChannel,
    cancel: &crate::cancel::CancelToken,
) -> Result<Message, E> {
    recv_until(ctl, cancel, None)
}

/// As [`recv_unless`], and no later than `deadline`, if given.
///
/// # Errors
/// As [`recv_unless`], or a timed-out [`TransportError::Io`] once the
/// deadline passed with nothing received.
pub(crate) fn recv_until<E: ControlFailure>(
    ctl: &mut dyn ControlChannel,
    cancel: &crate::cancel::CancelToken,
    deadline: Option<std::time::Instant>,
) -> Result<Message, E> {
    loop {
        if cancel.is_cancelled() {
            return Err(E::cancelled());
        }
        let mut wait = CANCEL_POLL;
        if let Some(d) = deadline {
            let left = d.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(E::from(TransportError::Io {
                    op: "wait for the peer's message",
                    source: std::io::ErrorKind::TimedOut.into(),
                }));
            }
            wait = wait.min(left);
        }
        let m = match ctl.recv_timeout(wait)? {
            Some(m) => m,
            None => continue,
        };
        return said(m);
    }
}

/// `bytes` in chunks of at most [`DEVICE_STATE_CHUNK`](crate::protocol::DEVICE_STATE_CHUNK),
/// each as the message `chunk(last, bytes)` makes (at least one: an empty
/// last chunk when there are no bytes).
///
/// # Errors
/// The channel's.
pub(crate) fn send_chunked(
    ctl: &mut dyn ControlChannel,
    bytes: &[u8],
    chunk: impl Fn(bool, Vec<u8>) -> Message,
) -> Result<(), TransportError> {
    let mut chunks = bytes.chunks(crate::protocol::DEVICE_STATE_CHUNK).peekable();
    if chunks.peek().is_none() {
        return ctl.send(&chunk(true, Vec::new()));
    }
    while let Some(c) = chunks.next() {
        ctl.send(&chunk(chunks.peek().is_none(), c.to_vec()))?;
    }
    Ok(())
}

/// `got` arrived while the state machine waited for `expected`.
pub(crate) fn unexpected<E: From<ProtocolError>>(got: &Message, expected: &'static str) -> E {
    E::from(ProtocolError::Unexpected {
        got: got.kind(),
        expected,
    })
}

/// Receive the next control message, which must be `Message::$variant`
/// (and satisfy the guard, if any); evaluates to `$out` with the variant's
/// fields bound. Anything else returns `ProtocolError::Unexpected` from the
/// enclosing function.
macro_rules! expect_msg {
    ($ctl:expr, $variant:ident $({ $($fields:tt)* })? $(if $guard:expr)? => $out:expr) => {
        match $crate::control::recv($ctl) {
            Ok($crate::protocol::Message::$variant $({ $($fields)* })?) $(if $guard)? => $out,
            Ok(other) => return Err($crate::control::unexpected(&other, stringify!($variant))),
            Err(e) => return Err(e),
        }
    };
}
pub(crate) use expect_msg;
