//! Options that choose a model and its weights, shared by the subcommands.

use clap::Args;
use marlin::backend::DeviceSet;
use marlin::hub;
use marlin::model::MarlinConfig;
use std::path::PathBuf;

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Released model name; its weights are downloaded on first use unless --weights is given.
    #[arg(long, default_value = "marlin_vit_base_ytf")]
    pub model: String,
    /// A custom model config (reference YAML format); needs --weights.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Checkpoint file (.pt, Lightning .ckpt or .safetensors).
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// cpu, cuda[:N], vulkan[:N] or metal (a GPU needs a build with that cargo feature:
    /// `--features cuda|vulkan|metal`); `extract` also takes several GPUs (cuda:0,cuda:1,
    /// cuda:all or vulkan:0,vulkan:1), one model replica each.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSet,
}

impl ModelArgs {
    /// The config and the weights file, downloading official weights when none are given.
    pub fn resolve(&self, full: bool, progress: bool) -> Result<(MarlinConfig, PathBuf), String> {
        let cfg = match &self.config {
            Some(p) => MarlinConfig::from_yaml_file(p).map_err(|e| e.to_string())?,
            None => MarlinConfig::from_name(&self.model).map_err(|e| e.to_string())?,
        };
        let weights = match &self.weights {
            Some(w) => w.clone(),
            None if self.config.is_some() => {
                return Err("a custom --config needs --weights FILE".into())
            }
            None => hub::fetch(&self.model, full, progress).map_err(|e| e.to_string())?,
        };
        Ok((cfg, weights))
    }
}
