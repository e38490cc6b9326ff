//! A pretraining run: epochs of steps over the training split (read ahead by a loader thread),
//! validation losses, a ground truth | masked | reconstruction PNG and a checkpoint after every
//! epoch, resumable after any interruption (Ctrl-C or `kill -9`: every file is written under a
//! temp name and renamed).
//!
//! Run folder: `checkpoint.safetensors` (model + discriminator with official key names, both
//! optimisers' state, the run state: next epoch, step count, seed), `model.safetensors` (the
//! weights alone, for `extract --weights` and `reconstruct`), `metrics.csv`,
//! `samples/epoch_NNNN.png`.

pub use super::checkpoint::RunState;
use super::checkpoint::{
    burn_pretrainer, param_ids, read_checkpoint, save_checkpoint, save_engine_checkpoint,
    SavedOptimizer,
};
use super::data::{clip_rng, epoch_order, read_batch, ClipSettings, Sample, Split};
use super::engine::{engine_step, EngineDevice, EngineRefusal, EngineStep};
use super::samples::{enlarge_small, sample_image, save_png, SAMPLE_MIN_SIDE};
use super::schedule::lr_at;
use super::{LossConfig, Pretrainer, StepLosses, TrainError};
use crate::distributed::{weights_digest, Group};
use crate::model::config::LearningRateConfig;
use crate::model::discriminator::Discriminator;
use crate::model::weights::StateDict;
use crate::model::{Marlin, MarlinConfig, MaskIndices, Part};
use crate::util::write_atomic;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Settings of a run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub epochs: usize,
    pub batch_size: usize,
    pub seed: u64,
    /// Stop each epoch after this many steps (smoke runs, tests).
    pub steps_per_epoch: Option<usize>,
    /// Validation clips per epoch (all when None).
    pub val_clips: Option<usize>,
    /// The ranks of a data-parallel run (see [`crate::distributed`]): `batch_size` is per rank, the
    /// global batch `world x batch_size`; rank r trains on positions r, r + world, ... of each
    /// global batch, so the run trains on the samples (and learning rates) of one process at
    /// the global batch. Rank 0 alone writes the run folder.
    pub group: Option<Arc<Group>>,
    /// Which implementation of the step trains.
    pub step: StepPath,
    /// Where the training engine's step runs (with [`StepPath::Engine`] or `Auto`).
    pub engine_device: EngineDevice,
}

/// Which implementation of the training step a run uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StepPath {
    /// burn's autodiff step on the run's backend (every model and device).
    #[default]
    Burn,
    /// The training engine's hand-scheduled step on the CPU's kernels (fp32); a model it does
    /// not cover is an error.
    Engine,
    /// The engine where it covers the model, burn's step otherwise (with a note); a resumed
    /// run keeps the step that wrote its checkpoint.
    Auto,
}

impl StepPath {
    pub const NAMES: [&'static str; 3] = ["auto", "engine", "burn"];

    /// Where the engine trains on CUDA in tf32 or bf16 (in its own buffers), burn's ops beside
    /// it (validation, the sample picture) go back to fp32, whose kernels burn's CUDA backend
    /// builds without a long first compile; the note to print. Call after [`Self::resolve`].
    pub fn keep_burn_in_fp32(self, engine: EngineDevice) -> Option<String> {
        use crate::kernels::Precision;
        match (self, engine) {
            (Self::Engine, EngineDevice::Cuda { precision, .. }) if precision != Precision::F32 => {
                crate::kernels::set_gpu_precision(Precision::F32);
                Some(format!(
                    "the training engine computes in {precision:?}; validation and the sample \
                     picture run on burn's ops in fp32"
                ))
            }
            _ => None,
        }
    }

    /// The step for a run on `device` at `precision`, and where the engine's step runs.
    /// `Auto` picks the engine on the CPU in fp32 (measured: about 2x burn's step there);
    /// `Engine` also runs on CUDA in fp32, tf32 or bf16 (bf16 activations, f32 master weights)
    /// and is an error elsewhere.
    pub fn resolve(
        self,
        device: crate::backend::DeviceSpec,
        precision: crate::kernels::Precision,
    ) -> Result<(Self, EngineDevice), String> {
        use crate::backend::DeviceSpec;
        use crate::kernels::Precision;
        let engine = match (device, precision) {
            (DeviceSpec::Cpu, Precision::F32) => Some(EngineDevice::Cpu),
            (DeviceSpec::Cuda(ordinal), _) => Some(EngineDevice::Cuda { ordinal, precision }),
            _ => None,
        };
        match (self, engine) {
            (Self::Engine, None) => Err(format!(
                "--step engine trains on the CPU in fp32 or on CUDA (this run: --device \
                 {device}, {precision:?}); use --step burn or auto there"
            )),
            (Self::Engine, Some(e)) => Ok((Self::Engine, e)),
            (Self::Auto, Some(EngineDevice::Cpu)) => Ok((Self::Auto, EngineDevice::Cpu)),
            (Self::Auto, _) | (Self::Burn, _) => Ok((Self::Burn, EngineDevice::Cpu)),
        }
    }
}

impl std::str::FromStr for StepPath {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "engine" => Ok(Self::Engine),
            "burn" => Ok(Self::Burn),
            _ => Err(format!("unknown step '{s}' (auto, engine or burn)")),
        }
    }
}

/// The step of a run: burn's autodiff or the training engine.
enum Trainer<B: AutodiffBackend> {
    Burn(Box<Pretrainer<B>>),
    Engine(Box<dyn EngineStep>),
}

/// Progress reports and Ctrl-C.
pub trait Progress {
    fn step(
        &mut self,
        epoch: usize,
        done: usize,
        total: usize,
        losses: &StepLosses,
        samples_per_s: f64,
    );
    fn epoch(&mut self, row: &EpochRow);
    fn stop(&self) -> bool;
    /// Something the user must know about a step (a non-finite loss was skipped).
    fn warning(&mut self, _message: &str) {}
    /// Something worth knowing about the run (which step trains it).
    fn note(&mut self, _message: &str) {}
}

/// Share of an epoch's training time spent waiting for data above which a run says so.
pub const DATA_WAIT_WARN: f64 = 0.2;

/// Steps in a row with a non-finite loss after which a run stops.
pub const MAX_NON_FINITE_STEPS: usize = 5;

/// One line of `metrics.csv`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct EpochRow {
    pub epoch: usize,
    pub lr: f64,
    pub train: StepLosses,
    pub val: StepLosses,
    pub samples_per_s: f64,
    pub seconds: f64,
    /// Seconds of the epoch's training steps spent waiting for the loader's next batch.
    pub data_wait_s: f64,
}

const CSV_HEADER: &str = "epoch,lr,train_d_loss,train_rec,train_adv,train_g_loss,val_d_loss,val_rec,val_adv,val_g_loss,samples_per_s,seconds,train_gp,data_wait_s";

/// Salt of the gradient penalty's draws in `clip_rng` (apart from the clips' own draws).
const GP_SALT: u64 = 0x6770;

impl EpochRow {
    fn csv(&self) -> String {
        let l =
            |s: &StepLosses| format!("{:.6},{:.6},{:.6},{:.6}", s.d_loss, s.rec, s.adv, s.g_loss);
        format!(
            "{},{:e},{},{},{:.2},{:.1},{:.6},{:.2}",
            self.epoch,
            self.lr,
            l(&self.train),
            l(&self.val),
            self.samples_per_s,
            self.seconds,
            self.train.gp,
            self.data_wait_s
        )
    }
}

fn lr_config(cfg: &MarlinConfig) -> LearningRateConfig {
    cfg.learning_rate.clone().unwrap_or(LearningRateConfig {
        base: 1.5e-4,
        warmup: 1e-6,
        min: 1e-5,
        warmup_epochs: 40,
    })
}

/// A batch of samples -> clips `[B, 3, T, H, W]` (flat) and mask indices.
fn batch_host(samples: &[Sample]) -> Result<(Vec<f32>, MaskIndices), TrainError> {
    let flat: Vec<f32> = samples
        .iter()
        .flat_map(|x| x.clip.iter().copied())
        .collect();
    let vis: Vec<bool> = samples
        .iter()
        .flat_map(|x| x.visible.iter().copied())
        .collect();
    let idx = MaskIndices::from_bools(&vis, samples.len()).map_err(|e| e.to_string())?;
    Ok((flat, idx))
}

/// A batch of samples -> clip tensor and mask indices.
fn batch_tensors<B: Backend>(
    samples: &[Sample],
    s: &ClipSettings,
    device: &B::Device,
) -> Result<(Tensor<B, 5>, MaskIndices), TrainError> {
    let (t, h) = (s.clip_frames, s.img_size);
    let (flat, idx) = batch_host(samples)?;
    let clip = Tensor::from_data(TensorData::new(flat, [samples.len(), 3, t, h, h]), device);
    Ok((clip, idx))
}

/// FNV-1a of the values of a state dict, key by key (the ranks compare starting weights).
fn state_digest(sd: &StateDict) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut n = 0usize;
    for t in sd.tensors.values() {
        for v in &t.data {
            for b in v.to_bits().to_le_bytes() {
                h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3);
            }
        }
        n += t.data.len();
    }
    format!("{h:016x} over {n} values")
}

/// The generator and critic (inference backend) of the current weights.
type Inner<B> = (
    Marlin<<B as AutodiffBackend>::InnerBackend>,
    Discriminator<<B as AutodiffBackend>::InnerBackend>,
);

impl<B: AutodiffBackend> Trainer<B> {
    fn inner(&mut self, cfg: &MarlinConfig, device: &B::Device) -> Result<Inner<B>, TrainError> {
        match self {
            Trainer::Burn(pt) => Ok((
                burn::module::AutodiffModule::valid(pt.generator()),
                burn::module::AutodiffModule::valid(pt.critic_module()),
            )),
            Trainer::Engine(et) => {
                let sd = et.weights()?;
                let (mut m, _) = Marlin::<B::InnerBackend>::from_state_dict(
                    cfg,
                    &sd,
                    &[Part::Encoder, Part::Decoder, Part::Discriminator],
                    device,
                )
                .map_err(|e| e.to_string())?;
                let c = m
                    .discriminator
                    .take()
                    .ok_or("the training engine's weights have no critic")?;
                Ok((m, c))
            }
        }
    }
}

fn add(a: &mut StepLosses, b: &StepLosses, w: f64) {
    a.d_loss += b.d_loss * w;
    a.rec += b.rec * w;
    a.adv += b.adv * w;
    a.g_loss += b.g_loss * w;
    a.gp += b.gp * w;
}

/// What a run did.
pub struct RunSummary {
    pub epochs_run: usize,
    pub last_epoch: usize,
    pub rows: Vec<EpochRow>,
    pub interrupted: bool,
    pub resumed_from: Option<usize>,
}

/// Train `model` (encoder, decoder and discriminator) on `data` into `out`, or resume the run
/// in `out` when `resume` and a checkpoint is there.
#[allow(clippy::too_many_arguments)]
pub fn pretrain<B: AutodiffBackend>(
    cfg: &MarlinConfig,
    model: Option<Marlin<B>>,
    data: &Path,
    out: &Path,
    opts: &RunOptions,
    resume: bool,
    progress: &mut dyn Progress,
    device: &B::Device,
) -> Result<RunSummary, TrainError> {
    let train = Split::load(data, "train")?;
    let val = Split::load(data, "val")?;
    let settings = ClipSettings::from_config(cfg)?;
    let losses = LossConfig::from_config(cfg);
    let lrc = lr_config(cfg);
    let group = opts.group.as_deref();
    let (rank, world) = group.map_or((0, 1), |g| (g.rank(), g.world()));
    let main = rank == 0;
    if main {
        std::fs::create_dir_all(out.join("samples"))
            .map_err(|e| format!("{}: {e}", out.display()))?;
    }
    // Temp files of a killed run: the real files beside them are whole; drop the leftovers.
    for dir in [out.to_path_buf(), out.join("samples")]
        .iter()
        .filter(|_| main)
    {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') && name.contains(".tmp") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
    let ckpt = out.join("checkpoint.safetensors");
    let engine_refused = |e: EngineRefusal| match e {
        EngineRefusal::Device(d) => TrainError::Device(d),
        EngineRefusal::Model(m) => TrainError::Run(format!("training engine: {m}")),
    };
    let (mut trainer, mut state, resumed_from) = if resume && ckpt.is_file() {
        let (sd, saved, state) = read_checkpoint(out)?;
        let e = state.epoch;
        let trainer = match (saved, opts.step) {
            (SavedOptimizer::Burn(g, d), StepPath::Burn | StepPath::Auto) => {
                Trainer::Burn(Box::new(burn_pretrainer::<B>(
                    &sd,
                    (g, d),
                    &state,
                    cfg,
                    losses,
                    device,
                )?))
            }
            (SavedOptimizer::Engine(o), StepPath::Engine | StepPath::Auto) => Trainer::Engine(
                engine_step(cfg, sd, Some(o), losses, opts.engine_device)
                    .map_err(engine_refused)?,
            ),
            (SavedOptimizer::Burn(..), StepPath::Engine) => {
                return Err(format!(
                    "{}: this run was trained by burn's step; resume it with --step burn (or auto)",
                    ckpt.display()
                )
                .into())
            }
            (SavedOptimizer::Engine(_), StepPath::Burn) => {
                return Err(format!(
                    "{}: this run was trained by the training engine's step; resume it with \
                     --step engine (or auto on the CPU)",
                    ckpt.display()
                )
                .into())
            }
        };
        (trainer, state, Some(e))
    } else {
        let model = model.ok_or("no model to start from")?;
        let engine = match opts.step {
            StepPath::Burn => None,
            StepPath::Engine | StepPath::Auto => {
                let sd = model.to_state_dict();
                match engine_step(cfg, sd, None, losses, opts.engine_device) {
                    Ok(t) => Some(t),
                    Err(e @ EngineRefusal::Model(_)) if opts.step == StepPath::Auto => {
                        progress.note(&format!("{e}"));
                        None
                    }
                    Err(e) => return Err(engine_refused(e)),
                }
            }
        };
        let trainer = match engine {
            Some(t) => Trainer::Engine(t),
            None => Trainer::Burn(Box::new(Pretrainer::new(model, losses)?)),
        };
        let state = RunState {
            epoch: 0,
            step: 0,
            seed: opts.seed,
            epochs: opts.epochs,
            batch_size: opts.batch_size.max(1) * world,
            ..Default::default()
        };
        (trainer, state, None)
    };
    trainer = match trainer {
        Trainer::Burn(pt) => Trainer::Burn(Box::new(pt.with_group(opts.group.clone()))),
        Trainer::Engine(mut et) => {
            et.set_group(opts.group.clone());
            Trainer::Engine(et)
        }
    };
    // A resumed run keeps its own schedule, seed and global batch (`batch_size` in the run
    // state), whatever the number of ranks now.
    let (epochs, global, seed) = if resumed_from.is_some() {
        (state.epochs.max(opts.epochs), state.batch_size, state.seed)
    } else {
        (opts.epochs, opts.batch_size.max(1) * world, opts.seed)
    };
    if global % world != 0 {
        return Err(format!(
            "{}: the run's global batch is {global} clips, which {world} ranks cannot share evenly: resume it with a number of ranks that divides {global}",
            ckpt.display()
        )
        .into());
    }
    // Clips per step on this rank.
    let bs = global / world;
    state.epochs = epochs;
    if let Some(g) = group {
        // Every rank must run the same run: config, options, data, starting weights.
        g.agree(
            "run (config, epochs, global batch, seed, data, resume)",
            &format!(
                "config {:016x}, epochs {epochs}, global batch {global}, seed {seed}, {} train and {} val videos, steps/epoch {:?}, val clips {:?}, from epoch {}",
                text_digest(&format!("{cfg:?}")),
                train.videos.len(),
                val.videos.len(),
                opts.steps_per_epoch,
                opts.val_clips,
                state.epoch
            ),
        )?;
        let digest = match &mut trainer {
            Trainer::Burn(pt) => format!(
                "burn's step: generator {}, critic {}",
                weights_digest(pt.generator()),
                weights_digest(pt.critic_module())
            ),
            Trainer::Engine(et) => format!("the training engine: {}", state_digest(&et.weights()?)),
        };
        g.agree("starting weights", &digest)?;
    }
    // Metrics of the epochs already done (a resumed run keeps them, drops any later line).
    let csv_path = out.join("metrics.csv");
    let mut csv_lines: Vec<String> = if resumed_from.is_some() {
        std::fs::read_to_string(&csv_path)
            .unwrap_or_default()
            .lines()
            .skip(1)
            .filter(|l| {
                l.split(',')
                    .next()
                    .and_then(|e| e.parse::<usize>().ok())
                    .is_some_and(|e| e < state.epoch)
            })
            .map(String::from)
            .collect()
    } else {
        Vec::new()
    };
    let mut rows = Vec::new();
    let mut interrupted = false;
    let mut bad_in_a_row = 0usize;
    // The engine's notes already shown (a slower path its ops took, said once).
    let mut notes_shown = 0usize;
    let n = train.videos.len();
    let val_n = opts
        .val_clips
        .unwrap_or(val.videos.len())
        .min(val.videos.len());
    for epoch in state.epoch..epochs {
        let t0 = Instant::now();
        let lr = lr_at(&lrc, epoch, epochs, global);
        let order = epoch_order(n, seed, epoch);
        let mut batches: Vec<Vec<usize>> =
            order.chunks(global.min(n)).map(<[usize]>::to_vec).collect();
        if batches.len() > 1 && batches.last().is_some_and(|b| b.len() < global) {
            batches.pop();
        }
        if world > 1 {
            if batches.first().is_some_and(|b| b.len() < world) {
                return Err(format!(
                    "{}: {n} training videos are fewer than the {world} ranks",
                    data.display()
                )
                .into());
            }
            // This rank's share of each global batch: positions rank, rank + world, ...
            // (A short batch is cut to a multiple of the ranks, so every rank's share is equal.)
            for b in &mut batches {
                b.truncate(b.len() / world * world);
                *b = b.iter().copied().skip(rank).step_by(world).collect();
            }
        }
        if let Some(k) = opts.steps_per_epoch {
            batches.truncate(k);
        }
        let total = batches.len();
        // The loader thread reads batches ahead of the trainer.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Vec<Sample>, TrainError>>(2);
        let (train_ref, settings_ref) = (&train, &settings);
        let mut sum = StepLosses::default();
        let mut seen = 0usize;
        let mut data_wait = std::time::Duration::ZERO;
        let result: Result<(), TrainError> = std::thread::scope(|scope| {
            // The receiver lives in this closure: when the trainer leaves early (an error, a
            // rank gone), it is dropped before the scope joins the loader, whose next send then
            // fails and ends it instead of waiting for room forever.
            let rx = rx;
            scope.spawn(move || {
                for b in &batches {
                    if tx
                        .send(read_batch(train_ref, b, settings_ref, seed, epoch, 1))
                        .is_err()
                    {
                        break;
                    }
                }
            });
            let mut batches_in = rx.iter().enumerate();
            loop {
                let asked = Instant::now();
                let Some((i, batch)) = batches_in.next() else {
                    break;
                };
                data_wait += asked.elapsed();
                // Every rank stops at the same step (Ctrl-C may reach only some of them).
                let stop = match group {
                    Some(g) => {
                        let mut flag = [f32::from(u8::from(progress.stop()))];
                        g.all_reduce_sum(&mut flag, "the stop check")?;
                        flag[0] > 0.0
                    }
                    None => progress.stop(),
                };
                if stop {
                    interrupted = true;
                    break;
                }
                let samples = batch?;
                let l = match &mut trainer {
                    Trainer::Burn(pt) => {
                        let (clip, idx) = batch_tensors::<B>(&samples, &settings, device)?;
                        let gp_seed =
                            rand::RngExt::random::<u64>(&mut clip_rng(seed, epoch, i, GP_SALT));
                        crate::device_error::guard(samples.len(), || {
                            pt.step(clip, &idx, lr, gp_seed)
                        })??
                    }
                    Trainer::Engine(et) => {
                        let (clips, idx) = batch_host(&samples)?;
                        let l = et.step(&clips, &idx, lr)?;
                        let notes = et.notes();
                        for n in notes.iter().skip(notes_shown) {
                            progress.note(n);
                        }
                        notes_shown = notes.len();
                        l
                    }
                };
                state.step += 1;
                if l.skipped {
                    bad_in_a_row += 1;
                    progress.warning(&format!(
                        "epoch {epoch}, step {}: non-finite loss (critic {}, generator {}): its \
                         update was skipped",
                        i + 1,
                        l.d_loss,
                        l.g_loss
                    ));
                    if bad_in_a_row >= MAX_NON_FINITE_STEPS {
                        return Err(TrainError::NonFinite {
                            steps: bad_in_a_row,
                            epoch,
                            step: i + 1,
                        });
                    }
                    continue;
                }
                bad_in_a_row = 0;
                // The losses are the global batch's means (every rank's samples).
                seen += samples.len() * world;
                add(&mut sum, &l, (samples.len() * world) as f64);
                let rate = seen as f64 / t0.elapsed().as_secs_f64().max(1e-9);
                progress.step(epoch, i + 1, total, &l, rate);
            }
            Ok(())
        });
        result?;
        if interrupted {
            break;
        }
        let train_mean = {
            let mut m = StepLosses::default();
            add(&mut m, &sum, 1.0 / seen.max(1) as f64);
            m
        };
        let train_s = t0.elapsed().as_secs_f64();
        let samples_per_s = seen as f64 / train_s.max(1e-9);
        let data_wait_s = data_wait.as_secs_f64();
        if data_wait_s > DATA_WAIT_WARN * train_s && data_wait_s > 1.0 && main {
            progress.warning(&format!(
                "epoch {epoch}: the step waited {data_wait_s:.1} s of {train_s:.1} s for data \
                 ({:.0}%): decoding and cropping the clips is the bottleneck (faster storage, \
                 more CPU cores, or fewer other jobs on them)",
                100.0 * data_wait_s / train_s
            ));
        }
        // Validation: the same clips and masks every epoch; rank r takes chunks r, r + world...
        let mut vsum = StepLosses::default();
        let val_idx: Vec<usize> = (0..val_n).collect();
        let mut first: Option<(Sample, Vec<f32>)> = None;
        let (g, c) = trainer.inner(cfg, device)?;
        for chunk in val_idx.chunks(bs.max(1)).skip(rank).step_by(world) {
            let samples = read_batch(&val, chunk, &settings, seed, 0, 2)?;
            let (clip, idx) = batch_tensors::<B::InnerBackend>(&samples, &settings, device)?;
            let l = super::evaluate(&g, &c, clip, &idx, &losses)?;
            add(&mut vsum, &l, chunk.len() as f64);
            if first.is_none() && main {
                let one = samples.into_iter().next();
                if let Some(s) = one {
                    let (c1, i1) = batch_tensors::<B::InnerBackend>(
                        std::slice::from_ref(&s),
                        &settings,
                        device,
                    )?;
                    let pred = g.forward_indices(c1, &i1).map_err(|e| e.to_string())?;
                    let p: Vec<f32> = crate::model::load::to_f32_vec(pred);
                    first = Some((s, p));
                }
            }
        }
        if let Some(g) = group {
            let mut v = [vsum.d_loss, vsum.rec, vsum.adv, vsum.g_loss, vsum.gp].map(|x| x as f32);
            g.all_reduce_sum(&mut v, "the validation losses")?;
            [vsum.d_loss, vsum.rec, vsum.adv, vsum.g_loss, vsum.gp] = v.map(f64::from);
        }
        let mut val_mean = StepLosses::default();
        add(&mut val_mean, &vsum, 1.0 / val_n.max(1) as f64);
        state.epoch = epoch + 1;
        let row = EpochRow {
            epoch,
            lr,
            train: train_mean,
            val: val_mean,
            samples_per_s,
            seconds: t0.elapsed().as_secs_f64(),
            data_wait_s,
        };
        if !main {
            rows.push(row);
            continue;
        }
        if let Some((s, p)) = &first {
            let img = enlarge_small(
                &sample_image(&s.clip, &s.visible, Some(p), &settings, 0),
                SAMPLE_MIN_SIDE,
            );
            save_png(
                &img,
                &out.join("samples").join(format!("epoch_{epoch:04}.png")),
            )?;
        }
        match &mut trainer {
            Trainer::Burn(pt) => {
                state.generator_ids = param_ids(pt.generator())
                    .into_iter()
                    .map(|i| i.serialize())
                    .collect();
                state.critic_ids = param_ids(pt.critic_module())
                    .into_iter()
                    .map(|i| i.serialize())
                    .collect();
                save_checkpoint(out, pt, &state)?;
            }
            Trainer::Engine(et) => {
                let (sd, opt) = et.state()?;
                let opt = opt.unwrap_or_else(|| zero_moments(&sd));
                save_engine_checkpoint(out, &sd, opt, &state)?;
            }
        }
        csv_lines.push(row.csv());
        let text = format!("{CSV_HEADER}\n{}\n", csv_lines.join("\n"));
        write_atomic(&csv_path, text.as_bytes())
            .map_err(|e| format!("{}: {e}", csv_path.display()))?;
        progress.epoch(&row);
        rows.push(row);
    }
    Ok(RunSummary {
        epochs_run: rows.len(),
        last_epoch: state.epoch,
        rows,
        interrupted,
        resumed_from,
    })
}

/// FNV-1a of a text (the ranks compare configs by it).
fn text_digest(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

/// A fresh model (reference initialisation, seeded) or the weights of `init`, with a fresh
/// discriminator where the file has none.
pub fn initial_model<B: Backend>(
    cfg: &MarlinConfig,
    init: Option<&PathBuf>,
    seed: u64,
    device: &B::Device,
) -> Result<Marlin<B>, TrainError> {
    let all = [Part::Encoder, Part::Decoder, Part::Discriminator];
    let Some(p) = init else {
        return Ok(Marlin::init(cfg, &all, seed, device));
    };
    let sd = StateDict::load(p).map_err(|e| e.to_string())?;
    let has_disc = sd.tensors.keys().any(|k| k.starts_with("discriminator."));
    let has_dec = sd.tensors.keys().any(|k| k.starts_with("decoder."));
    let parts: Vec<Part> = all
        .iter()
        .copied()
        .filter(|p| match p {
            Part::Discriminator => has_disc,
            Part::Decoder => has_dec,
            _ => true,
        })
        .collect();
    let (mut m, report) =
        Marlin::<B>::from_state_dict(cfg, &sd, &parts, device).map_err(|e| e.to_string())?;
    for k in &report.unknown_keys {
        eprintln!("warning: {}: unknown key '{k}' ignored", p.display());
    }
    let fresh = Marlin::<B>::init(cfg, &all, seed, device);
    if m.discriminator.is_none() {
        m.discriminator = fresh.discriminator.clone();
    }
    if m.decoder.is_none() {
        m.decoder = fresh.decoder;
        m.enc_dec_proj = fresh.enc_dec_proj;
    }
    Ok(m)
}

/// AdamW's state before any update.
fn zero_moments(sd: &StateDict) -> crate::engine::train::OptimizerState {
    let mut z = sd.clone();
    for t in z.tensors.values_mut() {
        t.data.iter_mut().for_each(|v| *v = 0.0);
    }
    crate::engine::train::OptimizerState {
        exp_avg: z.clone(),
        exp_avg_sq: z,
        updates: [0, 0],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::DeviceSpec;
    use crate::kernels::Precision;

    #[test]
    fn auto_takes_the_engine_only_where_it_was_measured() {
        let cpu = EngineDevice::Cpu;
        let r = |s: StepPath, d, p| s.resolve(d, p);
        assert_eq!(
            r(StepPath::Auto, DeviceSpec::Cpu, Precision::F32),
            Ok((StepPath::Auto, cpu))
        );
        // bf16 on the CPU, any CUDA or Vulkan run: burn's step.
        for (d, p) in [
            (DeviceSpec::Cpu, Precision::Bf16),
            (DeviceSpec::Cuda(0), Precision::Tf32),
            (DeviceSpec::Cuda(0), Precision::F32),
            (DeviceSpec::Vulkan(0), Precision::F32),
        ] {
            assert_eq!(
                r(StepPath::Auto, d, p),
                Ok((StepPath::Burn, cpu)),
                "{d} {p:?}"
            );
            assert_eq!(
                r(StepPath::Burn, d, p),
                Ok((StepPath::Burn, cpu)),
                "{d} {p:?}"
            );
        }
        // Asked for, the engine runs on CUDA in every precision, on the GPU named.
        for p in [Precision::F32, Precision::Tf32, Precision::Bf16] {
            assert_eq!(
                r(StepPath::Engine, DeviceSpec::Cuda(1), p),
                Ok((
                    StepPath::Engine,
                    EngineDevice::Cuda {
                        ordinal: 1,
                        precision: p
                    }
                ))
            );
        }
        for (d, p) in [
            (DeviceSpec::Vulkan(0), Precision::F32),
            (DeviceSpec::Cpu, Precision::Bf16),
        ] {
            let e = r(StepPath::Engine, d, p).unwrap_err();
            assert!(
                e.starts_with("--step engine trains on the CPU in fp32 or on CUDA (this run")
                    && e.contains("use --step burn or auto"),
                "{e}"
            );
        }
        // burn's ops beside the engine's tf32/bf16 CUDA step go to fp32 (with a note); nothing
        // changes elsewhere.
        let cuda = |precision| EngineDevice::Cuda {
            ordinal: 0,
            precision,
        };
        assert_eq!(
            StepPath::Burn.keep_burn_in_fp32(cuda(Precision::Bf16)),
            None
        );
        assert_eq!(StepPath::Engine.keep_burn_in_fp32(cpu), None);
        assert_eq!(
            StepPath::Engine.keep_burn_in_fp32(cuda(Precision::F32)),
            None
        );
        let note = StepPath::Engine.keep_burn_in_fp32(cuda(Precision::Bf16));
        assert!(note.is_some_and(|n| n.contains("burn's ops in fp32")));
        assert_eq!(crate::kernels::gpu_precision(), Precision::F32);
        assert_eq!("engine".parse::<StepPath>(), Ok(StepPath::Engine));
        assert!("fast"
            .parse::<StepPath>()
            .unwrap_err()
            .contains("auto, engine or burn"));
    }
}
