//! The `marlin` command line: parses arguments, calls the library, reports.

mod bench;
mod extract;
mod face;
mod face_args;
mod model_args;
mod parse;
mod pretrain;
mod probe;
mod reconstruct;

use clap::{Parser, Subcommand};
use marlin::hub;
use marlin::model::weights::{count_params, StateDict};
use marlin::model::{MarlinConfig, Part};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "marlin",
    version,
    about = "MARLIN facial video features, in Rust"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Videos or frame folders to MARLIN features (.npy), as marlin-pytorch's extract_video.
    Extract(Box<extract::ExtractArgs>),
    /// One manifest of an extraction (all shards): every input with its output, shape and
    /// status (done, failed, missing) in OUT/manifest.csv and
    /// OUT/manifest.parquet; missing inputs in OUT/missing.txt.
    Manifest(extract::ManifestArgs),
    /// Faces in the wild -> face videos (or frame folders) and their tracks (JSON).
    Crop(Box<face::CropArgs>),
    /// Detect faces in an image or video; draw them (--draw) so a person can look.
    Detect(Box<face::DetectArgs>),
    /// A face's LaPa label map (face mesh or 5-point template) and its Fasking mask, drawn
    /// (--draw) so a person can look.
    Parse(Box<parse::ParseArgs>),
    /// Pretraining data: face crops + parsing maps of raw videos, train/val CSVs.
    Prepare(Box<pretrain::PrepareArgs>),
    /// A clip as original | masked | reconstruction (PNG grid and MP4); the mask alone
    /// without weights.
    Reconstruct(Box<reconstruct::ReconstructArgs>),
    /// Print a released model's config (reference YAML, training keys included) to start a
    /// custom one: `marlin config marlin_vit_base_ytf > my.yaml`.
    Config {
        /// marlin_vit_small_ytf, marlin_vit_base_ytf, marlin_vit_large_ytf, or tiny_smoke (a
        /// 32 px model for CPU smoke runs of `marlin pretrain`)
        name: String,
    },
    /// Self-supervised pretraining (masked reconstruction + adversarial critic), resumable.
    Pretrain(Box<pretrain::PretrainArgs>),
    /// Split a labels CSV or a CelebV-HQ root 80/10/10 into train/val/test lists.
    Split(probe::SplitArgs),
    /// Linear probing: a linear head on features from `marlin extract`, with reports.
    Probe(Box<probe::ProbeArgs>),
    /// Fine-tune the encoder with a linear head on 16-frame clips, with reports.
    Finetune(Box<probe::FinetuneArgs>),
    /// Apply a trained probe or fine-tuned classifier to features or videos; writes CSV.
    Predict(Box<probe::PredictArgs>),
    /// Time feature extraction on this machine (random weights), optionally per operation.
    Bench(bench::BenchArgs),
    /// Download official weights into the cache.
    Download {
        /// marlin_vit_small_ytf, marlin_vit_base_ytf or marlin_vit_large_ytf
        name: String,
        /// The full model (encoder + decoder), for reconstruction.
        #[arg(long)]
        full: bool,
        #[arg(long, short)]
        quiet: bool,
    },
    /// What a checkpoint holds: parts, matching config, parameter counts.
    Info {
        file: PathBuf,
        /// A custom config (YAML) to check the file against.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// What this machine offers marlin: devices built, CPU instructions, FFmpeg, the CUDA
    /// driver and GPUs, and where cuBLASLt, cuDNN and NVRTC were found (or what to install).
    Doctor {
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// The weights cache ($MARLIN_HOME, else the platform cache dir).
    Cache {
        #[command(subcommand)]
        action: CacheAction,
    },
}

#[derive(Subcommand, Debug)]
enum CacheAction {
    /// List cached files.
    List,
    /// Remove every cached file.
    Clean,
}

/// [`marlin::backend::run_on`] with its error as the CLI's one line.
fn run_on<T: marlin::backend::BackendTask>(
    spec: marlin::backend::DeviceSpec,
    task: T,
) -> Result<T::Output, String> {
    marlin::backend::run_on(spec, task).map_err(|e| e.to_string())
}

/// A clap parser of a library enum: one of `names` (listed in `--help`), then `FromStr`.
fn names<T>(names: &'static [&'static str]) -> impl clap::builder::TypedValueParser<Value = T>
where
    T: std::str::FromStr + Clone + Send + Sync + 'static,
{
    use clap::builder::TypedValueParser;
    // Clap has already checked the value is one of `names`, each of which `T` parses.
    clap::builder::PossibleValuesParser::new(names).map(|s| {
        s.parse::<T>()
            .unwrap_or_else(|_| unreachable!("'{s}' is one of the listed names"))
    })
}

/// A progress bar of `len` items with an indicatif `template`, hidden with `quiet`.
fn progress_bar(quiet: bool, len: u64, template: &str) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(len);
    b.set_style(
        indicatif::ProgressStyle::with_template(template)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    b
}

/// Ctrl-C sets `stop` (long jobs finish or drop their current item and leave whole outputs);
/// a second Ctrl-C exits at once (outputs on disk are whole either way: each is renamed into
/// place only when complete).
fn stop_on_ctrlc(stop: &std::sync::Arc<std::sync::atomic::AtomicBool>) {
    let stop = stop.clone();
    let _ = ctrlc::set_handler(move || {
        if stop.swap(true, std::sync::atomic::Ordering::SeqCst) {
            std::process::exit(130);
        }
    });
}

/// Entry point; returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Extract(args) => extract::run(*args),
        Command::Manifest(args) => extract::manifest(args),
        Command::Bench(args) => bench::run(args),
        Command::Crop(args) => face::crop(*args),
        Command::Split(args) => probe::split(args),
        Command::Pretrain(args) => pretrain::run(*args),
        Command::Prepare(args) => pretrain::prepare(*args),
        Command::Config { name } => MarlinConfig::template(&name)
            .map(|c| {
                out!("{}", c.to_yaml());
                0
            })
            .map_err(|e| e.to_string()),
        Command::Reconstruct(args) => reconstruct::run(*args),
        Command::Probe(args) => probe::probe(*args),
        Command::Finetune(args) => probe::finetune(*args),
        Command::Predict(args) => probe::predict(*args),
        Command::Detect(args) => face::detect(*args),
        Command::Parse(args) => parse::run(*args),
        Command::Download { name, full, quiet } => hub::fetch(&name, full, !quiet)
            .map(|p| {
                outln!("{}", p.display());
                0
            })
            .map_err(|e| e.to_string()),
        Command::Info { file, config } => info(&file, config.as_deref()).map(|_| 0),
        Command::Cache { action } => cache(action).map(|_| 0),
        Command::Doctor { json } => {
            let r = marlin::doctor::report();
            if json {
                serde_json::to_string_pretty(&r)
                    .map(|t| {
                        outln!("{t}");
                        0
                    })
                    .map_err(|e| e.to_string())
            } else {
                out!("{r}");
                Ok(0)
            }
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

fn millions(n: usize) -> String {
    format!("{:.2}M", n as f64 / 1e6)
}

fn info(file: &std::path::Path, config: Option<&std::path::Path>) -> Result<(), String> {
    let sd = StateDict::load(file).map_err(|e| e.to_string())?;
    let s = sd.summary();
    let kind = match (s.has_encoder, s.has_decoder, s.has_discriminator) {
        (true, true, true) => "training checkpoint (encoder + decoder + discriminator)",
        (true, true, false) => "full (encoder + decoder)",
        (true, false, _) => "encoder-only",
        _ => "incomplete (no encoder)",
    };
    outln!("file:       {}", file.display());
    outln!("content:    {kind}");
    outln!(
        "tensors:    {} ({} values)",
        s.num_tensors,
        millions(s.num_values)
    );
    let parts = sd.parts();
    let cfg = match config {
        Some(p) => {
            let cfg = MarlinConfig::from_yaml_file(p).map_err(|e| e.to_string())?;
            sd.check(&cfg, &parts).map_err(|e| e.to_string())?;
            Some(cfg)
        }
        None => sd.detect_config(),
    };
    match cfg {
        Some(cfg) => {
            outln!("config:     {}", cfg.name());
            for (label, part) in [
                ("encoder", Part::Encoder),
                ("decoder", Part::Decoder),
                ("discriminator", Part::Discriminator),
            ] {
                if parts.contains(&part) {
                    outln!(
                        "  {label:<13} {} parameters",
                        millions(count_params(&cfg, &[part]))
                    );
                }
            }
            let unknown = sd.check(&cfg, &parts).map_err(|e| e.to_string())?;
            for k in unknown {
                outln!("  warning: unknown key '{k}'");
            }
        }
        None => {
            outln!("config:     fits no released model (pass --config YAML for a custom one)")
        }
    }
    Ok(())
}

fn cache(action: CacheAction) -> Result<(), String> {
    let dir = hub::cache_dir();
    match action {
        CacheAction::List => {
            outln!("cache: {}", dir.display());
            for (p, len) in hub::cached_files() {
                outln!(
                    "  {:>10}  {}",
                    len,
                    p.file_name().unwrap_or_default().to_string_lossy()
                );
            }
        }
        CacheAction::Clean => {
            let (n, bytes) = hub::clean_cache().map_err(|e| e.to_string())?;
            outln!(
                "removed {n} files ({:.1} MB) from {}",
                bytes as f64 / 1e6,
                dir.display()
            );
        }
    }
    Ok(())
}
