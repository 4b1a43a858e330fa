//! The CPU backend's f32 tensors as plain values, for the hand-written CPU kernels of every
//! crate: reading a tensor's elements as one contiguous slice ([`values_of`], [`values`]),
//! making a tensor of a vector ([`tensor`], [`from_values`]), and the block size those kernels
//! split flat data into over the thread pool.

use std::any::TypeId;

use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Shape, Tensor, TensorData, TensorPrimitive};
use burn_flex::FlexTensor;

use crate::rebrand::{cpu_values, rebrand};

/// Elements per task when a kernel splits flat data over the thread pool.
pub const PARALLEL_CHUNK: usize = 1 << 14;

/// `t`'s values, contiguous, when `B` is the CPU backend (with or without autodiff: the graph is
/// left out, for values that need no gradient) and `t` is f32; `None` otherwise.
pub fn values_of<B: Backend, const D: usize>(t: &Tensor<B, D>) -> Option<FlexTensor> {
    if t.dtype() != DType::F32 {
        return None;
    }
    cpu_values(t.clone()).map(contiguous)
}

/// A tensor of `B` holding `values`, `B` being the CPU backend [`values_of`] accepted (under
/// autodiff the tensor is untracked).
pub fn from_values<B: Backend, const D: usize>(values: FlexTensor) -> Tensor<B, D> {
    let primitive: FloatTensor<B> = if TypeId::of::<B>() == TypeId::of::<Flex>() {
        rebrand(values)
    } else {
        rebrand(<Autodiff<Flex> as AutodiffBackend>::from_inner(values))
    };
    Tensor::from_primitive(TensorPrimitive::Float(primitive))
}

/// The f32 elements of a contiguous tensor (as [`contiguous`] makes them).
pub fn values(t: &FlexTensor) -> &[f32] {
    let (start, end) = t
        .layout()
        .contiguous_offsets()
        .expect("kernels read contiguous tensors");
    &t.storage::<f32>()[start..end]
}

/// A tensor of `shape` holding `data`.
pub fn tensor(data: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(data, shape))
}

/// `t` itself when its elements are contiguous, else a contiguous copy.
pub fn contiguous(t: FlexTensor) -> FlexTensor {
    if t.layout().contiguous_offsets().is_some() {
        t
    } else {
        t.to_contiguous()
    }
}
