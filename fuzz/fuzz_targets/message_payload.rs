//! Every control message's decoder on any payload: the first byte picks
//! the frame kind, the rest is the payload.
#![no_main]

use libfuzzer_sys::fuzz_target;
use migrate_core::protocol::{FrameKind, Message};

fuzz_target!(|data: &[u8]| {
    let Some((&kind, payload)) = data.split_first() else {
        return;
    };
    if let Some(kind) = FrameKind::from_u8(kind) {
        if let Ok(m) = Message::decode(kind, payload) {
            // What decodes encodes back to the same bytes.
            let mut again = Vec::new();
            migrate_core::protocol::wire::write_message(&mut again, &m).unwrap();
            let back = migrate_core::protocol::wire::read_message(&mut &again[..]).unwrap();
            assert_eq!(back, m);
        }
    }
});
