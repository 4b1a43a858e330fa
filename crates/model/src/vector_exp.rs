//! `exp` over a slice of f32 in a form the compiler vectorizes: the standard library's `expf`
//! is a scalar call per element, which made it the largest single cost after the matrix
//! products in the CPU attention kernel. Range reduction to `2ⁿ · e^r` with `|r| ≤ ln 2 / 2`,
//! then a degree-6 polynomial for `e^r` (Cephes' `expf` coefficients), within 2 ulp of `expf`
//! over the range where the result is a normal f32; `-∞` and anything below that range give 0,
//! anything above 88.72 infinity.

/// Replaces every element of `xs` with its exponential.
pub(crate) fn exp_in_place(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has the feature the function is compiled for.
        unsafe { exp_avx2(xs) };
        return;
    }
    xs.iter_mut().for_each(|x| *x = exp(*x));
}

/// The same loop compiled for AVX2, eight lanes at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn exp_avx2(xs: &mut [f32]) {
    xs.iter_mut().for_each(|x| *x = exp(*x));
}

/// Below this `e^x` is not a normal f32.
const LOWEST: f32 = -87.33655;
/// Above this `e^x` overflows.
const HIGHEST: f32 = 88.72;

#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so `n · LN2_HIGH` is exact.
    const LN2_HIGH: f32 = 0.693_359_4;
    const LN2_LOW: f32 = -2.121_944_4e-4;
    // Adding 1.5 · 2²³ rounds to the nearest integer, which the sum's low mantissa bits then
    // hold (offset by 2²²): no float-to-int conversion, whose saturating form does not vectorize.
    const ROUND: f32 = 12_582_912.0;
    let clamped = x.clamp(LOWEST, HIGHEST);
    let shifted = clamped * LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = clamped - n * LN2_HIGH - n * LN2_LOW;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    // 2ⁿ from exponent bits, in two factors so each stays a normal f32 for n in -126..=128.
    let n = shifted.to_bits() as i32 - ROUND.to_bits() as i32;
    let power_of_two = |n: i32| f32::from_bits(((n + 127) as u32) << 23);
    let e = e_r * power_of_two(n >> 1) * power_of_two(n - (n >> 1));
    if x < LOWEST {
        0.0
    } else if x > HIGHEST {
        f32::INFINITY
    } else {
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equals_the_standard_exp_to_two_ulp() {
        let mut xs: Vec<f32> = (0..200_001)
            .map(|i| LOWEST + (HIGHEST - LOWEST) * i as f32 / 200_000.0)
            .chain([0.0, -0.0, 1e-30, -1e-30, 1.0, -1.0])
            .collect();
        let expected: Vec<f32> = xs.iter().map(|x| x.exp()).collect();
        exp_in_place(&mut xs);
        for (i, (got, want)) in xs.iter().zip(&expected).enumerate() {
            let ulp = (got.to_bits() as i64 - want.to_bits() as i64).abs();
            assert!(ulp <= 2, "element {i}: {got} against {want} ({ulp} ulp)");
        }
    }

    #[test]
    fn the_ends_of_the_range_give_zero_and_infinity() {
        let mut xs = [f32::NEG_INFINITY, -1000.0, -88.0, 89.0, f32::INFINITY];
        exp_in_place(&mut xs);
        assert_eq!(xs, [0.0, 0.0, 0.0, f32::INFINITY, f32::INFINITY]);
    }
}
