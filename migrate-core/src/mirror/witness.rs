//! The witness: a third party that grants the right to run a protected
//! guest once per protection session, to the first that asks.
//!
//! When the primary and the standby lose each other, each cannot tell a
//! dead peer from a cut link. Both ask the witness (a small process on a
//! third host, `migrate-cli witness`): the first claim of a session wins,
//! every later claim of another party is refused, so at most one guest runs
//! whatever was cut. A claimant that cannot reach the witness has no right:
//! the standby does not take over, the primary stops its guest.
//!
//! ```text
//!  claimant                              witness
//!    | MAGIC+version (TLS/PSK as every connection)  |
//!    | WitnessClaim{session, claimant}  ->           |  first claim of session?
//!    |                  <-  WitnessVerdict{granted}  |  (granted again to the
//!    |                                               |   same claimant)
//! ```

use std::collections::HashMap;
use std::sync::Mutex;

use crate::protocol::Message;
use crate::transport::{ControlChannel, TransportError};

/// Who asks for the run right.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Claimant {
    /// The primary, which lost its standby: to go on unprotected.
    Primary,
    /// The standby, which lost its primary: to take over.
    Standby,
}

impl Claimant {
    fn wire(self) -> u16 {
        match self {
            Claimant::Primary => 1,
            Claimant::Standby => 2,
        }
    }

    fn from_wire(v: u16) -> Option<Self> {
        match v {
            1 => Some(Claimant::Primary),
            2 => Some(Claimant::Standby),
            _ => None,
        }
    }

    /// `primary` or `standby`.
    pub fn name(self) -> &'static str {
        match self {
            Claimant::Primary => "primary",
            Claimant::Standby => "standby",
        }
    }
}

/// Who decides which end may run the guest once the two lost each other.
pub trait RunRight: Send {
    /// Ask for the right to run the guest of protection `session`.
    /// `Ok(false)`: refused (the other end has it). An error means no
    /// answer, which a caller must treat as a refusal.
    ///
    /// # Errors
    /// [`TransportError`] when the witness cannot be asked.
    fn claim(&mut self, session: u64, claimant: Claimant) -> Result<bool, TransportError>;

    /// Whether a split brain is possible (no witness): the docs and the
    /// report say so.
    fn is_witnessed(&self) -> bool {
        true
    }
}

/// `--no-witness`: every claim is granted. If the link between primary and
/// standby is cut while both live, both run the guest (split brain).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoWitness;

impl RunRight for NoWitness {
    fn claim(&mut self, _session: u64, claimant: Claimant) -> Result<bool, TransportError> {
        tracing::warn!(
            claimant = claimant.name(),
            "no witness: running without asking (split brain possible if the other end lives)"
        );
        Ok(true)
    }

    fn is_witnessed(&self) -> bool {
        false
    }
}

/// Ask over a connected control channel (one claim per connection).
///
/// # Errors
/// The channel's error, or a protocol error when the peer answers with
/// anything but a verdict.
pub fn claim_over(
    ctl: &mut dyn ControlChannel,
    session: u64,
    claimant: Claimant,
) -> Result<bool, TransportError> {
    ctl.send(&Message::WitnessClaim {
        session,
        claimant: claimant.wire(),
    })?;
    match ctl.recv()? {
        Message::WitnessVerdict { granted } => Ok(granted),
        other => Err(TransportError::Protocol(
            crate::protocol::ProtocolError::Unexpected {
                got: other.kind(),
                expected: "WitnessVerdict",
            },
        )),
    }
}

/// The witness's memory: who holds the run right of each session.
#[derive(Debug, Default)]
pub struct WitnessBook {
    holders: Mutex<HashMap<u64, Claimant>>,
}

impl WitnessBook {
    /// An empty book.
    pub fn new() -> Self {
        Self::default()
    }

    /// Decide a claim: the first claimant of a session holds the right from
    /// then on (asking again, it is granted again); the other is refused.
    pub fn decide(&self, session: u64, claimant: Claimant) -> bool {
        let mut h = self.holders.lock().unwrap_or_else(|p| p.into_inner());
        let holder = *h.entry(session).or_insert(claimant);
        holder == claimant
    }

    /// Answer one claimant on `ctl`: read its claim, decide, send the
    /// verdict. Returns what was decided.
    ///
    /// # Errors
    /// The channel's error, or a protocol error for anything but a claim.
    pub fn serve(
        &self,
        ctl: &mut dyn ControlChannel,
    ) -> Result<(u64, Claimant, bool), TransportError> {
        let bad = |got: crate::protocol::FrameKind| {
            TransportError::Protocol(crate::protocol::ProtocolError::Unexpected {
                got,
                expected: "WitnessClaim",
            })
        };
        let (session, claimant) = match ctl.recv()? {
            Message::WitnessClaim { session, claimant } => (
                session,
                Claimant::from_wire(claimant)
                    .ok_or_else(|| bad(crate::protocol::FrameKind::WitnessClaim))?,
            ),
            other => return Err(bad(other.kind())),
        };
        let granted = self.decide(session, claimant);
        tracing::info!(
            session = format_args!("{session:016x}"),
            claimant = claimant.name(),
            granted,
            "run right claimed"
        );
        ctl.send(&Message::WitnessVerdict { granted })?;
        Ok((session, claimant, granted))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_claimant_of_a_session_wins_and_keeps_it() {
        let book = WitnessBook::new();
        assert!(book.decide(1, Claimant::Standby));
        assert!(!book.decide(1, Claimant::Primary));
        assert!(book.decide(1, Claimant::Standby), "asked again");
        // Another session is another question.
        assert!(book.decide(2, Claimant::Primary));
        assert!(!book.decide(2, Claimant::Standby));
    }
}
