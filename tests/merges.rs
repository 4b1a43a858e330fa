//! Merge methods against PEFT 0.21's `merge_utils` (task arithmetic, magnitude pruning, TIES,
//! DARE given the same keep-masks) and the linear / SLERP formulas, on the golden tensors of
//! `scripts/golden/make_adapters.py`. Tolerance: 1e-6 absolute.

use std::collections::BTreeMap;
use std::path::PathBuf;

use burnish_peft::decode_f32;
use burnish_peft::merge_methods::{
    SignMethod, dare_linear, dare_ties, linear, magnitude_prune, slerp, task_arithmetic, ties,
};
use safetensors::SafeTensors;

use crate::fixtures::max_abs_diff;

const WEIGHTS: [f32; 3] = [0.5, 0.3, 0.8];
const DENSITY: f64 = 0.4;

fn golden() -> BTreeMap<String, Vec<f32>> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/merges/golden.safetensors");
    let bytes = std::fs::read(path).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    file.tensors()
        .into_iter()
        .map(|(n, v)| (n, decode_f32(&v).unwrap()))
        .collect()
}

fn assert_close(ours: &[f32], theirs: &[f32], what: &str) {
    assert_eq!(ours.len(), theirs.len(), "{what}");
    let worst = max_abs_diff(ours, theirs);
    assert!(worst <= 1e-6, "{what}: max |Δ| = {worst:e}");
}

#[test]
fn every_merge_method_matches_its_reference() {
    let g = golden();
    let tasks: Vec<&[f32]> = (0..3).map(|i| g[&format!("task_{i}")].as_slice()).collect();
    assert_close(
        &task_arithmetic(&tasks, &WEIGHTS).unwrap(),
        &g["task_arithmetic"],
        "task_arithmetic",
    );

    let pruned: Vec<Vec<f32>> = tasks.iter().map(|t| magnitude_prune(t, DENSITY)).collect();
    let pruned: Vec<&[f32]> = pruned.iter().map(Vec::as_slice).collect();
    assert_close(
        &task_arithmetic(&pruned, &WEIGHTS).unwrap(),
        &g["magnitude_prune"],
        "magnitude_prune",
    );

    assert_close(
        &ties(&tasks, &WEIGHTS, DENSITY, SignMethod::Total).unwrap(),
        &g["ties_total"],
        "ties total",
    );
    assert_close(
        &ties(&tasks, &WEIGHTS, DENSITY, SignMethod::Frequency).unwrap(),
        &g["ties_frequency"],
        "ties frequency",
    );

    let masks: Vec<Vec<f32>> = (0..3)
        .map(|i| g[&format!("dare_mask_{i}")].clone())
        .collect();
    assert_close(
        &dare_linear(&tasks, &WEIGHTS, DENSITY, &masks).unwrap(),
        &g["dare_linear"],
        "dare_linear",
    );
    assert_close(
        &dare_ties(&tasks, &WEIGHTS, DENSITY, SignMethod::Total, &masks).unwrap(),
        &g["dare_ties"],
        "dare_ties",
    );

    let base = &g["base"];
    let models: Vec<Vec<f32>> = tasks
        .iter()
        .map(|t| t.iter().zip(base).map(|(a, b)| a + b).collect())
        .collect();
    let models: Vec<&[f32]> = models.iter().map(Vec::as_slice).collect();
    assert_close(&linear(&models, &WEIGHTS).unwrap(), &g["linear"], "linear");
    assert_close(
        &slerp(0.3, models[0], models[1]).unwrap(),
        &g["slerp_0.3"],
        "slerp",
    );
    let doubled: Vec<f32> = models[0].iter().map(|x| 2.0 * x).collect();
    assert_close(
        &slerp(0.6, models[0], &doubled).unwrap(),
        &g["slerp_parallel"],
        "slerp, parallel inputs",
    );
}
