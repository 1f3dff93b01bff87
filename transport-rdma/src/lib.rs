//! RDMA transport for live migration: one-sided RDMA WRITE from the source's
//! guest memory straight into the destination's pre-registered guest memory.
//!
//! Filled in by the RDMA transport issue; the workspace builds it from the start.
