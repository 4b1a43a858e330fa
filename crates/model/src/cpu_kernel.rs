//! Running an op as a hand-written kernel on the CPU backend, with or without autodiff. Ops
//! composed of burn-flex's tensor ops run one single-threaded pass per op over the data (a
//! SiLU and its backward are five); a kernel does the same arithmetic in one parallel pass,
//! and under autodiff becomes one graph node with its own backward.
//!
//! Dispatch is by `TypeId` on the concrete backend types, so generic code keeps no extra
//! bound: [`run`] returns `None` on every other backend, whose callers use burn's ops.

use std::any::TypeId;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, TensorMetadata};
use burn_flex::FlexTensor;
use burnish_peft::cpu_tensors::contiguous;
pub(crate) use burnish_peft::cpu_tensors::{
    PARALLEL_CHUNK, from_values, tensor, values, values_of,
};
pub(crate) use burnish_peft::rebrand;

/// An op of `N` f32 tensors to one, forward and backward, on contiguous data.
pub(crate) trait Kernel<const N: usize>:
    Clone + Send + Sync + std::fmt::Debug + 'static
{
    /// What the forward pass hands to the backward pass besides the inputs.
    type Saved: Clone + Send + std::fmt::Debug + 'static;

    fn forward(&self, inputs: &[FlexTensor; N]) -> (FlexTensor, Self::Saved);

    /// The gradients of the inputs `wanted` marks (`None` for the others).
    fn backward(
        &self,
        inputs: &[FlexTensor; N],
        saved: Self::Saved,
        d_out: &FlexTensor,
        wanted: [bool; N],
    ) -> [Option<FlexTensor>; N];
}

/// `kernel` on `inputs` when `B` is the CPU backend (with or without autodiff) and every input
/// is f32; `None` otherwise.
pub(crate) fn run<B: Backend, K: Kernel<N>, const N: usize>(
    kernel: K,
    inputs: [FloatTensor<B>; N],
) -> Option<FloatTensor<B>> {
    if inputs
        .iter()
        .any(|t| t.dtype() != DType::F32 || t.shape().num_elements() == 0)
    {
        return None;
    }
    if TypeId::of::<B>() == TypeId::of::<Flex>() {
        let inputs = inputs.map(|t| contiguous(rebrand(t)));
        return Some(rebrand(kernel.forward(&inputs).0));
    }
    if TypeId::of::<B>() == TypeId::of::<Autodiff<Flex>>() {
        let inputs: [FloatTensor<Autodiff<Flex>>; N] = inputs.map(rebrand);
        return Some(rebrand(tracked(kernel, inputs)));
    }
    None
}

#[derive(Debug)]
struct KernelBackward<K>(K);

impl<K: Kernel<N>, const N: usize> Backward<Flex, N> for KernelBackward<K> {
    type State = ([FlexTensor; N], K::Saved);

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let d_out = contiguous(grads.consume::<Flex>(&ops.node));
        let wanted = ops.parents.each_ref().map(Option::is_some);
        let (inputs, saved) = ops.state;
        let input_grads = self.0.backward(&inputs, saved, &d_out, wanted);
        for (parent, grad) in ops.parents.into_iter().zip(input_grads) {
            if let (Some(parent), Some(grad)) = (parent, grad) {
                grads.register::<Flex>(parent.id, grad);
            }
        }
    }
}

fn tracked<K: Kernel<N>, const N: usize>(
    kernel: K,
    inputs: [FloatTensor<Autodiff<Flex>>; N],
) -> FloatTensor<Autodiff<Flex>> {
    let nodes = inputs.each_ref().map(|t| t.node.clone());
    let values = inputs.map(|t| contiguous(t.primitive));
    match KernelBackward(kernel.clone())
        .prepare::<NoCheckpointing>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let (out, saved) = kernel.forward(&values);
            prep.finish((values, saved), out)
        }
        OpsKind::UnTracked(prep) => prep.finish(kernel.forward(&values).0),
    }
}
