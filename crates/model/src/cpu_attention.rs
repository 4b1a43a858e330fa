//! Causal attention for training on the CPU backend, forward and backward each as one kernel:
//! every (row, head) pair and block of queries is a task on the thread pool, its scores live
//! only in a scratch buffer of `block × visible keys`, and the products go straight to `gemm`
//! on the heads' strided rows. Composed of burn's tensor ops, the same attention spent most of
//! its time in single-threaded strided element-wise passes over the scores (masking, max,
//! exponent, the log-sum-exp broadcasts); here those are one pass per row, in cache.
//!
//! Grouped-query attention is native: keys and values come with their own (fewer) heads, query
//! head `h` reads key head `h / groups`, and their gradients are summed over the group.

use burn::backend::Flex;
use burn::tensor::{Bool, Tensor, TensorData};
use burn_flex::FlexTensor;
use gemm::{Parallelism, gemm};
use rayon::prelude::*;

use crate::row_softmax::softmax_in_place;
use crate::vector_exp::exp_in_place;

/// Query rows per task.
const BLOCK: usize = 64;

/// The attention output and each query's log-sum-exp of its visible scores.
///
/// # Shapes
/// - q: `[batch, heads, seq, head_dim]`; k, v: `[batch, kv_heads, seq, head_dim]`
/// - mask: `[batch or 1, 1, seq, seq]`, `true` where a query must not see a key
/// - output: `[batch, heads, seq, head_dim]` and `[batch, heads, seq, 1]`
///
/// The inputs are f32 (the caller checks).
pub(crate) fn forward(
    q: &Tensor<Flex, 4>,
    k: &Tensor<Flex, 4>,
    v: &Tensor<Flex, 4>,
    mask: Option<&Tensor<Flex, 4, Bool>>,
) -> (Tensor<Flex, 4>, Tensor<Flex, 4>) {
    let [batch, heads, seq, dim] = q.dims();
    let (q, k, v) = (Heads::new(q), Heads::new(k), Heads::new(v));
    let mask = Mask::new(mask, seq);
    let groups = heads / k.heads;
    let scale = (dim as f32).powf(-0.5);

    let mut out = vec![0.0f32; batch * heads * seq * dim];
    let mut lse = vec![0.0f32; batch * heads * seq];
    out.par_chunks_mut(seq * dim)
        .zip(lse.par_chunks_mut(seq))
        .enumerate()
        .flat_map(|(plane, (out, lse))| {
            out.par_chunks_mut(BLOCK * dim)
                .zip(lse.par_chunks_mut(BLOCK))
                .enumerate()
                .map(move |(block, rows)| (plane, block * BLOCK, rows))
        })
        .for_each_init(Vec::new, |scratch, (plane, start, (out, lse))| {
            let (b, h) = (plane / heads, plane % heads);
            let rows = lse.len();
            let seen = start + rows;
            let (q, k) = (q.at(b, h, start), k.at(b, h / groups, 0));
            let probs = scores(scratch, &q, &k, [rows, seen, dim]);
            for (i, (row, lse)) in probs.chunks_mut(seen).zip(lse.iter_mut()).enumerate() {
                scale_and_hide(row, scale, 0.0, start + i + 1, mask.row(b, start + i));
                *lse = softmax_in_place(row);
            }
            // out = P · V
            product(
                (rows, dim, seen),
                Out::rows(out, dim),
                In::rows(probs, seen),
                v.at(b, h / groups, 0),
                1.0,
                false,
            );
        });
    (
        positions_major(&out, [batch, heads, seq, dim], 1),
        Tensor::from_data(
            TensorData::new(lse, [batch, heads, seq, 1]),
            &Default::default(),
        ),
    )
}

/// Gradients of q, k and v from the output's, recomputing each block's probabilities from the
/// saved log-sum-exp: `dV = Pᵀ·dO`, `dS = P ∘ (dO·Vᵀ − rowsum(dO ∘ O))`, `dQ = s·dS·K`,
/// `dK = s·dSᵀ·Q`. Shapes as [`forward`]'s, with `out` and `lse` what it returned.
pub(crate) fn backward(
    [q, k, v]: [&Tensor<Flex, 4>; 3],
    mask: Option<&Tensor<Flex, 4, Bool>>,
    out: &Tensor<Flex, 4>,
    lse: &Tensor<Flex, 4>,
    d_out: &Tensor<Flex, 4>,
) -> [Tensor<Flex, 4>; 3] {
    let [batch, heads, seq, dim] = q.dims();
    let [_, kv_heads, _, _] = k.dims();
    let (q, k, v, out, d_out) = (
        Heads::new(q),
        Heads::new(k),
        Heads::new(v),
        Heads::new(out),
        Heads::new(d_out),
    );
    let lse = Heads::new(lse);
    let mask = Mask::new(mask, seq);
    let groups = heads / kv_heads;
    let scale = (dim as f32).powf(-0.5);

    // Per query head; keys' and values' gradients are summed over each group afterwards.
    let plane = seq * dim;
    let mut dq = vec![0.0f32; batch * heads * plane];
    let mut dk = vec![0.0f32; batch * heads * plane];
    let mut dv = vec![0.0f32; batch * heads * plane];
    dq.par_chunks_mut(plane)
        .zip(dk.par_chunks_mut(plane))
        .zip(dv.par_chunks_mut(plane))
        .enumerate()
        .for_each(|(index, ((dq, dk), dv))| {
            let (b, h) = (index / heads, index % heads);
            let (q, k, v) = (
                q.at(b, h, 0),
                k.at(b, h / groups, 0),
                v.at(b, h / groups, 0),
            );
            let (out, d_out, lse) = (out.at(b, h, 0), d_out.at(b, h, 0), lse.at(b, h, 0));
            let row_dots: Vec<f32> = (0..seq)
                .map(|i| (0..dim).map(|c| d_out.get(i, c) * out.get(i, c)).sum())
                .collect();
            let (mut probs_scratch, mut d_scores_scratch) = (Vec::new(), Vec::new());
            for start in (0..seq).step_by(BLOCK) {
                let rows = BLOCK.min(seq - start);
                let seen = start + rows;
                let (q_block, d_out_block) = (q.offset(start), d_out.offset(start));
                let probs = scores(&mut probs_scratch, &q_block, &k, [rows, seen, dim]);
                for (i, row) in probs.chunks_mut(seen).enumerate() {
                    let lse = lse.get(start + i, 0);
                    if lse == f32::NEG_INFINITY {
                        // Nothing visible: no probability anywhere.
                        row.fill(0.0);
                        continue;
                    }
                    scale_and_hide(row, scale, lse, start + i + 1, mask.row(b, start + i));
                    exp_in_place(row);
                }
                // dV[..seen] += Pᵀ · dO
                product(
                    (seen, dim, rows),
                    Out::rows(&mut dv[..seen * dim], dim),
                    In::rows(probs, seen).transposed(),
                    d_out_block,
                    1.0,
                    true,
                );
                // dS = P ∘ (dO · Vᵀ − rowsum(dO ∘ O))
                let d_scores = scratch(&mut d_scores_scratch, rows * seen);
                product(
                    (rows, seen, dim),
                    Out::rows(d_scores, seen),
                    d_out_block,
                    v.transposed(),
                    1.0,
                    false,
                );
                for (i, (ds, p)) in d_scores
                    .chunks_mut(seen)
                    .zip(probs.chunks(seen))
                    .enumerate()
                {
                    let dot = row_dots[start + i];
                    for (ds, p) in ds.iter_mut().zip(p) {
                        *ds = p * (*ds - dot);
                    }
                }
                // dQ = s · dS · K
                product(
                    (rows, dim, seen),
                    Out::rows(&mut dq[start * dim..seen * dim], dim),
                    In::rows(d_scores, seen),
                    k,
                    scale,
                    false,
                );
                // dK[..seen] += s · dSᵀ · Q
                product(
                    (seen, dim, rows),
                    Out::rows(&mut dk[..seen * dim], dim),
                    In::rows(d_scores, seen).transposed(),
                    q_block,
                    scale,
                    true,
                );
            }
        });
    let shape = [batch, heads, seq, dim];
    [
        positions_major(&dq, shape, 1),
        positions_major(&dk, shape, groups),
        positions_major(&dv, shape, groups),
    ]
}

/// `scores = Q · Kᵀ` (unscaled) for `rows` queries against the first `seen` keys, in `buffer`.
fn scores<'a>(
    buffer: &'a mut Vec<f32>,
    q: &In,
    k: &In,
    [rows, seen, dim]: [usize; 3],
) -> &'a mut [f32] {
    let scores = scratch(buffer, rows * seen);
    product(
        (rows, seen, dim),
        Out::rows(scores, seen),
        *q,
        k.transposed(),
        1.0,
        false,
    );
    scores
}

/// The first `len` elements of a buffer reused from task to task, grown when too short. They
/// hold whatever the last use left: only for outputs that a product overwrites.
fn scratch(buffer: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buffer.len() < len {
        buffer.resize(len, 0.0);
    }
    &mut buffer[..len]
}

/// Turns a row of raw scores into `scale · score − shift` for the keys before `visible` (the
/// query's own position and earlier) and −∞ for the others and for those `hidden` marks.
fn scale_and_hide(row: &mut [f32], scale: f32, shift: f32, visible: usize, hidden: Option<&[u8]>) {
    let (seen, future) = row.split_at_mut(visible.min(row.len()));
    for x in seen.iter_mut() {
        *x = *x * scale - shift;
    }
    future.fill(f32::NEG_INFINITY);
    if let Some(hidden) = hidden {
        for (x, &h) in seen.iter_mut().zip(hidden) {
            if h != 0 {
                *x = f32::NEG_INFINITY;
            }
        }
    }
}

/// Values computed head by head (`[batch, heads, seq, dim]`, contiguous) as a tensor of that
/// shape laid out `[batch, seq, heads, dim]` in memory, the query heads of each group of `groups`
/// summed into their key/value head (`groups` 1: every head as it is). That layout is the
/// projections': the output goes back to `[batch, seq, heads · dim]`, and the inputs' gradients
/// to the projections' outputs, as views, where a head-major tensor took a single-threaded
/// strided copy each. One pass over the positions on the thread pool.
fn positions_major(
    per_head: &[f32],
    [batch, heads, seq, dim]: [usize; 4],
    groups: usize,
) -> Tensor<Flex, 4> {
    let kv_heads = heads / groups;
    let mut data = vec![0.0f32; batch * seq * kv_heads * dim];
    data.par_chunks_mut(kv_heads * dim)
        .enumerate()
        .for_each(|(position, row)| {
            let (b, s) = (position / seq, position % seq);
            for (kv_head, sum) in row.chunks_mut(dim).enumerate() {
                for h in kv_head * groups..(kv_head + 1) * groups {
                    let start = ((b * heads + h) * seq + s) * dim;
                    for (total, x) in sum.iter_mut().zip(&per_head[start..start + dim]) {
                        *total += x;
                    }
                }
            }
        });
    let positions = TensorData::new(data, [batch, seq, kv_heads, dim]);
    Tensor::<Flex, 4>::from_data(positions, &Default::default()).swap_dims(1, 2)
}

/// The keys a `[batch or 1, 1, seq, seq]` mask hides beyond causality, as bytes.
struct Mask {
    hidden: Option<(FlexTensor, usize)>,
    seq: usize,
}

impl Mask {
    fn new(mask: Option<&Tensor<Flex, 4, Bool>>, seq: usize) -> Self {
        let hidden = mask.map(|m| (m.clone().into_primitive().to_contiguous(), m.dims()[0]));
        Self { hidden, seq }
    }

    /// Query `i` of row `b`'s mask row (non-zero where hidden), if there is a mask.
    fn row(&self, b: usize, i: usize) -> Option<&[u8]> {
        self.hidden.as_ref().map(|(mask, rows)| {
            let b = if *rows == 1 { 0 } else { b };
            let start = (b * self.seq + i) * self.seq;
            &mask.storage::<u8>()[start..start + self.seq]
        })
    }
}

/// A `[batch, heads, seq, dim]` tensor read in place: unit stride along `dim`, any strides
/// elsewhere (a copy is made only when that does not hold).
struct Heads {
    tensor: FlexTensor,
    heads: usize,
}

impl Heads {
    fn new(t: &Tensor<Flex, 4>) -> Self {
        let heads = t.dims()[1];
        let tensor = t.clone().into_primitive().tensor();
        let strides = tensor.layout().strides();
        let tensor = if strides[3] == 1 && strides.iter().all(|&s| s >= 0) {
            tensor
        } else {
            tensor.to_contiguous()
        };
        Self { tensor, heads }
    }

    /// Head `h` of row `b` from position `start` on, as a matrix of positions × dims.
    fn at(&self, b: usize, h: usize, start: usize) -> In<'_> {
        let layout = self.tensor.layout();
        let s = layout.strides();
        let offset = layout.start_offset() + b * s[0] as usize + h * s[1] as usize;
        let data = &self.tensor.storage::<f32>()[offset..];
        In {
            data,
            row_stride: s[2],
            col_stride: 1,
        }
        .offset(start)
    }
}

/// A read-only matrix in a slice: element `(i, j)` at `i · row_stride + j · col_stride`.
#[derive(Clone, Copy)]
struct In<'a> {
    data: &'a [f32],
    row_stride: isize,
    col_stride: isize,
}

impl<'a> In<'a> {
    fn rows(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            row_stride: cols as isize,
            col_stride: 1,
        }
    }

    fn transposed(self) -> Self {
        Self {
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// The matrix from row `start` on.
    fn offset(self, start: usize) -> Self {
        Self {
            data: &self.data[start * self.row_stride as usize..],
            ..self
        }
    }

    fn get(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.row_stride as usize + j * self.col_stride as usize]
    }
}

/// A row-major matrix being written: `data` holds its rows, `cols` apart.
struct Out<'a> {
    data: &'a mut [f32],
    cols: usize,
}

impl<'a> Out<'a> {
    fn rows(data: &'a mut [f32], cols: usize) -> Self {
        Self { data, cols }
    }
}

/// `dst = [dst +] alpha · lhs · rhs` for an `m × k` lhs and a `k × n` rhs, on this thread.
fn product(
    (m, n, k): (usize, usize, usize),
    dst: Out,
    lhs: In,
    rhs: In,
    alpha: f32,
    accumulate: bool,
) {
    let last = |x: &In, rows: usize, cols: usize| {
        rows.saturating_sub(1) * x.row_stride as usize
            + cols.saturating_sub(1) * x.col_stride as usize
    };
    // The bounds gemm relies on, checked once per product.
    assert!(dst.cols == n && dst.data.len() >= m * n);
    assert!(m == 0 || k == 0 || last(&lhs, m, k) < lhs.data.len());
    assert!(k == 0 || n == 0 || last(&rhs, k, n) < rhs.data.len());
    // SAFETY: the asserts above keep every element gemm reads or writes inside the slices, and
    // `dst` is borrowed mutably for the call.
    unsafe {
        gemm(
            m,
            n,
            k,
            dst.data.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride,
            lhs.row_stride,
            rhs.data.as_ptr(),
            rhs.col_stride,
            rhs.row_stride,
            1.0,
            alpha,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}
