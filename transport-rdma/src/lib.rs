//! RDMA transport for live migration: one-sided RDMA WRITE from the source's
//! guest memory straight into the destination's pre-registered guest memory.
//!
//! This first layer is [`verbs`]: device and GID choice, registration of
//! memory the caller already mapped, an RC queue pair exchanged over a side
//! channel, WRITE chains with selective signaling and a WRITE_WITH_IMM round
//! fence. It is exercised over real SoftRoCE verbs in the emulated VM
//! (`scripts/rdma-vm.sh`); the `SourceTransport`/`DestinationTransport`
//! implementation on top of it is the next step of the RDMA issue.

pub mod verbs;
