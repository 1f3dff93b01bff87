//! Core of the live-migration engine.
//!
//! The data path reads top to bottom: [`memory`] (guest regions mapped into
//! this process) → [`dirty`] (which pages were written since the last
//! harvest) → [`source`] (the source's state as a type in `source::phase`,
//! pre-copy rounds, switch-over, post-copy) → [`protocol`] (every message
//! on the wire) → [`pages`] (where a page is encoded and where it lands) →
//! [`transport`] (the seam TCP and RDMA fill) → [`destination`] (the
//! receiver's state and its one transition function, commit). [`vm`] is the
//! seam to the VMM; [`MigrationError`] (the source's) and
//! [`IncomingError`] (the destination's) are each end's error over each
//! layer's own.
//!
//! # Embedding
//!
//! A VMM gives the engine its guest memory and a transport
//! ([`SourceMigration::bind`]: RDMA registers the memory there), then
//! starts a dirty tracker, then runs ([`BoundMigration::run`]) with its VM
//! control ([`SourceVm`] to pause,
//! resume, throttle and save device state; [`DestinationVm`] to load it and
//! start the guest). The whole migration, both ends, over loopback TCP:
//!
//! ```
//! use std::sync::Arc;
//! use migrate_core::{
//!     DestinationVm, DirtyTracking, GuestMemory, GuestRegion, IncomingMigration, SourceConfig,
//!     SourceMigration, SourceVm, TrackerPreference, VmError,
//! };
//! use transport_tcp::{TcpConfig, TcpMigrationListener, TcpSource};
//!
//! /// The VMM's side: its vCPUs and devices (here, a guest with no vCPU).
//! #[derive(Default)]
//! struct Vmm {
//!     paused: bool,
//!     devices: Vec<u8>,
//! }
//!
//! impl SourceVm for Vmm {
//!     fn pause(&mut self) -> Result<(), VmError> {
//!         self.paused = true; // kick every vCPU out and stop device DMA
//!         Ok(())
//!     }
//!     fn resume(&mut self) -> Result<(), VmError> {
//!         self.paused = false;
//!         Ok(())
//!     }
//!     fn save_state(&mut self) -> Result<Vec<u8>, VmError> {
//!         Ok(b"registers, device models".to_vec())
//!     }
//!     fn throttle(&mut self, _percent: u8) -> Result<bool, VmError> {
//!         Ok(false) // this VMM cannot slow its vCPUs
//!     }
//! }
//!
//! impl DestinationVm for Vmm {
//!     fn load_state(&mut self, state: &[u8]) -> Result<(), VmError> {
//!         self.devices = state.to_vec();
//!         Ok(())
//!     }
//!     fn resume(&mut self) -> Result<(), VmError> {
//!         self.paused = false; // start the vCPUs
//!         Ok(())
//!     }
//! }
//!
//! // Destination: listen, learn the source's layout, give it memory, receive.
//! let listener = TcpMigrationListener::bind("127.0.0.1:0", TcpConfig::default())?;
//! let addr = listener.local_addr()?.to_string();
//! let destination = std::thread::spawn(move || -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
//!     let mut transport = listener.accept()?;
//!     let incoming = IncomingMigration::accept(&mut transport)?;
//!     let regions = incoming
//!         .layout()
//!         .regions
//!         .iter()
//!         .map(|r| GuestRegion::anonymous(r.gpa, r.len as usize))
//!         .collect::<Result<Vec<_>, _>>()?;
//!     let mem = Arc::new(GuestMemory::new(regions)?);
//!     let mut vmm = Vmm::default();
//!     let report = incoming.receive(&mut transport, &mem, &mut vmm)?;
//!     let mut page = [0u8; 11];
//!     mem.read(0x10_2000, &mut page)?;
//!     Ok((report, page, vmm.devices))
//! });
//!
//! // Source: 4 MiB of guest memory in two regions.
//! let mem = Arc::new(GuestMemory::new(vec![
//!     GuestRegion::anonymous(0, 1 << 20)?,
//!     GuestRegion::memfd(0x10_0000, 3 << 20, "guest")?,
//! ])?);
//! let mut transport = TcpSource::connect(&addr, TcpConfig::default())?;
//! let migration = SourceMigration::new(SourceConfig {
//!     verify: true, // compare every page before the commit
//!     ..SourceConfig::default()
//! });
//! let handle = migration.handle(); // cancel(), stats(), subscribe() from any thread
//! // Bind the memory to the transport (RDMA registers it), then track:
//! // writes from now on are caught.
//! let bound = migration.bind(&mut transport, &mem)?;
//! let tracking = DirtyTracking::new(&mem, TrackerPreference::Best)?;
//! mem.write(0x10_2000, b"guest bytes")?; // a vCPU's write
//! let mut vmm = Vmm::default();
//! let stats = bound.run(&tracking, &mut vmm)?;
//! assert!(stats.verified && vmm.paused); // the destination runs the guest now
//! assert_eq!(handle.stats().status, migrate_core::MigrationStatus::Completed);
//!
//! let (report, page, devices) = destination.join().unwrap().map_err(|e| e.to_string())?;
//! assert_eq!(&page, b"guest bytes");
//! assert_eq!(devices, b"registers, device models");
//! assert!(report.verify_requested);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! What a tracker reports, on its own:
//!
//! ```
//! use migrate_core::memory::{GuestMemory, GuestRegion};
//! use migrate_core::dirty::{DirtyLog, DirtyTracker, DirtyTracking, TrackerPreference};
//!
//! // 4 MiB of anonymous guest memory at guest-physical address 0.
//! let mem = GuestMemory::new(vec![GuestRegion::anonymous(0, 4 << 20)?])?;
//! // Best tracker this kernel offers for this memory, plus the software bitmap.
//! let tracking = DirtyTracking::new(&mem, TrackerPreference::Best)?;
//! mem.write(0x2000, b"vCPU writes")?;
//! let mut log = DirtyLog::new(&mem);
//! tracking.harvest(&mut log)?;
//! assert!(log.is_dirty(0, 2));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]
#![deny(unsafe_code)]

mod cancel;
pub mod checksum;
mod control;
pub mod destination;
pub mod dirty;
mod error;
pub mod memory;
pub mod mirror;
pub mod pages;
pub mod postcopy;
pub mod protocol;
#[cfg(feature = "json")]
pub mod report;
#[cfg(feature = "serde")]
mod serialize;
// Test support (tiny, so always built: fixtures and every test crate use
// it): a skip where the machine has the need fails, by design.
#[allow(clippy::panic)]
pub mod skip;
pub mod source;
pub mod stats;
pub mod transport;
// The userfaultfd wrapper: every unsafe block of it.
#[allow(unsafe_code)]
mod uffd;
pub mod vm;

pub use cancel::CancelToken;
pub use destination::{DestinationReport, IncomingEvent, IncomingHandle, IncomingMigration};
pub use dirty::{DirtyTracker, DirtyTracking, TrackerPreference};
pub use error::{IncomingError, MigrationError};
pub use memory::{GuestMemory, GuestRegion};
pub use postcopy::{FaultLatency, PostcopyMode};
pub use source::{
    BoundMigration, MigrationHandle, NotPreSwitchover, SourceConfig, SourceMigration, TimeoutPolicy,
};
pub use stats::{
    MigrationEvent, MigrationStats, MigrationStatus, PostcopyStats, PrecopyStats,
    STATS_SCHEMA_VERSION,
};
pub use transport::{DestinationTransport, SourceTransport};
pub use vm::{DestinationVm, SourceVm, VmError};
