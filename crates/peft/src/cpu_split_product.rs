//! f32 products on the CPU backend spread over the thread pool: an adapter's low-rank products
//! and, with an f32 base, the frozen projections'. burn-flex multiplies on one thread below
//! 192³ multiply-adds, and at the rows of a short batch every LoRA product is below that:
//! `x·Aᵀ` and `h·Bᵀ` forward, and the four of their backward pass. On two cores they took an
//! eighth of a SmolLM2-135M training step at 128 tokens, on one core while the other waited.
//! Here each product's output is cut into one block of rows (or of columns, whichever side is
//! longer) per thread, and each block is one single-threaded gemm call on the operands in
//! place, strided views included. The sums over the shared dimension are those of one
//! whole-matrix call; only the split of the output differs. Larger products, which burn-flex
//! hands to gemm's own threading, measured a few percent faster this way too, with no
//! zero-filled output buffer.
//!
//! [`matmul`] takes the forward product and, with autodiff, its backward pass, which computes
//! the same kind of products for both operands' gradients.

use std::any::TypeId;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor, TensorPrimitive};
use burn_flex::FlexTensor;
use gemm::{Parallelism, gemm};
use rayon::prelude::*;

use crate::cpu_tensors::tensor;
use crate::rebrand::{on_cpu, rebrand};
use crate::shared_output::SharedOutput;

/// Multiply-adds below which a product stays one call: splitting it would cost more in handing
/// work to another thread than the thread saves.
const SPLIT_FROM: usize = 1 << 16;

/// `x·Wᵀ` (`transposed`) or `x·W` split over the thread pool, when `B` is the CPU backend and
/// both operands are f32; `None` otherwise. Both operands may be tracked.
///
/// # Shapes
/// - x: `[rows, from]`; weight: `[to, from]` (`transposed`) or `[from, to]`; output: `[rows, to]`
pub(crate) fn matmul<B: Backend>(
    x: &Tensor<B, 2>,
    weight: &Tensor<B, 2>,
    transposed: bool,
) -> Option<Tensor<B, 2>> {
    if !on_cpu::<B>() || x.dtype() != DType::F32 || weight.dtype() != DType::F32 {
        return None;
    }
    let (x, weight) = (
        x.clone().into_primitive().tensor(),
        weight.clone().into_primitive().tensor(),
    );
    let out: FloatTensor<B> = if TypeId::of::<B>() == TypeId::of::<Flex>() {
        let (x, weight) = (readable(rebrand(x)), readable(rebrand(weight)));
        rebrand(product(
            Operand::of(&x),
            Operand::of(&weight).transposed_if(transposed),
        ))
    } else {
        rebrand(tracked(rebrand(x), rebrand(weight), transposed))
    };
    Some(Tensor::from_primitive(TensorPrimitive::Float(out)))
}

#[derive(Debug)]
struct ProductBackward;

impl Backward<Flex, 2> for ProductBackward {
    /// `x` (kept when the weight needs its gradient), the weight (kept when `x` does), and the
    /// orientation of the forward product.
    type State = (Option<FlexTensor>, Option<FlexTensor>, bool);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let d_out = readable(grads.consume::<Flex>(&ops.node));
        let (x, weight, transposed) = ops.state;
        let [x_node, weight_node] = ops.parents;
        let d_out_values = Operand::of(&d_out);
        if let (Some(node), Some(weight)) = (x_node, weight) {
            // out = x·R with R = Wᵀ or W, so dx = d_out·Rᵀ.
            let right = Operand::of(&weight).transposed_if(!transposed);
            grads.register::<Flex>(node.id, product(d_out_values, right));
        }
        if let (Some(node), Some(x)) = (weight_node, x) {
            // dR = xᵀ·d_out; dW is dR, or dRᵀ = d_outᵀ·x for a weight used transposed.
            let x = Operand::of(&x);
            let d_weight = if transposed {
                product(d_out_values.transposed(), x)
            } else {
                product(x.transposed(), d_out_values)
            };
            grads.register::<Flex>(node.id, d_weight);
        }
    }
}

fn tracked(
    x: FloatTensor<Autodiff<Flex>>,
    weight: FloatTensor<Autodiff<Flex>>,
    transposed: bool,
) -> FloatTensor<Autodiff<Flex>> {
    let (x_values, weight_values) = (
        readable(x.primitive.clone()),
        readable(weight.primitive.clone()),
    );
    let out = product(
        Operand::of(&x_values),
        Operand::of(&weight_values).transposed_if(transposed),
    );
    let (x_tracked, weight_tracked) = (x.is_tracked(), weight.is_tracked());
    match ProductBackward
        .prepare::<NoCheckpointing>([x.node.clone(), weight.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let state = (
                weight_tracked.then_some(x_values),
                x_tracked.then_some(weight_values),
                transposed,
            );
            prep.finish(state, out)
        }
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

/// `t` itself, or a contiguous copy of it when a stride is negative (a flipped view), which
/// gemm does not read.
fn readable(t: FlexTensor) -> FlexTensor {
    if t.layout().strides().iter().all(|&s| s >= 0) {
        t
    } else {
        t.to_contiguous()
    }
}

/// A 2-D f32 operand read in place: element `(i, j)` at `i·row_stride + j·col_stride` of
/// `values`.
#[derive(Clone, Copy)]
struct Operand<'a> {
    values: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: isize,
    col_stride: isize,
}

impl<'a> Operand<'a> {
    /// `t`'s values in its own layout, which must have no negative stride ([`readable`]).
    fn of(t: &'a FlexTensor) -> Self {
        let layout = t.layout();
        let (shape, strides) = (layout.shape(), layout.strides());
        assert!(strides.iter().all(|&s| s >= 0), "a readable layout");
        Self {
            values: &t.storage::<f32>()[layout.start_offset()..],
            rows: shape[0],
            cols: shape[1],
            row_stride: strides[0],
            col_stride: strides[1],
        }
    }

    fn transposed(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    fn transposed_if(self, transpose: bool) -> Self {
        if transpose { self.transposed() } else { self }
    }

    /// Rows `r0..r0 + rows` and columns `c0..c0 + cols`, as a pointer to the first element.
    fn block_start(&self, r0: usize, c0: usize) -> *const f32 {
        let offset = r0 as isize * self.row_stride + c0 as isize * self.col_stride;
        // SAFETY: checked against the slice in `product` for the whole operand.
        unsafe { self.values.as_ptr().offset(offset) }
    }

    /// The offset of the last element, past which nothing is read.
    fn last(&self) -> usize {
        (self.rows.saturating_sub(1) as isize * self.row_stride
            + self.cols.saturating_sub(1) as isize * self.col_stride) as usize
    }
}

/// `a·b` `[m, n]`, contiguous, with the output split over the thread pool.
fn product(a: Operand, b: Operand) -> FlexTensor {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(k, b.rows, "product shapes");
    if m == 0 || n == 0 || k == 0 {
        return tensor(vec![0.0f32; m * n], [m, n].into());
    }
    assert!(a.last() < a.values.len() && b.last() < b.values.len());
    let work = m * n * k;
    let tasks = rayon::current_num_threads()
        .min(work.div_ceil(SPLIT_FROM))
        .min(m.max(n))
        .max(1);
    // Blocks along the longer side of the output.
    let (along_rows, side) = if m >= n { (true, m) } else { (false, n) };
    let block = side.div_ceil(tasks);
    let mut out: Vec<f32> = Vec::with_capacity(m * n);
    let target = SharedOutput::new(&mut out, n);
    (0..side.div_ceil(block)).into_par_iter().for_each(|t| {
        let start = t * block;
        let len = block.min(side - start);
        let (r0, rows, c0, cols) = if along_rows {
            (start, len, 0, n)
        } else {
            (0, m, start, len)
        };
        // SAFETY: the operands' blocks lie inside their slices (checked above for the whole
        // operands), and this task alone writes rows r0..r0 + rows × columns c0..c0 + cols of
        // the m × n output, which `out` has room for.
        unsafe {
            gemm(
                rows,
                cols,
                k,
                target.at(r0, c0),
                1,
                n as isize,
                false,
                a.block_start(r0, 0),
                a.col_stride,
                a.row_stride,
                b.block_start(0, c0),
                b.col_stride,
                b.row_stride,
                0.0,
                1.0,
                false,
                false,
                false,
                Parallelism::None,
            );
        }
    });
    // SAFETY: the blocks cover the whole m × n output and gemm wrote each element (it does
    // not read the destination when told not to).
    unsafe { out.set_len(m * n) };
    tensor(out, [m, n].into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, TensorData};

    type AD = Autodiff<Flex>;

    /// Largest difference relative to the largest magnitude of `expected` (at least 1).
    fn relative_error(ours: TensorData, expected: TensorData) -> f32 {
        let (ours, expected) = (
            ours.to_vec::<f32>().unwrap(),
            expected.to_vec::<f32>().unwrap(),
        );
        assert_eq!(ours.len(), expected.len());
        let scale = expected.iter().fold(1.0f32, |s, v| s.max(v.abs()));
        ours.iter()
            .zip(&expected)
            .fold(0.0f32, |e, (o, x)| e.max((o - x).abs()))
            / scale
    }

    #[test]
    fn equals_burns_matmul_with_both_gradients_whichever_way_it_splits() {
        let device = Default::default();
        AD::seed(&device, 5);
        // [rows, from, to]: below the split, split by rows, split by columns, one row, a
        // shared dimension longer than both sides.
        for [m, k, n] in [
            [3, 5, 4],
            [300, 96, 16],
            [16, 300, 200],
            [1, 576, 1536],
            [7, 2048, 9],
        ] {
            for transposed in [true, false] {
                let x = Tensor::<AD, 2>::random([m, k], Distribution::Default, &device);
                let shape = if transposed { [n, k] } else { [k, n] };
                let w = Tensor::<AD, 2>::random(shape, Distribution::Default, &device);
                let upstream = Tensor::<AD, 2>::random([m, n], Distribution::Default, &device);
                let run = |ours: bool| {
                    let (x, w) = (x.clone().require_grad(), w.clone().require_grad());
                    let y = if ours {
                        matmul(&x, &w, transposed).expect("the CPU backend")
                    } else if transposed {
                        x.clone().matmul(w.clone().transpose())
                    } else {
                        x.clone().matmul(w.clone())
                    };
                    let grads = (y.clone() * upstream.clone()).sum().backward();
                    [
                        y.into_data(),
                        x.grad(&grads).unwrap().into_data(),
                        w.grad(&grads).unwrap().into_data(),
                    ]
                };
                let [y, dx, dw] = run(true);
                let [y_burn, dx_burn, dw_burn] = run(false);
                for (what, ours, burns) in
                    [("y", y, y_burn), ("dx", dx, dx_burn), ("dw", dw, dw_burn)]
                {
                    let error = relative_error(ours, burns);
                    assert!(
                        error < 1e-5,
                        "{what} of [{m}, {k}] · [{n}] (transposed {transposed}): {error}"
                    );
                }
            }
        }
    }

    #[test]
    fn reads_strided_and_flipped_operands_and_tracks_only_what_needs_a_gradient() {
        let device = Default::default();
        AD::seed(&device, 6);
        // x a transposed view, the weight flipped along its rows (a negative stride).
        let x = Tensor::<AD, 2>::random([40, 30], Distribution::Default, &device).transpose();
        let w = Tensor::<AD, 2>::random([20, 40], Distribution::Default, &device).flip([0]);
        let upstream = Tensor::<AD, 2>::random([30, 20], Distribution::Default, &device);
        let w_tracked = w.clone().require_grad();
        let y = matmul(&x, &w_tracked, true).expect("the CPU backend");
        let grads = (y.clone() * upstream.clone()).sum().backward();
        let expected = x.clone().matmul(w.clone().transpose());
        assert!(relative_error(y.into_data(), expected.into_data()) < 1e-5);
        let expected_dw = upstream.transpose().matmul(x.clone());
        let dw = w_tracked.grad(&grads).unwrap().into_data();
        assert!(relative_error(dw, expected_dw.into_data()) < 1e-5);
        assert!(x.grad(&grads).is_none(), "x needed no gradient");
    }

    #[test]
    fn leaves_other_dtypes_to_burn() {
        let device = Default::default();
        let x = Tensor::<Flex, 2>::ones([2, 3], &device).cast(burn::tensor::FloatDType::BF16);
        let w = Tensor::<Flex, 2>::ones([4, 3], &device);
        assert!(matmul(&x, &w, true).is_none());
    }
}
