//! What mini-vmm's test files share: whether KVM is here (a counted skip
//! when not), the binary, and a process's whole output.

#![allow(dead_code)]

use std::process::{Command, Output};

/// Whether `/dev/kvm` opens; else `test` is skipped, visibly and counted
/// (a failure where the test command found KVM).
pub fn kvm_here(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            migrate_core::skip::skip(
                test,
                migrate_core::skip::Need::Kvm,
                &format!("/dev/kvm: {e}"),
            );
            false
        }
    }
}

/// The `mini-vmm` binary.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mini-vmm"))
}

/// Stdout then stderr.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
