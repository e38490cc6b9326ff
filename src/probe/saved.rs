//! A trained classifier on disk (the folder `marlin probe` / `marlin finetune` write:
//! `classifier.json` + `best.safetensors`), loaded to predict on features or videos.
//!
//! ```no_run
//! use marlin::backend::Cpu;
//! use marlin::probe::saved::SavedClassifier;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let clf = SavedClassifier::<Cpu>::load("runs/lp".as_ref(), &Default::default())?;
//! let probs = clf.predict_file("clip.npy".as_ref(), None)?;
//! println!("{} -> {}", clf.info.names.join("/"), clf.label(&probs));
//! # Ok(()) }
//! ```

use super::metrics::TaskKind;
use super::train::{probs, reduce_clips, Classifier};
use crate::extract::{read_clips, ClipData, ExtractError, ExtractOptions};
use crate::model::weights::{read_safetensors_file, StateDict, WeightsError};

use crate::model::{Marlin, MarlinConfig};
use crate::util::write_atomic;
use crate::video::Input;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use std::path::{Path, PathBuf};

/// What `classifier.json` records of a run, so a prediction uses the same setup.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ClassifierInfo {
    /// probe or finetune.
    pub mode: String,
    pub task: TaskKind,
    pub names: Vec<String>,
    pub feature_dim: usize,
    /// probe: how clips were combined.
    pub reduction: Option<String>,
    /// finetune: the encoder's config.
    pub config: Option<MarlinConfig>,
    pub sample_rate: Option<usize>,
    pub best_epoch: usize,
    pub val_auc: Option<f64>,
}

/// Why a classifier could not be loaded or could not predict. One line naming the file.
#[derive(Debug, thiserror::Error)]
pub enum PredictError {
    #[error("{path}: {msg}")]
    Read { path: String, msg: String },
    #[error("{path}: cannot write: {msg}")]
    Write { path: String, msg: String },
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Extract(#[from] ExtractError),
    /// Features of the wrong width, a probe's video without the model that made its features.
    #[error("{path}: {msg}")]
    Input { path: String, msg: String },
}

/// A loaded classifier with its run's setup.
pub struct SavedClassifier<B: Backend> {
    pub info: ClassifierInfo,
    pub classifier: Classifier<B>,
    device: B::Device,
}

impl<B: Backend> SavedClassifier<B> {
    /// Load `dir/classifier.json` and `dir/best.safetensors`.
    pub fn load(dir: &Path, device: &B::Device) -> Result<Self, PredictError> {
        let info_path = dir.join("classifier.json");
        let read_err = |p: &Path, msg: String| PredictError::Read {
            path: p.display().to_string(),
            msg,
        };
        let text =
            std::fs::read_to_string(&info_path).map_err(|e| read_err(&info_path, e.to_string()))?;
        let info: ClassifierInfo =
            serde_json::from_str(&text).map_err(|e| read_err(&info_path, e.to_string()))?;
        let ckpt = dir.join("best.safetensors");
        let sd = StateDict {
            tensors: read_safetensors_file(&ckpt)?,
            source: ckpt.display().to_string(),
        };
        let classifier = Classifier::from_state_dict(&sd, info.config.as_ref(), device)?;
        Ok(Self {
            info,
            classifier,
            device: device.clone(),
        })
    }

    /// Outputs of the head: 1 for binary, else the number of labels or classes.
    pub fn width(&self) -> usize {
        match self.info.task {
            TaskKind::Binary => 1,
            _ => self.info.names.len(),
        }
    }

    /// Probabilities of one video's clip features (`[clips, D]` or `[D]`), combined over clips
    /// as in training.
    pub fn predict_features(
        &self,
        features: ndarray::ArrayD<f32>,
        origin: &Path,
    ) -> Result<Vec<f32>, PredictError> {
        let how = self.info.reduction.as_deref().unwrap_or("mean");
        let input_err = |msg: String| PredictError::Input {
            path: origin.display().to_string(),
            msg,
        };
        let f = reduce_clips(features, how).map_err(|e| input_err(e.to_string()))?;
        if f.len() != self.info.feature_dim {
            return Err(input_err(format!(
                "{} features, the classifier takes {}",
                f.len(),
                self.info.feature_dim
            )));
        }
        let x =
            Tensor::<B, 2>::from_data(TensorData::new(f, [1, self.info.feature_dim]), &self.device);
        Ok(probs(self.classifier.forward_features(x), self.info.task))
    }

    /// Probabilities of a `.npy` feature file, or of a video: a probe's through `encoder` (the
    /// model that made its training features), a fine-tuned classifier's through its own
    /// encoder on every window, probabilities averaged.
    pub fn predict_file(
        &self,
        path: &Path,
        encoder: Option<&Marlin<B>>,
    ) -> Result<Vec<f32>, PredictError> {
        if path.extension().is_some_and(|e| e == "npy") {
            let a: ndarray::ArrayD<f32> =
                ndarray_npy::read_npy(path).map_err(|e| PredictError::Read {
                    path: path.display().to_string(),
                    msg: format!("cannot read features: {e}"),
                })?;
            return self.predict_features(a, path);
        }
        if self.classifier.encoder.is_none() {
            let m = encoder.ok_or_else(|| PredictError::Input {
                path: path.display().to_string(),
                msg: "a probe predicts on videos through the model that made its features".into(),
            })?;
            let (a, _) = m.extract_video(path, &ExtractOptions::default())?;
            return self.predict_features(a, path);
        }
        // Fine-tuned: every window of the video, probabilities averaged.
        let cfg = self
            .info
            .config
            .as_ref()
            .ok_or_else(|| PredictError::Input {
                path: path.display().to_string(),
                msg: "classifier.json has no config".into(),
            })?;
        let opts = ExtractOptions {
            sample_rate: self.info.sample_rate.unwrap_or(2),
            ..Default::default()
        };
        let mut clips: Vec<ClipData> = Vec::new();
        let (t, s) = (cfg.clip_frames, cfg.img_size);
        read_clips(
            &Input::from_path(path),
            t,
            s,
            &opts,
            None,
            &|| false,
            &mut |c| clips.push(c),
        )
        .map_err(ExtractError::from)?;
        if clips.is_empty() {
            return Err(PredictError::Input {
                path: path.display().to_string(),
                msg: "no complete clip".into(),
            });
        }
        let k = self.width();
        let mut sum = vec![0f32; k];
        for c in &clips {
            let x = Tensor::<B, 5>::from_data(
                TensorData::new(c.data.clone(), [1, 3, t, s, s]),
                &self.device,
            );
            let p = probs(self.classifier.forward_clips(x), self.info.task);
            for (a, b) in sum.iter_mut().zip(p) {
                *a += b;
            }
        }
        Ok(sum.into_iter().map(|v| v / clips.len() as f32).collect())
    }

    /// The prediction of `probs`: the most likely class name (multiclass), else 0/1 per label
    /// at 0.5, space-separated.
    pub fn label(&self, probs: &[f32]) -> String {
        match self.info.task {
            TaskKind::Multiclass => {
                let arg = (0..probs.len())
                    .max_by(|&a, &b| probs[a].total_cmp(&probs[b]))
                    .unwrap_or(0);
                self.info.names.get(arg).cloned().unwrap_or_default()
            }
            _ => probs
                .iter()
                .map(|&v| if v > 0.5 { "1" } else { "0" })
                .collect::<Vec<_>>()
                .join(" "),
        }
    }

    /// True when predicting on `inputs` needs the MARLIN model that made a probe's features
    /// (a probe classifier and at least one input that is not a `.npy` file).
    pub fn needs_encoder(&self, inputs: &[PathBuf]) -> bool {
        self.classifier.encoder.is_none()
            && inputs
                .iter()
                .any(|p| p.extension().is_none_or(|e| e != "npy"))
    }

    /// Predict every input and write one CSV atomically: `path`, a probability per label (or
    /// class; `probability` for a binary task), `prediction`. An input that fails is left out
    /// of the CSV and returned with its error; the others are written.
    pub fn predict_csv(
        &self,
        inputs: &[PathBuf],
        encoder: Option<&Marlin<B>>,
        out: &Path,
    ) -> Result<Vec<PredictError>, PredictError> {
        let mut header = vec!["path".to_string()];
        header.extend(self.info.names.iter().take(self.width()).cloned());
        if self.info.task == TaskKind::Binary && header.len() == 1 {
            header.push("probability".into());
        }
        header.push("prediction".into());
        let mut rows = vec![header.join(",")];
        let mut failures = Vec::new();
        for p in inputs {
            match self.predict_file(p, encoder) {
                Ok(probs) => {
                    let mut cells = vec![csv_cell(&p.display().to_string())];
                    cells.extend(probs.iter().map(|v| format!("{v:.6}")));
                    cells.push(csv_cell(&self.label(&probs)));
                    rows.push(cells.join(","));
                }
                Err(e) => failures.push(e),
            }
        }
        let text = rows.join("\n") + "\n";
        write_atomic(out, text.as_bytes()).map_err(|e| PredictError::Write {
            path: out.display().to_string(),
            msg: e.to_string(),
        })?;
        Ok(failures)
    }
}

/// A CSV cell, quoted when it holds a comma, a quote or a newline.
fn csv_cell(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}
