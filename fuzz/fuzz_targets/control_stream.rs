//! A control stream from a peer: preamble, then frames until the first
//! error. Frame checks are not enforced under `cfg(fuzzing)`, so every
//! payload decoder is reached. Never a panic, never more than the frame
//! limit allocated, always an end.
#![no_main]

use libfuzzer_sys::fuzz_target;
use migrate_core::protocol::wire::{read_message, read_preamble};

fuzz_target!(|data: &[u8]| {
    // A stream starts with the preamble; a corpus entry may also start at
    // a frame.
    let mut r = data;
    if read_preamble(&mut r).is_err() {
        r = data;
    }
    // Every frame the bytes hold, as a control reader would read them.
    for _ in 0..1024 {
        if read_message(&mut r).is_err() {
            break;
        }
    }
});
