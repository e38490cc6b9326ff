//! Training a classifier as the reference's downstream `Classifier`: a linear head on frozen
//! features (linear probing) or on the encoder's pooled features of 16-frame clips
//! (fine-tuning). Adam (lr 1e-4, betas (0.5, 0.9)), BCE-with-logits (binary, multilabel) or
//! cross-entropy (multiclass), ReduceLROnPlateau on the training loss (factor 0.5, patience 7),
//! stop once the learning rate falls below 1e-6, best checkpoint by validation AUC.

pub use super::classifier::{head_shape, probs, Classifier};
use super::data::{Dataset, Sample};
pub use super::engine::ClassifierEngine;
pub use super::features::{load_features, reduce_clips};
pub use super::inputs::{ClipSpec, Inputs, ProbeError};
use super::metrics::{evaluate, Metrics, TaskKind};
use crate::distributed::{all_reduce_gradients, weights_digest, Group};
use crate::model::load::to_scalar;
use crate::model::MarlinConfig;
use crate::train::run::DATA_WAIT_WARN;
use crate::video::clip::ClipData;
use burn::module::AutodiffModule;
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use rand::seq::SliceRandom;
use rand::{rngs::StdRng, RngExt, SeedableRng};
use rayon::prelude::*;
use std::sync::Arc;
use std::time::Instant;

/// Settings of a training run (the reference's values by default).
#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub lr: f64,
    pub batch_size: usize,
    pub max_epochs: usize,
    /// ReduceLROnPlateau on the training loss.
    pub patience: usize,
    pub factor: f64,
    /// Stop once the learning rate is below this.
    pub stop_lr: f64,
    pub seed: u64,
    /// The ranks of a data-parallel run (see [`crate::distributed`]): `batch_size` is per rank, rank
    /// r trains on positions r, r + world, ... of each global batch; rank 0 alone calls the
    /// epoch hook (writes the run folder).
    pub group: Option<Arc<Group>>,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            lr: 1e-4,
            batch_size: 32,
            max_epochs: 200,
            patience: 7,
            factor: 0.5,
            stop_lr: 1e-6,
            seed: 0,
            group: None,
        }
    }
}

/// PyTorch's ReduceLROnPlateau with its defaults (mode min, relative threshold 1e-4, no
/// cooldown, min_lr 1e-8 as the reference sets).
#[derive(Debug, Clone)]
pub struct Plateau {
    pub lr: f64,
    best: f64,
    bad: usize,
    patience: usize,
    factor: f64,
}

impl Plateau {
    pub fn new(lr: f64, patience: usize, factor: f64) -> Self {
        Self {
            lr,
            best: f64::INFINITY,
            bad: 0,
            patience,
            factor,
        }
    }
    /// Record an epoch's metric; lower the rate after `patience` epochs without improvement.
    pub fn step(&mut self, metric: f64) {
        if metric < self.best * (1.0 - 1e-4) {
            self.best = metric;
            self.bad = 0;
        } else {
            self.bad += 1;
        }
        if self.bad > self.patience {
            self.lr = (self.lr * self.factor).max(1e-8);
            self.bad = 0;
        }
    }
}

/// One epoch's numbers.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EpochLog {
    pub epoch: usize,
    pub lr: f64,
    pub train_loss: f64,
    pub val_loss: f64,
    pub val_accuracy: f64,
    pub val_auc: Option<f64>,
    pub seconds: f64,
    /// Seconds the steps waited for their clips (fine-tuning; 0 on features).
    pub data_wait_s: f64,
}

/// What a run did.
pub struct RunResult<B: Backend> {
    pub epochs: Vec<EpochLog>,
    pub best_epoch: usize,
    /// The best classifier (by validation AUC).
    pub best: Classifier<B>,
    pub val: Metrics,
    pub test: Metrics,
    pub stop: String,
}

/// Hooks of a run: progress and checkpoints (called after each epoch), and Ctrl-C.
pub trait RunHooks<B: Backend> {
    fn epoch(&mut self, log: &EpochLog, improved: Option<&Classifier<B>>)
        -> Result<(), ProbeError>;
    fn stop(&self) -> bool;
    fn batch(&mut self, _done: usize, _total: usize) {}
    /// Something the user must know (the steps wait for their clips).
    fn warning(&mut self, _message: &str) {}
}

fn targets(samples: &[Sample], idx: &[usize]) -> Vec<f32> {
    idx.iter()
        .flat_map(|&i| samples[i].target.iter().copied())
        .collect()
}

/// Loss (mean) of logits `[b, k]` against the targets of `kind` (a class index per row, or
/// `b·k` 0/1 values): cross-entropy for multiclass, binary cross-entropy with logits otherwise.
pub fn loss<B: Backend>(logits: Tensor<B, 2>, y: &[f32], kind: TaskKind) -> Tensor<B, 1> {
    let [b, k] = logits.dims();
    let device = logits.device();
    match kind {
        TaskKind::Multiclass => {
            let mut onehot = vec![0f32; b * k];
            for (i, &c) in y.iter().enumerate() {
                onehot[i * k + c as usize] = 1.0;
            }
            let oh = Tensor::<B, 2>::from_data(TensorData::new(onehot, [b, k]), &device);
            (log_softmax(logits, 1) * oh)
                .sum()
                .neg()
                .div_scalar(b as f32)
        }
        _ => {
            let yt = Tensor::<B, 2>::from_data(TensorData::new(y.to_vec(), [b, k]), &device);
            // Stable BCE with logits: max(x, 0) - x y + log(1 + exp(-|x|)).
            let l = logits.clone().clamp_min(0.0) - logits.clone() * yt
                + logits.abs().neg().exp().add_scalar(1.0).log();
            l.mean()
        }
    }
}

impl Inputs {
    fn logits<B: Backend>(
        &self,
        model: &Classifier<B>,
        split: &str,
        samples: &[Sample],
        idx: &[usize],
        seeds: Option<&[u64]>,
        device: &B::Device,
    ) -> Result<Tensor<B, 2>, ProbeError> {
        match self {
            Inputs::Features {
                d,
                train,
                val,
                test,
            } => {
                let src = match split {
                    "train" => train,
                    "val" => val,
                    _ => test,
                };
                let x: Vec<f32> = idx
                    .iter()
                    .flat_map(|&i| src[i * d..(i + 1) * d].iter().copied())
                    .collect();
                Ok(model.forward_features(Tensor::from_data(
                    TensorData::new(x, [idx.len(), *d]),
                    device,
                )))
            }
            Inputs::Clips(spec) => {
                let flat = read_clips(spec, samples, idx, seeds)?;
                let (t, s) = (spec.clip_frames, spec.size);
                let x = Tensor::<B, 5>::from_data(
                    TensorData::new(flat, [idx.len(), 3, t, s, s]),
                    device,
                );
                Ok(model.forward_clips(x))
            }
        }
    }

    /// Loss and metrics of a split, in batches, without gradients.
    pub fn evaluate<B: Backend>(
        &self,
        model: &Classifier<B>,
        data: &Dataset,
        split: &str,
        batch: usize,
        device: &B::Device,
    ) -> Result<(f64, Metrics), ProbeError> {
        let samples = data.split(split);
        let idx: Vec<usize> = (0..samples.len()).collect();
        let (mut p, mut total, mut y) = (Vec::new(), 0f64, Vec::new());
        for chunk in idx.chunks(batch.max(1)) {
            let logits = self.logits(model, split, samples, chunk, None, device)?;
            let t = targets(samples, chunk);
            total += to_scalar(loss(logits.clone(), &t, data.kind)) * chunk.len() as f64;
            p.extend(probs(logits, data.kind));
            y.extend(t);
        }
        let n = samples.len().max(1) as f64;
        Ok((
            total / n,
            evaluate(data.kind, &data.names, &p, &y, data.width()),
        ))
    }
}

/// The clips `[b, 3, T, S, S]` (flat) of `samples[idx]`, decoded in parallel; with `seeds`
/// (one per clip from the run's generator), random windows that stay deterministic.
fn read_clips(
    spec: &ClipSpec,
    samples: &[Sample],
    idx: &[usize],
    seeds: Option<&[u64]>,
) -> Result<Vec<f32>, ProbeError> {
    let seeds: Vec<Option<u64>> = match seeds {
        Some(s) => s.iter().copied().map(Some).collect(),
        None => vec![None; idx.len()],
    };
    let clips: Vec<ClipData> = idx
        .par_iter()
        .zip(seeds)
        .map(|(&i, s)| {
            let mut r = s.map(StdRng::seed_from_u64);
            spec.read(&samples[i].video, r.as_mut())
                .map_err(|e| format!("{}: {e}", samples[i].origin))
        })
        .collect::<Result<_, _>>()?;
    Ok(clips.into_iter().flat_map(|c| c.data).collect())
}

/// An epoch's training clips decoded one batch ahead of the step on their own thread, in the
/// plan's order. Dropping it stops the thread after the batch it is reading.
struct ClipReader {
    rx: Option<std::sync::mpsc::Receiver<Result<Vec<f32>, ProbeError>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ClipReader {
    fn start(spec: ClipSpec, samples: Arc<Vec<Sample>>, plan: Vec<(Vec<usize>, Vec<u64>)>) -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::spawn(move || {
            for (idx, seeds) in &plan {
                let clips = read_clips(&spec, &samples, idx, Some(seeds));
                if tx.send(clips).is_err() {
                    break;
                }
            }
        });
        Self {
            rx: Some(rx),
            thread: Some(thread),
        }
    }

    /// The next batch's clips (a video that cannot be read: its one-line error).
    fn next(&mut self) -> Result<Vec<f32>, ProbeError> {
        let stopped = || ProbeError::Input("the clip reader stopped before the epoch's end".into());
        let rx = self.rx.as_ref().ok_or_else(stopped)?;
        rx.recv().map_err(|_| stopped())?
    }
}

impl Drop for ClipReader {
    fn drop(&mut self) {
        // The receiver first, so a reader blocked on a full channel wakes up and ends.
        self.rx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Fine-tuning's step on the training engine ([`super::engine`]) and the config its weights
/// are read back with (validation, checkpoints).
pub struct EngineRun {
    pub engine: Box<dyn ClassifierEngine>,
    pub config: MarlinConfig,
}

/// Train `model` on `data`'s train split, validate each epoch, keep the best by validation AUC
/// and evaluate it on the test split.
pub fn train<B: AutodiffBackend>(
    model: Classifier<B>,
    data: &Dataset,
    inputs: &Inputs,
    opts: &TrainOptions,
    hooks: &mut dyn RunHooks<B::InnerBackend>,
    device: &B::Device,
) -> Result<RunResult<B::InnerBackend>, ProbeError> {
    train_with(model, None, data, inputs, opts, hooks, device)
}

/// [`train`], with `engine` (fine-tuning on clips) taking the steps: it starts from `model`'s
/// weights, and validation runs on `device`'s backend from the engine's weights.
pub fn train_with<B: AutodiffBackend>(
    mut model: Classifier<B>,
    mut engine: Option<EngineRun>,
    data: &Dataset,
    inputs: &Inputs,
    opts: &TrainOptions,
    hooks: &mut dyn RunHooks<B::InnerBackend>,
    device: &B::Device,
) -> Result<RunResult<B::InnerBackend>, ProbeError> {
    let clip_spec = match inputs {
        Inputs::Clips(spec) => Some(spec.clone()),
        Inputs::Features { .. } => None,
    };
    if engine.is_some() && clip_spec.is_none() {
        return Err(ProbeError::Engine(
            "the training engine fine-tunes on clips, not features".into(),
        ));
    }
    let train_samples = Arc::new(data.train.clone());
    let mut optim = AdamConfig::new()
        .with_beta_1(0.5)
        .with_beta_2(0.9)
        .with_epsilon(1e-8)
        .init::<B, Classifier<B>>();
    let mut sched = Plateau::new(opts.lr, opts.patience, opts.factor);
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let n = data.train.len();
    let group = opts.group.as_deref();
    let (rank, world) = group.map_or((0, 1), |g| (g.rank(), g.world()));
    if n < world {
        return Err(ProbeError::Input(format!(
            "the training split has {n} videos, fewer than the {world} ranks"
        )));
    }
    // Per rank; the global batch is world x bs.
    let bs = opts.batch_size.max(1).min((n / world).max(1));
    let global = bs * world;
    if let Some(g) = group {
        g.agree(
            "run (options, data)",
            &format!(
                "lr {}, global batch {global}, epochs {}, seed {}, {n} training samples",
                opts.lr, opts.max_epochs, opts.seed
            ),
        )?;
        g.agree("starting weights", &weights_digest(&model))?;
    }
    if let Some(e) = &mut engine {
        e.engine.set_group(opts.group.clone());
    }
    let clips = matches!(inputs, Inputs::Clips(_));
    let mut epochs = Vec::new();
    // (validation AUC, -validation loss), epoch, weights.
    type Best<M> = Option<((f64, f64), usize, M)>;
    let mut best: Best<Classifier<B::InnerBackend>> = None;
    let mut stop = format!("reached --max-epochs {}", opts.max_epochs);
    let eval_device = inner_device_of::<B>(device);
    // The engine's notes already shown (a slower path its ops took, said once).
    let mut notes_shown = 0usize;
    for epoch in 1..=opts.max_epochs {
        if hooks.stop() {
            stop = "interrupted".into();
            break;
        }
        let t0 = Instant::now();
        let mut idx: Vec<usize> = (0..n).collect();
        idx.shuffle(&mut rng);
        // The reference drops the last incomplete batch.
        let batches: Vec<&[usize]> = idx.chunks(global).filter(|c| c.len() == global).collect();
        let (mut sum, mut count) = (0f64, 0usize);
        let mut stopped = false;
        // This rank's positions of each batch and its clips' seeds, drawn for the global batch
        // in order (so every rank draws alike, and the run repeats from its seed).
        let plan: Vec<(Vec<usize>, Vec<u64>)> = batches
            .iter()
            .map(|gb| {
                let all_seeds: Vec<u64> = match clips {
                    true => gb.iter().map(|_| rng.random::<u64>()).collect(),
                    false => Vec::new(),
                };
                let mine = |v: &[usize]| -> Vec<usize> {
                    v.iter().copied().skip(rank).step_by(world).collect()
                };
                let seeds = all_seeds.into_iter().skip(rank).step_by(world).collect();
                (mine(gb), seeds)
            })
            .collect();
        // Clips are decoded one batch ahead of the step, on their own thread.
        let mut reader = clip_spec
            .as_ref()
            .map(|spec| ClipReader::start(spec.clone(), train_samples.clone(), plan.clone()));
        let mut data_wait = 0f64;
        let t_train = Instant::now();
        for (bi, (b, _)) in plan.iter().enumerate() {
            stopped = stop_all(group, hooks.stop())?;
            if stopped {
                break;
            }
            let x = match &mut reader {
                Some(r) => {
                    let t = Instant::now();
                    let x = r.next()?;
                    data_wait += t.elapsed().as_secs_f64();
                    Some(x)
                }
                None => None,
            };
            if let (Some(e), Some(x)) = (&mut engine, &x) {
                let y = targets(&data.train, b);
                // A non-finite loss skipped its update; the epoch's loss shows it (NaN).
                let value = e.engine.step(x, &y, sched.lr)?.unwrap_or(f64::NAN);
                let notes = e.engine.notes();
                for n in notes.iter().skip(notes_shown) {
                    hooks.warning(n);
                }
                notes_shown = notes.len();
                sum += value * global as f64;
                count += global;
                hooks.batch(bi + 1, batches.len());
                continue;
            }
            let logits = match (x, &clip_spec) {
                (Some(x), Some(spec)) => {
                    let (t, s) = (spec.clip_frames, spec.size);
                    model.forward_clips(Tensor::<B, 5>::from_data(
                        TensorData::new(x, [b.len(), 3, t, s, s]),
                        device,
                    ))
                }
                _ => inputs.logits(&model, "train", &data.train, b, None, device)?,
            };
            let l = loss(logits, &targets(&data.train, b), data.kind);
            let mut value = to_scalar(l.clone().inner());
            let mut grads = GradientsParams::from_grads(l.backward(), &model);
            if let Some(g) = group {
                let mut extra = [value as f32];
                grads =
                    all_reduce_gradients(g, &model, grads, &mut extra, "the gradient all-reduce")?;
                value = extra[0] as f64;
            }
            sum += value * global as f64;
            count += global;
            model = optim.step(sched.lr, model, grads);
            hooks.batch(bi + 1, batches.len());
        }
        drop(reader);
        let train_s = t_train.elapsed().as_secs_f64();
        if data_wait > DATA_WAIT_WARN * train_s && data_wait > 1.0 && rank == 0 {
            hooks.warning(&format!(
                "epoch {epoch}: the steps waited {data_wait:.1} s of {train_s:.1} s for clips \
                 ({:.0}%): decoding them is the bottleneck (faster storage, more CPU cores, or \
                 fewer other jobs on them)",
                100.0 * data_wait / train_s
            ));
        }
        if stopped || stop_all(group, hooks.stop())? {
            stop = "interrupted".into();
            break;
        }
        let train_loss = sum / count.max(1) as f64;
        let valid = match &mut engine {
            Some(e) => {
                Classifier::from_state_dict(&e.engine.weights()?, Some(&e.config), &eval_device)
                    .map_err(|err| ProbeError::Engine(err.to_string()))?
            }
            None => model.valid(),
        };
        let (val_loss, vm) = inputs.evaluate(&valid, data, "val", bs, &eval_device)?;
        let log = EpochLog {
            epoch,
            lr: sched.lr,
            train_loss,
            val_loss,
            val_accuracy: vm.accuracy,
            val_auc: vm.auc(),
            seconds: t0.elapsed().as_secs_f64(),
            data_wait_s: data_wait,
        };
        // Judged by validation AUC, ties (common on small validation sets) broken by the
        // lower validation loss; where the AUC is undefined (one class in val), by the loss.
        let score = (vm.auc().unwrap_or(f64::NEG_INFINITY), -val_loss);
        let improved = best
            .as_ref()
            .is_none_or(|(s, _, _)| score.0 > s.0 || (score.0 == s.0 && score.1 > s.1));
        if improved {
            best = Some((score, epoch, valid.clone()));
        }
        if rank == 0 {
            hooks.epoch(&log, improved.then_some(&valid))?;
        }
        epochs.push(log);
        sched.step(train_loss);
        if sched.lr < opts.stop_lr {
            stop = format!(
                "learning rate fell below {:e} after epoch {epoch}",
                opts.stop_lr
            );
            break;
        }
    }
    let (_, best_epoch, best) = best.ok_or(ProbeError::NoEpoch)?;
    let (_, val) = inputs.evaluate(&best, data, "val", bs, &eval_device)?;
    let (_, test) = inputs.evaluate(&best, data, "test", bs, &eval_device)?;
    Ok(RunResult {
        epochs,
        best_epoch,
        best,
        val,
        test,
        stop,
    })
}

/// Whether any rank asked to stop (every rank then stops at the same batch).
fn stop_all(group: Option<&Group>, mine: bool) -> Result<bool, ProbeError> {
    let Some(g) = group else { return Ok(mine) };
    let mut flag = [f32::from(u8::from(mine))];
    g.all_reduce_sum(&mut flag, "the stop check")?;
    Ok(flag[0] > 0.0)
}

/// The inner backend's device of an autodiff device (the same device).
fn inner_device_of<B: AutodiffBackend>(d: &B::Device) -> burn::tensor::Device<B::InnerBackend> {
    d.clone()
}
