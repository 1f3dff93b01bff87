//! A minimal KVM VMM that embeds the migration library the way a
//! hypervisor does, and the proof that the embedding works on a real vCPU.
//!
//! - guest memory in `vm_memory::GuestMemoryMmap<AtomicBitmap>` (as Cloud
//!   Hypervisor and Firecracker keep it), handed to the engine with
//!   [`GuestMemory::from_vm_memory`](migrate_core::memory::GuestMemory::from_vm_memory);
//! - one KVM memory slot per region with dirty logging; the engine's dirty
//!   set is KVM's log (the guest's writes) ∪ vm-memory's bitmap (the VMM's);
//! - one vCPU running a deterministic, memory-heavy guest program
//!   ([`program::TableProgram`]) whose final checksum proves that memory and
//!   registers survived the move;
//! - [`machine::KvmSource`] / [`machine::KvmDestination`]: the VM-control
//!   seam (pause with pending I/O completed, resume, throttle, registers and
//!   device state as the opaque state blob).
//!
//! The embedding, from the source's side (the `mini-vmm` binary does this):
//!
//! ```no_run
//! use migrate_core::{SourceConfig, SourceMigration};
//! use mini_vmm::machine::{KvmSource, Machine};
//! use mini_vmm::program::TableProgram;
//! use transport_tcp::{TcpConfig, TcpSource};
//!
//! let program = TableProgram::new(16, 40);
//! let mut machine = Machine::new(program.table_bytes())?;
//! let boot = machine.load_table_program(&program)?;
//! let vcpu = machine.start(&boot, 20_000)?;          // the guest runs
//! let mut transport = TcpSource::connect("dest:4444", TcpConfig::default())?;
//! let migration = SourceMigration::new(SourceConfig::default());
//! let bound = migration.bind(&mut transport, machine.memory())?; // memory first,
//! let tracking = machine.dirty_tracking()?;          // then tracking
//! let stats = bound.run(&tracking, &mut KvmSource::new(&vcpu))?;
//! println!("downtime {:.1} ms", stats.downtime_ms);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(unsafe_code)]

pub mod boot;
#[allow(unsafe_code)]
pub mod kick;
#[allow(unsafe_code)]
pub mod machine;
pub mod pc;
pub mod program;
pub mod state;
pub mod vcpu;
