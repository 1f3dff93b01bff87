//! Cancelling a migration: the engine's token, checked by the scheduler
//! between steps and by transports between batches.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Cancels a migration from any thread.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A token not yet cancelled.
    pub fn new() -> Self {
        Self::default()
    }
    /// Ask the migration to stop; it aborts at the next check (between
    /// batches), and the source guest keeps running.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    /// Whether cancel was asked.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}
