//! `marlin split`, `marlin probe`, `marlin finetune`, `marlin predict`: downstream tasks on
//! MARLIN features, with reports.

use super::model_args::ModelArgs;
use super::run_on;
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use clap::Args;
use indicatif::ProgressBar;
use marlin::backend::{BackendTask, DeviceSpec};
use marlin::model::{Marlin, MarlinConfig, Part};
use marlin::probe::data::{make_split, Dataset};
use marlin::probe::metrics::{table, Metrics, TaskKind};
use marlin::probe::saved::{ClassifierInfo, SavedClassifier};
use marlin::probe::train::{
    load_features, train, Classifier, ClipSpec, EpochLog, Inputs, ProbeError, RunHooks,
    TrainOptions,
};
use marlin::util::write_atomic;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Args, Debug)]
pub struct SplitArgs {
    /// A CelebV-HQ root (with cropped/) or a labels CSV (`path,label...`).
    pub input: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Replace existing split files.
    #[arg(long)]
    pub overwrite: bool,
}

/// Options shared by `probe` and `finetune`.
#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// A CelebV-HQ root (celebvhq_info.json, train/val/test.txt) or a folder with
    /// train.csv, val.csv and test.csv.
    #[arg(long)]
    pub labels: PathBuf,
    /// CelebV-HQ task: appearance (40 labels) or action (35).
    #[arg(long, default_value = "appearance")]
    pub task: String,
    /// Run folder: best.safetensors, classifier.json, metrics.csv, report.json, curves.png.
    #[arg(long, short)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long)]
    pub max_epochs: Option<usize>,
    /// Seed of the head's initialisation, shuffling and clip sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Args, Debug)]
pub struct ProbeArgs {
    /// Features from `marlin extract` (`<name>.npy`, `[clips, D]`).
    #[arg(long)]
    pub features: PathBuf,
    /// Combine the clips of a video: mean, max or min.
    #[arg(long, default_value = "mean")]
    pub reduction: String,
    #[command(flatten)]
    pub train: TrainArgs,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
}

#[derive(Args, Debug)]
pub struct FinetuneArgs {
    #[command(flatten)]
    pub train: TrainArgs,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Frame step of the 16-frame training clips.
    #[arg(long, default_value_t = 2)]
    pub sample_rate: usize,
}

#[derive(Args, Debug)]
pub struct PredictArgs {
    /// A run folder of `probe` or `finetune`.
    #[arg(long)]
    pub classifier: PathBuf,
    /// Feature files (.npy) or videos / frame folders.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// The CSV to write: path, then a probability per label (or class) and the prediction.
    #[arg(long, short)]
    pub out: PathBuf,
    /// For videos with a probe classifier: the model that made its features.
    #[command(flatten)]
    pub model: ModelArgs,
}

struct Hooks {
    out: PathBuf,
    name: String,
    bar: ProgressBar,
    stop: Arc<AtomicBool>,
    csv: String,
}

impl Hooks {
    fn new(out: &Path, name: &str, max_epochs: usize, quiet: bool, stop: Arc<AtomicBool>) -> Self {
        let bar = super::progress_bar(
            quiet,
            max_epochs as u64,
            "{bar:30} epoch {pos}/{len} (at most)  {msg}  elapsed {elapsed}",
        );
        Self {
            out: out.to_path_buf(),
            name: name.to_string(),
            bar,
            stop,
            csv: "epoch,lr,train_loss,val_loss,val_accuracy,val_auc,seconds\n".into(),
        }
    }
}

impl<B: Backend> RunHooks<B> for Hooks {
    fn epoch(
        &mut self,
        log: &EpochLog,
        improved: Option<&Classifier<B>>,
    ) -> Result<(), ProbeError> {
        let report = |msg: String| ProbeError::Report(msg);
        self.csv += &format!(
            "{},{:e},{:.6},{:.6},{:.6},{},{:.2}\n",
            log.epoch,
            log.lr,
            log.train_loss,
            log.val_loss,
            log.val_accuracy,
            log.val_auc.map(|v| format!("{v:.6}")).unwrap_or_default(),
            log.seconds
        );
        let p = self.out.join("metrics.csv");
        write_atomic(&p, self.csv.as_bytes())
            .map_err(|e| report(format!("{}: {e}", p.display())))?;
        if let Some(m) = improved {
            let p = self.out.join("best.safetensors");
            m.to_state_dict(&self.name)
                .save_safetensors(&p, None)
                .map_err(|e| report(e.to_string()))?;
        }
        self.bar.inc(1);
        self.bar.set_message(format!(
            "lr {:.1e}  train loss {:.4}  val loss {:.4}  val AUC {}{}",
            log.lr,
            log.train_loss,
            log.val_loss,
            log.val_auc
                .map(|v| format!("{v:.4}"))
                .unwrap_or("n/a".into()),
            if improved.is_some() { " (best)" } else { "" }
        ));
        Ok(())
    }
    fn stop(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

fn metrics_json(m: &Metrics) -> serde_json::Value {
    serde_json::to_value(m).unwrap_or_default()
}

/// Write the reports of a finished run and print the test table.
fn finish<B: Backend>(
    out: &Path,
    info: &ClassifierInfo,
    r: &marlin::probe::train::RunResult<B>,
    quiet: bool,
) -> Result<(), String> {
    let w = |name: &str, text: String| {
        let p = out.join(name);
        write_atomic(&p, text.as_bytes()).map_err(|e| format!("{}: {e}", p.display()))
    };
    w(
        "classifier.json",
        serde_json::to_string_pretty(info).unwrap_or_default(),
    )?;
    w(
        "report.json",
        serde_json::to_string_pretty(&serde_json::json!({
            "best_epoch": r.best_epoch,
            "stopped": r.stop,
            "val": metrics_json(&r.val),
            "test": metrics_json(&r.test),
            "epochs": r.epochs,
        }))
        .unwrap_or_default(),
    )?;
    marlin::probe::plot::curves(&r.epochs, &out.join("curves.png")).map_err(|e| e.to_string())?;
    if !quiet {
        eprintln!(
            "stopped: {}; best epoch {} (validation AUC {})",
            r.stop,
            r.best_epoch,
            r.val.auc().map_or("n/a".into(), |v| format!("{v:.4}"))
        );
    }
    outln!("test: {}", table(&r.test));
    Ok(())
}

pub fn split(args: SplitArgs) -> Result<i32, String> {
    for (p, n) in make_split(&args.input, args.seed, args.overwrite).map_err(|e| e.to_string())? {
        outln!("{}: {n}", p.display());
    }
    Ok(0)
}

/// Train with the reference's optimiser and schedule (`defaults`: batch size and max epochs when
/// not given), write the run's reports, and return the exit code (130 after Ctrl-C).
#[allow(clippy::too_many_arguments)]
fn train_and_report<B: Backend>(
    model: Classifier<Autodiff<B>>,
    data: &Dataset,
    inputs: &Inputs,
    t: &TrainArgs,
    defaults: (usize, usize),
    mut info: ClassifierInfo,
    stop: &Arc<AtomicBool>,
    device: &B::Device,
) -> Result<i32, String> {
    let opts = TrainOptions {
        lr: t.lr,
        batch_size: t.batch_size.unwrap_or(defaults.0),
        max_epochs: t.max_epochs.unwrap_or(defaults.1),
        seed: t.seed,
        ..Default::default()
    };
    let mut hooks = Hooks::new(&t.out, &info.mode, opts.max_epochs, t.quiet, stop.clone());
    let r = train::<Autodiff<B>>(model, data, inputs, &opts, &mut hooks, device)
        .map_err(|e| e.to_string())?;
    hooks.bar.finish_and_clear();
    info.best_epoch = r.best_epoch;
    info.val_auc = r.val.auc();
    finish(&t.out, &info, &r, t.quiet)?;
    Ok(if stop.load(Ordering::Relaxed) { 130 } else { 0 })
}

struct ProbeJob {
    args: ProbeArgs,
    data: Dataset,
    inputs: Inputs,
    stop: Arc<AtomicBool>,
}

impl BackendTask for ProbeJob {
    type Output = Result<i32, String>;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let t = &self.args.train;
        let Inputs::Features { d, .. } = &self.inputs else {
            return Err("probe needs features".into());
        };
        let d = *d;
        let model = Classifier::<Autodiff<B>>::new(None, d, self.data.width(), t.seed, &device);
        let info = ClassifierInfo {
            mode: "probe".into(),
            task: self.data.kind,
            names: self.data.names.clone(),
            feature_dim: d,
            reduction: Some(self.args.reduction.clone()),
            config: None,
            sample_rate: None,
            best_epoch: 0,
            val_auc: None,
        };
        let defaults = (32, 200);
        train_and_report::<B>(
            model,
            &self.data,
            &self.inputs,
            t,
            defaults,
            info,
            &self.stop,
            &device,
        )
    }
}

fn prepare_out(out: &Path) -> Result<(), String> {
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))
}

pub fn probe(args: ProbeArgs) -> Result<i32, String> {
    let data = Dataset::load(&args.train.labels, &args.train.task).map_err(|e| e.to_string())?;
    let paths = data
        .feature_paths(&args.features)
        .map_err(|e| e.to_string())?;
    let inputs = load_features(&paths, &data, &args.reduction).map_err(|e| e.to_string())?;
    if !args.train.quiet {
        eprintln!(
            "{:?} task, {} label(s)/class(es); {} train, {} val, {} test videos",
            data.kind,
            data.names.len(),
            data.train.len(),
            data.val.len(),
            data.test.len()
        );
    }
    prepare_out(&args.train.out)?;
    let stop = Arc::new(AtomicBool::new(false));
    super::stop_on_ctrlc(&stop);
    let device = args.device;
    run_on(
        device,
        ProbeJob {
            args,
            data,
            inputs,
            stop,
        },
    )?
}

struct FinetuneJob {
    args: FinetuneArgs,
    data: Dataset,
    cfg: MarlinConfig,
    weights: PathBuf,
    stop: Arc<AtomicBool>,
}

impl BackendTask for FinetuneJob {
    type Output = Result<i32, String>;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let t = &self.args.train;
        let (marlin, _) =
            Marlin::<Autodiff<B>>::load_file(&self.cfg, &self.weights, &[Part::Encoder], &device)
                .map_err(|e| e.to_string())?;
        let d = self.cfg.encoder.embed_dim;
        let model = Classifier::new(Some(marlin.encoder), d, self.data.width(), t.seed, &device);
        let inputs = Inputs::Clips(ClipSpec {
            clip_frames: self.cfg.clip_frames,
            sample_rate: self.args.sample_rate,
            size: self.cfg.img_size,
        });
        let info = ClassifierInfo {
            mode: "finetune".into(),
            task: self.data.kind,
            names: self.data.names.clone(),
            feature_dim: d,
            reduction: None,
            config: Some(self.cfg.clone()),
            sample_rate: Some(self.args.sample_rate),
            best_epoch: 0,
            val_auc: None,
        };
        let defaults = (8, 20);
        train_and_report::<B>(
            model, &self.data, &inputs, t, defaults, info, &self.stop, &device,
        )
    }
}

pub fn finetune(args: FinetuneArgs) -> Result<i32, String> {
    if args.sample_rate == 0 {
        return Err("--sample-rate must be at least 1".into());
    }
    let data = Dataset::load(&args.train.labels, &args.train.task).map_err(|e| e.to_string())?;
    data.check_videos().map_err(|e| e.to_string())?;
    let (cfg, weights) = args.model.resolve(false, !args.train.quiet)?;
    prepare_out(&args.train.out)?;
    let stop = Arc::new(AtomicBool::new(false));
    super::stop_on_ctrlc(&stop);
    let device = args.model.device;
    run_on(
        device,
        FinetuneJob {
            args,
            data,
            cfg,
            weights,
            stop,
        },
    )?
}

struct PredictJob {
    args: PredictArgs,
}

impl BackendTask for PredictJob {
    type Output = Result<i32, String>;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let clf = SavedClassifier::<B>::load(&self.args.classifier, &device)
            .map_err(|e| e.to_string())?;
        let info = &clf.info;
        // A probe's videos need the model that made its features.
        let encoder = if info.mode == "probe"
            && self
                .args
                .inputs
                .iter()
                .any(|p| p.extension().is_none_or(|e| e != "npy"))
        {
            let (cfg, w) = self.args.model.resolve(false, true)?;
            Some(
                Marlin::<B>::load_file(&cfg, &w, &[Part::Encoder], &device)
                    .map_err(|e| e.to_string())?
                    .0,
            )
        } else {
            None
        };
        let mut header = vec!["path".to_string()];
        header.extend(info.names.iter().take(clf.width()).cloned());
        if info.task == TaskKind::Binary && header.len() == 1 {
            header.push("probability".into());
        }
        header.push("prediction".into());
        let mut rows = vec![header.join(",")];
        let mut failures = 0;
        for p in &self.args.inputs {
            match clf.predict_file(p, encoder.as_ref()) {
                Ok(probs) => {
                    let mut cells = vec![csv_cell(&p.display().to_string())];
                    cells.extend(probs.iter().map(|v| format!("{v:.6}")));
                    cells.push(csv_cell(&clf.label(&probs)));
                    rows.push(cells.join(","));
                }
                Err(e) => {
                    eprintln!("failed: {e}");
                    failures += 1;
                }
            }
        }
        let text = rows.join("\n") + "\n";
        write_atomic(&self.args.out, text.as_bytes())
            .map_err(|e| format!("{}: {e}", self.args.out.display()))?;
        eprintln!(
            "{} of {} inputs predicted into {}",
            self.args.inputs.len() - failures,
            self.args.inputs.len(),
            self.args.out.display()
        );
        Ok(if failures == 0 { 0 } else { 1 })
    }
}

fn csv_cell(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

pub fn predict(args: PredictArgs) -> Result<i32, String> {
    let device = args.model.device;
    run_on(device, PredictJob { args })?
}
