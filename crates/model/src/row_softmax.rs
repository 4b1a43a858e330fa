//! The softmax of each row of a matrix together with the row's log-sum-exp, as values only:
//! what a loss computed chunk by chunk needs from a chunk of logits. On the CPU backend one
//! parallel pass per row; elsewhere burn's ops (the reductions through [`reduce_rows`], which
//! spreads a row of logits over a block of threads on the GPU backends).

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use burnish_peft::{RowReduction, reduce_rows};
use rayon::prelude::*;

use crate::cpu_kernel::{from_values, tensor, values, values_of};
use crate::vector_exp::exp_in_place;

/// The probabilities `softmax(logits)` of every row and each row's `log Σ exp`, with no
/// gradient.
///
/// # Shapes
/// - logits: `[rows, n]`
/// - output: `[rows, n]` and `[rows, 1]`
pub fn softmax_rows<B: Backend>(logits: Tensor<B, 2>) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let logits = logits.detach();
    if let Some(flex) = values_of(&logits) {
        let [rows, n] = logits.dims();
        let mut probs: Vec<f32> = values(&flex).par_iter().copied().collect();
        let mut lse = vec![0.0f32; rows];
        probs
            .par_chunks_mut(n.max(1))
            .zip(lse.par_iter_mut())
            .for_each(|(row, lse)| *lse = softmax_in_place(row));
        return (
            from_values(tensor(probs, [rows, n].into())),
            from_values(tensor(lse, [rows, 1].into())),
        );
    }
    let max = reduce_rows(logits.clone(), RowReduction::Max);
    let exp = (logits - max.clone()).exp();
    let total = reduce_rows(exp.clone(), RowReduction::Sum);
    (exp / total.clone(), max + total.log())
}

/// Turns `row` into its softmax and returns its log-sum-exp. A NaN anywhere makes the whole
/// row and the result NaN; a row of -∞ alone (nothing possible) becomes zeros, with -∞.
pub(crate) fn softmax_in_place(row: &mut [f32]) -> f32 {
    let max = max_or_nan(row);
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return f32::NEG_INFINITY;
    }
    row.iter_mut().for_each(|x| *x -= max);
    exp_in_place(row);
    let total = sum(row);
    let inverse = 1.0 / total;
    row.iter_mut().for_each(|x| *x *= inverse);
    max + total.ln()
}

/// Lanes the reductions below keep apart, so that they compile to vector instructions (a
/// single running value would be one sequential chain).
const LANES: usize = 16;

/// The largest value of `row`, or NaN if it holds one (unlike `f32::max`, which skips NaNs).
fn max_or_nan(row: &[f32]) -> f32 {
    let mut max = [f32::NEG_INFINITY; LANES];
    let mut nan = [false; LANES];
    let chunks = row.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for ((m, n), &x) in max.iter_mut().zip(&mut nan).zip(chunk) {
            *m = if x > *m { x } else { *m };
            *n |= x.is_nan();
        }
    }
    let mut largest = f32::NEG_INFINITY;
    for &x in max.iter().chain(rest) {
        largest = if x > largest { x } else { largest };
    }
    if nan.iter().any(|&n| n) || rest.iter().any(|x| x.is_nan()) {
        f32::NAN
    } else {
        largest
    }
}

/// The sum of `row`, in `LANES` partial sums.
fn sum(row: &[f32]) -> f32 {
    let mut sums = [0.0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (s, x) in sums.iter_mut().zip(chunk) {
            *s += x;
        }
    }
    sums.iter().chain(rest).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::{Distribution, TensorData, Tolerance};

    #[test]
    fn equals_the_exact_softmax_and_log_sum_exp() {
        let device = Default::default();
        Flex::seed(&device, 13);
        let logits =
            Tensor::<Autodiff<Flex>, 2>::random([7, 5000], Distribution::Normal(0.0, 6.0), &device);
        let rows: Vec<Vec<f64>> = logits
            .to_data()
            .to_vec::<f32>()
            .unwrap()
            .chunks(5000)
            .map(|r| r.iter().map(|&x| f64::from(x)).collect())
            .collect();
        let lse: Vec<f64> = rows
            .iter()
            .map(|r| r.iter().map(|x| x.exp()).sum::<f64>().ln())
            .collect();
        let probs: Vec<f32> = rows
            .iter()
            .zip(&lse)
            .flat_map(|(r, lse)| r.iter().map(move |x| (x - lse).exp() as f32))
            .collect();
        let lse: Vec<f32> = lse.into_iter().map(|x| x as f32).collect();
        let (ours_probs, ours_lse) = softmax_rows(logits.clone());
        ours_probs.into_data().assert_approx_eq::<f32>(
            &TensorData::new(probs, [7, 5000]),
            Tolerance::relative(1e-5),
        );
        ours_lse.into_data().assert_approx_eq::<f32>(
            &TensorData::new(lse.clone(), [7, 1]),
            Tolerance::relative(1e-6),
        );
    }
}
