//! Ops written with burn's tensor ops that train as one autodiff node with a backward pass of
//! their own: the node keeps its inputs and what its forward pass hands over (a row statistic),
//! where burn's autodiff would keep the intermediates of every op the forward pass is made of.
//! A SwiGLU of burn's ops keeps σ(gate) and silu(gate) besides its inputs until the backward
//! pass (two more tensors of the MLP's width per layer: 3 GB at 8 × 1024 tokens of
//! SmolLM2-135M in f32). An RMSNorm keeps the same tensors either way (its weight frozen), but
//! its composed backward pass makes fewer passes over them than burn's op-by-op one.
//!
//! This is how RMSNorm and SwiGLU train on GPUs (the CPU backend has kernels of its own for
//! them, f32 only, and takes those first), and how an adapter's first factor multiplies
//! activations held in another precision than its own. Dispatch is by `TypeId` on the autodiff
//! backends burnish builds (the CPU's, and CUDA and wgpu where enabled); without autodiff the
//! forward pass runs as it is written.

use std::any::TypeId;
use std::fmt::Debug;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};

use crate::rebrand::rebrand;

/// An op of `N` matrices to one, forward and backward, in burn's tensor ops on any backend.
pub trait ComposedOp<const N: usize>: Clone + Send + Sync + Debug + 'static {
    /// The output, and what the backward pass needs besides the inputs.
    fn forward<I: Backend>(
        &self,
        inputs: [Tensor<I, 2>; N],
    ) -> (Tensor<I, 2>, Option<Tensor<I, 2>>);

    /// The gradients of the inputs `wanted` marks (`None` for the others), each of its input's
    /// shape.
    fn backward<I: Backend>(
        &self,
        inputs: [Tensor<I, 2>; N],
        saved: Option<Tensor<I, 2>>,
        d_out: Tensor<I, 2>,
        wanted: [bool; N],
    ) -> [Option<Tensor<I, 2>>; N];
}

/// `op` on `inputs`: one autodiff node with `op`'s backward when `B` is one of burnish's
/// backends under autodiff (the CPU backend's when its kernel declined the inputs), `op`'s
/// forward pass in burn's ops otherwise.
pub fn run<B: Backend, K: ComposedOp<N>, const N: usize>(
    op: K,
    inputs: [Tensor<B, 2>; N],
) -> Tensor<B, 2> {
    #[cfg(feature = "cuda")]
    let inputs = match tracked_on::<B, burn::backend::Cuda, K, N>(&op, inputs) {
        Ok(out) => return out,
        Err(inputs) => inputs,
    };
    #[cfg(feature = "wgpu")]
    let inputs = match tracked_on::<B, burn::backend::Wgpu, K, N>(&op, inputs) {
        Ok(out) => return out,
        Err(inputs) => inputs,
    };
    match tracked_on::<B, Flex, K, N>(&op, inputs) {
        Ok(out) => out,
        Err(inputs) => op.forward(inputs).0,
    }
}

/// `op` as one node of `Autodiff<I>` when `B` is that backend; the inputs back otherwise.
fn tracked_on<B: Backend, I: Backend, K: ComposedOp<N>, const N: usize>(
    op: &K,
    inputs: [Tensor<B, 2>; N],
) -> Result<Tensor<B, 2>, [Tensor<B, 2>; N]> {
    if TypeId::of::<B>() != TypeId::of::<Autodiff<I>>() {
        return Err(inputs);
    }
    let inputs: [FloatTensor<Autodiff<I>>; N] =
        inputs.map(|t| rebrand(t.into_primitive().tensor()));
    let nodes = inputs.each_ref().map(|t| t.node.clone());
    let values =
        inputs.map(|t| Tensor::<I, 2>::from_primitive(TensorPrimitive::Float(t.primitive)));
    let out = match ComposedBackward(op.clone())
        .prepare::<NoCheckpointing>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let (out, saved) = op.forward(values.clone());
            prep.finish((values, saved), out.into_primitive().tensor())
        }
        OpsKind::UnTracked(prep) => prep.finish(op.forward(values).0.into_primitive().tensor()),
    };
    Ok(Tensor::from_primitive(TensorPrimitive::Float(rebrand(out))))
}

#[derive(Debug)]
struct ComposedBackward<K>(K);

impl<I: Backend, K: ComposedOp<N>, const N: usize> Backward<I, N> for ComposedBackward<K> {
    type State = ([Tensor<I, 2>; N], Option<Tensor<I, 2>>);

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let d_out =
            Tensor::<I, 2>::from_primitive(TensorPrimitive::Float(grads.consume::<I>(&ops.node)));
        let wanted = ops.parents.each_ref().map(Option::is_some);
        let (inputs, saved) = ops.state;
        let input_grads = self.0.backward(inputs, saved, d_out, wanted);
        for (parent, grad) in ops.parents.into_iter().zip(input_grads) {
            if let (Some(parent), Some(grad)) = (parent, grad) {
                grads.register::<I>(parent.id, grad.into_primitive().tensor());
            }
        }
    }
}
