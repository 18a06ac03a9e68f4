//! SplitMix64: a small seedable generator for jitter, nonces, loss
//! injection and simulations, not for secrets; and [`random_id`], which is
//! for ids that must not be guessed, from the OS random source.

/// SplitMix64 (Steele, Lea, Flood 2014).
#[derive(Clone, Debug)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A random 64-bit id from the OS random source. (std's `RandomState`
/// keys, used before, are seeded once per thread and then counted up, so
/// one id told the next: no good for session ids, node ids and tokens.)
pub fn random_id() -> u64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("the OS random source is available");
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    #[test]
    fn it_is_seeded_and_units_stay_in_range() {
        let (mut a, mut b) = (super::SplitMix64(7), super::SplitMix64(7));
        for _ in 0..1000 {
            assert_eq!(a.next_u64(), b.next_u64());
            let u = a.unit();
            b.unit();
            assert!((0.0..1.0).contains(&u));
        }
    }
}
