//! Causal attention for training that never stores the `[batch, heads, seq, seq]` scores:
//! queries go a chunk at a time, each chunk against only the keys up to its last position (the
//! rest are its future: about half the products of full scores at long sequences), and the
//! backward pass recomputes each chunk's probabilities from the saved log-sum-exp (the scheme of
//! memory-efficient and flash attention, written with burn's tensor ops). burn 0.21's autodiff
//! decomposes attention into ops that keep the scores, their softmax and the masked copies of
//! both for every layer: 8 × 1024 tokens of 9 heads are 0.3 GB per copy per layer in f32.
//!
//! This is an autodiff op with its own backward, so it is specialized to the concrete backends
//! burnish runs (the CPU backend, and CUDA or wgpu where built); a pass without autodiff on
//! those backends (scoring, a prompt's first pass) runs its forward pass alone, so it computes
//! as training does, except the CPU backend's in 16-bit types. Any other backend uses burn's
//! attention. On the CPU backend the op runs as one kernel per direction (`cpu_attention`);
//! elsewhere it is composed of burn's tensor ops, with each chunk's causal softmax one kernel
//! per direction on the plain GPU backends (`gpu_kernels`) when the keys each query sees are
//! one run ending at it (causality alone, or from each query's first key: packed documents, a
//! sliding window), and its products through cuBLAS on CUDA when cuBLAS queues on cubecl's
//! stream (`BURNISH_MATMUL=cublas-async`): in full f32 for an f32 model, TF32 for 16-bit
//! activations.

use std::any::TypeId;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Bool, DType, FloatDType, Tensor, TensorPrimitive};
use burnish_peft::{RowReduction, reduce_rows};

use crate::cpu_attention;
use crate::cpu_kernel::rebrand;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
use crate::gpu_kernels::{CausalSoftmax, CausalSoftmaxBackward};
#[cfg(any(feature = "cuda", feature = "wgpu"))]
use burnish_peft::gpu_kernel;

/// Scores one chunk of queries may hold (256 MiB in f32): on a GPU each chunk costs a few dozen
/// kernel launches whatever its size, so chunks are as large as this allows (and as the
/// device's largest buffer holds, `burnish_peft::f32_per_buffer`).
const SCORES_PER_CHUNK: usize = 1 << 26;

/// Query positions per chunk for `[batch, heads, seq, _]` queries: the fewest chunks whose
/// scores `[batch, heads, chunk, seq]` stay within `scores` values, split evenly, in multiples of
/// 64 that stay within it too (a device's largest buffer is a hard bound).
fn chunk_rows([batch, heads, seq, _]: [usize; 4], scores: usize) -> usize {
    let fit = (scores / (batch * heads * seq).max(1)).max(1);
    if fit >= seq {
        return seq.max(1);
    }
    let even = seq.div_ceil(seq.div_ceil(fit)).next_multiple_of(64);
    if even <= fit {
        even
    } else if fit >= 64 {
        fit / 64 * 64
    } else {
        fit
    }
}

/// Causal attention of `q` over `k`, `v` (grouped-query heads not repeated), with `mask`
/// hiding more keys where it is `true` (and `first_keys`, when given, saying the same as each
/// query's first visible key, for the GPU kernels), through the chunked op when `B` is one of
/// the autodiff backends it is built for, or its forward pass alone on those backends without
/// autodiff (scoring, a prompt's first pass): the CPU kernel's in f32, the chunks' on a GPU,
/// with their products on the same route as training's; `None` otherwise.
///
/// # Shapes
/// - q: `[batch, heads, seq, head_dim]`
/// - k, v: `[batch, kv_heads, seq, head_dim]`
/// - mask: `[batch or 1, 1, seq, seq]`
/// - first_keys: `[batch, seq]`
/// - output: `[batch, heads, seq, head_dim]`
pub(crate) fn chunked_causal_attention<B: Backend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    mask: Option<&Tensor<B, 4, Bool>>,
    first_keys: Option<&Tensor<B, 2>>,
) -> Option<Tensor<B, 4>> {
    if q.dims()[2] != k.dims()[2] {
        return None; // queries after a cache: inference, not training
    }
    if q.dims().contains(&0) || k.dims()[1] == 0 {
        return None; // nothing to attend: burn's op returns the empty result
    }
    // Without autodiff the CPU backend's 16-bit passes take burn's attention.
    let hidden = Hidden { mask, first_keys };
    let out = match q.dtype() {
        DType::F32 => untracked_on::<B, Flex>(q, k, v, hidden, Kernel::Cpu),
        _ => None,
    };
    let out = out.or_else(|| on::<B, Flex>(q, k, v, hidden, Kernel::Cpu));
    #[cfg(feature = "cuda")]
    let out = out
        .or_else(|| on::<B, burn::backend::Cuda>(q, k, v, hidden, chunks(q)))
        .or_else(|| untracked_on::<B, burn::backend::Cuda>(q, k, v, hidden, chunks(q)));
    #[cfg(feature = "wgpu")]
    let out = out
        .or_else(|| on::<B, burn::backend::Wgpu>(q, k, v, hidden, chunks(q)))
        .or_else(|| untracked_on::<B, burn::backend::Wgpu>(q, k, v, hidden, chunks(q)));
    out
}

/// The keys hidden beyond causality, as [`chunked_causal_attention`] takes them.
#[derive(Debug)]
struct Hidden<'a, B: Backend> {
    mask: Option<&'a Tensor<B, 4, Bool>>,
    first_keys: Option<&'a Tensor<B, 2>>,
}

// References only: copied whatever `B` is (a derive would ask `B: Copy`).
impl<B: Backend> Clone for Hidden<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: Backend> Copy for Hidden<'_, B> {}

impl<B: Backend> Hidden<'_, B> {
    /// The same on backend `I`, where `B` is `Autodiff<I>` (neither gets a gradient).
    fn untracked<I: Backend>(self) -> (Option<Tensor<I, 4, Bool>>, Option<Tensor<I, 2>>) {
        let mask = self
            .mask
            .map(|m| Tensor::<I, 4, Bool>::from_primitive(rebrand(m.clone().into_primitive())));
        let first_keys = self.first_keys.map(|first| {
            let tracked: FloatTensor<Autodiff<I>> =
                rebrand(first.clone().into_primitive().tensor());
            Tensor::<I, 2>::from_primitive(TensorPrimitive::Float(tracked.primitive))
        });
        (mask, first_keys)
    }
}

/// The op's forward pass alone, through `kernel`, when `B` is the backend `I` (without
/// autodiff).
fn untracked_on<B: Backend, I: Backend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    hidden: Hidden<B>,
    kernel: Kernel,
) -> Option<Tensor<B, 4>> {
    if TypeId::of::<B>() != TypeId::of::<I>() {
        return None;
    }
    Some(attention_forward(kernel, q, k, v, hidden.mask, hidden.first_keys).0)
}

/// The burn-op kernel, in chunks sized for `q` and its device.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn chunks<B: Backend>(q: &Tensor<B, 4>) -> Kernel {
    let scores = burnish_peft::f32_per_buffer::<B>(&q.device(), SCORES_PER_CHUNK);
    Kernel::Chunks(chunk_rows(q.dims(), scores))
}

/// How the op computes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kernel {
    /// `cpu_attention`'s kernels (`I` is the CPU backend); f32 only, other dtypes take `Chunks`.
    Cpu,
    /// burn's tensor ops, this many queries at a time.
    Chunks(usize),
}

/// The chunked op when `B` is `Autodiff<I>`.
fn on<B: Backend, I: Backend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    hidden: Hidden<B>,
    kernel: Kernel,
) -> Option<Tensor<B, 4>> {
    if TypeId::of::<B>() != TypeId::of::<Autodiff<I>>() {
        return None;
    }
    let kernel = match kernel {
        Kernel::Cpu if q.dtype() == DType::F32 => Kernel::Cpu,
        Kernel::Cpu => Kernel::Chunks(chunk_rows(q.dims(), SCORES_PER_CHUNK)),
        chunks => chunks,
    };
    let float = |t: &Tensor<B, 4>| -> FloatTensor<Autodiff<I>> {
        rebrand(t.clone().into_primitive().tensor())
    };
    let (mask, first_keys) = hidden.untracked::<I>();
    let out = tracked::<I>(float(q), float(k), float(v), mask, first_keys, kernel);
    Some(Tensor::from_primitive(TensorPrimitive::Float(rebrand(out))))
}

/// What the backward pass needs: the inputs, the output and each row's log-sum-exp.
#[derive(Debug, Clone)]
struct Saved<I: Backend> {
    kernel: Kernel,
    q: Tensor<I, 4>,
    k: Tensor<I, 4>,
    v: Tensor<I, 4>,
    mask: Option<Tensor<I, 4, Bool>>,
    first_keys: Option<Tensor<I, 2>>,
    out: Tensor<I, 4>,
    /// Per chunk of queries: `[batch, heads, chunk, 1]` (one chunk for the CPU kernel).
    lse: Vec<Tensor<I, 4>>,
}

#[derive(Debug)]
struct AttentionBackward;

impl<I: Backend> Backward<I, 3> for AttentionBackward {
    type State = Saved<I>;

    fn backward(self, ops: Ops<Saved<I>, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let d_out =
            Tensor::<I, 4>::from_primitive(TensorPrimitive::Float(grads.consume::<I>(&ops.node)));
        let [dq, dk, dv] = attention_backward(ops.state, d_out);
        for (parent, grad) in ops.parents.into_iter().zip([dq, dk, dv]) {
            if let Some(parent) = parent {
                grads.register::<I>(parent.id, grad.into_primitive().tensor());
            }
        }
    }
}

fn tracked<I: Backend>(
    q: FloatTensor<Autodiff<I>>,
    k: FloatTensor<Autodiff<I>>,
    v: FloatTensor<Autodiff<I>>,
    mask: Option<Tensor<I, 4, Bool>>,
    first_keys: Option<Tensor<I, 2>>,
    kernel: Kernel,
) -> FloatTensor<Autodiff<I>> {
    let inner = |t: &FloatTensor<Autodiff<I>>| {
        Tensor::<I, 4>::from_primitive(TensorPrimitive::Float(t.primitive.clone()))
    };
    let (q_in, k_in, v_in) = (inner(&q), inner(&k), inner(&v));
    let (out, lse) = attention_forward(
        kernel,
        &q_in,
        &k_in,
        &v_in,
        mask.as_ref(),
        first_keys.as_ref(),
    );
    let primitive = out.clone().into_primitive().tensor();
    match AttentionBackward
        .prepare::<NoCheckpointing>([q.node.clone(), k.node.clone(), v.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let saved = Saved {
                kernel,
                q: q_in,
                k: k_in,
                v: v_in,
                mask,
                first_keys,
                out,
                lse,
            };
            prep.finish(saved, primitive)
        }
        OpsKind::UnTracked(prep) => prep.finish(primitive),
    }
}

/// `[batch or 1, 1, seq, seq]`: `true` where a query does not see a key (the future, and what
/// `mask` hides).
fn hidden_keys<I: Backend>(
    mask: Option<&Tensor<I, 4, Bool>>,
    seq: usize,
    device: &I::Device,
) -> Tensor<I, 4, Bool> {
    // `true` above the diagonal: the future.
    let future = Tensor::<I, 2, Bool>::tril_mask([seq, seq], 0, device).reshape([1, 1, seq, seq]);
    match mask {
        Some(mask) => mask.clone().bool_or(future.expand(mask.dims())),
        None => future,
    }
}

/// Which keys each query of a chunk sees, and so how the chunk's scores become probabilities.
#[derive(Debug, Clone)]
enum Visibility<I: Backend> {
    /// One run of keys ending at each query, which the GPU kernels apply from positions, with
    /// no mask tensor: from key 0 (causality alone), or from each query's first visible key
    /// (`[batch, seq]`, f32).
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    Run(Option<Tensor<I, 2>>),
    /// The keys [`hidden_keys`] marks are hidden: burn's ops fill their scores with -∞.
    Hidden(Tensor<I, 4, Bool>),
}

impl<I: Backend> Visibility<I> {
    fn of(
        mask: Option<&Tensor<I, 4, Bool>>,
        first_keys: Option<&Tensor<I, 2>>,
        seq: usize,
        device: &I::Device,
    ) -> Self {
        #[cfg(any(feature = "cuda", feature = "wgpu"))]
        if gpu_kernel::takes_kernel::<I, CausalSoftmax>()
            && gpu_kernel::takes_kernel::<I, CausalSoftmaxBackward>()
        {
            match (mask, first_keys) {
                (None, _) => return Self::Run(None),
                (Some(_), Some(first)) => {
                    return Self::Run(Some(burnish_peft::cast_to(first.clone(), DType::F32)));
                }
                (Some(_), None) => {}
            }
        }
        #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
        let _ = first_keys;
        Self::Hidden(hidden_keys(mask, seq, device))
    }
}

/// The scaled scores of queries `start..start + len` against the keys they can see at all,
/// `0..start + len` (later keys are in their future), for every query head of each key/value
/// head at once: `q_chunk` holds the chunk's queries grouped by the key/value head they read
/// ([`grouped`]), so grouped-query heads share their keys without copies.
///
/// # Shapes
/// - q_chunk: `[batch, kv_heads, groups · len, head_dim]`
/// - k: `[batch, kv_heads, seq, head_dim]`
/// - output: `[batch, kv_heads, groups · len, start + len]`
fn chunk_scores<I: Backend>(
    q_chunk: Tensor<I, 4>,
    k: &Tensor<I, 4>,
    (start, len): (usize, usize),
    activations: DType,
) -> Tensor<I, 4> {
    let head_dim = q_chunk.dims()[3];
    let scale = (head_dim as f64).powf(-0.5);
    // Scaled on the queries' side: a pass over `[.., len, head_dim]` rather than over the
    // scores' `[.., len, seen]`.
    product(
        q_chunk.mul_scalar(scale),
        k.clone().narrow(2, 0, start + len).swap_dims(2, 3),
        activations,
    )
}

/// `a·b` batch by batch, of values computed from `activations` (the attention's inputs'
/// dtype): through cuBLAS where the CUDA build's stream-ordered route takes it
/// (`burnish_peft::batched_matmul`), in full f32 for an f32 model and in TF32 for values that
/// were 16-bit activations; burn's matmul otherwise.
fn product<I: Backend>(a: Tensor<I, 4>, b: Tensor<I, 4>, activations: DType) -> Tensor<I, 4> {
    #[cfg(feature = "cuda")]
    {
        use burnish_peft::F32Compute;
        let f32_compute = match activations {
            DType::F32 => F32Compute::Full,
            _ => F32Compute::Tf32,
        };
        if let Some(out) = burnish_peft::batched_matmul(&a, &b, f32_compute) {
            return out;
        }
    }
    #[cfg(not(feature = "cuda"))]
    let _ = activations;
    a.matmul(b)
}

/// A chunk's `scores` ([`chunk_scores`]) with the keys `hidden` marks at -∞.
fn masked<I: Backend>(
    scores: Tensor<I, 4>,
    hidden: &Tensor<I, 4, Bool>,
    start: usize,
    len: usize,
) -> Tensor<I, 4> {
    let [batch, kv_heads, rows, seen] = scores.dims();
    let groups = rows / len;
    let hidden = hidden
        .clone()
        .narrow(2, start, len)
        .narrow(3, 0, seen)
        .unsqueeze_dim::<5>(2)
        .expand([batch, kv_heads, groups, len, seen]);
    scores
        .reshape([batch, kv_heads, groups, len, seen])
        .mask_fill(hidden, f32::NEG_INFINITY)
        .reshape([batch, kv_heads, rows, seen])
}

/// `inputs` through `kernel`, each 4-D tensor's rows as one matrix, and the outputs back to
/// 4-D in `[batch, heads, rows, _]` (each output keeps its own width).
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn by_rows<I: Backend, K, const N: usize, const M: usize>(
    kernel: &K,
    inputs: [RowsOf<I>; N],
) -> [Tensor<I, 4>; M]
where
    K: gpu_kernel::GpuKernel<N, M>,
{
    let [batch, heads, rows] = inputs
        .iter()
        .find_map(|input| match input {
            RowsOf::Tensor(t) => Some(t.dims()),
            RowsOf::Matrix(_) => None,
        })
        .map(|[batch, heads, rows, _]| [batch, heads, rows])
        .expect("a 4-D input");
    let matrices = inputs.map(|input| match input {
        RowsOf::Tensor(t) => {
            let width = t.dims()[3];
            t.reshape([batch * heads * rows, width])
        }
        RowsOf::Matrix(m) => m,
    });
    gpu_kernel::launch(kernel, &matrices)
        .expect("the GPU kernels take every f32 chunk of scores")
        .map(|t| {
            let width = t.dims()[1];
            t.reshape([batch, heads, rows, width])
        })
}

/// An input of [`by_rows`]: a 4-D tensor taken row by row, or a matrix taken as it is.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
enum RowsOf<I: Backend> {
    Tensor(Tensor<I, 4>),
    Matrix(Tensor<I, 2>),
}

/// The causal softmax kernels' last input: each query's first visible key (`[batch, seq]`),
/// or where every query sees from key 0, any matrix in its place (here `scores`' own rows),
/// which the kernels do not read.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn first_keys_or_unread<I: Backend>(
    first_keys: Option<&Tensor<I, 2>>,
    scores: &Tensor<I, 4>,
) -> RowsOf<I> {
    match first_keys {
        Some(first) => RowsOf::Matrix(first.clone()),
        None => RowsOf::Tensor(scores.clone()),
    }
}

/// Positions `start..start + len` of `t`'s heads, grouped by the key/value head they read
/// (query head `h` reads key/value head `h / groups`, as HF's `repeat_kv` lays them out).
///
/// # Shapes
/// - t: `[batch, kv_heads · groups, seq, head_dim]`
/// - output: `[batch, kv_heads, groups · len, head_dim]`
fn grouped<I: Backend>(
    t: &Tensor<I, 4>,
    kv_heads: usize,
    start: usize,
    len: usize,
) -> Tensor<I, 4> {
    let [batch, heads, seq, head_dim] = t.dims();
    let groups = heads / kv_heads;
    let t = t.clone();
    if groups == 1 {
        return t.narrow(2, start, len); // a view, whatever t's layout
    }
    if len == seq {
        return t.reshape([batch, kv_heads, groups * seq, head_dim]);
    }
    t.reshape([batch, kv_heads, groups, seq, head_dim])
        .narrow(3, start, len)
        .reshape([batch, kv_heads, groups * len, head_dim])
}

/// [`grouped`] undone: `[batch, kv_heads, groups · len, head_dim]` as `[batch, heads, len,
/// head_dim]` (a view).
fn ungrouped<I: Backend>(t: Tensor<I, 4>, heads: usize) -> Tensor<I, 4> {
    let [batch, kv_heads, rows, head_dim] = t.dims();
    t.reshape([batch, heads, rows * kv_heads / heads, head_dim])
}

/// The attention output, and per chunk of queries each query's log-sum-exp of scores (kept
/// apart, each contiguous, for the backward pass's row-wise broadcasts).
fn attention_forward<I: Backend>(
    kernel: Kernel,
    q: &Tensor<I, 4>,
    k: &Tensor<I, 4>,
    v: &Tensor<I, 4>,
    mask: Option<&Tensor<I, 4, Bool>>,
    first_keys: Option<&Tensor<I, 2>>,
) -> (Tensor<I, 4>, Vec<Tensor<I, 4>>) {
    let Kernel::Chunks(chunk) = kernel else {
        let (out, lse) = cpu_attention::forward(
            &rebrand(q.clone()),
            &rebrand(k.clone()),
            &rebrand(v.clone()),
            mask.cloned().map(rebrand).as_ref(),
        );
        return (rebrand(out), vec![rebrand(lse)]);
    };
    // Scores and softmax in f32 whatever the inputs' precision; the output in theirs.
    let dtype = q.dtype();
    let [q, k, v] = [q, k, v].map(|t| t.clone().cast(FloatDType::F32));
    let [_, heads, seq, _] = q.dims();
    let kv_heads = k.dims()[1];
    let visibility = Visibility::of(mask, first_keys, seq, &q.device());
    let mut outs = Vec::new();
    let mut lses = Vec::new();
    for start in (0..seq).step_by(chunk) {
        let len = chunk.min(seq - start);
        let scores = chunk_scores(grouped(&q, kv_heads, start, len), &k, (start, len), dtype);
        let v_seen = v.clone().narrow(2, 0, start + len);
        let (out, lse) = match &visibility {
            #[cfg(any(feature = "cuda", feature = "wgpu"))]
            Visibility::Run(first_keys) => {
                let softmax = CausalSoftmax::new(start, len, heads, first_keys.is_some());
                let last = first_keys_or_unread(first_keys.as_ref(), &scores);
                let [probs, lse] = by_rows(&softmax, [RowsOf::Tensor(scores), last]);
                (product(probs, v_seen, dtype), lse)
            }
            Visibility::Hidden(hidden) => {
                let scores = masked(scores, hidden, start, len);
                let max = reduce_rows(scores.clone(), RowReduction::Max);
                let exp = (scores - max.clone()).exp();
                let total = reduce_rows(exp.clone(), RowReduction::Sum);
                let out = product(exp, v_seen, dtype) / total.clone();
                (out, max + total.log())
            }
        };
        outs.push(ungrouped(out, heads).cast(dtype).swap_dims(1, 2));
        lses.push(lse);
    }
    (positions_major(outs), lses)
}

/// Chunks of `[batch, heads, chunk, head_dim]` (each viewed as `[batch, chunk, heads,
/// head_dim]`) laid end to end as `[batch, seq, heads, head_dim]`, returned viewed as `[batch,
/// heads, seq, head_dim]`: the layer's next step reads positions-major (`[batch, seq, heads ·
/// head_dim]`), a view of this without another copy, and the output projection's saved input
/// shares this buffer with the attention's saved output.
fn positions_major<I: Backend>(chunks: Vec<Tensor<I, 4>>) -> Tensor<I, 4> {
    // `cat` writes a fresh buffer in its output's layout, one chunk or several.
    Tensor::cat(chunks, 1).swap_dims(1, 2)
}

/// Gradients of q, k and v from the output's gradient, recomputing each chunk's probabilities:
/// `dV = Pᵀ·dO`, `dS = P ∘ (dO·Vᵀ − rowsum(dO ∘ O))`, `dQ = s·dS·K`, `dK = s·dSᵀ·Q`.
fn attention_backward<I: Backend>(saved: Saved<I>, d_out: Tensor<I, 4>) -> [Tensor<I, 4>; 3] {
    let Saved {
        kernel,
        q,
        k,
        v,
        mask,
        first_keys,
        out,
        lse,
    } = saved;
    let Kernel::Chunks(chunk) = kernel else {
        let grads = cpu_attention::backward(
            [&rebrand(q), &rebrand(k), &rebrand(v)],
            mask.map(rebrand).as_ref(),
            &rebrand(out),
            &rebrand(
                lse.into_iter()
                    .next()
                    .expect("the CPU kernel's log-sum-exp"),
            ),
            &rebrand(d_out),
        );
        return grads.map(rebrand);
    };
    let dtypes = [q.dtype(), k.dtype(), v.dtype()];
    let activations = dtypes[0];
    let [q, k, v, out, d_out] = [q, k, v, out, d_out].map(|t| t.cast(FloatDType::F32));
    let kv_heads = k.dims()[1];
    let [_, heads, seq, head_dim] = q.dims();
    let scale = (head_dim as f64).powf(-0.5);
    let visibility = Visibility::of(mask.as_ref(), first_keys.as_ref(), seq, &q.device());
    // The last chunk first: it sees every key, so its key and value gradients are the whole
    // tensors, which each earlier chunk adds into the prefix of keys it sees (no zero-filled
    // start, and one chunk needs no additions at all). Queries go grouped by the key/value head
    // they read, so each product sums over a group's query heads as it goes.
    let mut dq = Vec::new();
    let mut dk: Option<Tensor<I, 4>> = None;
    let mut dv: Option<Tensor<I, 4>> = None;
    let starts: Vec<usize> = (0..seq).step_by(chunk).collect();
    for (start, lse) in starts.into_iter().zip(lse).rev() {
        let len = chunk.min(seq - start);
        let seen = start + len;
        let q_chunk = grouped(&q, kv_heads, start, len);
        let scores = chunk_scores(q_chunk.clone(), &k, (start, len), activations);
        let d_out_chunk = grouped(&d_out, kv_heads, start, len);
        let row_dots = reduce_rows(
            d_out_chunk.clone() * grouped(&out, kv_heads, start, len),
            RowReduction::Sum,
        );
        let d_probs = product(
            d_out_chunk.clone(),
            v.clone().narrow(2, 0, seen).swap_dims(2, 3),
            activations,
        );
        let (probs, d_scores) = match &visibility {
            #[cfg(any(feature = "cuda", feature = "wgpu"))]
            Visibility::Run(first_keys) => {
                let softmax = CausalSoftmax::new(start, len, heads, first_keys.is_some());
                let last = first_keys_or_unread(first_keys.as_ref(), &scores);
                let [scores, lse, d_probs, row_dots] =
                    [scores, lse, d_probs, row_dots].map(RowsOf::Tensor);
                let inputs = [scores, lse, d_probs, row_dots, last];
                let [probs, d_scores] = by_rows(&CausalSoftmaxBackward(softmax), inputs);
                (probs, d_scores)
            }
            Visibility::Hidden(hidden) => {
                let probs = (masked(scores, hidden, start, len) - lse).exp();
                (probs.clone(), probs * (d_probs - row_dots))
            }
        };
        let dv_part = product(probs.swap_dims(2, 3), d_out_chunk, activations);
        dv = Some(add_into_prefix(dv, dv_part));
        let dq_chunk =
            product(d_scores.clone(), k.clone().narrow(2, 0, seen), activations).mul_scalar(scale);
        dq.push(ungrouped(dq_chunk, heads).cast(dtypes[0]).swap_dims(1, 2));
        let dk_part = product(d_scores.swap_dims(2, 3), q_chunk, activations).mul_scalar(scale);
        dk = Some(add_into_prefix(dk, dk_part));
    }
    dq.reverse();
    let (dk, dv) = (
        dk.expect("at least one chunk of queries"),
        dv.expect("at least one chunk of queries"),
    );
    // dq's chunks are in q's precision already.
    let [_, k_dtype, v_dtype] = dtypes;
    [positions_major(dq), dk.cast(k_dtype), dv.cast(v_dtype)]
}

/// `part` (the gradient for the first `seen` keys) added into `whole`, or `part` itself when
/// there is no `whole` yet (then it spans every key).
///
/// # Shapes
/// - whole: `[batch, heads, seq, head_dim]`
/// - part: `[batch, heads, seen, head_dim]`
fn add_into_prefix<I: Backend>(whole: Option<Tensor<I, 4>>, part: Tensor<I, 4>) -> Tensor<I, 4> {
    let Some(whole) = whole else {
        return part;
    };
    let [batch, heads, seen, head_dim] = part.dims();
    let sum = whole.clone().narrow(2, 0, seen) + part;
    whole.slice_assign([0..batch, 0..heads, 0..seen, 0..head_dim], sum)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::repeat_kv;
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    use crate::documents::{Documents, window_first_keys, window_mask};
    use burn::tensor::backend::AutodiffBackend;
    use burn::tensor::module::attention;
    use burn::tensor::ops::AttentionModuleOptions;
    use burn::tensor::{Distribution, TensorData, Tolerance};

    type AD = Autodiff<Flex>;

    /// Output and the three gradients of `Σ out ∘ upstream`, on autodiff backend `B`.
    fn run<B: AutodiffBackend>(
        attend: impl Fn(Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) -> Tensor<B, 4>,
        inputs: &[Tensor<B, 4>; 4],
    ) -> [TensorData; 4] {
        let [q, k, v, upstream] = inputs.clone();
        let (q, k, v) = (q.require_grad(), k.require_grad(), v.require_grad());
        let out = attend(q.clone(), k.clone(), v.clone());
        let grads = (out.clone() * upstream).sum().backward();
        let grad = |t: &Tensor<B, 4>| t.grad(&grads).expect("a gradient").into_data();
        [out.into_data(), grad(&q), grad(&k), grad(&v)]
    }

    /// Two documents per row (packing) over the first 170 positions and the rest: the keys of
    /// the other document are hidden (`[batch, 1, seq, seq]`).
    fn two_documents(batch: usize, seq: usize) -> TensorData {
        let document: Vec<bool> = (0..batch * seq * seq)
            .map(|i| ((i / seq) % seq < 170) != (i % seq < 170))
            .collect();
        TensorData::new(document, [batch, 1, seq, seq])
    }

    /// The keys `mask` hides, with no first keys.
    fn by_mask<B: Backend>(mask: Option<&Tensor<B, 4, Bool>>) -> Hidden<'_, B> {
        Hidden {
            mask,
            first_keys: None,
        }
    }

    #[test]
    fn both_kernels_equal_burns_attention_in_value_and_gradient() {
        let device = Default::default();
        // 300 positions: full chunks and a short one for both kernels (the CPU kernel's
        // blocks are 64 queries).
        let [batch, heads, seq, head_dim] = [2, 6, 300, 16];
        Flex::seed(&device, 3);
        let random = |heads: usize| {
            Tensor::<AD, 4>::random(
                [batch, heads, seq, head_dim],
                Distribution::Default,
                &device,
            )
        };
        let documents = Tensor::<AD, 4, Bool>::from_data(two_documents(batch, seq), &device);
        // Plain heads, and grouped queries (three query heads per key/value head).
        for kv_heads in [heads, 2] {
            let groups = heads / kv_heads;
            let inputs = [
                random(heads),
                random(kv_heads),
                random(kv_heads),
                random(heads),
            ];
            for mask in [None, Some(documents.clone())] {
                let burns = run(
                    |q, k, v| {
                        let options = AttentionModuleOptions {
                            scale: None,
                            softcap: None,
                            is_causal: true,
                        };
                        let mask = mask.clone().map(|m| m.expand([batch, heads, seq, seq]));
                        let (k, v) = (repeat_kv(k, groups), repeat_kv(v, groups));
                        attention(q, k, v, mask, None, options)
                    },
                    &inputs,
                );
                // 300 positions: chunks of 128, 128 and 44 for the burn-op kernel, or one.
                for kernel in [Kernel::Cpu, Kernel::Chunks(128), Kernel::Chunks(512)] {
                    let ours = run(
                        |q, k, v| {
                            on::<AD, Flex>(&q, &k, &v, by_mask(mask.as_ref()), kernel)
                                .expect("the op")
                        },
                        &inputs,
                    );
                    // Gradients summed over 300 positions reach ~10: within 1e-5 of their size
                    // (the summation order differs with the CPU's vector width).
                    for (ours, burns) in ours.into_iter().zip(&burns) {
                        ours.assert_approx_eq::<f32>(burns, Tolerance::rel_abs(1e-5, 1e-5));
                    }
                }
            }
        }
    }

    /// bf16 inputs (GPUs' activations): scores and softmax in f32, the output and the
    /// gradients in bf16, near the f32 op's.
    #[test]
    fn bf16_inputs_get_a_bf16_output_and_gradients_near_f32() {
        let device = Default::default();
        let [batch, heads, kv_heads, seq, head_dim] = [2, 6, 2, 150, 16];
        Flex::seed(&device, 9);
        let random = |heads: usize| {
            Tensor::<AD, 4>::random(
                [batch, heads, seq, head_dim],
                Distribution::Default,
                &device,
            )
        };
        let inputs = [
            random(heads),
            random(kv_heads),
            random(kv_heads),
            random(heads),
        ];
        let attend = |q: Tensor<AD, 4>, k: Tensor<AD, 4>, v: Tensor<AD, 4>| {
            on::<AD, Flex>(&q, &k, &v, by_mask(None), Kernel::Chunks(64)).expect("the op")
        };
        let f32s = run(attend, &inputs);
        let halves = run(
            |q, k, v| {
                let [q, k, v] = [q, k, v].map(|t| t.cast(FloatDType::BF16));
                let out = attend(q.clone(), k.clone(), v.clone());
                assert_eq!(out.dtype(), DType::BF16);
                out.cast(FloatDType::F32)
            },
            &inputs,
        );
        for (half, full) in halves.iter().zip(&f32s) {
            // bf16 keeps 8 significant bits: inputs, output and gradients each rounded.
            half.assert_approx_eq::<f32>(full, Tolerance::absolute(3e-2).set_relative(3e-2));
        }
        // bf16 leaves get bf16 gradients.
        let [q, k, v, _] = inputs.map(|t| t.cast(FloatDType::BF16).detach().require_grad());
        let grads = attend(q.clone(), k.clone(), v.clone()).sum().backward();
        for input in [q, k, v] {
            assert_eq!(input.grad(&grads).expect("a gradient").dtype(), DType::BF16);
        }
    }

    #[test]
    fn the_cpu_kernel_reads_strided_heads_in_place() {
        // Heads as the projections leave them: `[batch, seq, heads, dim]` seen as
        // `[batch, heads, seq, dim]`, and the output's gradient as a view too.
        let device = Default::default();
        let [batch, heads, seq, head_dim] = [1, 4, 70, 8];
        Flex::seed(&device, 5);
        let random = || {
            Tensor::<AD, 4>::random(
                [batch, seq, heads, head_dim],
                Distribution::Default,
                &device,
            )
        };
        let inputs = [random(), random(), random(), random()].map(|t| t.swap_dims(1, 2));
        let contiguous = inputs
            .clone()
            .map(|t| Tensor::from_data(t.into_data(), &device));
        let attend = |q: Tensor<AD, 4>, k: Tensor<AD, 4>, v: Tensor<AD, 4>| {
            on::<AD, Flex>(&q, &k, &v, by_mask(None), Kernel::Cpu).expect("the op")
        };
        let strided = run(attend, &inputs);
        for (strided, contiguous) in strided.into_iter().zip(run(attend, &contiguous)) {
            strided.assert_approx_eq::<f32>(&contiguous, Tolerance::absolute(1e-6));
        }
    }

    #[test]
    fn without_autodiff_the_cpu_kernel_equals_burns_attention() {
        let device = Default::default();
        Flex::seed(&device, 9);
        let random = |heads: usize| {
            Tensor::<Flex, 4>::random([2, heads, 150, 16], Distribution::Default, &device)
        };
        let (q, k, v) = (random(4), random(2), random(2));
        let ours = chunked_causal_attention(&q, &k, &v, None, None).expect("the CPU kernel");
        let options = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: true,
        };
        let burns = attention(q, repeat_kv(k, 2), repeat_kv(v, 2), None, None, options);
        ours.into_data()
            .assert_approx_eq::<f32>(&burns.into_data(), Tolerance::absolute(1e-5));
    }

    #[test]
    fn a_nan_query_gives_a_nan_output_in_both_kernels() {
        // A NaN must not be mistaken for "nothing visible" (that would train on zeros).
        let device = Default::default();
        let mut values = vec![0.5f32; 2 * 3 * 8];
        values[0] = f32::NAN;
        let q = Tensor::<AD, 4>::from_data(TensorData::new(values, [1, 2, 3, 8]), &device);
        let kv = Tensor::<AD, 4>::ones([1, 1, 3, 8], &device);
        for kernel in [Kernel::Cpu, Kernel::Chunks(64)] {
            let out = on::<AD, Flex>(&q, &kv, &kv, by_mask(None), kernel).expect("the op");
            let first_row = out.narrow(1, 0, 1).narrow(2, 0, 1).into_data();
            let first_row = first_row.to_vec::<f32>().unwrap();
            assert!(
                first_row.iter().all(|x| x.is_nan()),
                "{kernel:?}: {first_row:?}"
            );
        }
    }

    #[test]
    fn chunks_are_as_few_as_the_scores_budget_allows_and_even() {
        let budget = SCORES_PER_CHUNK;
        // SmolLM2-135M at 8 x 1024: 302 MB of scores in f32, so two chunks of 512.
        assert_eq!(chunk_rows([8, 9, 1024, 64], budget), 512);
        // TinyLlama's 32 heads: four chunks of 256.
        assert_eq!(chunk_rows([8, 32, 1024, 64], budget), 256);
        // Short rows fit whole; 300 positions in two chunks round up to 192 (then 108).
        assert_eq!(chunk_rows([1, 4, 100, 16], budget), 100);
        assert_eq!(chunk_rows([1, 1 << 10, 300, 16], budget), 192);
        // A device whose buffers hold 2^24 f32: at most 227 rows, so 192 (the even split's 256
        // would not fit), and 48 for a budget under 64 rows.
        assert_eq!(chunk_rows([8, 9, 1024, 64], 1 << 24), 192);
        assert_eq!(chunk_rows([8, 9, 1024, 64], 48 * 8 * 9 * 1024 + 5), 48);
    }

    #[test]
    fn queries_after_a_cache_fall_back() {
        // One new query against four cached keys: generation, where burn's attention runs.
        let device = Default::default();
        let q = Tensor::<Flex, 4>::zeros([1, 1, 1, 8], &device);
        let kv = Tensor::<Flex, 4>::zeros([1, 1, 4, 8], &device);
        assert!(chunked_causal_attention(&q, &kv, &kv, None, None).is_none());
    }

    /// The op on a GPU backend (the GPU kernels' causal softmax without a mask, burn's masked
    /// ops with one) against the CPU kernel, grouped-query heads, in several chunks and in one,
    /// and its forward pass without autodiff, to `tolerance`. On wgpu it needs a Vulkan device
    /// (a GPU's, or Mesa's lavapipe on the CPU): `cargo test --release -p burnish-model
    /// --features wgpu -- --ignored on_wgpu`; on CUDA an NVIDIA GPU, with
    /// `BURNISH_GPU_KERNELS=all` (`--features cuda`, `on_cuda`).
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    fn on_a_gpu_the_op_equals_the_cpu_kernel<Plain: Backend>(tolerance: Tolerance<f32>) {
        assert!(
            burnish_peft::gpu_kernel::takes::<Plain>(),
            "the GPU kernels are off here: set BURNISH_GPU_KERNELS=all"
        );
        let [batch, heads, kv_heads, seq, head_dim] = [2, 6, 2, 300, 16];
        let device = Default::default();
        Flex::seed(&device, 11);
        let data = |heads: usize| {
            Tensor::<Flex, 4>::random(
                [batch, heads, seq, head_dim],
                Distribution::Default,
                &device,
            )
            .into_data()
        };
        let inputs = [data(heads), data(kv_heads), data(kv_heads), data(heads)];
        // Keys hidden beyond causality, as a mask and as each query's first key: packed rows
        // (two documents in the first row, three in the second) and a sliding window of 100.
        let segments: Vec<u32> = (0..seq)
            .map(|p| u32::from(p >= 170))
            .chain((0..seq).map(|p| u32::from(p >= 40) + u32::from(p >= 250)))
            .collect();
        let documents = Documents::<Flex>::of_segments(&segments, batch, seq, &device);
        let window = 100;
        let cases = [
            None,
            Some((
                documents.hidden.into_data(),
                documents.first_keys.expect("runs").into_data(),
            )),
            Some((
                window_mask::<Flex>(seq, seq, window, &device).into_data(),
                window_first_keys::<Flex>(batch, seq, window, &device).into_data(),
            )),
        ];
        for case in cases {
            let cpu_inputs = inputs
                .clone()
                .map(|d| Tensor::<AD, 4>::from_data(d, &device));
            let cpu_mask = case
                .as_ref()
                .map(|(mask, _)| Tensor::<AD, 4, Bool>::from_data(mask.clone(), &device));
            let cpu = run(
                |q, k, v| {
                    on::<AD, Flex>(&q, &k, &v, by_mask(cpu_mask.as_ref()), Kernel::Cpu).expect("op")
                },
                &cpu_inputs,
            );
            let gpu_device = Default::default();
            let gpu_mask = case.as_ref().map(|(mask, _)| {
                Tensor::<Autodiff<Plain>, 4, Bool>::from_data(mask.clone(), &gpu_device)
            });
            let gpu_first = case.as_ref().map(|(_, first)| {
                Tensor::<Autodiff<Plain>, 2>::from_data(first.clone(), &gpu_device)
            });
            // With each query's first key (the kernels), and with the mask alone (burn's ops).
            for first_keys in [gpu_first.as_ref(), None] {
                let hidden = Hidden {
                    mask: gpu_mask.as_ref(),
                    first_keys,
                };
                for kernel in [Kernel::Chunks(128), Kernel::Chunks(512)] {
                    let gpu_inputs = inputs
                        .clone()
                        .map(|d| Tensor::<Autodiff<Plain>, 4>::from_data(d, &gpu_device));
                    let gpu = run(
                        |q, k, v| {
                            on::<Autodiff<Plain>, Plain>(&q, &k, &v, hidden, kernel).expect("op")
                        },
                        &gpu_inputs,
                    );
                    for (gpu, cpu) in gpu.into_iter().zip(&cpu) {
                        gpu.assert_approx_eq::<f32>(cpu, tolerance);
                    }
                }
            }
            // Without autodiff (scoring): the forward pass alone, in the device's chunks.
            let [q, k, v, _] = inputs
                .clone()
                .map(|d| Tensor::<Plain, 4>::from_data(d, &gpu_device));
            let mask = case
                .as_ref()
                .map(|(mask, _)| Tensor::<Plain, 4, Bool>::from_data(mask.clone(), &gpu_device));
            let first_keys = case
                .as_ref()
                .map(|(_, first)| Tensor::<Plain, 2>::from_data(first.clone(), &gpu_device));
            chunked_causal_attention(&q, &k, &v, mask.as_ref(), first_keys.as_ref())
                .expect("the op's forward pass")
                .into_data()
                .assert_approx_eq::<f32>(&cpu[0], tolerance);
        }
    }

    #[cfg(feature = "wgpu")]
    #[test]
    #[ignore = "needs a GPU or a Vulkan driver (wgpu)"]
    fn on_wgpu_the_op_equals_the_cpu_kernel() {
        type Plain = burn_cubecl::CubeBackend<cubecl::wgpu::WgpuRuntime, f32, i32, u32>;
        on_a_gpu_the_op_equals_the_cpu_kernel::<Plain>(
            Tolerance::absolute(1e-5).set_relative(1e-5),
        );
    }

    /// On CUDA burn's f32 products run in TF32 (errors of about 1e-3 here): a wrong kernel is off
    /// by far more.
    #[cfg(feature = "cuda")]
    #[test]
    #[ignore = "needs an NVIDIA GPU, and BURNISH_GPU_KERNELS=all"]
    fn on_cuda_the_op_equals_the_cpu_kernel() {
        type Plain = burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, f32, i32, u8>;
        on_a_gpu_the_op_equals_the_cpu_kernel::<Plain>(
            Tolerance::absolute(2e-2).set_relative(2e-2),
        );
    }
}
