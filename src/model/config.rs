//! Model configuration: the three released MARLIN models by name, and custom models from the
//! reference YAML format.

use serde::{Deserialize, Serialize};
use std::path::Path;

/// Width, depth and heads of one transformer stack (encoder or decoder).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StackConfig {
    pub embed_dim: usize,
    pub depth: usize,
    pub num_heads: usize,
}

/// Learning-rate schedule keys of the reference YAML (used by pretraining).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LearningRateConfig {
    pub base: f64,
    pub warmup: f64,
    pub min: f64,
    pub warmup_epochs: usize,
}

/// Optimiser keys of the reference YAML (used by pretraining).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptimizerConfig {
    #[serde(rename = "type")]
    pub kind: String,
    pub eps: f64,
    pub betas: [f64; 2],
}

/// A MARLIN model: architecture plus the training keys the reference YAML carries.
///
/// Field names are the reference's YAML keys, so a reference config file loads unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MarlinConfig {
    #[serde(default)]
    pub model_name: Option<String>,
    pub img_size: usize,
    pub patch_size: usize,
    pub clip_frames: usize,
    pub tubelet_size: usize,
    pub mlp_ratio: f64,
    pub qkv_bias: bool,
    #[serde(default)]
    pub qk_scale: Option<f64>,
    #[serde(default)]
    pub drop_rate: f64,
    #[serde(default)]
    pub attn_drop_rate: f64,
    #[serde(default = "default_norm_layer")]
    pub norm_layer: String,
    #[serde(default)]
    pub init_values: f64,
    pub encoder: StackConfig,
    pub decoder: StackConfig,
    // Training keys (optional for inference).
    #[serde(default = "default_mask_strategy")]
    pub mask_strategy: String,
    #[serde(default = "default_sample_rate")]
    pub temporal_sample_rate: usize,
    #[serde(default = "default_mask_ratio")]
    pub mask_percentage_target: f64,
    #[serde(default = "default_true")]
    pub adv_loss: bool,
    #[serde(default = "default_adv_weight")]
    pub adv_weight: f64,
    #[serde(default)]
    pub gp_weight: f64,
    #[serde(default = "default_one")]
    pub d_steps: usize,
    #[serde(default = "default_one")]
    pub g_steps: usize,
    #[serde(default)]
    pub learning_rate: Option<LearningRateConfig>,
    #[serde(default)]
    pub optimizer: Option<OptimizerConfig>,
    #[serde(default)]
    pub weight_decay: f64,
}

fn default_norm_layer() -> String {
    "LayerNorm".into()
}
fn default_mask_strategy() -> String {
    "fasking".into()
}
fn default_sample_rate() -> usize {
    2
}
fn default_mask_ratio() -> f64 {
    0.9
}
fn default_true() -> bool {
    true
}
fn default_adv_weight() -> f64 {
    0.01
}
fn default_one() -> usize {
    1
}

/// Names of the released models, in size order.
pub const RELEASED_MODELS: [&str; 3] = [
    "marlin_vit_small_ytf",
    "marlin_vit_base_ytf",
    "marlin_vit_large_ytf",
];

/// Name of the CPU smoke-run config (`MarlinConfig::tiny_smoke`).
pub const TINY_SMOKE: &str = "tiny_smoke";

/// An invalid or unknown configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("unknown model '{0}' (known: marlin_vit_small_ytf, marlin_vit_base_ytf, marlin_vit_large_ytf)")]
    UnknownModel(String),
    #[error("unknown config '{0}' (known: marlin_vit_small_ytf, marlin_vit_base_ytf, marlin_vit_large_ytf, tiny_smoke)")]
    UnknownTemplate(String),
    #[error("{path}: cannot read config: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a MARLIN config: {source}")]
    Yaml {
        path: String,
        source: serde_yaml::Error,
    },
    #[error("invalid config{}: {msg}", name.as_deref().map(|n| format!(" '{n}'")).unwrap_or_default())]
    Invalid { name: Option<String>, msg: String },
}

impl MarlinConfig {
    /// A released model by name (`marlin_vit_{small,base,large}_ytf`).
    pub fn from_name(name: &str) -> Result<Self, ConfigError> {
        let (enc, dec) = match name {
            "marlin_vit_small_ytf" => ((384, 12, 6), (192, 4, 3)),
            "marlin_vit_base_ytf" => ((768, 12, 12), (384, 4, 6)),
            "marlin_vit_large_ytf" => ((1024, 24, 16), (512, 12, 8)),
            _ => return Err(ConfigError::UnknownModel(name.to_string())),
        };
        let stack = |(embed_dim, depth, num_heads)| StackConfig {
            embed_dim,
            depth,
            num_heads,
        };
        Ok(Self {
            model_name: Some(name.to_string()),
            img_size: 224,
            patch_size: 16,
            clip_frames: 16,
            tubelet_size: 2,
            mlp_ratio: 4.0,
            qkv_bias: true,
            qk_scale: None,
            drop_rate: 0.0,
            attn_drop_rate: 0.0,
            norm_layer: default_norm_layer(),
            init_values: 0.0,
            encoder: stack(enc),
            decoder: stack(dec),
            mask_strategy: default_mask_strategy(),
            temporal_sample_rate: 2,
            mask_percentage_target: 0.9,
            adv_loss: true,
            adv_weight: 0.01,
            gp_weight: 0.0,
            d_steps: 1,
            g_steps: 1,
            learning_rate: Some(LearningRateConfig {
                base: 1.5e-4,
                warmup: 1e-6,
                min: 1e-5,
                warmup_epochs: 40,
            }),
            optimizer: Some(OptimizerConfig {
                kind: "AdamW".into(),
                eps: 1e-8,
                betas: [0.9, 0.95],
            }),
            weight_decay: 0.0,
        })
    }

    /// A tiny model for CPU smoke runs of `marlin pretrain` (`marlin config tiny_smoke`): 32 px
    /// frames, 8 px patches, 16 frames, encoder and decoder 64 wide and 2 deep. Its schedule
    /// (base 2.0, i.e. 1.6e-2 at batch 2 after the batch/256 scaling; 40 warmup epochs) is
    /// the one with which 300 steps at batch 2 on one face video bring the face back in the
    /// reconstruction of held-out frames (tests/suite/pretrain_run.rs); the reference's 1.5e-4 is for
    /// ViT-B at batch 64.
    pub fn tiny_smoke() -> Self {
        let mut cfg = Self::from_name("marlin_vit_small_ytf").expect("a released name");
        cfg.model_name = Some(TINY_SMOKE.into());
        cfg.img_size = 32;
        cfg.patch_size = 8;
        let stack = StackConfig {
            embed_dim: 64,
            depth: 2,
            num_heads: 4,
        };
        cfg.encoder = stack.clone();
        cfg.decoder = stack;
        cfg.learning_rate = Some(LearningRateConfig {
            base: 2.0,
            warmup: 1e-3,
            min: 2e-2,
            warmup_epochs: 40,
        });
        cfg
    }

    /// A released model or `tiny_smoke`, by name, for `marlin config`.
    pub fn template(name: &str) -> Result<Self, ConfigError> {
        if name == TINY_SMOKE {
            return Ok(Self::tiny_smoke());
        }
        Self::from_name(name).map_err(|_| ConfigError::UnknownTemplate(name.to_string()))
    }

    /// Parse a reference-format YAML string and validate it.
    pub fn from_yaml_str(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let mut cfg: Self = serde_yaml::from_str(text).map_err(|source| ConfigError::Yaml {
            path: origin.to_string(),
            source,
        })?;
        if cfg.model_name.is_none() {
            cfg.model_name = Path::new(origin)
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned());
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Read a reference-format YAML file and validate it.
    pub fn from_yaml_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_yaml_str(&text, &path.display().to_string()).map_err(|e| match e {
            // Name the file, which is what the user can open and fix.
            ConfigError::Invalid { msg, .. } => ConfigError::Invalid {
                name: Some(path.display().to_string()),
                msg,
            },
            e => e,
        })
    }

    /// Serialise in the reference YAML format.
    pub fn to_yaml(&self) -> String {
        // Serialising plain data to YAML cannot fail.
        serde_yaml::to_string(self).expect("config serialises")
    }

    /// Check that the sizes fit together; one message naming what is wrong.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |msg: String| {
            Err(ConfigError::Invalid {
                name: self.model_name.clone(),
                msg,
            })
        };
        if self.patch_size == 0
            || self.img_size == 0
            || !self.img_size.is_multiple_of(self.patch_size)
        {
            return err(format!(
                "patch_size {} must divide img_size {}",
                self.patch_size, self.img_size
            ));
        }
        if self.tubelet_size == 0
            || self.clip_frames == 0
            || !self.clip_frames.is_multiple_of(self.tubelet_size)
        {
            return err(format!(
                "tubelet_size {} must divide clip_frames {}",
                self.tubelet_size, self.clip_frames
            ));
        }
        for (key, v) in [
            ("gp_weight", self.gp_weight),
            ("adv_weight", self.adv_weight),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return err(format!("{key} {v} must be a number >= 0"));
            }
        }
        for (part, s) in [("encoder", &self.encoder), ("decoder", &self.decoder)] {
            if s.embed_dim == 0 || s.num_heads == 0 || s.embed_dim % s.num_heads != 0 {
                return err(format!(
                    "{part}.num_heads {} must divide {part}.embed_dim {}",
                    s.num_heads, s.embed_dim
                ));
            }
            if s.embed_dim % 2 != 0 {
                return err(format!(
                    "{part}.embed_dim {} must be even (sin-cos position table)",
                    s.embed_dim
                ));
            }
        }
        if self.encoder.depth == 0 {
            return err("encoder.depth must be at least 1".into());
        }
        if self.mlp_ratio.is_nan() || self.mlp_ratio <= 0.0 {
            return err(format!("mlp_ratio {} must be positive", self.mlp_ratio));
        }
        if self.norm_layer != "LayerNorm" {
            return err(format!(
                "norm_layer '{}' is not supported (only LayerNorm)",
                self.norm_layer
            ));
        }
        if !(0.0..1.0).contains(&self.mask_percentage_target) {
            return err(format!(
                "mask_percentage_target {} must be in [0, 1)",
                self.mask_percentage_target
            ));
        }
        Ok(())
    }

    /// Patches along height (and width): img_size / patch_size.
    pub fn grid(&self) -> usize {
        self.img_size / self.patch_size
    }

    /// Tubelets along time: clip_frames / tubelet_size.
    pub fn time_steps(&self) -> usize {
        self.clip_frames / self.tubelet_size
    }

    /// Tokens per clip N = (T / tubelet) * (H / patch) * (W / patch); 1568 for the released models.
    pub fn num_patches(&self) -> usize {
        self.time_steps() * self.grid() * self.grid()
    }

    /// Values per tubelet patch = 3 * tubelet * patch * patch; 1536 for the released models.
    pub fn patch_dim(&self) -> usize {
        3 * self.tubelet_size * self.patch_size * self.patch_size
    }

    /// Hidden width of the MLP of a block of width `dim` (int(dim * mlp_ratio), as the reference).
    pub fn mlp_hidden(&self, dim: usize) -> usize {
        (dim as f64 * self.mlp_ratio) as usize
    }

    /// Hidden width of the discriminator (int(D_dec * 4)).
    pub fn discriminator_hidden(&self) -> usize {
        self.decoder.embed_dim * 4
    }

    /// Number of visible tokens under the configured mask ratio: floor(N * (1 - ratio)).
    pub fn num_visible(&self) -> usize {
        (self.num_patches() as f64 * (1.0 - self.mask_percentage_target)).floor() as usize
    }

    /// Display name (model_name or "custom").
    pub fn name(&self) -> &str {
        self.model_name.as_deref().unwrap_or("custom")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_and_loss_weights_are_checked() {
        let smoke = MarlinConfig::template("tiny_smoke").unwrap();
        smoke.validate().unwrap();
        assert_eq!((smoke.img_size, smoke.num_patches()), (32, 128));
        let back = MarlinConfig::from_yaml_str(&smoke.to_yaml(), "tiny.yaml").unwrap();
        assert_eq!(back, smoke);
        let e = MarlinConfig::template("nonsense").unwrap_err().to_string();
        assert!(e.contains("'nonsense'") && e.contains("tiny_smoke"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("bad.yaml");
        std::fs::write(
            &f,
            smoke.to_yaml().replace("gp_weight: 0.0", "gp_weight: -1.0"),
        )
        .unwrap();
        let e = MarlinConfig::from_yaml_file(&f).unwrap_err().to_string();
        assert!(e.contains("bad.yaml") && e.contains("gp_weight -1"), "{e}");
    }

    #[test]
    fn released_shapes() {
        let c = MarlinConfig::from_name("marlin_vit_base_ytf").unwrap();
        assert_eq!(c.num_patches(), 1568);
        assert_eq!(c.patch_dim(), 1536);
        assert_eq!(c.num_visible(), 156);
        assert_eq!(c.discriminator_hidden(), 1536);
        assert!(MarlinConfig::from_name("vit_huge").is_err());
    }

    #[test]
    fn yaml_round_trip_and_validation() {
        let c = MarlinConfig::from_name("marlin_vit_small_ytf").unwrap();
        let back = MarlinConfig::from_yaml_str(&c.to_yaml(), "x.yaml").unwrap();
        assert_eq!(c, back);
        let bad = c.to_yaml().replace("num_heads: 6", "num_heads: 5");
        let e = MarlinConfig::from_yaml_str(&bad, "bad.yaml").unwrap_err();
        assert!(
            e.to_string()
                .contains("num_heads 5 must divide encoder.embed_dim 384"),
            "{e}"
        );
        let bad = c.to_yaml().replace("patch_size: 16", "patch_size: 15");
        let e = MarlinConfig::from_yaml_str(&bad, "bad.yaml").unwrap_err();
        assert!(
            e.to_string()
                .contains("patch_size 15 must divide img_size 224"),
            "{e}"
        );
        let e = MarlinConfig::from_yaml_str("img_size: [", "broken.yaml").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("broken.yaml: not a MARLIN config"),
            "{e}"
        );
    }
}
