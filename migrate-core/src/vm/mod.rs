//! The VM-control seam: what the engine asks of the VMM.

/// An error from the VMM, carried through the engine as is.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct VmError {
    /// What the engine asked for (`pause`, `save device state`, ...).
    pub what: &'static str,
    /// The VMM's error.
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl VmError {
    /// Wrap a VMM error.
    pub fn new(
        what: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self {
            what,
            source: source.into(),
        }
    }
}

/// The source VMM: pause and resume vCPUs, save device state, throttle.
pub trait SourceVm: Send {
    /// Stop every vCPU and device that writes guest memory. Returns once none
    /// does: the final round reads a still memory.
    ///
    /// # Errors
    /// [`VmError`]; the migration aborts and calls [`resume`](Self::resume).
    fn pause(&mut self) -> Result<(), VmError>;

    /// Let the guest run again (after an abort, or a failed pause).
    ///
    /// # Errors
    /// [`VmError`]; reported with the migration's own error.
    fn resume(&mut self) -> Result<(), VmError>;

    /// The device state (vCPU registers, device models) as opaque bytes,
    /// taken while paused.
    ///
    /// # Errors
    /// [`VmError`]; the migration aborts and the guest resumes.
    fn save_state(&mut self) -> Result<Vec<u8>, VmError>;

    /// Auto-converge: slow the guest's vCPUs to `percent` % throttle (0 = full
    /// speed) because it dirties faster than the link drains. Returns `false` if this VMM
    /// cannot throttle (the engine then relies on `max_rounds`).
    ///
    /// # Errors
    /// [`VmError`]; logged, and the migration goes on unthrottled.
    fn throttle(&mut self, percent: u8) -> Result<bool, VmError>;
}

/// The destination VMM: load device state and start the guest.
pub trait DestinationVm: Send {
    /// Load the device state the source saved.
    ///
    /// # Errors
    /// [`VmError`]; the destination refuses the commit and the source resumes.
    fn load_state(&mut self, state: &[u8]) -> Result<(), VmError>;

    /// Start the migrated guest.
    ///
    /// # Errors
    /// [`VmError`]; the destination refuses the commit and the source resumes.
    fn resume(&mut self) -> Result<(), VmError>;

    /// Called before [`load_state`](Self::load_state) when the guest
    /// resumes in post-copy (see [`crate::postcopy`]): its memory is not
    /// all there yet, and the engine places the missing pages only once
    /// [`resume`](Self::resume) returned. So `resume` must start the vCPUs
    /// and return without reading guest memory itself (a vCPU's or another
    /// thread's access waits for its page and is served). By default
    /// nothing.
    fn postcopy(&mut self) {}
}

#[cfg(feature = "test-utils")]
// Test support: a failed check panics, by design.
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
pub mod conformance;
