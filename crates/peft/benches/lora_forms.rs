//! Factored LoRA (`x·Wᵀ + s·(x·Aᵀ)·Bᵀ`, what burnish trains with) against the dense form
//! (`x·(W + s·B·A)ᵀ`, rebuilt every step) on the 210 projections of SmolLM2-135M (30 layers ×
//! q, k, v, o, gate, up, down), r = 16 on all, one forward + backward per step on the CPU.
//! Each form runs in its own process so peak memory is its own:
//!
//! ```sh
//! cargo bench --profile dev -p burnish-peft --bench lora_forms -- factored
//! cargo bench --profile dev -p burnish-peft --bench lora_forms -- dense
//! ```

use std::time::Instant;

use burn::backend::{Autodiff, Flex};
use burn::module::Param;
use burn::tensor::module::linear;
use burn::tensor::{Distribution, Tensor};
use burnish_peft::{AdaptableLinear, Lora, LoraInit};

type B = Autodiff<Flex>;

const LAYERS: usize = 30;
const HIDDEN: usize = 576;
const KV: usize = 192;
const FFN: usize = 1536;
const TOKENS: usize = 256;
const RANK: usize = 16;

/// One layer's projections as `(d_out, d_in)`: q, k, v, o, gate, up, down.
const SHAPES: [(usize, usize); 7] = [
    (HIDDEN, HIDDEN),
    (KV, HIDDEN),
    (KV, HIDDEN),
    (HIDDEN, HIDDEN),
    (FFN, HIDDEN),
    (FFN, HIDDEN),
    (HIDDEN, FFN),
];

fn projection(d_out: usize, d_in: usize, device: &burn::tensor::Device<B>) -> AdaptableLinear<B> {
    let weight = Tensor::random([d_out, d_in], Distribution::Normal(0.0, 0.02), device);
    let mut layer = AdaptableLinear::new(weight, None);
    let mut lora = Lora::init([d_out, d_in], RANK, 2.0, 0.0, LoraInit::Kaiming, 0, device);
    // A non-zero B, as after some training.
    lora.lora_b = Param::from_tensor(Tensor::random(
        [d_out, RANK],
        Distribution::Normal(0.0, 0.02),
        device,
    ));
    layer.attach(lora);
    layer
}

/// The dense form: the update is added to the frozen weight, then one matmul.
fn dense_forward(layer: &AdaptableLinear<B>, x: Tensor<B, 2>) -> Tensor<B, 2> {
    let lora = layer
        .lora
        .as_ref()
        .expect("every projection has an adapter");
    let weight = layer.weight.val() + lora.delta_weight();
    linear(x, weight.transpose(), None)
}

fn step(layers: &[Vec<AdaptableLinear<B>>], x: &Tensor<B, 2>, dense: bool) {
    let apply = |l: &AdaptableLinear<B>, x: Tensor<B, 2>| {
        if dense {
            dense_forward(l, x)
        } else {
            l.forward(x)
        }
    };
    let mut h = x.clone();
    for p in layers {
        let q = apply(&p[0], h.clone());
        let k = apply(&p[1], h.clone());
        let v = apply(&p[2], h.clone());
        let o = apply(&p[3], q);
        let mlp = apply(&p[4], h.clone()) * apply(&p[5], h.clone());
        let down = apply(&p[6], mlp);
        h = h + o + down + (k + v).sum_dim(1).div_scalar(KV as f64);
    }
    let grads = h.sum().backward();
    let lora = p0_lora(&layers[0][0]);
    assert!(lora.lora_a.val().grad(&grads).is_some());
}

fn p0_lora(l: &AdaptableLinear<B>) -> &Lora<B> {
    l.lora.as_ref().expect("every projection has an adapter")
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn main() {
    let form = std::env::args()
        .skip(1)
        .find(|a| a == "factored" || a == "dense");
    let Some(form) = form else {
        eprintln!(
            "usage: cargo bench --profile dev -p burnish-peft --bench lora_forms -- factored|dense"
        );
        return;
    };
    let dense = form == "dense";
    let device = Default::default();
    let layers: Vec<Vec<AdaptableLinear<B>>> = (0..LAYERS)
        .map(|_| {
            SHAPES
                .iter()
                .map(|&(o, i)| projection(o, i, &device))
                .collect()
        })
        .collect();
    let x = Tensor::<B, 2>::random([TOKENS, HIDDEN], Distribution::Normal(0.0, 1.0), &device);
    step(&layers, &x, dense);
    let steps = 3;
    let start = Instant::now();
    for _ in 0..steps {
        step(&layers, &x, dense);
    }
    let ms = start.elapsed().as_secs_f64() * 1e3 / steps as f64;
    println!(
        "{form}: {ms:.0} ms/step (forward + backward, {TOKENS} tokens, r = {RANK}), peak RSS {:.0} MiB",
        peak_rss_mib()
    );
}
