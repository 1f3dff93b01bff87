//! Benchmarks of the migration engine: criterion micro benchmarks under
//! `benches/` and (with the benchmark issue) a macro benchmark binary.
