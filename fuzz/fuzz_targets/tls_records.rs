//! The TLS 1.3 records of a connection after its handshake
//! (`transport-tcp/src/record.rs`), with keys from one real TLS session
//! per suite: a peer's byte stream opened (a stranger's or a corrupted
//! stream ends in an error, never a panic, never more plaintext than
//! bytes), and real plaintext sealed in writes of fuzzed sizes, with key
//! updates and close_notify, and opened again, byte for byte. The first
//! byte picks the suite and the mode.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| transport_tcp::fuzzing::tls_records(data));
