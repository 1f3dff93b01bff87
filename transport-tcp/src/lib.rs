//! TCP transport for live migration: pages from the source's guest memory
//! to the destination's over one or more TCP connections.
//!
//! Filled in by the TCP migration issue; the workspace builds it from the start.
