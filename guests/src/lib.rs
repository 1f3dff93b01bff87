//! The built-in guests: deterministic workloads that live in guest memory,
//! for `migrate-cli`'s source and demo, the benchmarks and the tests.
//!
//! - [`image`]: fill guest memory with a chosen page mix (zero, text-like,
//!   random pages) from a seed;
//! - [`guest`]: a synthetic guest whose threads dirty its memory at a chosen
//!   rate and pattern, pausable like a VMM pauses vCPUs;
//! - [`bank`]: a checkable guest whose whole state (a ledger of accounts with
//!   transfers between them) lives in guest memory, so a migrated copy can be
//!   validated for consistency, not only compared;
//! - [`vm`]: VM control of those guests, for the engine.
//!
//! The test harness (the transport conformance suite, scratch directories)
//! is the `fixtures` crate's, which re-exports these: nothing of it ships
//! in `migrate-cli`.

#![forbid(unsafe_code)]

pub mod bank;
pub mod guest;
pub mod image;
pub mod procfs;
mod rng;
pub mod vm;

pub use bank::{BankConfig, BankError, BankGuest, BankSummary};
pub use guest::{DirtyPattern, RunningGuest, SyntheticGuest, WorkloadConfig};
pub use image::{PageClass, PageMix, fill_memory, fill_memory_sparse};
pub use vm::{FixtureDestinationVm, FixtureSourceVm};

/// Wait until `cond` holds, polling every millisecond: the way a test
/// waits for another thread to reach a state, instead of a sleep that
/// assumes how fast it gets there. The deadline (60 s) only catches a
/// hang, so a loaded machine does not fail the test.
///
/// # Panics
/// When `cond` still does not hold after 60 s, naming `what` (tests only).
pub fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !cond() {
        #[allow(clippy::panic)]
        if std::time::Instant::now() > deadline {
            panic!("waited 60 s for {what}");
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}
