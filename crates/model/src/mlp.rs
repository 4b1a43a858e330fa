//! The SwiGLU feed-forward block: `down(silu(gate(x)) · up(x))`.

use burn::module::Module;
use burn::tensor::Tensor;
use burn::tensor::activation::silu;
use burn::tensor::backend::Backend;
use burnish_peft::AdaptableLinear;

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
        let gate = silu(self.gate_proj.forward(x.clone()));
        self.down_proj.forward(gate * self.up_proj.forward(x))
    }
}
