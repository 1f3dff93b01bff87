//! mini-vmm's device-state blob (registers, segments, interrupt state) as
//! a destination receives it from a peer.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = mini_vmm::state::VmState::decode(data) {
        // What decodes encodes back to what decodes the same.
        let again = s.encode();
        assert!(mini_vmm::state::VmState::decode(&again).is_ok());
    }
});
