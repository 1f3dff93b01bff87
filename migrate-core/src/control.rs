//! The engine's side of the control channel: receive with the peer's
//! `Abort` and `Refused` turned into errors, and [`expect!`](crate::expect)
//! for "the next message must be this one". Source and destination share it,
//! so an out-of-order message is the same typed error on both sides.

use crate::error::MigrationError;
use crate::protocol::{Message, ProtocolError};
use crate::transport::{ControlChannel, TransportError};

/// The next control message; the peer's `Abort` and `Refused` are errors.
///
/// # Errors
/// [`MigrationError::PeerAborted`], [`MigrationError::Refused`], or the
/// channel's error.
pub(crate) fn recv(ctl: &mut dyn ControlChannel) -> Result<Message, MigrationError> {
    match ctl.recv()? {
        Message::Abort { reason } => Err(MigrationError::PeerAborted { reason }),
        Message::Refused { code, message } => Err(MigrationError::Refused { code, message }),
        m => Ok(m),
    }
}

/// The longest a wait goes without looking at a cancel.
pub(crate) const CANCEL_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// As [`recv`], waiting in slices of at most [`CANCEL_POLL`] and failing with
/// [`MigrationError::Cancelled`] once `cancel` is set.
///
/// # Errors
/// As [`recv`], or [`MigrationError::Cancelled`].
pub(crate) fn recv_unless(
    ctl: &mut dyn ControlChannel,
    cancel: &crate::cancel::CancelToken,
) -> Result<Message, MigrationError> {
    recv_until(ctl, cancel, None)
}

/// As [`recv_unless`], and no later than `deadline`, if given.
///
/// # Errors
/// As [`recv_unless`], or a timed-out [`TransportError::Io`] once the
/// deadline passed with nothing received.
pub(crate) fn recv_until(
    ctl: &mut dyn ControlChannel,
    cancel: &crate::cancel::CancelToken,
    deadline: Option<std::time::Instant>,
) -> Result<Message, MigrationError> {
    loop {
        if cancel.is_cancelled() {
            return Err(MigrationError::Cancelled);
        }
        let mut wait = CANCEL_POLL;
        if let Some(d) = deadline {
            let left = d.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(MigrationError::Transport(TransportError::Io {
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
        return match m {
            Message::Abort { reason } => Err(MigrationError::PeerAborted { reason }),
            Message::Refused { code, message } => Err(MigrationError::Refused { code, message }),
            m => Ok(m),
        };
    }
}

/// `got` arrived while the state machine waited for `expected`.
pub(crate) fn unexpected(got: &Message, expected: &'static str) -> MigrationError {
    MigrationError::Protocol(ProtocolError::Unexpected {
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
        match $crate::control::recv($ctl)? {
            $crate::protocol::Message::$variant $({ $($fields)* })? $(if $guard)? => $out,
            other => {
                return Err($crate::control::unexpected(&other, stringify!($variant)).into())
            }
        }
    };
}
pub(crate) use expect_msg;
