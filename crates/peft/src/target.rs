//! Which modules get an adapter, by PEFT's rules: a list matches a module whose name equals an
//! entry or ends with `.entry`; a string is a regex that must match the whole name;
//! `all-linear` is every linear but the LM head. `layers_to_transform` narrows list targets to
//! some layer indices; `rank_pattern` / `alpha_pattern` override r and alpha per module.

use regex::Regex;

use crate::config::LoraConfig;
use crate::error::{PeftError, Result};

/// The name of the output projection, never adapted by `all-linear`.
pub const LM_HEAD: &str = "lm_head";

/// The modules an adapter targets.
#[derive(Debug, Clone, PartialEq)]
pub enum Targets {
    /// Module names or name suffixes (`q_proj` matches `model.layers.0.self_attn.q_proj`).
    List(Vec<String>),
    /// A regular expression matched against the whole module name.
    Regex(String),
    /// Every linear module except `lm_head`.
    AllLinear,
}

impl Targets {
    /// Checks a regex target compiles.
    pub(crate) fn compile(&self) -> Result<()> {
        if let Self::Regex(pattern) = self {
            full_match_regex(pattern, "target_modules")?;
        }
        Ok(())
    }

    fn matches(&self, name: &str) -> Result<bool> {
        Ok(match self {
            Self::List(list) => list
                .iter()
                .any(|t| name == t || name.ends_with(&format!(".{t}"))),
            Self::Regex(pattern) => full_match_regex(pattern, "target_modules")?.is_match(name),
            Self::AllLinear => leaf(name) != LM_HEAD,
        })
    }

    fn describe(&self) -> String {
        match self {
            Self::List(list) => format!("{list:?}"),
            Self::Regex(pattern) => format!("regex `{pattern}`"),
            Self::AllLinear => "\"all-linear\"".into(),
        }
    }
}

fn full_match_regex(pattern: &str, key: &str) -> Result<Regex> {
    Regex::new(&format!("^(?:{pattern})$"))
        .map_err(|e| PeftError::invalid(key, format!("`{pattern}` is not a valid regex: {e}")))
}

/// The last component of a dotted module name.
fn leaf(name: &str) -> &str {
    name.rsplit('.').next().unwrap_or(name)
}

/// A module chosen for an adapter, with its own rank and alpha.
#[derive(Debug, Clone, PartialEq)]
pub struct Selected {
    pub name: String,
    pub r: usize,
    pub alpha: f64,
}

/// The layer index in a module name such as `model.layers.3.mlp.up_proj`.
fn layer_index(name: &str, layers_pattern: Option<&[String]>) -> Option<usize> {
    let patterns: Vec<String> = match layers_pattern {
        None => vec![r"^.*?\.[^.]*\.(\d+)\.".into()],
        Some(list) => list
            .iter()
            .map(|p| format!(r"^(?:.*?\.)?{p}\.(\d+)\."))
            .collect(),
    };
    patterns.iter().find_map(|p| {
        Regex::new(p)
            .ok()?
            .captures(name)
            .and_then(|c| c[1].parse().ok())
    })
}

/// The first pattern key that matches `name` as PEFT's `get_pattern_key` does.
fn pattern_value<T: Copy>(patterns: &[(String, T)], name: &str) -> Result<Option<T>> {
    for (key, value) in patterns {
        let re = Regex::new(&format!(r"^(.*\.)?({key})$")).map_err(|e| {
            PeftError::invalid("rank_pattern/alpha_pattern", format!("`{key}`: {e}"))
        })?;
        if re.is_match(name) {
            return Ok(Some(*value));
        }
    }
    Ok(None)
}

/// Chooses, among the model's linear modules `names`, those `config` targets, with their rank and
/// alpha. An empty choice is an error listing the modules that exist.
pub fn select_targets(names: &[String], config: &LoraConfig) -> Result<Vec<Selected>> {
    config.validate()?;
    let mut chosen = Vec::new();
    for name in names {
        if let Some(exclude) = &config.exclude_modules
            && exclude.matches(name)?
        {
            continue;
        }
        if !config.targets.matches(name)? {
            continue;
        }
        // PEFT narrows by layer for list targets and for `all-linear`, which it expands to a
        // list first; it refuses layers with a regex (`LoraConfig::validate` does too).
        if let Some(layers) = &config.layers_to_transform
            && !matches!(config.targets, Targets::Regex(_))
            && !layer_index(name, config.layers_pattern.as_deref())
                .is_some_and(|i| layers.contains(&i))
        {
            continue;
        }
        chosen.push(Selected {
            name: name.clone(),
            r: pattern_value(&config.rank_pattern, name)?.unwrap_or(config.r),
            alpha: pattern_value(&config.alpha_pattern, name)?.unwrap_or(config.lora_alpha),
        });
    }
    if chosen.is_empty() {
        let mut leaves: Vec<&str> = names.iter().map(|n| leaf(n)).collect();
        leaves.sort_unstable();
        leaves.dedup();
        return Err(PeftError::NoTargetMatched {
            targets: config.targets.describe(),
            available: leaves.join(", "),
        });
    }
    Ok(chosen)
}

/// The `target_modules` list PEFT writes for a selection: the distinct leaf names, sorted.
pub fn resolved_target_names(selected: &[Selected]) -> Vec<String> {
    let mut leaves: Vec<String> = selected.iter().map(|s| leaf(&s.name).to_string()).collect();
    leaves.sort();
    leaves.dedup();
    leaves
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        let mut out = Vec::new();
        for i in 0..3 {
            for m in ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"] {
                out.push(format!("model.layers.{i}.{m}"));
            }
        }
        out.push(LM_HEAD.into());
        out
    }

    fn config(targets: Targets) -> LoraConfig {
        LoraConfig {
            r: 4,
            lora_alpha: 8.0,
            targets,
            ..Default::default()
        }
    }

    fn chosen(c: &LoraConfig) -> Vec<String> {
        select_targets(&names(), c)
            .unwrap()
            .into_iter()
            .map(|s| s.name)
            .collect()
    }

    #[test]
    fn list_targets_match_by_dotted_suffix_only() {
        let c = config(Targets::List(vec!["q_proj".into(), "proj".into()]));
        let got = chosen(&c);
        assert_eq!(got.len(), 3);
        assert!(got.iter().all(|n| n.ends_with(".q_proj")));
    }

    #[test]
    fn regex_must_match_the_whole_name() {
        let c = config(Targets::Regex(r".*\.1\..*_proj".into()));
        assert_eq!(chosen(&c).len(), 3);
        let c = config(Targets::Regex("q_proj".into()));
        assert!(select_targets(&names(), &c).is_err());
    }

    #[test]
    fn all_linear_skips_the_lm_head() {
        let got = chosen(&config(Targets::AllLinear));
        assert_eq!(got.len(), 9);
        assert!(!got.contains(&LM_HEAD.to_string()));
    }

    #[test]
    fn layers_to_transform_and_patterns() {
        let mut c = config(Targets::List(vec!["q_proj".into(), "down_proj".into()]));
        c.layers_to_transform = Some(vec![0, 2]);
        c.rank_pattern = vec![("down_proj".into(), 2)];
        c.alpha_pattern = vec![(r"layers\.2\.self_attn\.q_proj".into(), 1.0)];
        let got = select_targets(&names(), &c).unwrap();
        assert_eq!(got.len(), 4);
        let find = |n: &str| got.iter().find(|s| s.name == n).unwrap().clone();
        assert_eq!(find("model.layers.0.mlp.down_proj").r, 2);
        assert_eq!(find("model.layers.0.self_attn.q_proj").r, 4);
        assert_eq!(find("model.layers.2.self_attn.q_proj").alpha, 1.0);
        assert_eq!(find("model.layers.0.self_attn.q_proj").alpha, 8.0);
    }

    #[test]
    fn layers_to_transform_narrows_all_linear_as_its_expanded_list() {
        let mut c = config(Targets::AllLinear);
        c.layers_to_transform = Some(vec![1]);
        let got = chosen(&c);
        assert_eq!(got.len(), 3);
        assert!(
            got.iter().all(|n| n.starts_with("model.layers.1.")),
            "{got:?}"
        );
        // What is saved (the expanded names beside the same layers) selects the same modules.
        let saved = config(Targets::List(resolved_target_names(
            &select_targets(&names(), &c).unwrap(),
        )));
        let reloaded = LoraConfig {
            layers_to_transform: Some(vec![1]),
            ..saved
        };
        assert_eq!(chosen(&reloaded), got);
    }

    #[test]
    fn a_target_matching_nothing_lists_what_exists() {
        let err = select_targets(&names(), &config(Targets::List(vec!["c_attn".into()])))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("c_attn") && err.contains("q_proj") && err.contains("down_proj"),
            "{err}"
        );
    }
}
