//! AdamW as PyTorch defines it (decoupled weight decay, bias-corrected moments, `eps` added to
//! the root of the corrected second moment), with gradient clipping by the global norm over all
//! trainable tensors (`torch.nn.utils.clip_grad_norm_`). Weight decay applies to matrices only,
//! never to biases or norm scales. Only parameters that received a gradient are touched, so a
//! frozen base gets neither updates nor optimizer state.

use std::collections::HashMap;

use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor, TensorData};
use burnish_peft::f32_values;

/// AdamW's settings (PyTorch's defaults except the weight decay, which recipes set).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Clip the global gradient norm to this value; `None` disables clipping.
    pub max_grad_norm: Option<f64>,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: Some(1.0),
        }
    }
}

/// First and second moments of one parameter, flattened.
#[derive(Debug, Clone)]
struct Moments<B: Backend> {
    m: Tensor<B, 1>,
    v: Tensor<B, 1>,
}

/// The optimizer and its state.
#[derive(Debug, Clone)]
pub struct AdamW<B: AutodiffBackend> {
    pub config: AdamWConfig,
    /// Optimizer steps taken so far.
    pub steps: usize,
    state: HashMap<ParamId, Moments<B::InnerBackend>>,
}

/// What one optimizer step reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
}

/// Sums the squared gradient of every parameter that has one.
struct SquaredNorm<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    total: f64,
    _backend: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for SquaredNorm<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
            let sq: f64 = g.square().sum().into_scalar().elem();
            self.total += sq;
        }
    }
}

/// Applies one AdamW update to every parameter with a gradient.
struct Update<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    state: &'a mut HashMap<ParamId, Moments<B::InnerBackend>>,
    config: AdamWConfig,
    lr: f64,
    grad_scale: f64,
    step: i32,
}

impl<B: AutodiffBackend> ModuleMapper<B> for Update<'_, B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(grad) = self.grads.get::<B::InnerBackend, D>(id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let c = self.config;
        let shape = tensor.shape();
        let value = tensor.inner().flatten::<1>(0, D - 1);
        let grad = grad.flatten::<1>(0, D - 1).mul_scalar(self.grad_scale);
        let moments = self.state.remove(&id).unwrap_or_else(|| Moments {
            m: grad.zeros_like(),
            v: grad.zeros_like(),
        });
        let m = moments.m.mul_scalar(c.beta1) + grad.clone().mul_scalar(1.0 - c.beta1);
        let v = moments.v.mul_scalar(c.beta2) + grad.square().mul_scalar(1.0 - c.beta2);
        let m_hat = m.clone().div_scalar(1.0 - c.beta1.powi(self.step));
        let v_hat = v.clone().div_scalar(1.0 - c.beta2.powi(self.step));
        // Decoupled decay, matrices only: biases and norm scales are one-dimensional.
        let decayed = if D >= 2 && c.weight_decay > 0.0 {
            value.mul_scalar(1.0 - self.lr * c.weight_decay)
        } else {
            value
        };
        let updated = decayed
            - m_hat
                .div(v_hat.sqrt().add_scalar(c.eps))
                .mul_scalar(self.lr);
        self.state.insert(id, Moments { m, v });
        let updated = Tensor::<B, D>::from_inner(updated.reshape(shape)).require_grad();
        Param::from_mapped_value(id, updated, mapper)
    }
}

/// The L2 norm of all gradients of `module` taken together.
pub fn global_grad_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &GradientsParams,
) -> f64 {
    let mut norm = SquaredNorm::<B> {
        grads,
        total: 0.0,
        _backend: std::marker::PhantomData,
    };
    module.visit(&mut norm);
    norm.total.sqrt()
}

impl<B: AutodiffBackend> AdamW<B> {
    pub fn new(config: AdamWConfig) -> Self {
        Self {
            config,
            steps: 0,
            state: HashMap::new(),
        }
    }

    /// Number of parameters holding optimizer state.
    pub fn tracked_parameters(&self) -> usize {
        self.state.len()
    }

    /// Clips the gradients by their global norm and applies one AdamW step at learning rate `lr`.
    pub fn step<M: AutodiffModule<B>>(
        &mut self,
        lr: f64,
        module: M,
        grads: &GradientsParams,
    ) -> (M, StepReport) {
        let grad_norm = global_grad_norm(&module, grads);
        let grad_scale = match self.config.max_grad_norm {
            Some(max) => (max / (grad_norm + 1e-6)).min(1.0),
            None => 1.0,
        };
        self.steps += 1;
        let mut update = Update::<B> {
            grads,
            state: &mut self.state,
            config: self.config,
            lr,
            grad_scale,
            step: self.steps as i32,
        };
        (module.map(&mut update), StepReport { grad_norm })
    }
}

/// Records the dotted field path of every float parameter (`layers.0.self_attn.q_proj.lora.lora_a`):
/// stable across runs, unlike parameter ids, so optimizer state can be saved and restored.
struct ParamPaths {
    stack: Vec<String>,
    paths: HashMap<ParamId, String>,
}

impl<B: Backend> ModuleVisitor<B> for ParamPaths {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.stack.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.stack.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.paths.insert(param.id, self.stack.join("."));
    }
}

/// The field path of every float parameter of `module`, by parameter id.
pub fn parameter_paths<B: Backend, M: Module<B>>(module: &M) -> HashMap<ParamId, String> {
    let mut visitor = ParamPaths {
        stack: Vec::new(),
        paths: HashMap::new(),
    };
    module.visit(&mut visitor);
    visitor.paths
}

/// One parameter's moments, flattened, by field path.
#[derive(Debug, Clone, PartialEq)]
pub struct SavedMoments {
    pub path: String,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

impl<B: AutodiffBackend> AdamW<B> {
    /// The optimizer's moments under the field paths of `module`'s parameters, sorted by path.
    pub fn export_state<M: AutodiffModule<B>>(&self, module: &M) -> Vec<SavedMoments> {
        let paths = parameter_paths::<B, M>(module);
        let mut out: Vec<SavedMoments> = self
            .state
            .iter()
            .filter_map(|(id, moments)| {
                paths.get(id).map(|path| SavedMoments {
                    path: path.clone(),
                    m: f32_values(moments.m.clone()),
                    v: f32_values(moments.v.clone()),
                })
            })
            .collect();
        out.sort_by(|a, b| a.path.cmp(&b.path));
        out
    }

    /// Restores moments saved by [`AdamW::export_state`] onto `module`'s parameters, and the
    /// step count. Every saved path must exist in `module`.
    pub fn import_state<M: AutodiffModule<B>>(
        &mut self,
        module: &M,
        steps: usize,
        saved: Vec<SavedMoments>,
        device: &burn::tensor::Device<B::InnerBackend>,
    ) -> Result<(), String> {
        let by_path: HashMap<String, ParamId> = parameter_paths::<B, M>(module)
            .into_iter()
            .map(|(id, path)| (path, id))
            .collect();
        self.state.clear();
        for s in saved {
            let id = by_path.get(&s.path).ok_or_else(|| {
                format!(
                    "optimizer state for `{}`, which the model does not have",
                    s.path
                )
            })?;
            let tensor = |v: Vec<f32>| {
                let n = v.len();
                Tensor::<B::InnerBackend, 1>::from_data(TensorData::new(v, [n]), device)
            };
            self.state.insert(
                *id,
                Moments {
                    m: tensor(s.m),
                    v: tensor(s.v),
                },
            );
        }
        self.steps = steps;
        Ok(())
    }
}
