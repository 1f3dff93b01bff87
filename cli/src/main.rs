//! `migrate-cli`: drives the migration engine for operators and benchmarks.

fn main() {
    eprintln!("migrate-cli: the source/dest/demo commands arrive with the TCP migration issue");
    std::process::exit(2);
}
