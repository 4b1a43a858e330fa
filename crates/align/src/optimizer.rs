//! AdamW as PyTorch defines it (decoupled weight decay, bias-corrected moments, `eps` added to
//! the root of the corrected second moment), with gradient clipping by the global norm over all
//! trainable tensors (`torch.nn.utils.clip_grad_norm_`). Parameters are grouped as the trainers
//! group them: weight decay applies to matrices and DoRA's magnitudes, never to biases or norm
//! scales (transformers' `Trainer`); under LoRA+ the B factors and DoRA's magnitudes take a
//! larger learning rate (PEFT's `create_loraplus_optimizer`). Only parameters that received a
//! gradient are touched, so a frozen base gets neither updates nor optimizer state.

use std::collections::{HashMap, HashSet};

use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor, TensorData};
use burnish_peft::f32_values;

use crate::cpu_adamw;

/// AdamW's settings (PyTorch's defaults except the weight decay, which recipes set).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Clip the global gradient norm to this value; `None` disables clipping.
    pub max_grad_norm: Option<f64>,
    /// LoRA+: the B factors and DoRA's magnitudes learn at this many times the learning rate.
    pub loraplus_lr_ratio: Option<f64>,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: Some(1.0),
            loraplus_lr_ratio: None,
        }
    }
}

/// Where one parameter's values sit in its group's flat vectors.
#[derive(Debug, Clone, PartialEq)]
struct Slot {
    id: ParamId,
    offset: usize,
    len: usize,
}

/// Which update a parameter takes, told by its field name and rank: transformers' `Trainer`
/// decays every parameter but biases and norm scales, so matrices and DoRA's magnitudes; PEFT's
/// LoRA+ gives the B factors and every one-dimensional trainable (the magnitudes) its larger
/// learning rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Treatment {
    decayed: bool,
    /// Learns at `loraplus_lr_ratio` times the learning rate under LoRA+.
    b_side: bool,
}

impl Treatment {
    /// Every treatment, at its index.
    const ALL: [Self; 4] = [
        Self::new(false, false),
        Self::new(true, false),
        Self::new(false, true),
        Self::new(true, true),
    ];

    const fn new(decayed: bool, b_side: bool) -> Self {
        Self { decayed, b_side }
    }

    /// The treatment of a parameter called `name` (its field) of `rank` dimensions.
    fn of(name: &str, rank: usize) -> Self {
        let magnitude = name == "magnitude";
        Self::new(rank >= 2 || magnitude, magnitude || name == "lora_b")
    }

    fn index(self) -> usize {
        usize::from(self.decayed) | (usize::from(self.b_side) << 1)
    }
}

/// The moments of the parameters updated together, each flattened and laid end to end in
/// `slots` order: an update is then a dozen element-wise ops over all of them at once, not a
/// dozen per parameter (on a GPU each op is a kernel launch, and a LoRA over seven projections
/// of 30 layers has 420 parameters).
#[derive(Debug, Clone)]
struct Group<B: Backend> {
    treatment: Treatment,
    slots: Vec<Slot>,
    m: Tensor<B, 1>,
    v: Tensor<B, 1>,
}

impl<B: Backend> Group<B> {
    /// The moments of `slot`'s parameter, if this group holds them.
    fn moments_of(&self, slot: &Slot) -> Option<(Tensor<B, 1>, Tensor<B, 1>)> {
        let held = self
            .slots
            .iter()
            .find(|s| s.id == slot.id && s.len == slot.len)?;
        Some((
            self.m.clone().narrow(0, held.offset, held.len),
            self.v.clone().narrow(0, held.offset, held.len),
        ))
    }
}

/// One AdamW step's element-wise update of a group: its scalars, all as `f64`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Update {
    pub lr: f64,
    /// The clipping factor the gradients are multiplied by (1 without clipping).
    pub grad_scale: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// The bias corrections `1 − β₁ᵗ` and `1 − β₂ᵗ`.
    pub bias1: f64,
    pub bias2: f64,
    /// The decoupled weight decay's factor `1 − lr·λ`, for a decayed group.
    pub decay: Option<f64>,
}

impl Update {
    /// `(value, m, v)` after the update, as burn's element-wise ops on any backend.
    pub(crate) fn apply<B: Backend>(
        &self,
        value: Tensor<B, 1>,
        grad: Tensor<B, 1>,
        m: Tensor<B, 1>,
        v: Tensor<B, 1>,
    ) -> (Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>) {
        let grad = grad.mul_scalar(self.grad_scale);
        let m = m.mul_scalar(self.beta1) + grad.clone().mul_scalar(1.0 - self.beta1);
        let v = v.mul_scalar(self.beta2) + grad.square().mul_scalar(1.0 - self.beta2);
        let m_hat = m.clone().div_scalar(self.bias1);
        let v_hat = v.clone().div_scalar(self.bias2);
        let value = match self.decay {
            Some(decay) => value.mul_scalar(decay),
            None => value,
        };
        let step = m_hat
            .div(v_hat.sqrt().add_scalar(self.eps))
            .mul_scalar(self.lr);
        (value - step, m, v)
    }
}

/// The optimizer and its state.
#[derive(Debug, Clone)]
pub struct AdamW<B: AutodiffBackend> {
    pub config: AdamWConfig,
    /// Optimizer steps taken so far.
    pub steps: usize,
    groups: Vec<Group<B::InnerBackend>>,
}

/// What one optimizer step reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
}

/// The gradients of one step, flattened per group of [`AdamW`]'s state (see [`Group`]).
#[derive(Debug, Clone)]
pub struct FlatGradients<B: Backend> {
    groups: Vec<FlatGroup<B>>,
}

/// One group's gradients, laid end to end in `slots` order.
#[derive(Debug, Clone)]
struct FlatGroup<B: Backend> {
    treatment: Treatment,
    slots: Vec<Slot>,
    grad: Tensor<B, 1>,
}

/// One group's gradients as the module is visited: slots and the flattened pieces.
struct Pieces<B: Backend> {
    slots: Vec<Slot>,
    grads: Vec<Tensor<B, 1>>,
}

impl<B: Backend> Default for Pieces<B> {
    fn default() -> Self {
        Self {
            slots: Vec::new(),
            grads: Vec::new(),
        }
    }
}

impl<B: Backend> FlatGradients<B> {
    /// The L2 norm of all the gradients taken together, read back once.
    pub fn norm(&self) -> f64 {
        let squares = self
            .groups
            .iter()
            .map(|group| group.grad.clone().square().sum())
            .reduce(|a, b| a + b);
        squares.map_or(0.0, |total| {
            let total: f64 = total.into_scalar().elem();
            total.sqrt()
        })
    }
}

/// Collects every parameter's gradient (in the module's order), flattened, per group.
struct GradientsByGroup<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    /// The field names down to the one visited.
    names: Vec<String>,
    /// Per treatment, at its index.
    groups: [Pieces<B::InnerBackend>; 4],
}

impl<B: AutodiffBackend> ModuleVisitor<B> for GradientsByGroup<'_, B> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.names.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.names.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(grad) = self.grads.get::<B::InnerBackend, D>(param.id) {
            let name = self.names.last().map_or("", String::as_str);
            let pieces = &mut self.groups[Treatment::of(name, D).index()];
            let offset = pieces.slots.last().map_or(0, |s| s.offset + s.len);
            let len = grad.shape().num_elements();
            pieces.slots.push(Slot {
                id: param.id,
                offset,
                len,
            });
            pieces.grads.push(grad.flatten::<1>(0, D - 1));
        }
    }
}

/// The gradients of `module`'s parameters in `grads`, flattened per group.
pub fn flat_gradients<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &GradientsParams,
) -> FlatGradients<B::InnerBackend> {
    let mut visitor = GradientsByGroup::<B> {
        grads,
        names: Vec::new(),
        groups: Default::default(),
    };
    module.visit(&mut visitor);
    let groups = visitor
        .groups
        .into_iter()
        .zip(Treatment::ALL)
        .filter(|(pieces, _)| !pieces.slots.is_empty())
        .map(|(pieces, treatment)| FlatGroup {
            treatment,
            slots: pieces.slots,
            grad: Tensor::cat(pieces.grads, 0),
        })
        .collect();
    FlatGradients { groups }
}

/// Collects the values of the parameters with a slot, flattened, per group in slot order.
struct Values<B: AutodiffBackend> {
    /// Each wanted parameter's group and slot index.
    wanted: HashMap<ParamId, (usize, usize)>,
    found: Vec<Vec<Option<Tensor<B::InnerBackend, 1>>>>,
}

impl<B: AutodiffBackend> Values<B> {
    /// The values of the parameters in `groups`' slots, gathered in one visit of `module`.
    fn of<M: AutodiffModule<B>>(module: &M, groups: &[FlatGroup<B::InnerBackend>]) -> Self {
        let wanted = groups
            .iter()
            .enumerate()
            .flat_map(|(g, group)| {
                let slots = group.slots.iter().enumerate();
                slots.map(move |(i, slot)| (slot.id, (g, i)))
            })
            .collect();
        let found = groups.iter().map(|g| vec![None; g.slots.len()]).collect();
        let mut values = Self { wanted, found };
        module.visit(&mut values);
        values
    }
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Values<B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(&(group, index)) = self.wanted.get(&param.id) {
            self.found[group][index] = Some(param.val().inner().flatten::<1>(0, D - 1));
        }
    }
}

/// Puts each updated parameter back, a view of its group's flat result.
struct PutBack<B: AutodiffBackend> {
    updated: HashMap<ParamId, Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> ModuleMapper<B> for PutBack<B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        match self.updated.remove(&id) {
            Some(updated) => {
                let shape = tensor.shape();
                let updated = Tensor::<B, D>::from_inner(updated.reshape(shape)).require_grad();
                Param::from_mapped_value(id, updated, mapper)
            }
            None => Param::from_mapped_value(id, tensor, mapper),
        }
    }
}

impl<B: AutodiffBackend> AdamW<B> {
    pub fn new(config: AdamWConfig) -> Self {
        Self {
            config,
            steps: 0,
            groups: Vec::new(),
        }
    }

    /// Number of parameters holding optimizer state.
    pub fn tracked_parameters(&self) -> usize {
        self.held_slots().count()
    }

    /// Every parameter's moments once, the freshest: the index of the group and the slot.
    fn held_slots(&self) -> impl Iterator<Item = (usize, &Slot)> {
        let mut seen = HashSet::new();
        self.groups
            .iter()
            .enumerate()
            .flat_map(|(index, group)| group.slots.iter().map(move |slot| (index, slot)))
            .filter(move |(_, slot)| seen.insert(slot.id))
    }

    /// Clips the gradients by their global norm and applies one AdamW step at learning rate `lr`.
    pub fn step<M: AutodiffModule<B>>(
        &mut self,
        lr: f64,
        module: M,
        grads: &GradientsParams,
    ) -> (M, StepReport) {
        let grads = flat_gradients(&module, grads);
        let grad_norm = grads.norm();
        self.apply(lr, module, grads, grad_norm)
    }

    /// [`AdamW::step`] with the gradients already flattened and their norm (`grad_norm`) known.
    pub fn apply<M: AutodiffModule<B>>(
        &mut self,
        lr: f64,
        module: M,
        grads: FlatGradients<B::InnerBackend>,
        grad_norm: f64,
    ) -> (M, StepReport) {
        let c = self.config;
        let grad_scale = match c.max_grad_norm {
            Some(max) => (max / (grad_norm + 1e-6)).min(1.0),
            None => 1.0,
        };
        self.steps += 1;
        let step = self.steps as i32;
        let mut updated = HashMap::new();
        let mut groups = Vec::new();
        let values = Values::<B>::of(&module, &grads.groups).found;
        for (
            FlatGroup {
                treatment,
                slots,
                grad,
            },
            found,
        ) in grads.groups.into_iter().zip(values)
        {
            let value = Tensor::cat(
                found
                    .into_iter()
                    .map(|v| v.expect("a parameter with a gradient is in the module"))
                    .collect(),
                0,
            );
            let (m, v) = self.moments_for(treatment, &slots, &grad);
            // torch decays by the group's own learning rate.
            let lr = match (treatment.b_side, c.loraplus_lr_ratio) {
                (true, Some(ratio)) => lr * ratio,
                _ => lr,
            };
            let update = Update {
                lr,
                grad_scale,
                beta1: c.beta1,
                beta2: c.beta2,
                eps: c.eps,
                bias1: 1.0 - c.beta1.powi(step),
                bias2: 1.0 - c.beta2.powi(step),
                decay: (treatment.decayed && c.weight_decay > 0.0)
                    .then_some(1.0 - lr * c.weight_decay),
            };
            let (value, m, v) = match cpu_adamw::update(&update, &value, &grad, &m, &v) {
                Some(updated) => updated,
                None => update.apply(value, grad, m, v),
            };
            for slot in &slots {
                updated.insert(slot.id, value.clone().narrow(0, slot.offset, slot.len));
            }
            groups.push(Group {
                treatment,
                slots,
                m,
                v,
            });
        }
        // A parameter without a gradient this step keeps its moments, as torch's AdamW skips
        // it: the groups that hold any such parameter stay behind the fresh ones (which are
        // searched first, so their own values win).
        let fresh: HashSet<ParamId> = updated.keys().copied().collect();
        let kept = std::mem::take(&mut self.groups)
            .into_iter()
            .filter(|group| group.slots.iter().any(|slot| !fresh.contains(&slot.id)));
        groups.extend(kept);
        self.groups = groups;
        (
            module.map(&mut PutBack::<B> { updated }),
            StepReport { grad_norm },
        )
    }

    /// The moments for a group laid out as `slots`: the held ones where the layout is unchanged
    /// (every step after the first), else gathered per parameter, zero for a parameter without.
    fn moments_for(
        &self,
        treatment: Treatment,
        slots: &[Slot],
        grad: &Tensor<B::InnerBackend, 1>,
    ) -> (Tensor<B::InnerBackend, 1>, Tensor<B::InnerBackend, 1>) {
        let held = self.groups.iter().find(|g| g.treatment == treatment);
        if let Some(group) = held
            && group.slots == slots
        {
            return (group.m.clone(), group.v.clone());
        }
        let (ms, vs): (Vec<_>, Vec<_>) = slots
            .iter()
            .map(|slot| {
                self.groups
                    .iter()
                    .find_map(|g| g.moments_of(slot))
                    .unwrap_or_else(|| {
                        let zeros = grad.clone().narrow(0, slot.offset, slot.len).zeros_like();
                        (zeros.clone(), zeros)
                    })
            })
            .unzip();
        (Tensor::cat(ms, 0), Tensor::cat(vs, 0))
    }
}

/// Records the dotted field path of every float parameter (`layers.0.self_attn.q_proj.lora.lora_a`):
/// stable across runs, unlike parameter ids, so optimizer state can be saved and restored.
struct ParamPaths {
    stack: Vec<String>,
    paths: HashMap<ParamId, String>,
    ranks: HashMap<ParamId, usize>,
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
        self.ranks.insert(param.id, D);
    }
}

/// The field path of every float parameter of `module`, by parameter id.
pub fn parameter_paths<B: Backend, M: Module<B>>(module: &M) -> HashMap<ParamId, String> {
    visit_paths::<B, M>(module).paths
}

fn visit_paths<B: Backend, M: Module<B>>(module: &M) -> ParamPaths {
    let mut visitor = ParamPaths {
        stack: Vec::new(),
        paths: HashMap::new(),
        ranks: HashMap::new(),
    };
    module.visit(&mut visitor);
    visitor
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
        let mut out = Vec::new();
        let values: Vec<(Vec<f32>, Vec<f32>)> = self
            .groups
            .iter()
            .map(|group| (f32_values(group.m.clone()), f32_values(group.v.clone())))
            .collect();
        for (index, slot) in self.held_slots() {
            let (m, v) = &values[index];
            if let Some(path) = paths.get(&slot.id) {
                let range = slot.offset..slot.offset + slot.len;
                out.push(SavedMoments {
                    path: path.clone(),
                    m: m[range.clone()].to_vec(),
                    v: v[range].to_vec(),
                });
            }
        }
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
        let params = visit_paths::<B, M>(module);
        let by_path: HashMap<&str, ParamId> = params
            .paths
            .iter()
            .map(|(id, path)| (path.as_str(), *id))
            .collect();
        // Per treatment: slots and the moments laid end to end.
        let mut groups: [(Vec<Slot>, Vec<f32>, Vec<f32>); 4] = Default::default();
        for s in saved {
            let id = *by_path.get(s.path.as_str()).ok_or_else(|| {
                format!(
                    "optimizer state for `{}`, which the model does not have",
                    s.path
                )
            })?;
            let name = s.path.rsplit('.').next().unwrap_or_default();
            let (slots, m, v) = &mut groups[Treatment::of(name, params.ranks[&id]).index()];
            slots.push(Slot {
                id,
                offset: m.len(),
                len: s.m.len(),
            });
            m.extend(s.m);
            v.extend(s.v);
        }
        let tensor = |values: Vec<f32>| {
            let n = values.len();
            Tensor::<B::InnerBackend, 1>::from_data(TensorData::new(values, [n]), device)
        };
        self.groups = groups
            .into_iter()
            .zip(Treatment::ALL)
            .filter(|((slots, _, _), _)| !slots.is_empty())
            .map(|((slots, m, v), treatment)| Group {
                treatment,
                slots,
                m: tensor(m),
                v: tensor(v),
            })
            .collect();
        self.steps = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};

    type AD = Autodiff<Flex>;

    #[derive(Module, Debug)]
    struct Two<B: Backend> {
        matrix: Param<Tensor<B, 2>>,
        vector: Param<Tensor<B, 1>>,
    }

    /// Gradients of `Σ matrix + Σ vector²`, or of `Σ matrix` alone.
    fn gradients(model: &Two<AD>, with_vector: bool) -> GradientsParams {
        let mut loss = model.matrix.val().sum();
        if with_vector {
            loss = loss + model.vector.val().powi_scalar(2).sum();
        }
        GradientsParams::from_grads(loss.backward(), model)
    }

    #[test]
    fn a_parameter_without_a_gradient_keeps_its_moments() {
        let device = Default::default();
        let mut model = Two::<AD> {
            matrix: Param::from_tensor(Tensor::from_floats([[1.0, 2.0], [3.0, 4.0]], &device)),
            vector: Param::from_tensor(Tensor::from_floats([0.5, -1.0, 2.0], &device)),
        };
        let mut optimizer = AdamW::<AD>::new(AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        });
        let moments = |optimizer: &AdamW<AD>, model: &Two<AD>| optimizer.export_state(model);
        for with_vector in [true, false, false] {
            let grads = gradients(&model, with_vector);
            let before = moments(&optimizer, &model);
            let vector_before = model.vector.val().into_data();
            (model, _) = optimizer.step(1e-2, model, &grads);
            let after = moments(&optimizer, &model);
            assert_eq!(optimizer.tracked_parameters(), 2);
            assert_eq!(after.len(), 2, "both parameters' moments, once each");
            if !with_vector {
                // The vector is neither moved nor are its moments touched or dropped.
                assert_eq!(model.vector.val().into_data(), vector_before);
                let vector = |saved: &[SavedMoments]| {
                    saved.iter().find(|s| s.path == "vector").cloned().unwrap()
                };
                assert_eq!(vector(&after), vector(&before));
                assert_ne!(after[0], before[0], "the matrix moved on");
            }
        }
    }
}
