//! The sealed records of a TLS connection after its handshake
//! (`transport-tcp/src/record.rs`): a peer's byte stream opened with fixed
//! keys (a stranger's or a corrupted stream ends in an error, never a
//! panic, never more plaintext than bytes), and real plaintext sealed in
//! writes of fuzzed sizes and opened again, byte for byte. The first byte
//! picks the suite and the mode.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| transport_tcp::fuzzing::sealed_records(data));
