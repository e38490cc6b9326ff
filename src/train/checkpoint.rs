//! The run checkpoint: `checkpoint.safetensors` holds the model and critic under official key
//! names, both optimisers' state (burn records, keyed by parameter ids that are remapped on
//! load by visit order) and the run state; `model.safetensors` the weights alone. Both are
//! written atomically.

use super::{CriticRecord, GenRecord, LossConfig, Pretrainer, TrainError};
use crate::engine::train::OptimizerState;
use crate::model::weights::{read_safetensors_file, HostTensor, StateDict};
use crate::model::{Marlin, MarlinConfig, Part};
use crate::util::write_atomic;
use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use std::collections::HashMap;
use std::path::Path;

/// Where a run stands (saved in every checkpoint).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunState {
    /// The next epoch to run (0-based).
    pub epoch: usize,
    pub step: u64,
    pub seed: u64,
    pub epochs: usize,
    pub batch_size: usize,
    /// Parameter order of the generator and the critic, to re-key the optimiser state.
    pub generator_ids: Vec<String>,
    pub critic_ids: Vec<String>,
    /// Written by the training engine: its updates made (generator, critic); its optimiser
    /// state is in `train.exp_avg.*` / `train.exp_avg_sq.*` (burn's path: None, its records
    /// in `train.optimizer_*`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_updates: Option<[u32; 2]>,
}

/// The optimisers' state a checkpoint holds, by the path that wrote it.
pub(super) enum SavedOptimizer {
    /// burn's records (generator, critic).
    Burn(Vec<u8>, Vec<u8>),
    /// The training engine's moments.
    Engine(OptimizerState),
}

struct Ids(Vec<ParamId>);

impl<B: Backend> ModuleVisitor<B> for Ids {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.0.push(param.id);
    }
}

pub(super) fn param_ids<B: Backend, M: Module<B>>(m: &M) -> Vec<ParamId> {
    let mut v = Ids(Vec::new());
    m.visit(&mut v);
    v.0
}

/// Re-key an optimiser record (a map from parameter ids) from the saved ids to the model's.
fn remap<V, M>(rec: M, old: &[String], new: &[ParamId]) -> Result<M, TrainError>
where
    M: IntoIterator<Item = (ParamId, V)> + FromIterator<(ParamId, V)>,
{
    if old.len() != new.len() {
        return Err(format!(
            "the checkpoint's optimiser state has {} parameters, the model {}",
            old.len(),
            new.len()
        )
        .into());
    }
    let map: HashMap<ParamId, ParamId> = old
        .iter()
        .map(|s| ParamId::deserialize(s))
        .zip(new.iter().copied())
        .collect();
    Ok(rec
        .into_iter()
        .filter_map(|(k, v)| map.get(&k).map(|n| (*n, v)))
        .collect())
}

/// Write the checkpoint (atomically) of burn's path and the weights-only model file.
pub(super) fn save_checkpoint<B: AutodiffBackend>(
    out: &Path,
    pt: &Pretrainer<B>,
    state: &RunState,
) -> Result<(), TrainError> {
    let sd = pt.model().to_state_dict();
    let (g, d) = pt.optimizer_records();
    let rec = BinBytesRecorder::<FullPrecisionSettings>::default();
    let gb = rec
        .record(g, ())
        .map_err(|e| format!("optimiser state: {e:?}"))?;
    let db = rec
        .record(d, ())
        .map_err(|e| format!("optimiser state: {e:?}"))?;
    let mut state = state.clone();
    state.engine_updates = None;
    write_checkpoint(out, &sd, SavedOptimizer::Burn(gb, db), &state)
}

/// Write the checkpoint of the training engine: weights `sd`, its optimisers' state.
pub(super) fn save_engine_checkpoint(
    out: &Path,
    sd: &StateDict,
    optimizer: OptimizerState,
    state: &RunState,
) -> Result<(), TrainError> {
    let mut state = state.clone();
    state.engine_updates = Some(optimizer.updates);
    state.generator_ids.clear();
    state.critic_ids.clear();
    write_checkpoint(out, sd, SavedOptimizer::Engine(optimizer), &state)
}

fn f32_entry(k: String, t: &HostTensor) -> (String, Vec<u8>, Vec<usize>, safetensors::Dtype) {
    (
        k,
        t.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        t.shape.clone(),
        safetensors::Dtype::F32,
    )
}

fn write_checkpoint(
    out: &Path,
    sd: &StateDict,
    optimizer: SavedOptimizer,
    state: &RunState,
) -> Result<(), TrainError> {
    let mut bytes: Vec<(String, Vec<u8>, Vec<usize>, safetensors::Dtype)> = sd
        .tensors
        .iter()
        .map(|(k, t)| f32_entry(k.clone(), t))
        .collect();
    match optimizer {
        SavedOptimizer::Burn(gb, db) => {
            let (gl, dl) = (gb.len(), db.len());
            bytes.push((
                "train.optimizer_generator".into(),
                gb,
                vec![gl],
                safetensors::Dtype::U8,
            ));
            bytes.push((
                "train.optimizer_critic".into(),
                db,
                vec![dl],
                safetensors::Dtype::U8,
            ));
        }
        SavedOptimizer::Engine(o) => {
            for (prefix, m) in [
                ("train.exp_avg.", &o.exp_avg),
                ("train.exp_avg_sq.", &o.exp_avg_sq),
            ] {
                bytes.extend(
                    m.tensors
                        .iter()
                        .map(|(k, t)| f32_entry(format!("{prefix}{k}"), t)),
                );
            }
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(k, b, s, dt)| {
            safetensors::tensor::TensorView::new(*dt, s.clone(), b)
                .map(|v| (k.clone(), v))
                .map_err(|e| e.to_string())
        })
        .collect::<Result<_, _>>()?;
    let meta: HashMap<String, String> = [(
        "marlin_run_state".to_string(),
        serde_json::to_string(state).map_err(|e| e.to_string())?,
    )]
    .into_iter()
    .collect();
    let data = safetensors::serialize(views, &Some(meta)).map_err(|e| e.to_string())?;
    let p = out.join("checkpoint.safetensors");
    write_atomic(&p, &data).map_err(|e| format!("{}: {e}", p.display()))?;
    let m = out.join("model.safetensors");
    Ok(sd.save_safetensors(&m, None)?)
}

/// The weights, optimisers' state and run state of `out/checkpoint.safetensors`.
pub(super) fn read_checkpoint(
    out: &Path,
) -> Result<(StateDict, SavedOptimizer, RunState), TrainError> {
    let p = out.join("checkpoint.safetensors");
    let raw = std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&raw)
        .map_err(|e| format!("{}: {e}", p.display()))?;
    let state: RunState = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("marlin_run_state"))
        .ok_or_else(|| format!("{}: not a marlin pretraining checkpoint", p.display()))
        .and_then(|s| serde_json::from_str(s).map_err(|e| format!("{}: {e}", p.display())))?;
    let mut tensors = read_safetensors_file(&p).map_err(|e| e.to_string())?;
    let saved = match state.engine_updates {
        Some(updates) => {
            let take = |prefix: &str| StateDict {
                tensors: tensors
                    .iter()
                    .filter_map(|(k, t)| k.strip_prefix(prefix).map(|k| (k.to_string(), t.clone())))
                    .collect(),
                source: p.display().to_string(),
            };
            let (m, v) = (take("train.exp_avg."), take("train.exp_avg_sq."));
            SavedOptimizer::Engine(OptimizerState {
                exp_avg: m,
                exp_avg_sq: v,
                updates,
            })
        }
        None => {
            let st = safetensors::SafeTensors::deserialize(&raw)
                .map_err(|e| format!("{}: {e}", p.display()))?;
            let bytes_of = |k: &str| -> Result<Vec<u8>, TrainError> {
                st.tensor(k)
                    .map(|v| v.data().to_vec())
                    .map_err(|e| TrainError::Run(format!("{}: {k}: {e}", p.display())))
            };
            SavedOptimizer::Burn(
                bytes_of("train.optimizer_generator")?,
                bytes_of("train.optimizer_critic")?,
            )
        }
    };
    tensors.retain(|k, _| !k.starts_with("train."));
    let sd = StateDict {
        tensors,
        source: p.display().to_string(),
    };
    Ok((sd, saved, state))
}

/// burn's pretrainer (model and optimisers) from the weights and records of a checkpoint.
pub(super) fn burn_pretrainer<B: AutodiffBackend>(
    sd: &StateDict,
    records: (Vec<u8>, Vec<u8>),
    state: &RunState,
    cfg: &MarlinConfig,
    losses: LossConfig,
    device: &B::Device,
) -> Result<Pretrainer<B>, TrainError> {
    let (model, _) = Marlin::<B>::from_state_dict(
        cfg,
        sd,
        &[Part::Encoder, Part::Decoder, Part::Discriminator],
        device,
    )
    .map_err(|e| e.to_string())?;
    let mut pt = Pretrainer::new(model, losses)?;
    let rec = BinBytesRecorder::<FullPrecisionSettings>::default();
    let g: GenRecord<B> = rec
        .load(records.0, device)
        .map_err(|e| format!("optimiser state: {e:?}"))?;
    let d: CriticRecord<B> = rec
        .load(records.1, device)
        .map_err(|e| format!("optimiser state: {e:?}"))?;
    let g = remap(g, &state.generator_ids, &param_ids(pt.generator()))?;
    let d = remap(d, &state.critic_ids, &param_ids(pt.critic_module()))?;
    pt.load_optimizer_records(g, d);
    Ok(pt)
}
