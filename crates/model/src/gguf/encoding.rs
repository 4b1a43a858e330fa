//! f32 values in the element types a GGUF file holds, rounded as ggml rounds them: f16 and
//! bf16 to the nearest even, and Q8_0, blocks of 32 values as one f16 scale (the block's largest
//! magnitude over 127) and 32 signed bytes (each value over the scale, rounded half away from
//! zero), with the arithmetic in f32.

use half::f16;

use super::file::TensorType;

/// Values per Q8_0 block.
pub const Q8_0_BLOCK: usize = 32;

/// Bytes of `n` values in `kind` (`n` a multiple of [`Q8_0_BLOCK`] for Q8_0).
pub fn encoded_len(kind: TensorType, n: usize) -> usize {
    match kind {
        TensorType::F32 => 4 * n,
        TensorType::F16 | TensorType::BF16 => 2 * n,
        TensorType::Q8_0 => n / Q8_0_BLOCK * (2 + Q8_0_BLOCK),
    }
}

/// Values encoded per task when a tensor is split over the thread pool (a multiple of
/// [`Q8_0_BLOCK`]).
const CHUNK: usize = 1 << 16;

/// `values` encoded in `kind`, chunks of them on the thread pool's threads.
pub fn encode(kind: TensorType, values: &[f32]) -> Vec<u8> {
    use rayon::prelude::*;
    let chunks: Vec<Vec<u8>> = values
        .par_chunks(CHUNK)
        .map(|chunk| encode_chunk(kind, chunk))
        .collect();
    chunks.concat()
}

/// `values` encoded in `kind` on this thread.
fn encode_chunk(kind: TensorType, values: &[f32]) -> Vec<u8> {
    match kind {
        TensorType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        TensorType::F16 => values
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect(),
        TensorType::BF16 => values
            .iter()
            .flat_map(|&v| bf16_bits(v).to_le_bytes())
            .collect(),
        TensorType::Q8_0 => values.chunks(Q8_0_BLOCK).flat_map(q8_0_block).collect(),
    }
}

/// bfloat16's bits of `v`, rounded to the nearest even (`ggml_compute_fp32_to_bf16`; NaNs
/// made quiet).
fn bf16_bits(v: f32) -> u16 {
    let n = v.to_bits();
    if n & 0x7fff_ffff > 0x7f80_0000 {
        return ((n >> 16) | 64) as u16;
    }
    ((u64::from(n) + 0x7fff + u64::from((n >> 16) & 1)) >> 16) as u16
}

/// One Q8_0 block: the f16 scale, then the 32 codes.
fn q8_0_block(block: &[f32]) -> Vec<u8> {
    let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = max / 127.0;
    let inverse = if scale == 0.0 { 0.0 } else { 1.0 / scale };
    let mut out = Vec::with_capacity(2 + Q8_0_BLOCK);
    out.extend_from_slice(&f16::from_f32(scale).to_le_bytes());
    out.extend(
        block
            .iter()
            .map(|&v| round_half_away(v * inverse) as i8 as u8),
    );
    out
}

/// Rounds `x` (within ±127.5, as a value over its block's scale is) half away from zero, as
/// ggml's `roundf`: the whole part plus one when the fraction is at least a half, with
/// truncating casts (for magnitudes these are floors) rather than a library call per value.
fn round_half_away(x: f32) -> f32 {
    let a = x.abs();
    let whole = a as i32;
    let fraction = a - whole as f32;
    ((whole + (2.0 * fraction) as i32) as f32).copysign(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_to_the_nearest_even() {
        // 1 + 2^-8 lies halfway between two bf16 values: to the even one, 1.0.
        assert_eq!(bf16_bits(1.0 + 2f32.powi(-8)), 0x3f80);
        assert_eq!(bf16_bits(1.0 + 3.0 * 2f32.powi(-8)), 0x3f82);
        assert_eq!(bf16_bits(-2.0), 0xc000);
    }

    /// Halves go away from zero; the largest float below a half goes to zero (where adding a
    /// half would round up to 1).
    #[test]
    fn rounding_is_ggmls() {
        let below_half = 0.5f32.next_down();
        for (x, rounded) in [
            (2.5, 3.0),
            (-2.5, -3.0),
            (1.49, 1.0),
            (below_half, 0.0),
            (-127.0, -127.0),
        ] {
            assert_eq!(round_half_away(x), rounded, "{x}");
        }
    }

    #[test]
    fn q8_0_scales_by_the_largest_magnitude() {
        let mut block = [0f32; 32];
        block[0] = -127.0;
        block[1] = 63.5;
        block[2] = 0.5;
        let bytes = q8_0_block(&block);
        assert_eq!(f16::from_le_bytes([bytes[0], bytes[1]]).to_f32(), 1.0);
        assert_eq!(bytes[2] as i8, -127);
        assert_eq!(bytes[3] as i8, 64); // 63.5 rounds away from zero
        assert_eq!(bytes[4] as i8, 1); // 0.5 likewise
        assert_eq!(q8_0_block(&[0.0; 32])[2..], [0u8; 32]);
    }
}
