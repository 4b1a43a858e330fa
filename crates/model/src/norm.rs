//! RMSNorm as transformers computes it: `x / sqrt(mean(x²) + eps) · weight`, as one kernel on
//! the CPU backend and one autodiff node elsewhere, whose passes are a kernel each on the plain
//! GPU backends (`gpu_kernels`) and burn's ops on the others.

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{FloatDType, Tensor, TensorPrimitive};
use burn_flex::FlexTensor;
use burnish_peft::composed_op::{self, ComposedOp};
use burnish_peft::{RowReduction, reduce_rows};
use rayon::prelude::*;

use crate::cpu_kernel::{self, Kernel, tensor, values};
#[cfg(any(feature = "cuda", feature = "wgpu"))]
use crate::gpu_kernels::{RmsNormBackward, RmsNormForward};
#[cfg(any(feature = "cuda", feature = "wgpu"))]
use burnish_peft::gpu_kernel;

/// Root-mean-square normalisation over the last dimension with a learned scale.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// `[hidden]`
    pub weight: Param<Tensor<B, 1>>,
    #[module(skip)]
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    pub fn new(weight: Tensor<B, 1>, eps: f64) -> Self {
        Self {
            weight: Param::from_tensor(weight),
            eps,
        }
    }

    /// # Shapes
    /// - input, output: `[batch, seq, hidden]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let weight = self.weight.val();
        let kernel = RmsNormKernel { eps: self.eps };
        let inputs = [
            x.clone().into_primitive().tensor(),
            weight.clone().into_primitive().tensor(),
        ];
        if let Some(out) = cpu_kernel::run::<B, _, 2>(kernel, inputs) {
            return Tensor::from_primitive(TensorPrimitive::Float(out));
        }
        let [batch, seq, hidden] = x.dims();
        let op = RmsNormOp { eps: self.eps };
        let rows = [x.reshape([batch * seq, hidden]), weight.unsqueeze::<2>()];
        composed_op::run(op, rows).reshape([batch, seq, hidden])
    }
}

/// The same in burn's ops, for the other backends: the rows `[rows, hidden]` and the weight
/// `[1, hidden]`; keeps each row's `r` for the backward pass. Computes in f32 whatever the
/// input's precision (as transformers does) and returns the input's.
#[derive(Debug, Clone)]
struct RmsNormOp {
    eps: f64,
}

impl ComposedOp<2> for RmsNormOp {
    fn forward<I: Backend>(
        &self,
        [x, weight]: [Tensor<I, 2>; 2],
    ) -> (Tensor<I, 2>, Option<Tensor<I, 2>>) {
        #[cfg(any(feature = "cuda", feature = "wgpu"))]
        if let Some([out, inv_rms]) = gpu_kernel::launch(
            &RmsNormForward { eps: self.eps },
            &[x.clone(), weight.clone()],
        ) {
            return (out, Some(inv_rms));
        }
        let dtype = x.dtype();
        let x = x.cast(FloatDType::F32);
        let inv_rms = reduce_rows(x.clone().square(), RowReduction::Mean)
            .add_scalar(self.eps)
            .sqrt()
            .recip();
        let out = x * inv_rms.clone() * weight.cast(FloatDType::F32);
        (out.cast(dtype), Some(inv_rms))
    }

    fn backward<I: Backend>(
        &self,
        [x, weight]: [Tensor<I, 2>; 2],
        inv_rms: Option<Tensor<I, 2>>,
        d_out: Tensor<I, 2>,
        [x_wanted, weight_wanted]: [bool; 2],
    ) -> [Option<Tensor<I, 2>>; 2] {
        let r = inv_rms.expect("RmsNormOp's forward pass keeps r");
        #[cfg(any(feature = "cuda", feature = "wgpu"))]
        if x_wanted && !weight_wanted {
            let inputs = [x.clone(), weight.clone(), r.clone(), d_out.clone()];
            if let Some([dx]) = gpu_kernel::launch(&RmsNormBackward, &inputs) {
                return [Some(dx), None];
            }
        }
        let (x_dtype, weight_dtype) = (x.dtype(), weight.dtype());
        let [x, weight, d_out] = [x, weight, d_out].map(|t| t.cast(FloatDType::F32));
        let hidden = x.dims()[1] as f64;
        let dw = weight_wanted.then(|| {
            let dw = (d_out.clone() * x.clone() * r.clone()).sum_dim(0);
            dw.cast(weight_dtype)
        });
        let dx = x_wanted.then(|| {
            let g = d_out * weight;
            let dot = reduce_rows(g.clone() * x.clone(), RowReduction::Sum);
            let correction = r.clone() * r.clone() * r.clone() * dot.div_scalar(hidden);
            (g * r - x * correction).cast(x_dtype)
        });
        [dx, dw]
    }
}

/// Rows of the normalised axis per task.
const ROWS_PER_TASK: usize = 16;

/// Per row `r = 1 / sqrt(mean(x²) + eps)`, `y = x · r · w`. Backward, with `g = dy · w`:
/// `dx = r · g − x · r³ · mean(g · x)` and `dw = Σ_rows dy · x · r`.
#[derive(Debug, Clone)]
struct RmsNormKernel {
    eps: f64,
}

impl Kernel<2> for RmsNormKernel {
    /// `r` of every row.
    type Saved = Vec<f32>;

    fn forward(&self, [x, weight]: &[FlexTensor; 2]) -> (FlexTensor, Vec<f32>) {
        let (xs, w) = (values(x), values(weight));
        let hidden = w.len();
        let mut out = vec![0.0f32; xs.len()];
        let mut inv_rms = vec![0.0f32; xs.len() / hidden];
        out.par_chunks_mut(hidden * ROWS_PER_TASK)
            .zip(inv_rms.par_chunks_mut(ROWS_PER_TASK))
            .zip(xs.par_chunks(hidden * ROWS_PER_TASK))
            .for_each(|((out, inv_rms), xs)| {
                for ((out, r), x) in out.chunks_mut(hidden).zip(inv_rms).zip(xs.chunks(hidden)) {
                    let mean_square = x.iter().map(|v| v * v).sum::<f32>() / hidden as f32;
                    *r = 1.0 / (mean_square + self.eps as f32).sqrt();
                    for ((o, x), w) in out.iter_mut().zip(x).zip(w) {
                        *o = x * *r * w;
                    }
                }
            });
        (tensor(out, x.layout().shape().clone()), inv_rms)
    }

    fn backward(
        &self,
        [x, weight]: &[FlexTensor; 2],
        inv_rms: Vec<f32>,
        d_out: &FlexTensor,
        [_, weight_wanted]: [bool; 2],
    ) -> [Option<FlexTensor>; 2] {
        let (xs, w, dys) = (values(x), values(weight), values(d_out));
        let hidden = w.len();
        let mut dx = vec![0.0f32; xs.len()];
        // Each task's share of `dw`, added up afterwards.
        let dw_parts: Vec<Vec<f32>> = dx
            .par_chunks_mut(hidden * ROWS_PER_TASK)
            .zip(inv_rms.par_chunks(ROWS_PER_TASK))
            .zip(xs.par_chunks(hidden * ROWS_PER_TASK))
            .zip(dys.par_chunks(hidden * ROWS_PER_TASK))
            .map(|(((dx, inv_rms), xs), dys)| {
                let mut dw = if weight_wanted {
                    vec![0.0f32; hidden]
                } else {
                    Vec::new()
                };
                for (((dx, r), x), dy) in dx
                    .chunks_mut(hidden)
                    .zip(inv_rms)
                    .zip(xs.chunks(hidden))
                    .zip(dys.chunks(hidden))
                {
                    let dot: f32 = x.iter().zip(dy).zip(w).map(|((x, dy), w)| dy * w * x).sum();
                    let correction = r * r * r * dot / hidden as f32;
                    for (((dx, x), dy), w) in dx.iter_mut().zip(x).zip(dy).zip(w) {
                        *dx = r * dy * w - x * correction;
                    }
                    for ((dw, x), dy) in dw.iter_mut().zip(x).zip(dy) {
                        *dw += dy * x * r;
                    }
                }
                dw
            })
            .collect();
        let dw = weight_wanted.then(|| {
            let mut dw = vec![0.0f32; hidden];
            for part in &dw_parts {
                dw.iter_mut().zip(part).for_each(|(total, v)| *total += v);
            }
            tensor(dw, weight.layout().shape().clone())
        });
        [Some(tensor(dx, x.layout().shape().clone())), dw]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::{Distribution, TensorData, Tolerance};

    type AD = Autodiff<Flex>;
    const EPS: f64 = 1e-5;
    const HIDDEN: usize = 96;

    /// An input of more rows than one of the kernel's tasks holds (and a last task with fewer),
    /// an upstream gradient, and a weight. (Drawn once per test: the seed is shared by tests
    /// running in parallel.)
    fn inputs() -> (Tensor<AD, 3>, Tensor<AD, 3>, Tensor<AD, 1>) {
        let device = Default::default();
        Flex::seed(&device, 7);
        let x = Tensor::<AD, 3>::random([3, 37, HIDDEN], Distribution::Normal(0.0, 2.0), &device);
        let upstream = Tensor::<AD, 3>::random([3, 37, HIDDEN], Distribution::Default, &device);
        let weight = Tensor::<AD, 1>::random([HIDDEN], Distribution::Normal(1.0, 0.3), &device);
        (x, upstream, weight)
    }

    /// `forward`'s output and the gradients of the input and the weight, both tracked.
    fn values_and_gradients(
        (x, upstream, weight): &(Tensor<AD, 3>, Tensor<AD, 3>, Tensor<AD, 1>),
        forward: &dyn Fn(Tensor<AD, 3>, Tensor<AD, 1>) -> Tensor<AD, 3>,
    ) -> [TensorData; 3] {
        let (x, w) = (x.clone().require_grad(), weight.clone().require_grad());
        let out = forward(x.clone(), w.clone());
        let grads = (out.clone() * upstream.clone()).sum().backward();
        [
            out.into_data(),
            x.grad(&grads).unwrap().into_data(),
            w.grad(&grads).unwrap().into_data(),
        ]
    }

    /// RMSNorm decomposed into burn's ops, differentiated op by op.
    fn burns(x: Tensor<AD, 3>, w: Tensor<AD, 1>) -> Tensor<AD, 3> {
        let inv_rms = x
            .clone()
            .square()
            .mean_dim(2)
            .add_scalar(EPS)
            .sqrt()
            .recip();
        x * inv_rms * w.unsqueeze::<3>()
    }

    fn assert_equal(ours: &[TensorData], burns: &[TensorData]) {
        for (ours, burns) in ours.iter().zip(burns) {
            ours.assert_approx_eq::<f32>(burns, Tolerance::absolute(1e-5));
        }
    }

    #[test]
    fn the_kernel_equals_burns_ops_in_value_and_gradients() {
        let drawn = inputs();
        let (x, upstream, weight) = drawn.clone();
        let primitives = [
            x.clone().into_primitive().tensor(),
            weight.clone().into_primitive().tensor(),
        ];
        assert!(cpu_kernel::run::<AD, _, 2>(RmsNormKernel { eps: EPS }, primitives).is_some());
        let burns = values_and_gradients(&drawn, &burns);
        assert_equal(
            &values_and_gradients(&drawn, &|x, w| RmsNorm::new(w, EPS).forward(x)),
            &burns,
        );
        // A frozen weight gets no gradient; the input still does.
        let frozen = RmsNorm::new(weight.clone(), EPS).no_grad();
        let x_tracked = x.clone().require_grad();
        let grads = (frozen.forward(x_tracked.clone()) * upstream.clone())
            .sum()
            .backward();
        x_tracked
            .grad(&grads)
            .unwrap()
            .into_data()
            .assert_approx_eq::<f32>(&burns[1], Tolerance::absolute(1e-5));
        assert!(frozen.weight.val().grad(&grads).is_none());
        // And without autodiff.
        let device = Default::default();
        let plain_x = Tensor::<Flex, 3>::from_data(x.to_data(), &device);
        let plain_w = Tensor::<Flex, 1>::from_data(weight.to_data(), &device);
        RmsNorm::new(plain_w, EPS)
            .forward(plain_x)
            .into_data()
            .assert_approx_eq::<f32>(&burns[0], Tolerance::absolute(1e-5));
    }

    /// The op GPUs train with, as one autodiff node (here of the CPU backend's autodiff, which
    /// takes it when its kernel declines), against burn's ops differentiated one by one.
    #[test]
    fn the_composed_op_equals_burns_ops_in_value_and_gradients() {
        let composed = |x: Tensor<AD, 3>, w: Tensor<AD, 1>| {
            let [batch, seq, hidden] = x.dims();
            let rows = [x.reshape([batch * seq, hidden]), w.unsqueeze::<2>()];
            composed_op::run(RmsNormOp { eps: EPS }, rows).reshape([batch, seq, hidden])
        };
        let drawn = inputs();
        let burns = values_and_gradients(&drawn, &burns);
        assert_equal(&values_and_gradients(&drawn, &composed), &burns);
        // A frozen weight: the input's gradient alone.
        let (x, upstream, weight) = drawn;
        let x = x.require_grad();
        let grads = (composed(x.clone(), weight.clone()) * upstream.clone())
            .sum()
            .backward();
        x.grad(&grads)
            .unwrap()
            .into_data()
            .assert_approx_eq::<f32>(&burns[1], Tolerance::absolute(1e-5));
        assert!(weight.grad(&grads).is_none());
        // bf16 activations: computed in f32, returned (and differentiated) in bf16.
        let x = x.cast(FloatDType::BF16).detach().require_grad();
        let out = composed(x.clone(), weight.clone());
        assert_eq!(out.dtype(), burn::tensor::DType::BF16);
        let grads = (out.clone().cast(FloatDType::F32) * upstream)
            .sum()
            .backward();
        let dx = x.grad(&grads).unwrap();
        assert_eq!(dx.dtype(), burn::tensor::DType::BF16);
        let near = Tolerance::absolute(5e-2).set_relative(2e-2);
        out.into_data()
            .convert::<f32>()
            .assert_approx_eq::<f32>(&burns[0], near);
        dx.into_data()
            .convert::<f32>()
            .assert_approx_eq::<f32>(&burns[1], near);
    }
}
