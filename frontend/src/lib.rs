//! The operator's side of a migration, shared by `migrate-cli` and
//! `mini-vmm` so that the two front ends cannot drift: the same options
//! mean the same thing, the same rules decide who may connect, and the
//! same outcome is the same exit status.
//!
//! | question | answer |
//! |---|---|
//! | how do options become the engine's configuration? | [`args`]: [`TransportArgs`](args::TransportArgs), [`MigrationArgs::source_config`](args::MigrationArgs::source_config) |
//! | who may connect, and with what credentials? | [`security::tls`] (nothing in the clear off loopback without `--insecure`) |
//! | which transport carries the pages? | [`transport`]: [`connect`](transport::connect), [`Listener`](transport::Listener) |
//! | where does an exit status come from? | [`Outcome`]: one meaning per code |
//! | who may run a protected guest when its two ends lost each other? | [`witness`]: [`NetWitness`](witness::NetWitness) asks, [`serve`](witness::serve) answers |
//! | where do reports go? | [`output`] (files made for this user alone); their fields are `migrate_core::report`'s |
//!
//! Set-up errors (a bad option, unreadable credentials, an address that
//! cannot work) are [`SetupError`]s: exit status 2, nothing sent.

/// `eprintln!` that cannot panic. `eprintln!` panics when stderr cannot be
/// written (the orchestrator that read it died, a closed pipe): a signal
/// thread that panicked took every later SIGTERM with it, and a main
/// thread's last words turned a clean exit 1 into a panic's 101.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// `println!` that cannot panic: a line on stdout that nobody reads any
/// more (the orchestrator that read `listening on ...` died) is lost, and
/// the guest that runs in this process runs on. `println!` panicked there,
/// and a panic in a thread of a destination that had resumed its guest, or
/// of a protected primary, ended the guest.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

pub mod args;
mod error;
pub mod outcome;
pub mod output;
pub mod security;
pub mod transport;
pub mod witness;

pub use error::SetupError;
pub use outcome::Outcome;
