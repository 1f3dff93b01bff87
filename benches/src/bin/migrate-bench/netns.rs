//! Running a program inside a site's network namespace (the source's or
//! the destination's), for the migrations and the ceilings alike.

use std::process::Command;

/// `ip netns exec NS PROGRAM` or just `PROGRAM`.
pub fn in_ns(ns: &Option<String>, program: impl AsRef<std::ffi::OsStr>) -> Command {
    match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(program);
            c
        }
        None => Command::new(program),
    }
}
