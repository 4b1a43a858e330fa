//! The CPU's products with a frozen bf16 weight (`cpu_bf16`), both ways (`x·Wᵀ` forward, `x·W`
//! for the activations' gradient), on SmolLM2-135M's widest projection (`[1536, 576]`) and its
//! LM head (`[49152, 576]`), at 1, 128 and 512 rows: one row shows what a call costs whatever
//! its rows (the weight's packing, the thread pool), more rows the kernel's throughput.
//!
//! ```sh
//! cargo bench -p burnish-peft --bench bf16_product
//! ```

use std::time::Instant;

use burn::backend::Flex;
use burn::tensor::{Distribution, FloatDType, Tensor};
use burnish_peft::{cpu_bf16_available, project, unproject};

type B = Flex;

/// Best milliseconds of `runs` calls of `f` (the VM's neighbours add noise, never speed).
fn best_ms(runs: usize, mut f: impl FnMut()) -> f64 {
    (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::MAX, f64::min)
}

fn main() {
    if !cpu_bf16_available() {
        println!("this CPU has no AVX512-BF16: bf16 products take burn-flex's f32 path");
    }
    let device = Default::default();
    for (name, out, inner) in [("up_proj", 1536, 576), ("lm_head", 49152, 576)] {
        let weight = Tensor::<B, 2>::random([out, inner], Distribution::Normal(0.0, 0.02), &device)
            .cast(FloatDType::BF16);
        for rows in [1usize, 128, 512] {
            let x = Tensor::<B, 2>::random([rows, inner], Distribution::Default, &device);
            let g = Tensor::<B, 2>::random([rows, out], Distribution::Default, &device);
            let runs = if out > 10_000 { 5 } else { 30 };
            let forward = best_ms(runs, || {
                let _ = project(x.clone(), weight.clone());
            });
            let backward = best_ms(runs, || {
                let _ = unproject(g.clone(), weight.clone());
            });
            let gflops = |ms: f64| 2.0 * (rows * out * inner) as f64 / ms / 1e6;
            println!(
                "{name} [{out}, {inner}], {rows:>3} rows: x·Wᵀ {forward:.3} ms ({:.0} GFLOP/s), x·W {backward:.3} ms ({:.0} GFLOP/s)",
                gflops(forward),
                gflops(backward)
            );
        }
    }
}
