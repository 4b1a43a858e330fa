//! The LoRA configuration and its on-disk form, PEFT's `adapter_config.json` for a causal LM or
//! a sequence classifier (a reward model, whose `score` head PEFT saves whole). Options PEFT has
//! and burnish does not implement (trained biases, other `modules_to_save`, ...) are refused by
//! name when a config is read, never ignored.

use std::path::Path;

use serde_json::{Map, Value, json};

use crate::error::{PeftError, Result};
use crate::target::Targets;

/// How adapter matrices start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraInit {
    /// PEFT's default: A kaiming-uniform (a = √5, i.e. U(±1/√in)), B zero.
    Kaiming,
    /// A normal with std 1/r, B zero.
    Gaussian,
}

/// What the adapted model is, as PEFT's `task_type` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Task {
    /// `CAUSAL_LM`: a language model; only the adapters are saved.
    #[default]
    CausalLm,
    /// `SEQ_CLS`: a sequence classifier (a reward model); PEFT trains and saves its head whole.
    SequenceClassification,
}

/// The heads PEFT adds to `modules_to_save` for a `SEQ_CLS` task: whichever the model has is
/// trained whole and saved beside the adapters.
pub const CLASSIFIER_HEADS: [&str; 2] = ["classifier", "score"];

/// A LoRA adapter's configuration, as PEFT defines it.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub targets: Targets,
    /// Only layers with these indices get adapters (PEFT applies this to list targets only).
    pub layers_to_transform: Option<Vec<usize>>,
    /// The name of the layer list used to find layer indices (`layers` for our models).
    pub layers_pattern: Option<Vec<String>>,
    /// Modules never adapted, with the same matching rules as targets.
    pub exclude_modules: Option<Targets>,
    /// Per-module ranks: regex keys matched against module-name suffixes, first match wins.
    pub rank_pattern: Vec<(String, usize)>,
    /// Per-module alphas, matched like `rank_pattern`.
    pub alpha_pattern: Vec<(String, f64)>,
    /// Scale by `alpha / √r` instead of `alpha / r`.
    pub use_rslora: bool,
    /// DoRA: each adapted layer also learns the magnitude of every output row of its weight.
    pub use_dora: bool,
    pub init: LoraInit,
    pub base_model_name_or_path: Option<String>,
    pub task: Task,
}

impl Default for LoraConfig {
    /// PEFT's defaults: r 8, alpha 8, no dropout; targets must still be chosen.
    fn default() -> Self {
        Self {
            r: 8,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            targets: Targets::List(Vec::new()),
            layers_to_transform: None,
            layers_pattern: None,
            exclude_modules: None,
            rank_pattern: Vec::new(),
            alpha_pattern: Vec::new(),
            use_rslora: false,
            use_dora: false,
            init: LoraInit::Kaiming,
            base_model_name_or_path: None,
            task: Task::CausalLm,
        }
    }
}

/// PEFT options that change what an adapter computes and that burnish does not implement, with
/// the value that means "off".
fn is_off(key: &str, value: &Value) -> Option<bool> {
    let off = match key {
        "fan_in_fan_out" | "lora_bias" | "use_qalora" | "use_bdlora" => {
            matches!(value, Value::Null | Value::Bool(false))
        }
        "bias" => matches!(value, Value::Null) || value == "none",
        "target_parameters"
        | "trainable_token_indices"
        | "layer_replication"
        | "megatron_config"
        | "alora_invocation_tokens"
        | "corda_config"
        | "eva_config" => match value {
            Value::Null => true,
            Value::Array(a) => a.is_empty(),
            Value::Object(o) => o.is_empty(),
            _ => false,
        },
        _ => return None,
    };
    Some(off)
}

impl LoraConfig {
    /// The scale of rank `r` with alpha `alpha` under this config.
    pub fn scale(&self, r: usize, alpha: f64) -> f64 {
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }

    /// Checks the values every adapter needs.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(PeftError::invalid("r", "must be at least 1"));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(PeftError::invalid("lora_dropout", "must be in [0, 1)"));
        }
        if !self.lora_alpha.is_finite() || self.lora_alpha <= 0.0 {
            return Err(PeftError::invalid(
                "lora_alpha",
                "must be a positive number",
            ));
        }
        if let Some((key, _)) = self.rank_pattern.iter().find(|(_, r)| *r == 0) {
            return Err(PeftError::invalid(
                "rank_pattern",
                format!("`{key}` has rank 0"),
            ));
        }
        if let Targets::List(list) = &self.targets
            && list.is_empty()
        {
            return Err(PeftError::invalid(
                "target_modules",
                "is empty; name modules, give a regex, or use \"all-linear\"",
            ));
        }
        if let Targets::Regex(_) = &self.targets {
            for (key, set) in [
                ("layers_to_transform", self.layers_to_transform.is_some()),
                ("layers_pattern", self.layers_pattern.is_some()),
            ] {
                if set {
                    return Err(PeftError::invalid(
                        key,
                        "cannot be used with a regex `target_modules` (PEFT refuses it too); \
                         list the modules or use \"all-linear\", or put the layers in the regex",
                    ));
                }
            }
        }
        self.targets.compile()?;
        if let Some(exclude) = &self.exclude_modules {
            exclude.compile()?;
        }
        Ok(())
    }

    /// Reads PEFT's `adapter_config.json`, refusing options burnish does not implement.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| PeftError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let map: Map<String, Value> =
            serde_json::from_str(&text).map_err(|source| PeftError::Json {
                path: path.to_path_buf(),
                source,
            })?;
        Self::from_json(&map, path)
    }

    /// Parses the JSON object of an `adapter_config.json`; `path` is used in errors.
    pub fn from_json(map: &Map<String, Value>, path: &Path) -> Result<Self> {
        let unsupported = |key: &str, detail: String| PeftError::Unsupported {
            path: path.to_path_buf(),
            key: key.into(),
            detail,
        };
        let peft_type = map.get("peft_type").and_then(Value::as_str).unwrap_or("");
        if peft_type != "LORA" {
            return Err(unsupported(
                "peft_type",
                format!("`{peft_type}`; only LORA adapters can be loaded"),
            ));
        }
        let task = match map.get("task_type") {
            None | Some(Value::Null) => Task::CausalLm,
            Some(v) if v == "CAUSAL_LM" => Task::CausalLm,
            Some(v) if v == "SEQ_CLS" => Task::SequenceClassification,
            Some(v) => {
                return Err(unsupported(
                    "task_type",
                    format!(
                        "{v}; only CAUSAL_LM and SEQ_CLS (reward model) adapters can be loaded"
                    ),
                ));
            }
        };
        // Only a classifier's head may be saved whole, as PEFT saves it for SEQ_CLS.
        let saved_whole: Vec<&str> = match map.get("modules_to_save") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items.iter().map(|v| v.as_str().unwrap_or("")).collect(),
            Some(other) => {
                return Err(unsupported(
                    "modules_to_save",
                    format!("{other}; expected a list of module names"),
                ));
            }
        };
        if let Some(module) = saved_whole
            .iter()
            .find(|m| task != Task::SequenceClassification || !CLASSIFIER_HEADS.contains(m))
        {
            return Err(unsupported(
                "modules_to_save",
                format!(
                    "`{module}`; burnish trains modules whole only for a sequence classifier's \
                     head (`task_type` SEQ_CLS, `score`)"
                ),
            ));
        }
        for (key, value) in map {
            if is_off(key, value) == Some(false) {
                return Err(unsupported(
                    key,
                    format!("{value}; burnish implements plain LoRA only"),
                ));
            }
        }

        let bad = |key: &str| unsupported(key, "has a value of the wrong type".into());
        let number = |key: &str| map.get(key).filter(|v| !v.is_null());
        let r = match number("r") {
            None => 8,
            Some(v) => v.as_u64().ok_or_else(|| bad("r"))? as usize,
        };
        let lora_alpha = match number("lora_alpha") {
            None => 8.0,
            Some(v) => v.as_f64().ok_or_else(|| bad("lora_alpha"))?,
        };
        let lora_dropout = match number("lora_dropout") {
            None => 0.0,
            Some(v) => v.as_f64().ok_or_else(|| bad("lora_dropout"))?,
        };
        let targets = match map.get("target_modules") {
            Some(Value::String(s)) if s == "all-linear" => Targets::AllLinear,
            Some(Value::String(s)) => Targets::Regex(s.clone()),
            Some(Value::Array(items)) => Targets::List(
                items
                    .iter()
                    .map(|v| {
                        v.as_str()
                            .map(String::from)
                            .ok_or_else(|| bad("target_modules"))
                    })
                    .collect::<Result<_>>()?,
            ),
            _ => return Err(bad("target_modules")),
        };
        let exclude_modules = match map.get("exclude_modules") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(Targets::Regex(s.clone())),
            Some(Value::Array(items)) => Some(Targets::List(
                items
                    .iter()
                    .map(|v| {
                        v.as_str()
                            .map(String::from)
                            .ok_or_else(|| bad("exclude_modules"))
                    })
                    .collect::<Result<_>>()?,
            )),
            _ => return Err(bad("exclude_modules")),
        };
        let layers_to_transform = match map.get("layers_to_transform") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => Some(vec![
                n.as_u64().ok_or_else(|| bad("layers_to_transform"))? as usize,
            ]),
            Some(Value::Array(items)) => Some(
                items
                    .iter()
                    .map(|v| {
                        v.as_u64()
                            .map(|i| i as usize)
                            .ok_or_else(|| bad("layers_to_transform"))
                    })
                    .collect::<Result<_>>()?,
            ),
            _ => return Err(bad("layers_to_transform")),
        };
        let layers_pattern = match map.get("layers_pattern") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(vec![s.clone()]),
            Some(Value::Array(items)) => Some(
                items
                    .iter()
                    .map(|v| {
                        v.as_str()
                            .map(String::from)
                            .ok_or_else(|| bad("layers_pattern"))
                    })
                    .collect::<Result<_>>()?,
            ),
            _ => return Err(bad("layers_pattern")),
        };
        let pattern = |key: &str| -> Result<Vec<(String, f64)>> {
            match map.get(key) {
                None | Some(Value::Null) => Ok(Vec::new()),
                Some(Value::Object(o)) => o
                    .iter()
                    .map(|(k, v)| v.as_f64().map(|x| (k.clone(), x)).ok_or_else(|| bad(key)))
                    .collect(),
                _ => Err(bad(key)),
            }
        };
        let rank_pattern = pattern("rank_pattern")?
            .into_iter()
            .map(|(k, v)| (k, v as usize))
            .collect();
        let init = match map.get("init_lora_weights") {
            Some(Value::String(s)) if s == "gaussian" => LoraInit::Gaussian,
            _ => LoraInit::Kaiming,
        };
        let config = Self {
            r,
            lora_alpha,
            lora_dropout,
            targets,
            layers_to_transform,
            layers_pattern,
            exclude_modules,
            rank_pattern,
            alpha_pattern: pattern("alpha_pattern")?,
            use_rslora: map
                .get("use_rslora")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            use_dora: match map.get("use_dora") {
                None | Some(Value::Null) => false,
                Some(v) => v.as_bool().ok_or_else(|| bad("use_dora"))?,
            },
            init,
            base_model_name_or_path: map
                .get("base_model_name_or_path")
                .and_then(Value::as_str)
                .map(String::from),
            task,
        };
        config.validate()?;
        Ok(config)
    }

    /// The `adapter_config.json` object PEFT writes for this config. `target_modules` is
    /// `resolved_targets` (PEFT saves `all-linear` as the module names it expanded to).
    pub fn to_json(&self, resolved_targets: &[String]) -> Value {
        fn num(x: f64) -> Value {
            if x.fract() == 0.0 && x.abs() < 1e15 {
                json!(x as i64)
            } else {
                json!(x)
            }
        }
        let target_modules = match &self.targets {
            Targets::Regex(s) => json!(s),
            Targets::List(_) | Targets::AllLinear => json!(resolved_targets),
        };
        let exclude = match &self.exclude_modules {
            None => Value::Null,
            Some(Targets::Regex(s)) => json!(s),
            Some(Targets::List(l)) => json!(l),
            Some(Targets::AllLinear) => json!("all-linear"),
        };
        let rank_pattern: Map<String, Value> = self
            .rank_pattern
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
        let alpha_pattern: Map<String, Value> = self
            .alpha_pattern
            .iter()
            .map(|(k, v)| (k.clone(), num(*v)))
            .collect();
        json!({
            "alpha_pattern": alpha_pattern,
            "auto_mapping": null,
            "base_model_name_or_path": self.base_model_name_or_path,
            "bias": "none",
            "exclude_modules": exclude,
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": match self.init { LoraInit::Kaiming => json!(true), LoraInit::Gaussian => json!("gaussian") },
            "layers_pattern": self.layers_pattern,
            "layers_to_transform": self.layers_to_transform,
            "lora_alpha": num(self.lora_alpha),
            "lora_bias": false,
            "lora_dropout": self.lora_dropout,
            "modules_to_save": match self.task {
                Task::CausalLm => Value::Null,
                Task::SequenceClassification => json!(CLASSIFIER_HEADS),
            },
            "peft_type": "LORA",
            "r": self.r,
            "rank_pattern": rank_pattern,
            "revision": null,
            "target_modules": target_modules,
            "task_type": match self.task {
                Task::CausalLm => "CAUSAL_LM",
                Task::SequenceClassification => "SEQ_CLS",
            },
            "use_dora": self.use_dora,
            "use_rslora": self.use_rslora,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<LoraConfig> {
        LoraConfig::from_json(v.as_object().unwrap(), Path::new("adapter_config.json"))
    }

    #[test]
    fn trained_bias_and_saved_modules_are_refused_by_name() {
        let base = json!({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "target_modules": ["q_proj"]});
        for (key, value) in [
            ("fan_in_fan_out", json!(true)),
            ("bias", json!("all")),
            ("modules_to_save", json!(["lm_head"])),
        ] {
            let mut v = base.clone();
            v[key] = value;
            let err = parse(v).unwrap_err().to_string();
            assert!(
                err.contains(key) && err.contains("adapter_config.json"),
                "{err}"
            );
        }
        assert!(parse(base).is_ok());
    }

    #[test]
    fn json_round_trip_keeps_every_setting() {
        let config = LoraConfig {
            r: 4,
            lora_alpha: 16.0,
            lora_dropout: 0.05,
            targets: Targets::List(vec!["q_proj".into(), "v_proj".into()]),
            layers_to_transform: Some(vec![1]),
            rank_pattern: vec![("v_proj".into(), 2)],
            alpha_pattern: vec![("q_proj".into(), 3.5)],
            use_rslora: true,
            use_dora: true,
            ..Default::default()
        };
        let json = config.to_json(&["q_proj".into(), "v_proj".into()]);
        assert_eq!(json["lora_alpha"], json!(16));
        assert_eq!(parse(json).unwrap(), config);
    }

    #[test]
    fn invalid_values_name_their_key() {
        let ok = LoraConfig {
            targets: Targets::List(vec!["q_proj".into()]),
            ..Default::default()
        };
        let cases = [
            ("r", LoraConfig { r: 0, ..ok.clone() }),
            (
                "lora_dropout",
                LoraConfig {
                    lora_dropout: 1.0,
                    ..ok.clone()
                },
            ),
            (
                "lora_alpha",
                LoraConfig {
                    lora_alpha: -1.0,
                    ..ok.clone()
                },
            ),
            (
                "target_modules",
                LoraConfig {
                    targets: Targets::Regex("(".into()),
                    ..ok.clone()
                },
            ),
            (
                "target_modules",
                LoraConfig {
                    targets: Targets::List(vec![]),
                    ..ok.clone()
                },
            ),
            (
                "rank_pattern",
                LoraConfig {
                    rank_pattern: vec![("q_proj".into(), 0)],
                    ..ok.clone()
                },
            ),
        ];
        for (key, config) in cases {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
        ok.validate().unwrap();
    }

    #[test]
    fn other_task_types_are_refused() {
        let err = parse(
            json!({"peft_type": "LORA", "task_type": "TOKEN_CLS", "target_modules": ["q_proj"]}),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("task_type"), "{err}");
    }

    /// A reward model's adapter: PEFT saves the classifier head whole, and nothing else may be.
    #[test]
    fn sequence_classifiers_save_their_head_whole() {
        let seq_cls = json!({"peft_type": "LORA", "task_type": "SEQ_CLS", "r": 4,
            "target_modules": ["q_proj"], "modules_to_save": ["classifier", "score"]});
        let config = parse(seq_cls.clone()).unwrap();
        assert_eq!(config.task, Task::SequenceClassification);
        let written = config.to_json(&["q_proj".into()]);
        assert_eq!(written["task_type"], "SEQ_CLS");
        assert_eq!(written["modules_to_save"], json!(["classifier", "score"]));
        assert_eq!(parse(written).unwrap(), config);

        let mut other = seq_cls;
        other["modules_to_save"] = json!(["score", "lm_head"]);
        let err = parse(other).unwrap_err().to_string();
        assert!(
            err.contains("modules_to_save") && err.contains("lm_head"),
            "{err}"
        );
    }
}
