//! Checkpoint import and export.
//!
//! A checkpoint is read into a [`StateDict`]: official key names (`encoder.blocks.0.attn.qkv.weight`)
//! mapped to host tensors in PyTorch layout. The model is built from a state dict and exported back
//! to one, so `.pt`, Lightning `.ckpt` and safetensors files share one code path, and every shape
//! is checked against [`param_specs`] with an error that names the key and both shapes. The
//! names and shapes come from the module tree ([`super::keys`]); nothing here lists them.

use super::config::MarlinConfig;
pub use super::host::{HostTensor, StateDict, WeightsError};
use burn_store::pytorch::PytorchReader;
use rand::{rngs::StdRng, RngExt, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Which parts of the model a set of weights covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Part {
    Encoder,
    /// Decoder plus the encoder-to-decoder projection.
    Decoder,
    Discriminator,
}

/// How a parameter is initialised when training from scratch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// Xavier-uniform over (fan_in, fan_out) of a Linear weight `[out, in]`.
    Xavier,
    /// PyTorch's default Conv3d init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    ConvDefault {
        fan_in: usize,
    },
    Zeros,
    Ones,
    /// Constant (layer scale gamma = init_values).
    Const(f32),
    /// Truncated normal, std (mask token).
    TruncNormal(f32),
    /// The fixed sin-cos table (not trained).
    PosTable,
}

/// One expected parameter: official key, PyTorch shape, initialiser.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    pub key: String,
    pub shape: Vec<usize>,
    pub init: Init,
    pub part: Part,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The reference's initialisation of a parameter (its `_init_weights`), by the module that
/// holds it: Linear weights Xavier-uniform with zero biases, LayerNorm ones and zeros, the
/// tubelet Conv3d torch's default, layer-scale gammas `init_values`, the mask token a truncated
/// normal, position tables the fixed sin-cos table.
fn reference_init(cfg: &MarlinConfig, slot: &super::keys::Slot) -> Init {
    match (slot.module.as_str(), slot.name()) {
        _ if slot.conv => Init::ConvDefault {
            fan_in: 3 * cfg.tubelet_size * cfg.patch_size * cfg.patch_size,
        },
        (_, "pos_embedding") => Init::PosTable,
        (_, "mask_token") => Init::TruncNormal(0.02),
        (_, "gamma_1" | "gamma_2") => Init::Const(cfg.init_values as f32),
        ("LayerNorm", "gamma") => Init::Ones,
        ("Linear", "weight") => Init::Xavier,
        _ => Init::Zeros,
    }
}

/// Every parameter of the given parts (the encoder always), with official key names and
/// PyTorch shapes, in the reference's order: read off the module tree
/// ([`super::Marlin::slots`]), which is the single source of truth for loading, counting,
/// exporting and initialising.
pub fn param_specs(cfg: &MarlinConfig, parts: &[Part]) -> Vec<ParamSpec> {
    type Host = burn::backend::Flex;
    // Lazy parameters: building the tree allocates no tensor.
    let model = super::Marlin::<Host>::new(cfg, parts, &Default::default());
    model
        .slots()
        .into_iter()
        .filter(|(part, _)| parts.contains(part))
        .map(|(part, slot)| ParamSpec {
            init: reference_init(cfg, &slot),
            key: slot.key,
            shape: slot.shape,
            part,
        })
        .collect()
}

/// Number of parameters of the given parts, counted from the specs (nothing allocated).
pub fn count_params(cfg: &MarlinConfig, parts: &[Part]) -> usize {
    param_specs(cfg, parts).iter().map(ParamSpec::numel).sum()
}

/// The fixed sin-cos position table `[n, d]`: angle = p / 10000^(2*floor(j/2)/d), sin on even
/// channels, cos on odd. Computed in f64 and rounded once, as the reference does with numpy.
pub fn sinusoid_table(n: usize, d: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n * d);
    for p in 0..n {
        for j in 0..d {
            let angle = p as f64 / 10000f64.powf(2.0 * (j / 2) as f64 / d as f64);
            out.push(if j % 2 == 0 { angle.sin() } else { angle.cos() } as f32);
        }
    }
    out
}

/// What a checkpoint holds, as `marlin info` reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointSummary {
    pub has_encoder: bool,
    pub has_decoder: bool,
    pub has_discriminator: bool,
    pub num_tensors: usize,
    pub num_values: usize,
}

/// Reading, checking and writing checkpoint files (the type is in [`super::host`]).
impl StateDict {
    /// Read a checkpoint: a torch `.pt` (zip or legacy pickle), a Lightning `.ckpt` (`state_dict`
    /// inside), or safetensors (ours, or the HF wrapper's prefixed names). The file type is told
    /// from its first bytes, not its extension. Keys are normalised to the official names.
    pub fn load(path: &Path) -> Result<Self, WeightsError> {
        let file = path.display().to_string();
        let read_err = |msg: String| WeightsError::Read {
            file: file.clone(),
            msg,
        };
        let mut head = [0u8; 16];
        let n = {
            use std::io::Read;
            let mut f = std::fs::File::open(path).map_err(|e| read_err(e.to_string()))?;
            f.read(&mut head).map_err(|e| read_err(e.to_string()))?
        };
        if n == 0 {
            return Err(read_err("the file is empty".into()));
        }
        // safetensors first: its 8-byte header length can begin with 0x80, the pickle marker.
        let raw = if n >= 9 && head[8] == b'{' && !head.starts_with(b"PK") {
            read_safetensors(path).map_err(|e| read_err(e.to_string()))?
        } else if head.starts_with(b"PK") || head[0] == 0x80 {
            read_torch(path).map_err(|e| read_err(e.to_string()))?
        } else {
            return Err(read_err(
                "unknown format (expected a torch .pt/.ckpt zip or pickle, or safetensors)".into(),
            ));
        };
        Self::from_raw(raw, file)
    }

    /// Normalise raw names: keep the Lightning `state_dict.` entries when present, then strip any
    /// prefix that stands before the official names (`marlin.`, `model.`, `_orig_mod.` ...).
    fn from_raw(raw: BTreeMap<String, LazyTensor>, file: String) -> Result<Self, WeightsError> {
        let probes = [
            "encoder.patch_embedding.projection.weight",
            "decoder.mask_token",
            "enc_dec_proj.weight",
            "discriminator.layers.0.linear.weight",
        ];
        // The shortest prefix in front of a probe key wins (a ckpt may nest copies, e.g. EMA).
        let prefix = raw
            .keys()
            .filter_map(|k| {
                probes.iter().find_map(|p| {
                    k.strip_suffix(p)
                        .filter(|pre| pre.is_empty() || pre.ends_with('.'))
                })
            })
            .min_by_key(|pre| pre.len())
            .map(str::to_string);
        if prefix.is_none() {
            if let Some(vp) = Self::videomae_prefix(&raw) {
                return Self::from_videomae(raw, &vp, file);
            }
        }
        let Some(prefix) = prefix else {
            let sample: Vec<&String> = raw.keys().take(3).collect();
            return Err(WeightsError::NotMarlin {
                file,
                probe: probes[0].into(),
                n: raw.len(),
                sample: if sample.is_empty() {
                    String::new()
                } else {
                    format!(", e.g. {sample:?}")
                },
            });
        };
        let mut tensors = BTreeMap::new();
        for (k, v) in raw {
            if let Some(name) = k.strip_prefix(&prefix) {
                let t = v.materialise().map_err(|msg| WeightsError::Read {
                    file: file.clone(),
                    msg: format!("tensor '{k}': {msg}"),
                })?;
                tensors.insert(name.to_string(), t);
            }
        }
        Ok(Self {
            tensors,
            source: file,
        })
    }

    /// A VideoMAE pretraining checkpoint (`encoder.patch_embed.proj`, `mlp.fc1/fc2`,
    /// `encoder_to_decoder`, top-level `mask_token`, usually inside a `model` dict) renamed to
    /// MARLIN's keys, to initialise pretraining. Its position tables are fixed sin-cos tables
    /// it does not store; [`StateDict::with_fixed_tables`] fills them in. None when the file is
    /// not one.
    fn videomae_prefix(raw: &BTreeMap<String, LazyTensor>) -> Option<String> {
        let probe = "encoder.patch_embed.proj.weight";
        raw.keys()
            .filter_map(|k| {
                k.strip_suffix(probe)
                    .filter(|p| p.is_empty() || p.ends_with('.'))
            })
            .min_by_key(|p| p.len())
            .map(str::to_string)
    }

    fn from_videomae(
        raw: BTreeMap<String, LazyTensor>,
        prefix: &str,
        file: String,
    ) -> Result<Self, WeightsError> {
        let mut tensors = BTreeMap::new();
        for (k, v) in raw {
            let Some(name) = k.strip_prefix(prefix) else {
                continue;
            };
            let name = if name == "mask_token" {
                "decoder.mask_token".to_string()
            } else if let Some(rest) = name.strip_prefix("encoder_to_decoder.") {
                format!("enc_dec_proj.{rest}")
            } else if let Some(rest) = name.strip_prefix("encoder.patch_embed.proj.") {
                format!("encoder.patch_embedding.projection.{rest}")
            } else if name.starts_with("encoder.") || name.starts_with("decoder.") {
                name.replace(".mlp.fc1.", ".mlp.layers.0.linear.")
                    .replace(".mlp.fc2.", ".mlp.layers.1.linear.")
            } else {
                continue;
            };
            let t = v.materialise().map_err(|msg| WeightsError::Read {
                file: file.clone(),
                msg: format!("tensor '{k}': {msg}"),
            })?;
            tensors.insert(name, t);
        }
        Ok(Self {
            tensors,
            source: format!("{file} (VideoMAE keys)"),
        })
    }

    /// This state dict with the fixed sin-cos position tables of `cfg` added where absent (they
    /// are never trained; VideoMAE files do not store them).
    pub fn with_fixed_tables(&self, cfg: &MarlinConfig) -> Option<Self> {
        let n = cfg.num_patches();
        let wanted = [
            (
                "encoder.pos_embedding.emb",
                cfg.encoder.embed_dim,
                "encoder.",
            ),
            (
                "decoder.pos_embedding.emb",
                cfg.decoder.embed_dim,
                "decoder.",
            ),
        ];
        let missing: Vec<_> = wanted
            .iter()
            .filter(|(k, _, root)| {
                !self.tensors.contains_key(*k) && self.tensors.keys().any(|x| x.starts_with(root))
            })
            .collect();
        if missing.is_empty() {
            return None;
        }
        let mut sd = self.clone();
        for (k, d, _) in missing {
            sd.tensors.insert(
                k.to_string(),
                HostTensor::new(vec![1, n, *d], sinusoid_table(n, *d)),
            );
        }
        Some(sd)
    }

    /// Parts present, told from their key roots.
    pub fn summary(&self) -> CheckpointSummary {
        let has = |root: &str| self.tensors.keys().any(|k| k.starts_with(root));
        CheckpointSummary {
            has_encoder: has("encoder."),
            has_decoder: has("decoder.") && has("enc_dec_proj."),
            has_discriminator: has("discriminator."),
            num_tensors: self.tensors.len(),
            num_values: self.tensors.values().map(HostTensor::numel).sum(),
        }
    }

    /// Parts this checkpoint holds (encoder-only, full, full + discriminator).
    pub fn parts(&self) -> Vec<Part> {
        let s = self.summary();
        let mut parts = Vec::new();
        if s.has_encoder {
            parts.push(Part::Encoder);
        }
        if s.has_decoder {
            parts.push(Part::Decoder);
        }
        if s.has_discriminator {
            parts.push(Part::Discriminator);
        }
        parts
    }

    /// Check every expected key of `parts` against `cfg`: a missing key or a shape mismatch is an
    /// error naming the key and both shapes. Returns the keys present that no part expects.
    pub fn check(&self, cfg: &MarlinConfig, parts: &[Part]) -> Result<Vec<String>, WeightsError> {
        let specs = param_specs(cfg, parts);
        for s in &specs {
            match self.tensors.get(&s.key) {
                None => {
                    let hint = if s.part == Part::Decoder && !self.summary().has_decoder {
                        " (this is an encoder-only checkpoint; reconstruction needs the '.full' one)"
                            .to_string()
                    } else {
                        String::new()
                    };
                    return Err(WeightsError::Missing {
                        file: self.source.clone(),
                        key: s.key.clone(),
                        expected: s.shape.clone(),
                        hint,
                    });
                }
                Some(t) if t.shape != s.shape => {
                    return Err(WeightsError::Shape {
                        file: self.source.clone(),
                        key: s.key.clone(),
                        config: cfg.name().to_string(),
                        expected: s.shape.clone(),
                        found: t.shape.clone(),
                    })
                }
                Some(_) => {}
            }
        }
        let expected: BTreeSet<&str> = specs.iter().map(|s| s.key.as_str()).collect();
        let all_parts = param_specs(cfg, &[Part::Encoder, Part::Decoder, Part::Discriminator]);
        let known: BTreeSet<&str> = all_parts.iter().map(|s| s.key.as_str()).collect();
        Ok(self
            .tensors
            .keys()
            .filter(|k| !expected.contains(k.as_str()) && !known.contains(k.as_str()))
            .cloned()
            .collect())
    }

    /// Which released config these weights fit, if any (by every shape of the present parts).
    pub fn detect_config(&self) -> Option<MarlinConfig> {
        let parts = self.parts();
        super::config::RELEASED_MODELS.iter().find_map(|name| {
            let cfg = MarlinConfig::from_name(name).ok()?;
            self.check(&cfg, &parts).ok()?;
            Some(cfg)
        })
    }

    /// Fresh weights for `parts` with the reference's initialisation, deterministic in `seed`.
    pub fn init(cfg: &MarlinConfig, parts: &[Part], seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut sd = Self::new(format!("<init seed {seed}>"));
        for s in param_specs(cfg, parts) {
            let numel = s.numel();
            let data: Vec<f32> = match s.init {
                Init::Xavier => {
                    let (fan_out, fan_in) = (s.shape[0], s.shape[1]);
                    let a = (6.0 / (fan_in + fan_out) as f64).sqrt() as f32;
                    (0..numel).map(|_| rng.random_range(-a..a)).collect()
                }
                Init::ConvDefault { fan_in } => {
                    let a = 1.0 / (fan_in as f32).sqrt();
                    (0..numel).map(|_| rng.random_range(-a..a)).collect()
                }
                Init::Zeros => vec![0.0; numel],
                Init::Ones => vec![1.0; numel],
                Init::Const(c) => vec![c; numel],
                Init::TruncNormal(std) => (0..numel)
                    .map(|_| loop {
                        // Box-Muller; keep draws within two standard deviations.
                        let u1: f32 = rng.random_range(f32::EPSILON..1.0);
                        let u2: f32 = rng.random();
                        let z = (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos();
                        if z.abs() <= 2.0 {
                            break z * std;
                        }
                    })
                    .collect(),
                Init::PosTable => sinusoid_table(s.shape[1], s.shape[2]),
            };
            sd.tensors.insert(s.key, HostTensor::new(s.shape, data));
        }
        sd
    }

    /// Write as safetensors (float32, official key names), atomically: temp file then rename.
    pub fn save_safetensors(
        &self,
        path: &Path,
        metadata: Option<std::collections::HashMap<String, String>>,
    ) -> Result<(), WeightsError> {
        let err = |msg: String| WeightsError::Write {
            file: path.display().to_string(),
            msg,
        };
        let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = self
            .tensors
            .iter()
            .map(|(k, t)| {
                let b: Vec<u8> = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
                (k.clone(), b, t.shape.clone())
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
            .iter()
            .map(|(k, b, s)| {
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .map(|v| (k.clone(), v))
                    .map_err(|e| err(e.to_string()))
            })
            .collect::<Result<_, _>>()?;
        let data = safetensors::serialize(views, &metadata).map_err(|e| err(e.to_string()))?;
        crate::util::write_atomic(path, &data).map_err(|e| err(e.to_string()))
    }
}

/// Why a checkpoint's bytes could not be read as tensors (reported as [`WeightsError::Read`],
/// which adds the file).
#[derive(Debug, thiserror::Error)]
enum FormatError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// burn-store's reader (torch zip or pickle), for a file that candle cannot read either.
    #[error("{0}")]
    Torch(String),
    #[error("{0}")]
    Safetensors(#[from] safetensors::SafeTensorError),
    #[error("tensor '{name}': {msg}")]
    Tensor { name: String, msg: String },
    #[error("tensor '{name}' has unsupported dtype {dtype}")]
    Dtype { name: String, dtype: String },
    /// A tensor whose values cannot be read as f32, or do not fill its shape.
    #[error("{0}")]
    Values(String),
}

/// A tensor read lazily from a checkpoint (only model keys are materialised).
pub(crate) enum LazyTensor {
    Snapshot(burn_store::TensorSnapshot),
    Host(HostTensor),
}

impl LazyTensor {
    fn materialise(self) -> Result<HostTensor, FormatError> {
        match self {
            LazyTensor::Host(t) => Ok(t),
            LazyTensor::Snapshot(s) => {
                let shape = s.shape.to_vec();
                let data = s
                    .to_data()
                    .map_err(|e| FormatError::Values(format!("{e:?}")))?
                    .convert::<f32>()
                    .into_vec::<f32>()
                    .map_err(|e| FormatError::Values(format!("{e:?}")))?;
                if data.len() != shape.iter().product::<usize>() {
                    return Err(FormatError::Values(format!(
                        "{} values for shape {shape:?}",
                        data.len()
                    )));
                }
                Ok(HostTensor::new(shape, data))
            }
        }
    }
}

fn read_torch(path: &Path) -> Result<BTreeMap<String, LazyTensor>, FormatError> {
    // burn-store reads plain state dicts (zip or legacy pickle); nested dicts come back as
    // dotted paths. It rejects dicts with non-string keys, which every real Lightning checkpoint
    // has (optimizer state is keyed by parameter index): for those, candle's reader takes the
    // `state_dict` entry alone.
    match PytorchReader::new(path) {
        Ok(reader) => Ok(reader
            .into_tensors()
            .into_iter()
            .map(|(k, v)| (k, LazyTensor::Snapshot(v)))
            .collect()),
        Err(burn_err) => read_torch_candle(path, Some("state_dict"))
            .map_err(|_| FormatError::Torch(burn_err.to_string())),
    }
}

fn read_torch_candle(
    path: &Path,
    key: Option<&str>,
) -> Result<BTreeMap<String, LazyTensor>, FormatError> {
    let pth = candle_core::pickle::PthTensors::new(path, key)
        .map_err(|e| FormatError::Torch(e.to_string()))?;
    let mut out = BTreeMap::new();
    for name in pth.tensor_infos().keys() {
        let tensor_err = |e: candle_core::Error| FormatError::Tensor {
            name: name.clone(),
            msg: e.to_string(),
        };
        let Some(t) = pth.get(name).map_err(tensor_err)? else {
            continue;
        };
        let shape = t.dims().to_vec();
        let data = t
            .flatten_all()
            .and_then(|t| t.to_dtype(candle_core::DType::F32))
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(tensor_err)?;
        out.insert(name.clone(), LazyTensor::Host(HostTensor::new(shape, data)));
    }
    Ok(out)
}

fn read_safetensors(path: &Path) -> Result<BTreeMap<String, LazyTensor>, FormatError> {
    read_safetensors_raw(&std::fs::read(path)?)
}

/// Every tensor of safetensors bytes as float32 host tensors, names as stored (embedded
/// weights, e.g. the face detector's).
pub fn read_safetensors_bytes(
    bytes: &[u8],
    name: &str,
) -> Result<BTreeMap<String, HostTensor>, WeightsError> {
    let read_err = |e: FormatError| WeightsError::Read {
        file: name.to_string(),
        msg: e.to_string(),
    };
    read_safetensors_raw(bytes)
        .map_err(read_err)?
        .into_iter()
        .map(|(k, v)| v.materialise().map(|t| (k, t)).map_err(read_err))
        .collect()
}

fn read_safetensors_raw(bytes: &[u8]) -> Result<BTreeMap<String, LazyTensor>, FormatError> {
    let st = safetensors::SafeTensors::deserialize(bytes)?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let shape = view.shape().to_vec();
        let raw = view.data();
        let data: Vec<f32> = match view.dtype() {
            safetensors::Dtype::F32 => raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            safetensors::Dtype::F16 => raw
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            safetensors::Dtype::BF16 => raw
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            safetensors::Dtype::F64 => raw
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
                .collect(),
            safetensors::Dtype::U8 | safetensors::Dtype::BOOL => {
                raw.iter().map(|&b| b as f32).collect()
            }
            other => {
                return Err(FormatError::Dtype {
                    name,
                    dtype: format!("{other:?}"),
                })
            }
        };
        out.insert(name, LazyTensor::Host(HostTensor::new(shape, data)));
    }
    Ok(out)
}

/// Every tensor of a safetensors file as float32 host tensors, names as stored (no key
/// normalisation): for data files such as test fixtures.
pub fn read_safetensors_file(path: &Path) -> Result<BTreeMap<String, HostTensor>, WeightsError> {
    let read_err = |e: FormatError| WeightsError::Read {
        file: path.display().to_string(),
        msg: e.to_string(),
    };
    read_safetensors(path)
        .map_err(read_err)?
        .into_iter()
        .map(|(k, v)| v.materialise().map(|t| (k, t)).map_err(read_err))
        .collect()
}

/// Default file name of our checkpoints for a path without extension.
pub fn with_safetensors_ext(path: &Path) -> PathBuf {
    if path.extension().is_some() {
        path.to_path_buf()
    } else {
        path.with_extension("safetensors")
    }
}
