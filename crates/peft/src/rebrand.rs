//! Moving a value between two spellings of one type: generic code that has checked with
//! `TypeId` that its backend `B` is a concrete backend (to run a kernel of that backend's own)
//! hands its tensors over with [`rebrand`], which cannot fail after that check; and
//! [`cpu_values`], that check and hand-over for the CPU backend's values; [`on_cpu`], that
//! check alone.

use std::any::{Any, TypeId};

use burn::backend::{Autodiff, Flex};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn_flex::FlexTensor;

/// `value` as `To`, which must be `From` under another name.
///
/// # Panics
/// If `From` and `To` are different types: a caller that did not check `TypeId` first.
pub fn rebrand<From: 'static, To: 'static>(value: From) -> To {
    match (Box::new(value) as Box<dyn Any>).downcast::<To>() {
        Ok(value) => *value,
        Err(_) => unreachable!("rebrand is called only between one type's two spellings"),
    }
}

/// Whether `B` is the CPU backend, with or without autodiff: the backend whose ops run on the
/// host, where work is sized for caches and memory rather than for a GPU's kernel launches and
/// parallelism.
pub fn on_cpu<B: Backend>() -> bool {
    let backend = TypeId::of::<B>();
    backend == TypeId::of::<Flex>() || backend == TypeId::of::<Autodiff<Flex>>()
}

/// `t`'s values when `B` is the CPU backend, with or without autodiff (the graph is left out:
/// for values that need no gradient, or whose gradient a kernel's own backward computes);
/// `None` on any other backend.
pub fn cpu_values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Option<FlexTensor> {
    let primitive = t.into_primitive().tensor();
    if TypeId::of::<B>() == TypeId::of::<Flex>() {
        Some(rebrand(primitive))
    } else if TypeId::of::<B>() == TypeId::of::<Autodiff<Flex>>() {
        let tracked: FloatTensor<Autodiff<Flex>> = rebrand(primitive);
        Some(tracked.primitive)
    } else {
        None
    }
}
