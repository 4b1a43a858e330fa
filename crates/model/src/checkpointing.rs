//! Activation (gradient) checkpointing per decoder layer, as `gradient_checkpointing=True` does
//! in transformers: the training forward pass keeps each layer's input and nothing inside the
//! layers, and the backward pass recomputes one layer at a time from its input. Between the
//! passes a model then holds one `[batch, seq, hidden]` tensor per layer instead of every
//! layer's activations (its projections, attention, gating); the price is a second forward
//! pass of the layers.
//!
//! burn's autodiff cannot run a backward pass inside another one's step (the graph is locked
//! while a backward pass runs), so the recomputation is not an op of the graph. The backward
//! pass runs here, segment by segment: the graph from the last layer's output to the loss
//! first, then each layer's, recomputed from its saved input, with the gradient that reached
//! its output, then the embedding's; the parameters' gradients of all segments are summed.

use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor};

use crate::decoder::{Decoder, DropoutSeeds, trains};
use crate::documents::Documents;
use crate::rope::Rotations;

/// What checkpointed forward passes keep for their backward pass.
#[derive(Debug)]
pub struct ActivationCheckpoints<B: AutodiffBackend> {
    passes: Vec<CheckpointedPass<B>>,
}

/// One forward pass over a batch.
#[derive(Debug)]
struct CheckpointedPass<B: AutodiffBackend> {
    /// The embeddings of the batch, tracked when the embedding is trained.
    embedded: Tensor<B, 3>,
    /// Each layer's input, out of any graph: `inputs[0]` is `embedded`'s value.
    inputs: Vec<Tensor<B, 3>>,
    /// The last layer's output, the leaf the rest of the forward pass started from.
    output: Tensor<B, 3>,
    rotations: Rotations<B>,
    documents: Option<Documents<B>>,
    /// Where each layer's dropout draws restarted.
    dropout: DropoutSeeds<B>,
}

impl<B: AutodiffBackend> Default for ActivationCheckpoints<B> {
    fn default() -> Self {
        Self { passes: Vec::new() }
    }
}

impl<B: AutodiffBackend> Decoder<B> {
    /// The final hidden states of `ids` as [`hidden_states`](Self::hidden_states) (or, with
    /// `packing` = per-token positions and document ids,
    /// [`hidden_states_packed`](Self::hidden_states_packed)) computes them, for a loss whose
    /// gradients come from [`ActivationCheckpoints::backward`]: only each layer's input is kept
    /// in `checkpoints`.
    ///
    /// # Shapes
    /// - ids: `[batch, seq]`
    /// - output: `[batch, seq, hidden]`
    pub fn hidden_states_checkpointed(
        &self,
        ids: Tensor<B, 2, Int>,
        packing: Option<(&[usize], &[u32])>,
        checkpoints: &mut ActivationCheckpoints<B>,
    ) -> Tensor<B, 3> {
        let (rotations, documents) = self.context(&ids, packing);
        let embedded = self.embed(ids);
        let seeds = self.dropout_seeds(&embedded.device());
        let mut inputs = Vec::with_capacity(self.layers.len());
        let mut x = embedded.clone().detach();
        for (i, layer) in self.layers.iter().enumerate() {
            inputs.push(x.clone());
            // Parameters out of the graph too: nothing here is recorded for a backward pass,
            // yet dropout applies as in training.
            let untracked = layer.clone().no_grad();
            seeds.reseed(i);
            x = untracked.forward(x, &rotations, documents.as_ref(), None);
        }
        seeds.reseed(self.layers.len());
        let output = x.require_grad();
        checkpoints.passes.push(CheckpointedPass {
            embedded,
            inputs,
            output: output.clone(),
            rotations,
            documents,
            dropout: seeds,
        });
        self.norm.forward(output)
    }
}

impl<B: AutodiffBackend> ActivationCheckpoints<B> {
    /// The gradients of `loss` for every parameter of `model`, which computed it from the
    /// hidden states of the checkpointed passes (and from any other tracked tensor): what
    /// `GradientsParams::from_grads(loss.backward(), model)` gives without checkpointing.
    pub fn backward(self, model: &Decoder<B>, loss: Tensor<B, 1>) -> GradientsParams {
        let mut head = loss.backward();
        let reached: Vec<_> = self
            .passes
            .iter()
            .map(|pass| pass.output.grad_remove(&mut head))
            .collect();
        let mut collected = GradientsAccumulator::<Decoder<B>>::new();
        collected.accumulate(model, GradientsParams::from_grads(head, model));
        for (pass, gradient) in self.passes.into_iter().zip(reached) {
            if let Some(gradient) = gradient {
                pass.backward(model, Tensor::from_inner(gradient), &mut collected);
            }
        }
        collected.grads()
    }
}

impl<B: AutodiffBackend> CheckpointedPass<B> {
    /// Passes `gradient` (of the last layer's output) down through every layer and the
    /// embedding, adding their parameters' gradients to `collected`.
    fn backward(
        self,
        model: &Decoder<B>,
        mut gradient: Tensor<B, 3>,
        collected: &mut GradientsAccumulator<Decoder<B>>,
    ) {
        // Below the lowest layer that trains, no gradient is needed unless the embedding trains.
        let embedding_trains = model.embed_tokens.val().is_require_grad();
        let lowest = if embedding_trains {
            0
        } else {
            let first = model.layers.iter().position(trains);
            first.unwrap_or(model.layers.len())
        };
        let layers = model
            .layers
            .iter()
            .zip(self.inputs)
            .enumerate()
            .skip(lowest);
        for (i, (layer, input)) in layers.rev() {
            self.dropout.reseed(i);
            let input = input.require_grad();
            let output = layer.forward(
                input.clone(),
                &self.rotations,
                self.documents.as_ref(),
                None,
            );
            // ∂(Σ output ⊙ g)/∂output = g: the backward pass of the layer seeded with g.
            let mut grads = (output * gradient).sum().backward();
            gradient = match input.grad_remove(&mut grads) {
                Some(below) => Tensor::from_inner(below),
                None => input.zeros_like(),
            };
            collected.accumulate(model, GradientsParams::from_grads(grads, layer));
        }
        self.dropout.reseed(model.layers.len());
        if embedding_trains {
            let grads = (self.embedded * gradient).sum().backward();
            collected.accumulate(
                model,
                GradientsParams::from_grads(grads, &model.embed_tokens),
            );
        }
    }
}
