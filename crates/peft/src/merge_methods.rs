//! Merging several task vectors (fine-tuned minus base weights, or adapter updates `s·B·A`) or
//! whole weight tensors into one, element by element, with the methods of PEFT's `merge_utils`
//! and mergekit: weighted linear average, task arithmetic, TIES, DARE (linear and TIES) and SLERP.
//! Everything works on flat f32 slices of one tensor at a time.

use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::error::{PeftError, Result};

/// How TIES elects the sign each element keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignMethod {
    /// The sign of the sum of the values.
    Total,
    /// The sign held by more of the values.
    Frequency,
}

fn check(tasks: &[&[f32]], weights: &[f32]) -> Result<usize> {
    let n = tasks
        .first()
        .map(|t| t.len())
        .ok_or_else(|| PeftError::Merge("nothing to merge".into()))?;
    if tasks.len() != weights.len() {
        return Err(PeftError::Merge(format!(
            "{} inputs but {} weights",
            tasks.len(),
            weights.len()
        )));
    }
    if tasks.iter().any(|t| t.len() != n) {
        return Err(PeftError::Merge("inputs have different sizes".into()));
    }
    Ok(n)
}

fn check_density(density: f64) -> Result<()> {
    if !(density > 0.0 && density <= 1.0) {
        return Err(PeftError::Merge(format!(
            "density {density} must be in (0, 1]"
        )));
    }
    Ok(())
}

/// `Σ wᵢ·tᵢ`.
pub fn task_arithmetic(tasks: &[&[f32]], weights: &[f32]) -> Result<Vec<f32>> {
    let n = check(tasks, weights)?;
    Ok((0..n)
        .map(|j| {
            tasks
                .iter()
                .zip(weights)
                .fold(0.0f32, |acc, (t, w)| acc + t[j] * w)
        })
        .collect())
}

/// `Σ wᵢ·mᵢ / Σ wᵢ`: the weighted average of whole weights.
pub fn linear(models: &[&[f32]], weights: &[f32]) -> Result<Vec<f32>> {
    let total: f32 = weights.iter().sum();
    if total == 0.0 {
        return Err(PeftError::Merge("linear merge weights sum to zero".into()));
    }
    Ok(task_arithmetic(models, weights)?
        .into_iter()
        .map(|v| v / total)
        .collect())
}

/// Keeps the `⌊density·n⌋` values of largest magnitude, zeroing the rest.
pub fn magnitude_prune(tensor: &[f32], density: f64) -> Vec<f32> {
    if density >= 1.0 {
        return tensor.to_vec();
    }
    let k = (density * tensor.len() as f64) as usize;
    let mut order: Vec<usize> = (0..tensor.len()).collect();
    order.sort_by(|&a, &b| tensor[b].abs().total_cmp(&tensor[a].abs()));
    let mut out = vec![0.0; tensor.len()];
    for &i in &order[..k] {
        out[i] = tensor[i];
    }
    out
}

/// A seeded keep-mask for DARE: each element kept (1.0) with probability `density`.
pub fn dare_mask(len: usize, density: f64, rng: &mut StdRng) -> Vec<f32> {
    (0..len)
        .map(|_| {
            if rng.random::<f64>() < density {
                1.0
            } else {
                0.0
            }
        })
        .collect()
}

/// DARE's drop and rescale with a given keep-mask: `t·mask / density`.
pub fn drop_and_rescale(tensor: &[f32], mask: &[f32], density: f64) -> Vec<f32> {
    let density = density as f32;
    tensor
        .iter()
        .zip(mask)
        .map(|(t, m)| t * m / density)
        .collect()
}

/// TIES' sign election and disjoint mean: for each element, the weighted values whose sign
/// matches the elected sign (computed on the unweighted `tasks`) are averaged.
fn elect_and_merge(tasks: &[Vec<f32>], weights: &[f32], sign: SignMethod) -> Vec<f32> {
    let n = tasks[0].len();
    (0..n)
        .map(|j| {
            let magnitude: f32 = match sign {
                SignMethod::Total => tasks.iter().map(|t| t[j]).sum(),
                SignMethod::Frequency => tasks.iter().map(|t| signum(t[j])).sum(),
            };
            let elected = if magnitude >= 0.0 { 1.0 } else { -1.0 };
            let (sum, count) =
                tasks
                    .iter()
                    .zip(weights)
                    .fold((0.0f32, 0.0f32), |(s, c), (t, w)| {
                        if signum(t[j]) == elected {
                            (s + t[j] * w, c + 1.0)
                        } else {
                            (s, c)
                        }
                    });
            sum / count.max(1.0)
        })
        .collect()
}

/// `torch.sign`: -1, 0 or 1.
fn signum(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// TIES: trim each task to its largest-magnitude `density` fraction, elect a sign per element,
/// and average the weighted values that agree with it.
pub fn ties(tasks: &[&[f32]], weights: &[f32], density: f64, sign: SignMethod) -> Result<Vec<f32>> {
    check(tasks, weights)?;
    check_density(density)?;
    let trimmed: Vec<Vec<f32>> = tasks.iter().map(|t| magnitude_prune(t, density)).collect();
    Ok(elect_and_merge(&trimmed, weights, sign))
}

/// Drops and rescales every task with its mask; the masks come from [`dare_masks`].
fn dare_drop(tasks: &[&[f32]], density: f64, masks: &[Vec<f32>]) -> Result<Vec<Vec<f32>>> {
    check_density(density)?;
    if masks.len() != tasks.len() || masks.iter().zip(tasks).any(|(m, t)| m.len() != t.len()) {
        return Err(PeftError::Merge(
            "one mask per input, of its size, is needed".into(),
        ));
    }
    Ok(tasks
        .iter()
        .zip(masks)
        .map(|(t, m)| drop_and_rescale(t, m, density))
        .collect())
}

/// One seeded DARE keep-mask per task.
pub fn dare_masks(tasks: &[&[f32]], density: f64, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    tasks
        .iter()
        .map(|t| dare_mask(t.len(), density, &mut rng))
        .collect()
}

/// DARE-linear: random drop with rescale, then `Σ wᵢ·tᵢ`.
pub fn dare_linear(
    tasks: &[&[f32]],
    weights: &[f32],
    density: f64,
    masks: &[Vec<f32>],
) -> Result<Vec<f32>> {
    check(tasks, weights)?;
    let dropped = dare_drop(tasks, density, masks)?;
    let views: Vec<&[f32]> = dropped.iter().map(Vec::as_slice).collect();
    task_arithmetic(&views, weights)
}

/// DARE-TIES: random drop with rescale, then TIES' sign election and disjoint mean.
pub fn dare_ties(
    tasks: &[&[f32]],
    weights: &[f32],
    density: f64,
    sign: SignMethod,
    masks: &[Vec<f32>],
) -> Result<Vec<f32>> {
    check(tasks, weights)?;
    let dropped = dare_drop(tasks, density, masks)?;
    Ok(elect_and_merge(&dropped, weights, sign))
}

/// Spherical interpolation between two weight tensors at `t` (mergekit's SLERP): the angle is
/// measured between the normalised tensors; nearly parallel tensors are interpolated linearly.
pub fn slerp(t: f32, v0: &[f32], v1: &[f32]) -> Result<Vec<f32>> {
    check(&[v0, v1], &[1.0, 1.0])?;
    const PARALLEL: f32 = 0.9995;
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let (n0, n1) = (norm(v0), norm(v1));
    let lerp = || {
        v0.iter()
            .zip(v1)
            .map(|(a, b)| (1.0 - t) * a + t * b)
            .collect()
    };
    if n0 == 0.0 || n1 == 0.0 {
        return Ok(lerp());
    }
    let dot: f32 = v0.iter().zip(v1).map(|(a, b)| (a / n0) * (b / n1)).sum();
    if dot.abs() > PARALLEL {
        return Ok(lerp());
    }
    let theta_0 = dot.acos();
    let theta_t = theta_0 * t;
    let s0 = (theta_0 - theta_t).sin() / theta_0.sin();
    let s1 = theta_t.sin() / theta_0.sin();
    Ok(v0.iter().zip(v1).map(|(a, b)| s0 * a + s1 * b).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dare_masks_are_seeded_and_keep_about_density() {
        let t = vec![1.0f32; 20_000];
        let masks = dare_masks(&[&t], 0.3, 5);
        assert_eq!(masks, dare_masks(&[&t], 0.3, 5));
        assert_ne!(masks, dare_masks(&[&t], 0.3, 6));
        let kept = masks[0].iter().sum::<f32>() / t.len() as f32;
        assert!((kept - 0.3).abs() < 0.02, "kept {kept}");
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(task_arithmetic(&[&[1.0], &[1.0, 2.0]], &[1.0, 1.0]).is_err());
        assert!(ties(&[&[1.0]], &[1.0], 0.0, SignMethod::Total).is_err());
        assert!(linear(&[&[1.0]], &[0.0]).is_err());
    }
}
