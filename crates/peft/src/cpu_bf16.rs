//! Products with a frozen bf16 weight on CPUs that have AVX512-BF16: the activations are
//! rounded to bf16 (as a bf16 model computes them), pairs of products are summed in f32 by
//! `vdpbf16ps`, and the result is f32 (not rounded back to bf16). burn-flex has no bf16 matrix
//! product: it converts both operands to f32 on every call, which made a bf16 base slower than
//! an f32 one on the CPU. `vdpbf16ps` does twice the multiply-adds of an f32 FMA per
//! instruction.
//!
//! The scheme is the usual one for such instructions: the weight is packed, 32 output columns
//! at a time and `KC` pairs of the shared dimension deep, into pairs of consecutive rows; each
//! activation row is converted to bf16 once, so consecutive elements already form the pairs;
//! a 12 × 32 block of outputs stays in 24 registers while the shared dimension is walked. Panels
//! of 32 columns are the tasks of the thread pool, each writing its columns of the output in
//! place. The packing is vectorized too: for `x·Wᵀ` the pairs are rows of W, transposed 16 × 16
//! at a time in registers; for `x·W` two rows of W are interleaved by permutes. Every call packs
//! afresh (holding packed copies would cost the base's memory again).
//!
//! On the CPU backend, with or without autodiff, [`matmul`] runs the forward product and, for
//! the gradient of the activations, the product with the weight the other way round. The
//! weight is frozen and gets no gradient.

use std::any::TypeId;
use std::mem::MaybeUninit;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor, TensorPrimitive};
use burn_flex::FlexTensor;
use half::bf16;
use rayon::prelude::*;

use crate::cpu_tensors::tensor;
use crate::rebrand::{cpu_values, rebrand};
use crate::shared_output::SharedOutput;

/// Rows of outputs a micro-kernel call holds in registers.
const MR: usize = 12;
/// Columns of outputs a micro-kernel call holds in registers (two vectors of 16).
const NR: usize = 32;
/// Pairs of the shared dimension packed at a time (32 KiB of packed weight per panel).
const KC: usize = 256;

/// `x·Wᵀ` (`transposed`) or `x·W` through the bf16 kernel, when `B` is the CPU backend, `x` is
/// f32, `weight` is bf16 and needs no gradient, and the CPU has AVX512-BF16; `None` otherwise.
///
/// # Shapes
/// - x: `[rows, from]`; weight: `[out, in]`; output: `[rows, to]`
pub(crate) fn matmul<B: Backend>(
    x: &Tensor<B, 2>,
    weight: &Tensor<B, 2>,
    transposed: bool,
) -> Option<Tensor<B, 2>> {
    if !available()
        || x.dims().contains(&0)
        || weight.dims().contains(&0)
        || x.dtype() != DType::F32
        || weight.dtype() != DType::BF16
        || weight.is_require_grad()
    {
        return None;
    }
    // Frozen: its autodiff node, if any, is left out.
    let weight_values = cpu_values(weight.clone())?;
    let x_primitive = x.clone().into_primitive().tensor();
    let out: FloatTensor<B> = if TypeId::of::<B>() == TypeId::of::<Flex>() {
        let x: FlexTensor = rebrand(x_primitive);
        rebrand(product(&x, &weight_values, transposed))
    } else {
        let x: FloatTensor<Autodiff<Flex>> = rebrand(x_primitive);
        rebrand(tracked(x, weight_values, transposed))
    };
    Some(Tensor::from_primitive(TensorPrimitive::Float(out)))
}

/// Whether this CPU runs the kernel (a bf16 base's products on the CPU backend take it).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[derive(Debug)]
struct ProductBackward;

impl Backward<Flex, 1> for ProductBackward {
    /// The weight and the orientation of the forward product.
    type State = (FlexTensor, bool);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let d_out = grads.consume::<Flex>(&ops.node);
        let (weight, transposed) = ops.state;
        let [parent] = ops.parents;
        if let Some(parent) = parent {
            grads.register::<Flex>(parent.id, product(&d_out, &weight, !transposed));
        }
    }
}

fn tracked(
    x: FloatTensor<Autodiff<Flex>>,
    weight: FlexTensor,
    transposed: bool,
) -> FloatTensor<Autodiff<Flex>> {
    let out = product(&x.primitive, &weight, transposed);
    match ProductBackward
        .prepare::<NoCheckpointing>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((weight, transposed), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

/// `x·Wᵀ` or `x·W` for f32 `x` `[m, from]` and a bf16 weight `[out, in]` (any strides).
fn product(x: &FlexTensor, weight: &FlexTensor, transposed: bool) -> FlexTensor {
    let x = x.to_contiguous();
    // The packing reads pairs along one of the weight's axes with unit stride.
    let strides = weight.layout().strides();
    let weight = if strides.iter().all(|&s| s >= 0) && strides.contains(&1) {
        weight
    } else {
        &weight.to_contiguous()
    };
    let [m, from] = dims2(&x);
    let [out, inner] = dims2(weight);
    let layout = weight.layout();
    let (rs, cs) = (layout.strides()[0], layout.strides()[1]);
    let w = &weight.storage::<bf16>()[layout.start_offset()..];
    // The product's right operand B `[from, to]`, element (p, j) at `p·bp + j·bj` in `w`.
    let (to, bp, bj) = if transposed {
        (out, cs, rs)
    } else {
        (inner, rs, cs)
    };
    assert_eq!(from, if transposed { inner } else { out }, "product shapes");
    let x_values = &x.storage::<f32>()[..m * from];
    let right = Right {
        values: w,
        p_stride: bp,
        j_stride: bj,
    };
    let data = gemm(m, to, from, x_values, right);
    tensor(data, [m, to].into())
}

fn dims2(t: &FlexTensor) -> [usize; 2] {
    let shape = t.layout().shape();
    [shape[0], shape[1]]
}

/// The right operand: element `(p, j)` at `p · p_stride + j · j_stride`.
#[derive(Clone, Copy)]
struct Right<'a> {
    values: &'a [bf16],
    p_stride: isize,
    j_stride: isize,
}

/// `[m, n]` = `a [m, k]` (f32, row-major) · `b [k, n]`.
fn gemm(m: usize, n: usize, k: usize, a: &[f32], b: Right) -> Vec<f32> {
    let pairs = k.div_ceil(2);
    // Each row of `a` in bf16, padded to whole pairs: consecutive elements are the pairs.
    let mut a_bf16: Vec<bf16> = Vec::with_capacity(m * pairs * 2);
    a_bf16.spare_capacity_mut()[..m * pairs * 2]
        .par_chunks_mut(pairs * 2)
        .zip(a.par_chunks(k.max(1)))
        .for_each(|(packed, row)| {
            let (values, padding) = packed.split_at_mut(row.len());
            to_bf16(row, values);
            padding.fill(MaybeUninit::new(bf16::ZERO));
        });
    // SAFETY: each of the m rows of `pairs · 2` elements was written above.
    unsafe { a_bf16.set_len(m * pairs * 2) };
    // Written, not read, by the first pass over the shared dimension (`accumulate` false).
    let mut out: Vec<f32> = Vec::with_capacity(m * n);
    let target = SharedOutput::new(&mut out, n);
    // Panels of NR output columns, each written by one task straight into `out`; a last panel
    // narrower than NR goes through a block of its own. One packing buffer per run of panels
    // a thread takes.
    let panels = (0..n.div_ceil(NR)).into_par_iter();
    panels.for_each_init(Vec::new, |packed: &mut Vec<u32>, panel| {
        let j0 = panel * NR;
        let cols = NR.min(n - j0);
        let mut edge = Vec::new();
        let (at, stride) = if cols < NR {
            edge = vec![0.0f32; m * NR];
            (edge.as_mut_ptr(), NR)
        } else {
            (target.at(0, j0), n)
        };
        packed.resize(KC * NR, 0);
        for p0 in (0..pairs).step_by(KC) {
            let depth = KC.min(pairs - p0);
            pack_right(b, k, p0, depth, j0, cols, packed);
            for i0 in (0..m).step_by(MR) {
                let rows = MR.min(m - i0);
                let call = Call {
                    left: &a_bf16[i0 * pairs * 2..],
                    left_pairs: pairs,
                    p0,
                    depth,
                    right: packed,
                    // SAFETY: row i0 of this panel's columns (of `out`, or of `edge`).
                    out: unsafe { at.add(i0 * stride) },
                    out_stride: stride,
                    accumulate: p0 > 0,
                };
                // SAFETY: rows i0..i0 + rows of the panel's NR columns lie inside `out` (whole
                // panels: columns j0..j0 + NR of rows < m) or `edge` (m × NR), and no other
                // task writes them.
                unsafe { micro_kernel(rows, call) };
            }
        }
        for (i, values) in edge.chunks(NR).enumerate() {
            // SAFETY: columns j0..j0 + cols of row i < m, this task's own.
            let row = unsafe { std::slice::from_raw_parts_mut(target.at(i, j0), cols) };
            row.copy_from_slice(&values[..cols]);
        }
    });
    // SAFETY: every panel wrote all m rows of its columns, and the panels cover all n columns.
    unsafe { out.set_len(m * n) };
    out
}

/// Packs pairs `p0..p0 + depth` of columns `j0..j0 + cols` of `b` as `[depth][NR]` u32s, each
/// the bf16 of rows `2p` (low half) and `2p + 1` (high half); missing rows and columns are 0.
fn pack_right(
    b: Right,
    k: usize,
    p0: usize,
    depth: usize,
    j0: usize,
    cols: usize,
    packed: &mut [u32],
) {
    assert!(b.p_stride == 1 || b.j_stride == 1, "one unit stride");
    packed[..depth * NR].fill(0);
    let bits = |v: &bf16| v.to_bits() as u32;
    if b.p_stride == 1 {
        // `x·Wᵀ`: column j of B is row j of W, whose consecutive elements are the pairs.
        // Whole panels take sixteen pairs at a time in registers; the rest, one at a time.
        #[cfg(target_arch = "x86_64")]
        let done = if cols == NR && 2 * (p0 + depth) <= k {
            let whole = depth / 16 * 16;
            // SAFETY: `available()` was checked before any product; every pair read lies
            // inside its row of W (whole pairs only) and so inside `b.values`.
            unsafe { transpose_rows(b, p0, whole, j0, packed) };
            whole
        } else {
            0
        };
        #[cfg(not(target_arch = "x86_64"))]
        let done = 0;
        let first = p0 + done;
        for j in 0..cols {
            let start = (j0 + j) as isize * b.j_stride + (2 * first) as isize;
            let len = (2 * (depth - done)).min(k - 2 * first);
            let row = &b.values[start as usize..start as usize + len];
            for (p, pair) in row.chunks(2).enumerate() {
                packed[(done + p) * NR + j] = bits(&pair[0]) | pair.get(1).map_or(0, bits) << 16;
            }
        }
    } else {
        // `x·W`: rows 2p and 2p + 1 of B are two rows of W, interleaved.
        #[cfg(target_arch = "x86_64")]
        if cols == NR && 2 * (p0 + depth) <= k {
            // SAFETY: `available()` was checked before any product; both rows of every pair
            // exist, and their columns j0..j0 + NR lie inside them.
            unsafe { interleave_rows(b, p0, depth, j0, packed) };
            return;
        }
        for p in 0..depth {
            let row = 2 * (p0 + p);
            let at = |r: usize| {
                let start = r as isize * b.p_stride + j0 as isize;
                &b.values[start as usize..start as usize + cols]
            };
            let (low, high) = (at(row), (row + 1 < k).then(|| at(row + 1)));
            for j in 0..cols {
                packed[p * NR + j] = bits(&low[j]) | high.map_or(0, |h| bits(&h[j])) << 16;
            }
        }
    }
}

/// [`pack_right`] of `x·Wᵀ` for a whole panel of `NR` rows of W and pairs `p0..p0 + depth`,
/// `depth` a multiple of sixteen: sixteen pairs of sixteen rows at a time are loaded as sixteen
/// vectors (a pair read as one u32, its first element in the low half) and transposed in
/// registers.
///
/// # Safety
/// The CPU has AVX-512; rows `j0..j0 + NR` of `b` hold `2·(p0 + depth)` elements from their
/// start.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_rows(b: Right, p0: usize, depth: usize, j0: usize, packed: &mut [u32]) {
    use std::arch::x86_64::*;
    assert!(packed.len() >= depth * NR && depth.is_multiple_of(16));
    let start = |j: usize| ((j0 + j) as isize * b.j_stride) as usize + 2 * p0;
    for half in 0..NR / 16 {
        for p in (0..depth).step_by(16) {
            // SAFETY: row j0 + half·16 + r holds pairs p0 + p .. p0 + p + 16 (the caller's
            // bound), and the stores stay inside `packed` (asserted above).
            unsafe {
                let rows: [__m512i; 16] = std::array::from_fn(|r| {
                    let at = start(half * 16 + r) + 2 * p;
                    _mm512_loadu_si512(b.values.as_ptr().add(at).cast())
                });
                let lines = transpose_16x16(rows);
                for (q, line) in lines.iter().enumerate() {
                    let to = packed.as_mut_ptr().add((p + q) * NR + half * 16);
                    _mm512_storeu_si512(to.cast(), *line);
                }
            }
        }
    }
}

/// [`pack_right`] of `x·W` for a whole panel of `NR` columns and pairs `p0..p0 + depth` whose
/// two rows both exist: the panel's 32 elements of the two rows of a pair are loaded as two
/// vectors and interleaved by two permutes.
///
/// # Safety
/// The CPU has AVX-512 (with its 16-bit permutes); rows `2·p0 .. 2·(p0 + depth)` of `b` hold
/// columns `j0..j0 + NR`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn interleave_rows(b: Right, p0: usize, depth: usize, j0: usize, packed: &mut [u32]) {
    use std::arch::x86_64::*;
    assert!(packed.len() >= depth * NR);
    // Output element 2i is element i of the first row (index i), 2i + 1 that of the second
    // (index 32 + i); the second vector takes columns 16..32.
    let pick = |first: usize| -> __m512i {
        let mut index = [0i16; 32];
        for i in 0..16 {
            index[2 * i] = (first + i) as i16;
            index[2 * i + 1] = (32 + first + i) as i16;
        }
        // SAFETY: 64 bytes read from a 64-byte array.
        unsafe { _mm512_loadu_si512(index.as_ptr().cast()) }
    };
    let (low_columns, high_columns) = (pick(0), pick(16));
    let row = |r: usize| (r as isize * b.p_stride) as usize + j0;
    for p in 0..depth {
        let first = 2 * (p0 + p);
        // SAFETY: rows `first` and `first + 1` hold columns j0..j0 + NR (the caller's bound);
        // the stores stay inside `packed` (asserted above).
        unsafe {
            let x = _mm512_loadu_si512(b.values.as_ptr().add(row(first)).cast());
            let y = _mm512_loadu_si512(b.values.as_ptr().add(row(first + 1)).cast());
            let to = packed.as_mut_ptr().add(p * NR);
            _mm512_storeu_si512(to.cast(), _mm512_permutex2var_epi16(x, low_columns, y));
            _mm512_storeu_si512(
                to.add(16).cast(),
                _mm512_permutex2var_epi16(x, high_columns, y),
            );
        }
    }
}

/// The transpose of a 16 × 16 matrix of u32 held as sixteen rows: line `q` holds element `q`
/// of every row. Three rounds of interleaving: 32-bit and 64-bit within 128-bit lanes, then
/// lanes across vectors (twice).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn transpose_16x16(r: [std::arch::x86_64::__m512i; 16]) -> [std::arch::x86_64::__m512i; 16] {
    use std::arch::x86_64::*;
    // t[2i], t[2i + 1]: rows 2i and 2i + 1 interleaved, elements 0, 1 (then 2, 3) of each lane.
    let t: [__m512i; 16] = std::array::from_fn(|i| {
        let (x, y) = (r[i & !1], r[i | 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_epi32(x, y)
        } else {
            _mm512_unpackhi_epi32(x, y)
        }
    });
    // u[4g + c]: element c of each lane of rows 4g .. 4g + 4.
    let u: [__m512i; 16] = std::array::from_fn(|i| {
        let (g, c) = (i / 4, i % 4);
        let (x, y) = (t[4 * g + c / 2], t[4 * g + 2 + c / 2]);
        if c % 2 == 0 {
            _mm512_unpacklo_epi64(x, y)
        } else {
            _mm512_unpackhi_epi64(x, y)
        }
    });
    // Lanes 0 and 2 (`0x88`) or 1 and 3 (`0xdd`) of two vectors, then of those pairs.
    let mut out = [_mm512_setzero_si512(); 16];
    for c in 0..4 {
        let even_01 = _mm512_shuffle_i32x4::<0x88>(u[c], u[4 + c]);
        let odd_01 = _mm512_shuffle_i32x4::<0xdd>(u[c], u[4 + c]);
        let even_23 = _mm512_shuffle_i32x4::<0x88>(u[8 + c], u[12 + c]);
        let odd_23 = _mm512_shuffle_i32x4::<0xdd>(u[8 + c], u[12 + c]);
        out[c] = _mm512_shuffle_i32x4::<0x88>(even_01, even_23);
        out[c + 8] = _mm512_shuffle_i32x4::<0xdd>(even_01, even_23);
        out[c + 4] = _mm512_shuffle_i32x4::<0x88>(odd_01, odd_23);
        out[c + 12] = _mm512_shuffle_i32x4::<0xdd>(odd_01, odd_23);
    }
    out
}

/// `dst = bf16(src)`, rounding to nearest even, sixteen at a time.
fn to_bf16(src: &[f32], dst: &mut [MaybeUninit<bf16>]) {
    assert_eq!(src.len(), dst.len());
    // Whole groups of sixteen by the vector instruction, the rest one at a time.
    #[cfg(target_arch = "x86_64")]
    let whole = {
        let whole = src.len() / 16 * 16;
        // SAFETY: `available()` was checked before any product; the loop stays inside both
        // slices.
        unsafe { convert_avx512(&src[..whole], &mut dst[..whole]) };
        whole
    };
    #[cfg(not(target_arch = "x86_64"))]
    let whole = 0;
    for (d, s) in dst[whole..].iter_mut().zip(&src[whole..]) {
        d.write(bf16::from_f32(*s));
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn convert_avx512(src: &[f32], dst: &mut [MaybeUninit<bf16>]) {
    use std::arch::x86_64::*;
    for (s, d) in src.chunks_exact(16).zip(dst.chunks_exact_mut(16)) {
        // SAFETY: sixteen f32 in, sixteen bf16 out.
        unsafe {
            let converted = _mm512_cvtneps_pbh(_mm512_loadu_ps(s.as_ptr()));
            _mm256_storeu_si256(
                d.as_mut_ptr().cast(),
                std::mem::transmute::<__m256bh, __m256i>(converted),
            );
        }
    }
}

/// One micro-kernel call: `out` (`rows × NR`, rows `out_stride` apart) `[+]=` left rows'
/// pairs `p0..p0 + depth` times the packed right panel.
struct Call<'a> {
    left: &'a [bf16],
    left_pairs: usize,
    p0: usize,
    depth: usize,
    right: &'a [u32],
    out: *mut f32,
    out_stride: usize,
    accumulate: bool,
}

/// # Safety
/// `call.out` points at `rows` rows of `NR` writable floats, `call.out_stride` apart, that
/// nothing else reads or writes meanwhile.
unsafe fn micro_kernel(rows: usize, call: Call) {
    let rows_present = call.left.len() / (call.left_pairs * 2);
    assert!(rows <= MR && rows <= rows_present && call.out_stride >= NR);
    assert!(call.p0 + call.depth <= call.left_pairs && call.right.len() >= call.depth * NR);
    // SAFETY: `available()` was checked before any product; the asserts above keep every read
    // inside the slices, and the caller vouches for the writes.
    unsafe {
        match rows {
            12 => kernel::<12>(call),
            11 => kernel::<11>(call),
            10 => kernel::<10>(call),
            9 => kernel::<9>(call),
            8 => kernel::<8>(call),
            7 => kernel::<7>(call),
            6 => kernel::<6>(call),
            5 => kernel::<5>(call),
            4 => kernel::<4>(call),
            3 => kernel::<3>(call),
            2 => kernel::<2>(call),
            _ => kernel::<1>(call),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn kernel<const R: usize>(call: Call) {
    use std::arch::x86_64::*;
    let Call {
        left,
        left_pairs,
        p0,
        depth,
        right,
        out,
        out_stride,
        accumulate,
    } = call;
    let left = left.as_ptr() as *const u32;
    let right = right.as_ptr();
    // SAFETY: pointers stay within the slices micro_kernel checked.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for p in 0..depth {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(right.add(p * NR).cast()));
            let b1: __m512bh =
                std::mem::transmute(_mm512_loadu_si512(right.add(p * NR + 16).cast()));
            for (r, acc) in acc.iter_mut().enumerate() {
                let pair = left.add(r * left_pairs + p0 + p).read_unaligned();
                let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair as i32));
                acc[0] = _mm512_dpbf16_ps(acc[0], a, b0);
                acc[1] = _mm512_dpbf16_ps(acc[1], a, b1);
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let row = out.add(r * out_stride);
            let (mut v0, mut v1) = (acc[0], acc[1]);
            if accumulate {
                v0 = _mm512_add_ps(v0, _mm512_loadu_ps(row));
                v1 = _mm512_add_ps(v1, _mm512_loadu_ps(row.add(16)));
            }
            _mm512_storeu_ps(row, v0);
            _mm512_storeu_ps(row.add(16), v1);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel<const R: usize>(_: Call) {
    unreachable!("available() is false off x86-64")
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    /// `x·Wᵀ` in f64 from bf16-rounded operands: what the kernel computes up to f32 sums.
    fn reference(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let round = |v: f32| f64::from(bf16::from_f32(v).to_f32());
        (0..m)
            .flat_map(|i| {
                (0..n).map(move |j| {
                    (0..k)
                        .map(|p| round(x[i * k + p]) * round(w[j * k + p]))
                        .sum()
                })
            })
            .collect()
    }

    #[test]
    fn equals_the_exact_product_of_the_rounded_operands_both_ways() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let device = Default::default();
        Flex::seed(&device, 21);
        type AD = Autodiff<Flex>;
        // Odd shared dimension, rows and columns that fill no whole block, deeper than KC pairs.
        // Whole pairs packed 16 at a time with some left over: [9, 40, 64], [5, 1100, 33].
        for [m, k, n] in [
            [13, 7, 33],
            [25, 601, 70],
            [3, 1, 1],
            [9, 40, 64],
            [5, 1100, 33],
        ] {
            let x = Tensor::<AD, 2>::random([m, k], Distribution::Default, &device);
            let w = Tensor::<AD, 2>::random([n, k], Distribution::Default, &device);
            let w_bf16 = w.clone().cast(burn::tensor::FloatDType::BF16);
            // The weight as the kernel holds it (burn's cast, exact in f32), and x as given.
            let (xv, wv) = (
                x.to_data().to_vec::<f32>().unwrap(),
                w_bf16.to_data().convert::<f32>().to_vec::<f32>().unwrap(),
            );
            let x = x.require_grad();
            let y = matmul(&x, &w_bf16, true).expect("the kernel");
            let upstream = Tensor::<AD, 2>::random([m, n], Distribution::Default, &device);
            let grads = (y.clone() * upstream.clone()).sum().backward();
            // f32 sums of `depth` products: within depth·2⁻²⁴ of the sum of their magnitudes,
            // which for these non-negative operands is at most the largest exact value.
            let check = |ours: Vec<f32>, exact: Vec<f64>, depth: usize, what: &str| {
                let scale = exact.iter().fold(1.0f64, |s, v| s.max(v.abs()));
                let bound = (depth + 2) as f64 * f64::from(f32::EPSILON / 2.0) * scale;
                for (i, (o, e)) in ours.iter().zip(&exact).enumerate() {
                    assert!(
                        (f64::from(*o) - e).abs() <= bound,
                        "{what} [{m}, {k}, {n}] element {i}: {o} against {e}"
                    );
                }
            };
            check(
                y.into_data().to_vec().unwrap(),
                reference(&xv, &wv, m, k, n),
                k,
                "y",
            );
            // dx = upstream · W, i.e. upstream · (Wᵀ)ᵀ.
            let uv = upstream.to_data().to_vec::<f32>().unwrap();
            let wt: Vec<f32> = (0..k * n).map(|i| wv[(i % n) * k + i / n]).collect();
            check(
                x.grad(&grads).unwrap().into_data().to_vec().unwrap(),
                reference(&uv, &wt, m, n, k),
                n,
                "dx",
            );
        }
    }
}
