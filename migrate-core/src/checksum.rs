//! XXH3-64, the checksum of every page and frame on the wire (and of the
//! digests that compare two memories).
//!
//! The implementation is twox-hash's, which picks AVX2 at run time where
//! the CPU has it; xxhash-rust, used before, compiles SSE2 only unless the
//! whole build targets AVX2. Same values (the test below holds them equal
//! over many lengths and seeds); measured here on 4 KiB pages: 31 GB/s
//! against 19–21 GB/s on cached pages (what a destination hashes right
//! after receiving them), 8.3 against 5.7–7.7 GB/s on pages from memory.

/// XXH3-64 of `bytes` (seed 0).
#[inline]
pub fn xxh3_64(bytes: &[u8]) -> u64 {
    twox_hash::XxHash3_64::oneshot(bytes)
}

/// XXH3-64 of `bytes` with `seed`.
#[inline]
pub fn xxh3_64_with_seed(bytes: &[u8], seed: u64) -> u64 {
    twox_hash::XxHash3_64::oneshot_with_seed(seed, bytes)
}

#[cfg(test)]
mod tests {
    /// The values are XXH3's: equal to the reference port's for every
    /// length up to two pages and then some (each of XXH3's size classes:
    /// 0, 1–3, 4–8, 9–16, 17–128, 129–240, long), with and without seeds.
    #[test]
    fn same_values_as_the_reference_port() {
        let data: Vec<u8> = (0..9000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for len in (0..=300).chain((301..9000).step_by(97)).chain([4096, 8192]) {
            let b = &data[..len];
            assert_eq!(super::xxh3_64(b), xxhash_rust::xxh3::xxh3_64(b), "{len}");
            for seed in [1, 0x9e37_79b9_7f4a_7c15] {
                assert_eq!(
                    super::xxh3_64_with_seed(b, seed),
                    xxhash_rust::xxh3::xxh3_64_with_seed(b, seed),
                    "{len} {seed}"
                );
            }
        }
        // The published value of the empty input.
        assert_eq!(super::xxh3_64(b""), 0x2d06_8005_38d3_94c2);
    }
}
