//! The bank guest's ledger check over guest memory a peer wrote: any bytes
//! in memory give a verdict, never a panic or an endless loop.
#![no_main]

use libfuzzer_sys::fuzz_target;
use migrate_core::memory::{GuestMemory, GuestRegion};

fuzz_target!(|data: &[u8]| {
    let Ok(region) = GuestRegion::anonymous(0, 64 << 10) else {
        return;
    };
    let n = data.len().min(region.len());
    region.write_bytes(0, &data[..n]);
    let Ok(mem) = GuestMemory::new(vec![region]) else {
        return;
    };
    let _ = fixtures::BankGuest::validate(&mem);
});
