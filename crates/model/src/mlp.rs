//! The SwiGLU feed-forward block: `down(silu(gate(x)) · up(x))`, with the gating as one
//! kernel on the CPU backend and one autodiff node elsewhere, whose passes are a kernel each on
//! the plain GPU backends (`gpu_kernels`) and burn's ops on the others.

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{FloatDType, Tensor, TensorPrimitive};
use burn_flex::FlexTensor;
use burnish_peft::AdaptableLinear;
use burnish_peft::composed_op::{self, ComposedOp};
use rayon::prelude::*;

use crate::cpu_kernel::{self, Kernel, PARALLEL_CHUNK, tensor, values};
#[cfg(any(feature = "cuda", feature = "wgpu"))]
use crate::gpu_kernels::{SwigluBackward, SwigluForward};
use crate::vector_exp::exp_in_place;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
use burnish_peft::gpu_kernel;

/// Gated feed-forward block of a Llama-style layer (`mlp.{gate,up,down}_proj`).
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub gate_proj: AdaptableLinear<B>,
    pub up_proj: AdaptableLinear<B>,
    pub down_proj: AdaptableLinear<B>,
}

impl<B: Backend> Mlp<B> {
    /// # Shapes
    /// - input, output: `[batch, seq, hidden]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [gate, up] = AdaptableLinear::forward_shared([&self.gate_proj, &self.up_proj], x);
        let gated = swiglu(gate, up);
        self.down_proj.forward(gated)
    }
}

/// `silu(gate) · up`.
pub(crate) fn swiglu<B: Backend, const D: usize>(
    gate: Tensor<B, D>,
    up: Tensor<B, D>,
) -> Tensor<B, D> {
    let inputs = [gate.clone(), up.clone()].map(|t| t.into_primitive().tensor());
    match cpu_kernel::run::<B, _, 2>(Swiglu, inputs) {
        Some(out) => Tensor::from_primitive(TensorPrimitive::Float(out)),
        None => {
            let dims = gate.dims();
            let width = dims[D - 1];
            let rows = dims.iter().product::<usize>() / width.max(1);
            let rows = [gate, up].map(|t| t.reshape([rows, width]));
            composed_op::run(SwigluOp, rows).reshape(dims)
        }
    }
}

/// The same in burn's ops, for the other backends, on `[rows, width]` matrices; keeps nothing
/// but the inputs (σ(gate) is recomputed in the backward pass). Computes in f32 both ways and
/// returns the output and gradients in the inputs' precision.
#[derive(Debug, Clone)]
struct SwigluOp;

impl ComposedOp<2> for SwigluOp {
    fn forward<I: Backend>(
        &self,
        [gate, up]: [Tensor<I, 2>; 2],
    ) -> (Tensor<I, 2>, Option<Tensor<I, 2>>) {
        #[cfg(any(feature = "cuda", feature = "wgpu"))]
        if let Some([out]) = gpu_kernel::launch(&SwigluForward, &[gate.clone(), up.clone()]) {
            return (out, None);
        }
        // g·σ(g)·u = g·u / (1 + e^-g): four passes, where burn's silu and product are eight
        // (its sigmoid goes through a log-sigmoid); in f32, rounded once to the inputs'
        // precision.
        let dtype = gate.dtype();
        let [gate, up] = [gate, up].map(|t| t.cast(FloatDType::F32));
        let denominator = gate.clone().neg().exp().add_scalar(1.0);
        ((gate * up / denominator).cast(dtype), None)
    }

    fn backward<I: Backend>(
        &self,
        [gate, up]: [Tensor<I, 2>; 2],
        _: Option<Tensor<I, 2>>,
        d_out: Tensor<I, 2>,
        [gate_wanted, up_wanted]: [bool; 2],
    ) -> [Option<Tensor<I, 2>>; 2] {
        #[cfg(any(feature = "cuda", feature = "wgpu"))]
        if let Some([dg, du]) =
            gpu_kernel::launch(&SwigluBackward, &[gate.clone(), up.clone(), d_out.clone()])
        {
            return [gate_wanted.then_some(dg), up_wanted.then_some(du)];
        }
        let (gate_dtype, up_dtype) = (gate.dtype(), up.dtype());
        let [gate, up, d_out] = [gate, up, d_out].map(|t| t.cast(FloatDType::F32));
        let sigma = gate.clone().neg().exp().add_scalar(1.0).recip();
        let du = up_wanted.then(|| (d_out.clone() * gate.clone() * sigma.clone()).cast(up_dtype));
        let dg = gate_wanted.then(|| {
            let slope = (gate * sigma.clone().neg().add_scalar(1.0)).add_scalar(1.0);
            (d_out * up * sigma * slope).cast(gate_dtype)
        });
        [dg, du]
    }
}

/// `silu(g) · u = g · σ(g) · u`; backward `du = dh · g · σ(g)`,
/// `dg = dh · u · σ(g) · (1 + g · (1 − σ(g)))`.
#[derive(Debug, Clone)]
struct Swiglu;

impl Kernel<2> for Swiglu {
    type Saved = ();

    fn forward(&self, [gate, up]: &[FlexTensor; 2]) -> (FlexTensor, ()) {
        let (g, u) = (values(gate), values(up));
        let mut out = vec![0.0f32; g.len()];
        out.par_chunks_mut(PARALLEL_CHUNK)
            .zip(
                g.par_chunks(PARALLEL_CHUNK)
                    .zip(u.par_chunks(PARALLEL_CHUNK)),
            )
            .for_each(|(out, (g, u))| {
                sigmoid_into(g, out);
                for ((o, g), u) in out.iter_mut().zip(g).zip(u) {
                    *o *= g * u;
                }
            });
        (tensor(out, gate.layout().shape().clone()), ())
    }

    fn backward(
        &self,
        [gate, up]: &[FlexTensor; 2],
        (): (),
        d_out: &FlexTensor,
        _: [bool; 2],
    ) -> [Option<FlexTensor>; 2] {
        let (g, u, dh) = (values(gate), values(up), values(d_out));
        let mut dg = vec![0.0f32; g.len()];
        let mut du = vec![0.0f32; g.len()];
        dg.par_chunks_mut(PARALLEL_CHUNK)
            .zip(du.par_chunks_mut(PARALLEL_CHUNK))
            .zip(g.par_chunks(PARALLEL_CHUNK))
            .zip(
                u.par_chunks(PARALLEL_CHUNK)
                    .zip(dh.par_chunks(PARALLEL_CHUNK)),
            )
            .for_each(|(((dg, du), g), (u, dh))| {
                // σ(g) in `dg` first.
                sigmoid_into(g, dg);
                for ((((dg, du), g), u), dh) in dg.iter_mut().zip(du).zip(g).zip(u).zip(dh) {
                    let sigma = *dg;
                    *du = dh * g * sigma;
                    *dg = dh * u * sigma * (1.0 + g * (1.0 - sigma));
                }
            });
        let shape = gate.layout().shape().clone();
        [Some(tensor(dg, shape.clone())), Some(tensor(du, shape))]
    }
}

/// `out = σ(x) = 1 / (1 + e^-x)`.
fn sigmoid_into(x: &[f32], out: &mut [f32]) {
    for (o, x) in out.iter_mut().zip(x) {
        *o = -x;
    }
    exp_in_place(out);
    for o in out.iter_mut() {
        *o = 1.0 / (1.0 + *o);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::{Distribution, TensorData, Tolerance};

    type AD = Autodiff<Flex>;

    /// Each element within `1e-6` of the exact value, relative to the size of the terms it is
    /// computed from (`dg` subtracts nearly equal terms where `g·(1 − σ(g))` is near -1, as
    /// torch's formula does).
    fn assert_close(ours: Vec<f32>, exact: &[(f64, f64)], what: &str) {
        for (i, (ours, (exact, size))) in ours.iter().zip(exact).enumerate() {
            let err = (f64::from(*ours) - exact).abs();
            assert!(err <= 1e-6 * size, "{what}[{i}]: {ours} against {exact}");
        }
    }

    type Swiglu2 = dyn Fn(Tensor<AD, 3>, Tensor<AD, 3>) -> Tensor<AD, 3>;

    /// `swiglu`'s output and both gradients against the exact ones (in f64), on inputs wide enough
    /// to split into several of the kernel's tasks, with values where σ saturates; the inputs
    /// back, and the exact output.
    fn check_against_exact(swiglu: &Swiglu2) -> ([Tensor<AD, 3>; 2], Vec<(f64, f64)>) {
        let device = Default::default();
        Flex::seed(&device, 11);
        let random =
            || Tensor::<AD, 3>::random([2, 3, 20_000], Distribution::Normal(0.0, 8.0), &device);
        let (gate, up, upstream) = (random(), random(), random());
        let (g, u) = (gate.clone().require_grad(), up.clone().require_grad());
        let out = swiglu(g.clone(), u.clone());
        let grads = (out.clone() * upstream.clone()).sum().backward();

        // The same in f64, each with the size of the terms it sums.
        let f64s = |t: &Tensor<AD, 3>| -> Vec<f64> {
            let v = t.to_data().to_vec::<f32>().unwrap();
            v.into_iter().map(f64::from).collect()
        };
        let (gv, uv, dh) = (f64s(&gate), f64s(&up), f64s(&upstream));
        let exact = |f: &dyn Fn(f64, f64, f64, f64) -> (f64, f64)| -> Vec<(f64, f64)> {
            (0..gv.len())
                .map(|i| {
                    let sigma = 1.0 / (1.0 + (-gv[i]).exp());
                    f(gv[i], uv[i], dh[i], sigma)
                })
                .collect()
        };
        let out_exact = exact(&|g, u, _, s| (g * s * u, (g * s * u).abs()));
        assert_close(vec(out.into_data()), &out_exact, "out");
        let dg_exact = exact(&|g, u, dh, s| {
            let outer = dh * u * s;
            // `1 − σ` in f32 is off by up to an ulp of 1, which `g` multiplies.
            (
                outer * (1.0 + g * (1.0 - s)),
                outer.abs() * (1.0 + 2.0 * g.abs()),
            )
        });
        assert_close(vec(g.grad(&grads).unwrap().into_data()), &dg_exact, "dg");
        let du_exact = exact(&|g, _, dh, s| (dh * g * s, (dh * g * s).abs()));
        assert_close(vec(u.grad(&grads).unwrap().into_data()), &du_exact, "du");
        ([gate, up], out_exact)
    }

    fn vec(t: TensorData) -> Vec<f32> {
        t.to_vec::<f32>().unwrap()
    }

    #[test]
    fn the_kernel_equals_exact_values_and_gradients() {
        let ([gate, up], out_exact) = check_against_exact(&swiglu);
        let primitives = [gate.clone(), up.clone()].map(|t| t.into_primitive().tensor());
        assert!(cpu_kernel::run::<AD, _, 2>(Swiglu, primitives).is_some());
        // And without autodiff.
        let device = Default::default();
        let plain = |t: &Tensor<AD, 3>| Tensor::<Flex, 3>::from_data(t.to_data(), &device);
        let out = swiglu(plain(&gate), plain(&up)).into_data();
        assert_close(vec(out), &out_exact, "plain out");
    }

    /// The op GPUs train with, as one autodiff node (here of the CPU backend's autodiff, which
    /// takes it when its kernel declines).
    #[test]
    fn the_composed_op_equals_exact_values_and_gradients() {
        let composed = |gate: Tensor<AD, 3>, up: Tensor<AD, 3>| {
            let [batch, seq, width] = gate.dims();
            let rows = [gate, up].map(|t| t.reshape([batch * seq, width]));
            composed_op::run(SwigluOp, rows).reshape([batch, seq, width])
        };
        let ([gate, up], _) = check_against_exact(&composed);
        // bf16 activations: bf16 out, bf16 gradients, near the f32 op's.
        let [g, u] = [gate, up].map(|t| t.cast(FloatDType::BF16).detach().require_grad());
        let out = composed(g.clone(), u.clone());
        assert_eq!(out.dtype(), burn::tensor::DType::BF16);
        let grads = out.clone().cast(FloatDType::F32).sum().backward();
        let full = composed(
            g.clone().cast(FloatDType::F32).detach().require_grad(),
            u.clone().detach().cast(FloatDType::F32),
        );
        // One rounding to bf16 (8 significant bits) of the f32 result.
        let near = Tolerance::relative(5e-3).set_absolute(1e-2);
        out.into_data()
            .convert::<f32>()
            .assert_approx_eq::<f32>(&full.into_data(), near);
        for input in [g, u] {
            assert_eq!(
                input.grad(&grads).unwrap().dtype(),
                burn::tensor::DType::BF16
            );
        }
    }
}
