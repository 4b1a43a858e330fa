//! The adaptable linear layer: a frozen-able base projection in Hugging Face layout
//! (`weight` is `[out, in]`, optional `bias` is `[out]`) that adapters attach to.

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, module::linear};

/// A linear projection `y = x·Wᵀ + b` whose weight is stored as `[out, in]`, exactly as the
/// checkpoint holds it, so loading and saving need no transposes.
#[derive(Module, Debug)]
pub struct AdaptableLinear<B: Backend> {
    /// `[out, in]`
    pub weight: Param<Tensor<B, 2>>,
    /// `[out]`
    pub bias: Option<Param<Tensor<B, 1>>>,
}

impl<B: Backend> AdaptableLinear<B> {
    /// Wraps a weight `[out, in]` and an optional bias `[out]`.
    pub fn new(weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Self {
        Self {
            weight: Param::from_tensor(weight),
            bias: bias.map(Param::from_tensor),
        }
    }

    /// Input features.
    pub fn d_in(&self) -> usize {
        self.weight.shape().dims::<2>()[1]
    }

    /// Output features.
    pub fn d_out(&self) -> usize {
        self.weight.shape().dims::<2>()[0]
    }

    /// # Shapes
    /// - input: `[..., in]`
    /// - output: `[..., out]`
    pub fn forward<const D: usize>(&self, input: Tensor<B, D>) -> Tensor<B, D> {
        linear(
            input,
            self.weight.val().transpose(),
            self.bias.as_ref().map(Param::val),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::{TensorData, Tolerance};

    #[test]
    fn forward_matches_hand_computed_affine_map() {
        let device = Default::default();
        // W = [[1, 2], [3, 4], [5, 6]] maps 2 -> 3 features.
        let weight = Tensor::<Flex, 2>::from_floats([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], &device);
        let bias = Tensor::<Flex, 1>::from_floats([0.5, -0.5, 1.0], &device);
        let layer = AdaptableLinear::new(weight, Some(bias));
        let x = Tensor::<Flex, 2>::from_floats([[1.0, -1.0]], &device);
        let y = layer.forward(x);
        y.into_data().assert_approx_eq::<f32>(
            &TensorData::from([[-0.5, -1.5, 0.0]]),
            Tolerance::absolute(1e-6),
        );
        assert_eq!((layer.d_in(), layer.d_out()), (2, 3));
    }
}
