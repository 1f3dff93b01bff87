//! The one conformance suite every VM-control implementation passes
//! ([`SourceVm`] with its [`DestinationVm`]), against a real guest that
//! writes its memory (feature `test-utils`): the fixture guests' threads and
//! mini-vmm's KVM vCPU run the same checks.
//!
//! [`vm_control_suite`] runs, in order, on one VM (KVM guests are slow to
//! build, so the checks share it):
//! 1. the guest is running: its memory changes;
//! 2. `pause` stops every guest write: the memory stays the same over an
//!    observation window;
//! 3. the device state is stable while paused: two saves are equal;
//! 4. the destination refuses to resume before it loaded a state, then
//!    loads the saved state and resumes it;
//! 5. `throttle` is idempotent: the same percent twice answers the same, and
//!    0 lifts it;
//! 6. `resume` after `pause` runs the guest again: its memory changes.
//!
//! The guest must keep writing for the whole suite (a guest that finishes
//! fails check 6).

use std::time::{Duration, Instant};

use super::{DestinationVm, SourceVm};
use crate::memory::GuestMemory;

/// Longest wait for a running guest to change its memory.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a paused guest is watched for writes.
const PAUSED_WINDOW: Duration = Duration::from_millis(300);

/// A digest of every page of `mem`.
fn digest(mem: &GuestMemory) -> u64 {
    mem.digest()
}

/// Wait until `mem`'s digest differs from `from`; the new digest.
fn wait_for_change(test: &str, what: &str, mem: &GuestMemory, from: u64) -> u64 {
    let start = Instant::now();
    loop {
        let now = digest(mem);
        if now != from {
            return now;
        }
        assert!(
            start.elapsed() < CHANGE_TIMEOUT,
            "{test}: {what}: guest memory unchanged for {CHANGE_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Run every check on `source`, whose running guest writes `mem`, and on
/// `destination`, a fresh destination VM of the same kind.
///
/// # Panics
/// On the first check that fails, naming `test` and the check.
pub fn vm_control_suite(
    test: &str,
    source: &mut dyn SourceVm,
    mem: &GuestMemory,
    destination: &mut dyn DestinationVm,
) {
    let before = digest(mem);
    wait_for_change(test, "the guest is running", mem, before);

    source.pause().expect("pause");
    let paused = digest(mem);
    let start = Instant::now();
    while start.elapsed() < PAUSED_WINDOW {
        assert_eq!(
            digest(mem),
            paused,
            "{test}: the guest wrote its memory {:?} after pause returned",
            start.elapsed()
        );
    }

    let state = source.save_state().expect("save device state while paused");
    assert_eq!(
        source.save_state().expect("save again"),
        state,
        "{test}: the device state changed while paused"
    );

    assert!(
        destination.resume().is_err(),
        "{test}: the destination resumed without a device state"
    );
    destination
        .load_state(&state)
        .unwrap_or_else(|e| panic!("{test}: the saved state does not load: {e}"));
    destination
        .resume()
        .unwrap_or_else(|e| panic!("{test}: resume after load failed: {e}"));

    let first = source.throttle(30).expect("throttle");
    let again = source.throttle(30).expect("throttle again");
    assert_eq!(
        first, again,
        "{test}: throttle(30) twice answered differently"
    );
    source.throttle(0).expect("lift the throttle");

    source.resume().expect("resume");
    wait_for_change(test, "the guest runs again after resume", mem, paused);
}
