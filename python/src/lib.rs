//! `marlin_rs._marlin_rs`: the Python layer over the marlin library. Each call converts its
//! arguments, releases the GIL, runs one library call on a worker thread (polling Python's
//! signals, so Ctrl-C stops it) and converts the result to numpy. No logic of its own.

use marlin::backend::Cpu;
use marlin::extract::batch::{extract_to_npy, write_failures_as, BatchOptions, FaceCrop};
use marlin::extract::inputs::{discover, DiscoverOptions};
use marlin::extract::{ExtractOptions, Reduction};
use marlin::face::{DetectOptions, Detector, TrackOptions};
use marlin::model::{Marlin, MarlinConfig, Part, StateDict};
use marlin::probe::saved::SavedClassifier;
use numpy::{PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyFileNotFoundError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

#[cfg(feature = "cuda")]
use marlin::backend::Gpu;
#[cfg(feature = "metal")]
use marlin::backend::Metal;
#[cfg(feature = "vulkan")]
use marlin::backend::Vulkan;

/// Configs registered by `register_model_from_yaml`, looked up before the released names.
static REGISTRY: Mutex<BTreeMap<String, MarlinConfig>> = Mutex::new(BTreeMap::new());

fn runtime(e: impl std::fmt::Display) -> PyErr {
    PyRuntimeError::new_err(e.to_string())
}

fn value(e: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// FileNotFoundError naming `path` when it does not exist.
fn must_exist(path: &Path) -> PyResult<()> {
    if path.exists() {
        Ok(())
    } else {
        Err(PyFileNotFoundError::new_err(format!(
            "{}: no such file or directory",
            path.display()
        )))
    }
}

/// Run `work` on a worker thread with the GIL released; Python's signal handlers run every
/// 50 ms meanwhile, and a KeyboardInterrupt (or any raised signal) sets the stop flag, waits
/// for the worker to finish what it is doing and raises.
fn interruptible<T: Send>(
    py: Python<'_>,
    work: impl FnOnce(&AtomicBool) -> T + Send,
) -> PyResult<T> {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let handle = s.spawn(|| work(&stop));
        loop {
            py.detach(|| {
                for _ in 0..10 {
                    if handle.is_finished() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            });
            if handle.is_finished() {
                break;
            }
            if let Err(e) = py.check_signals() {
                stop.store(true, Ordering::Relaxed);
                py.detach(|| {
                    while !handle.is_finished() {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                });
                return Err(e);
            }
        }
        handle
            .join()
            .map_err(|_| runtime("the worker thread panicked"))
    })
}

fn resolve_config(name: &str) -> PyResult<MarlinConfig> {
    if let Some(c) = REGISTRY.lock().map_err(runtime)?.get(name) {
        return Ok(c.clone());
    }
    MarlinConfig::from_name(name).map_err(|e| {
        let registered: Vec<String> = REGISTRY
            .lock()
            .map(|r| r.keys().cloned().collect())
            .unwrap_or_default();
        value(format!(
            "{e}{}",
            if registered.is_empty() {
                String::new()
            } else {
                format!(" (registered from YAML: {})", registered.join(", "))
            }
        ))
    })
}

fn reduction(s: &str) -> PyResult<Reduction> {
    s.parse().map_err(value)
}

/// A contiguous array of `dtype` ("float32", "bool") from numpy, anything with `__array__`, or
/// a torch tensor (`.detach().cpu().numpy()`).
fn as_array<'py, T: numpy::Element>(
    x: &Bound<'py, PyAny>,
    dtype: &str,
) -> PyResult<PyReadonlyArrayDyn<'py, T>> {
    let np = x.py().import("numpy")?;
    let x = if x.hasattr("detach")? && x.hasattr("cpu")? {
        x.call_method0("detach")?
            .call_method0("cpu")?
            .call_method0("numpy")?
    } else {
        x.clone()
    };
    let a = np.call_method1("ascontiguousarray", (x, dtype))?;
    Ok(a.cast_into::<PyArrayDyn<T>>()?.readonly())
}

/// The built-in face detector on `device` with the default tracking, when `crop_face`.
fn face_crop<B: burn::tensor::backend::Backend>(
    crop_face: bool,
    device: &B::Device,
) -> Result<Option<FaceCrop<B>>, String> {
    if !crop_face {
        return Ok(None);
    }
    Ok(Some(FaceCrop {
        detector: Detector::new(device, DetectOptions::default()).map_err(|e| e.to_string())?,
        track: TrackOptions::default(),
    }))
}

fn to_numpy<'py>(
    py: Python<'py>,
    data: Vec<f32>,
    shape: &[usize],
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    numpy::PyArray1::from_vec(py, data).reshape(shape.to_vec())
}

/// The model on its device.
enum Model {
    Cpu(Marlin<Cpu>),
    #[cfg(feature = "cuda")]
    Cuda(Marlin<Gpu>),
    #[cfg(feature = "vulkan")]
    Vulkan(Marlin<Vulkan>),
    #[cfg(feature = "metal")]
    Metal(Marlin<Metal>),
}

/// The same code for each backend: binds the model as `$m` and its device type as `$B`.
macro_rules! on_model {
    ($model:expr, |$m:ident, $dev:ident| $body:expr) => {
        match $model {
            Model::Cpu($m) => {
                let $dev: burn::tensor::Device<Cpu> = Default::default();
                let _ = &$dev;
                $body
            }
            #[cfg(feature = "cuda")]
            Model::Cuda($m) => {
                let $dev = $m.encoder.norm.gamma.device();
                let _ = &$dev;
                $body
            }
            #[cfg(feature = "vulkan")]
            Model::Vulkan($m) => {
                let $dev = $m.encoder.norm.gamma.device();
                let _ = &$dev;
                $body
            }
            #[cfg(feature = "metal")]
            Model::Metal($m) => {
                let $dev = $m.encoder.norm.gamma.device();
                let _ = &$dev;
                $body
            }
        }
    };
}

/// The engine (the encoder's schedule on the host kernels or on CUDA) for the model of `sd`
/// on `spec` in `precision` (the process's setting for that device when `None`); a note the
/// user must see becomes a Python warning. `None` where the device keeps burn's path.
fn engine_for(
    cfg: &MarlinConfig,
    sd: &StateDict,
    spec: marlin::backend::DeviceSpec,
    precision: Option<&str>,
) -> PyResult<Option<std::sync::Arc<dyn marlin::engine::FeatureEngine>>> {
    use marlin::kernels::Precision;
    let p: Precision = match precision {
        Some(p) => p.parse().map_err(value)?,
        None if spec == marlin::backend::DeviceSpec::Cpu => marlin::kernels::cpu_precision(),
        None => marlin::kernels::gpu_precision(),
    };
    let host = Marlin::<Cpu>::from_state_dict(cfg, sd, &[Part::Encoder], &Default::default())
        .map_err(value)?
        .0;
    let (engine, note) = match marlin::engine::for_device(&host, spec, p) {
        Ok(chosen) => chosen,
        Err(e) => (
            None,
            Some(format!(
                "{e}; extracting with burn's kernels instead (slower)"
            )),
        ),
    };
    if let Some(n) = note {
        Python::attach(|py| -> PyResult<()> {
            py.import("warnings")?.call_method1("warn", (n,))?;
            Ok(())
        })?;
    }
    Ok(engine)
}

/// `m` with `engine` attached, when there is one.
fn attach<B: burn::tensor::backend::Backend>(
    m: Marlin<B>,
    engine: Option<std::sync::Arc<dyn marlin::engine::FeatureEngine>>,
) -> Marlin<B> {
    match engine {
        Some(e) => m.with_engine(e),
        None => m,
    }
}

fn load_model(
    cfg: &MarlinConfig,
    sd: &StateDict,
    device: &str,
    precision: Option<&str>,
) -> PyResult<Model> {
    // The peer loads what the file holds (encoder only, or with the decoder); the critic of a
    // training checkpoint is dropped.
    let parts: Vec<Part> = sd
        .parts()
        .into_iter()
        .filter(|p| *p != Part::Discriminator)
        .collect();
    let spec: marlin::backend::DeviceSpec = device.parse().map_err(value)?;
    let built = |kind: &str| {
        value(format!(
            "device '{device}': this build has no {kind} (build the package with the {kind} \
             feature: maturin build --features {kind})"
        ))
    };
    match spec {
        // Features on the engine of the device (its own precision); the burn model keeps its
        // weights for reconstruction and `save`.
        marlin::backend::DeviceSpec::Cpu => Ok(Model::Cpu(attach(
            Marlin::<Cpu>::from_state_dict(cfg, sd, &parts, &Default::default())
                .map_err(value)?
                .0,
            engine_for(cfg, sd, spec, precision)?,
        ))),
        #[cfg(feature = "cuda")]
        marlin::backend::DeviceSpec::Cuda(index) => {
            let dev = burn::backend::cuda::CudaDevice::new(index);
            Ok(Model::Cuda(attach(
                Marlin::<Gpu>::from_state_dict(cfg, sd, &parts, &dev)
                    .map_err(value)?
                    .0,
                engine_for(cfg, sd, spec, precision)?,
            )))
        }
        #[cfg(feature = "vulkan")]
        marlin::backend::DeviceSpec::Vulkan(index) => {
            let dev = marlin::backend::wgpu::device(marlin::backend::wgpu::Api::Vulkan, index)
                .map_err(value)?;
            Ok(Model::Vulkan(
                Marlin::<Vulkan>::from_state_dict(cfg, sd, &parts, &dev)
                    .map_err(value)?
                    .0,
            ))
        }
        #[cfg(feature = "metal")]
        marlin::backend::DeviceSpec::Metal => {
            let dev = marlin::backend::wgpu::device(marlin::backend::wgpu::Api::Metal, 0)
                .map_err(value)?;
            Ok(Model::Metal(
                Marlin::<Metal>::from_state_dict(cfg, sd, &parts, &dev)
                    .map_err(value)?
                    .0,
            ))
        }
        #[allow(unreachable_patterns)]
        marlin::backend::DeviceSpec::Cuda(_) => Err(built("cuda")),
        #[allow(unreachable_patterns)]
        marlin::backend::DeviceSpec::Vulkan(_) => Err(built("vulkan")),
        #[allow(unreachable_patterns)]
        marlin::backend::DeviceSpec::Metal => Err(built("metal")),
    }
}

/// A MARLIN model, called as marlin-pytorch's `Marlin`.
#[pyclass(name = "Marlin", module = "marlin_rs", frozen)]
struct PyMarlin {
    model: Model,
    name: String,
    device: String,
}

#[pymethods]
impl PyMarlin {
    /// Download (once, into the cache) and load a released model; `full_model` adds the
    /// decoder for reconstruction.
    #[classmethod]
    #[pyo3(signature = (model_name, full_model = false, device = "cpu", precision = None))]
    fn from_online(
        _cls: &Bound<'_, pyo3::types::PyType>,
        py: Python<'_>,
        model_name: &str,
        full_model: bool,
        device: &str,
        precision: Option<&str>,
    ) -> PyResult<Self> {
        let path = interruptible(py, |_| marlin::hub::fetch(model_name, full_model, true))?
            .map_err(value)?;
        Self::load(py, model_name, &path, device, precision)
    }

    /// Load `path` (`.pt`, Lightning `.ckpt` or safetensors) with the config `model_name` (a
    /// released name, or one registered with `register_model_from_yaml`).
    #[classmethod]
    #[pyo3(signature = (model_name, path, device = "cpu", precision = None))]
    fn from_file(
        _cls: &Bound<'_, pyo3::types::PyType>,
        py: Python<'_>,
        model_name: &str,
        path: PathBuf,
        device: &str,
        precision: Option<&str>,
    ) -> PyResult<Self> {
        Self::load(py, model_name, &path, device, precision)
    }

    /// A fresh model of `model_name` with the reference's initialisation (deterministic in
    /// `seed`), e.g. to pretrain from scratch or to test a pipeline without downloading.
    #[classmethod]
    #[pyo3(signature = (model_name, seed = 0, full_model = false, device = "cpu", precision = None))]
    fn from_config(
        _cls: &Bound<'_, pyo3::types::PyType>,
        model_name: &str,
        seed: u64,
        full_model: bool,
        device: &str,
        precision: Option<&str>,
    ) -> PyResult<Self> {
        let cfg = resolve_config(model_name)?;
        let parts: &[Part] = if full_model {
            &[Part::Encoder, Part::Decoder]
        } else {
            &[Part::Encoder]
        };
        let sd = StateDict::init(&cfg, parts, seed);
        Ok(Self {
            model: load_model(&cfg, &sd, device, precision)?,
            name: model_name.to_string(),
            device: device.to_string(),
        })
    }

    /// Write the weights as safetensors with the official key names (readable by
    /// `from_file`, the `marlin` command and, after renaming, marlin-pytorch's loader).
    fn save(&self, path: PathBuf) -> PyResult<()> {
        let sd = on_model!(&self.model, |m, _d| m.to_state_dict());
        sd.save_safetensors(&path, None).map_err(runtime)
    }

    /// Remove the downloaded checkpoints.
    #[staticmethod]
    #[pyo3(signature = (verbose = true))]
    fn clean_cache(verbose: bool) -> PyResult<()> {
        let (n, bytes) = marlin::hub::clean_cache().map_err(runtime)?;
        if verbose {
            println!("Marlin checkpoints cache cleaned ({n} files, {bytes} bytes).");
        }
        Ok(())
    }

    /// The config name, embedding width, device and whether the decoder is loaded.
    #[getter]
    fn name(&self) -> &str {
        &self.name
    }

    #[getter]
    fn device(&self) -> &str {
        &self.device
    }

    /// The precision this model's features are computed in ("fp32", "tf32" or "bf16"):
    /// the model's own, fixed when it was loaded (`precision=`, else the process's setting).
    #[getter]
    fn precision(&self) -> String {
        on_model!(&self.model, |m, _d| match &m.engine {
            Some(e) => e.precision().to_string(),
            None => marlin::kernels::gpu_precision().to_string(),
        })
    }

    #[getter]
    fn embed_dim(&self) -> usize {
        on_model!(&self.model, |m, _d| m.config.encoder.embed_dim)
    }

    #[getter]
    fn full_model(&self) -> bool {
        on_model!(&self.model, |m, _d| m.decoder.is_some())
    }

    fn __repr__(&self) -> String {
        format!(
            "Marlin('{}', device='{}', full_model={})",
            self.name,
            self.device,
            self.full_model()
        )
    }

    /// Features of a video file or frame folder: `[windows, D]` (`[windows, N, D]` with
    /// keep_seq), or `[D]` reduced by "mean"/"max". `crop_face` detects and tracks the face
    /// first (built-in MTCNN).
    #[pyo3(signature = (video_path, crop_face = false, sample_rate = 2, stride = 16, reduction = "none", keep_seq = false, detector_device = None, batch_size = 4))]
    #[allow(clippy::too_many_arguments)]
    fn extract_video<'py>(
        &self,
        py: Python<'py>,
        video_path: PathBuf,
        crop_face: bool,
        sample_rate: usize,
        stride: usize,
        reduction: &str,
        keep_seq: bool,
        detector_device: Option<&str>,
        batch_size: usize,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let _ = detector_device; // the detector runs on the model's device
        must_exist(&video_path)?;
        let opts = ExtractOptions {
            sample_rate,
            stride,
            keep_seq,
            reduction: self::reduction(reduction)?,
            batch_size,
            ..Default::default()
        };
        opts.check().map_err(value)?;
        let (data, shape) = on_model!(&self.model, |m, dev| {
            interruptible(py, |stop| {
                let faces = face_crop(crop_face, &dev)?;
                let until = || stop.load(Ordering::Relaxed);
                m.extract_video_until(&video_path, &opts, faces.as_ref(), &until)
                    .map(|(a, _)| {
                        let shape = a.shape().to_vec();
                        (a.into_raw_vec_and_offset().0, shape)
                    })
                    .map_err(|e| e.to_string())
            })?
            .map_err(runtime)?
        });
        to_numpy(py, data, &shape)
    }

    /// Features of clips `[B, 3, 16, 224, 224]` (RGB in [0, 1], numpy or torch): `[B, N, D]`
    /// with keep_seq, else `[B, D]`.
    #[pyo3(signature = (x, keep_seq = true))]
    fn extract_features<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        keep_seq: bool,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let a = as_array::<f32>(x, "float32")?;
        let shape = a.shape().to_vec();
        let data = a.as_slice().map_err(value)?.to_vec();
        let (out, out_shape) = on_model!(&self.model, |m, dev| {
            let [b, c, t, h, w] = clip_shape(&m.config, &shape)?;
            interruptible(py, |_| {
                let x = burn::tensor::Tensor::<_, 5>::from_data(
                    burn::tensor::TensorData::new(data, [b, c, t, h, w]),
                    &dev,
                );
                let f = m.extract_features(x, keep_seq);
                let [b, n, d] = f.dims();
                let v = marlin::model::load::to_f32_vec(f);
                (v, if keep_seq { vec![b, n, d] } else { vec![b, d] })
            })?
        });
        to_numpy(py, out, &out_shape)
    }

    /// Reconstruction of clips `x` `[B, 3, 16, 224, 224]` with a visibility mask `[B, N]`
    /// (true = visible, the same count per clip): pixels of the masked tubelets
    /// `[B, N_masked, 3*2*16*16]`. Needs the full model (`from_online(..., full_model=True)`).
    fn __call__<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        mask: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let a = as_array::<f32>(x, "float32")?;
        let shape = a.shape().to_vec();
        let data = a.as_slice().map_err(value)?.to_vec();
        let mask = as_array::<bool>(mask, "bool")?;
        let mask_shape = mask.shape().to_vec();
        let mask: Vec<bool> = mask.as_slice().map_err(value)?.to_vec();
        let (out, out_shape) = on_model!(&self.model, |m, dev| {
            let [b, c, t, h, w] = clip_shape(&m.config, &shape)?;
            let n = m.config.num_patches();
            if mask_shape != [b, n] {
                return Err(value(format!(
                    "mask of shape {mask_shape:?}; expected [{b}, {n}] (true = visible)"
                )));
            }
            interruptible(py, |_| {
                let x = burn::tensor::Tensor::<_, 5>::from_data(
                    burn::tensor::TensorData::new(data, [b, c, t, h, w]),
                    &dev,
                );
                let idx =
                    marlin::model::MaskIndices::from_bools(&mask, b).map_err(|e| e.to_string())?;
                let y = m.forward_indices(x, &idx).map_err(|e| e.to_string())?;
                let s = y.dims().to_vec();
                Ok::<_, String>((marlin::model::load::to_f32_vec(y), s))
            })?
            .map_err(value)?
        });
        to_numpy(py, out, &out_shape)
    }

    /// Reconstruction pictures of one clip (needs the full model): each frame as original |
    /// masked | reconstruction, written to `out` (a `.png` grid of every frame, or an `.mp4`)
    /// and returned as the grid, uint8 `[H * frames, 3 * W, 3]`. Fasking masks by default
    /// ("tube", "frame", "random" too).
    #[pyo3(signature = (video_path, out, mask_strategy = "fasking", mask_ratio = 0.9, start = 0, sample_rate = 2, seed = 0, crop_face = false))]
    #[allow(clippy::too_many_arguments)]
    fn reconstruct<'py>(
        &self,
        py: Python<'py>,
        video_path: PathBuf,
        out: PathBuf,
        mask_strategy: &str,
        mask_ratio: f64,
        start: usize,
        sample_rate: usize,
        seed: u64,
        crop_face: bool,
    ) -> PyResult<Bound<'py, numpy::PyArray3<u8>>> {
        use marlin::train::reconstruct::{reconstruct, ReconstructOptions};
        must_exist(&video_path)?;
        let opts = ReconstructOptions {
            strategy: mask_strategy.parse().map_err(value)?,
            mask_ratio,
            start,
            sample_rate,
            seed,
            crop_face,
            ..Default::default()
        };
        let grid = on_model!(&self.model, |m, dev| {
            if m.decoder.is_none() {
                return Err(value(
                    "reconstruction needs the decoder: load the full model \
                     (from_online(name, full_model=True) or a .full checkpoint)",
                ));
            }
            interruptible(py, |_| {
                let r = reconstruct(&video_path, &m.config, Some(m), &opts, &dev)
                    .map_err(|e| e.to_string())?;
                let grid = r.grid();
                if out.extension().is_some_and(|e| e == "mp4") {
                    r.save_mp4(&out).map_err(|e| e.to_string())?;
                } else {
                    marlin::train::samples::save_png(&grid, &out).map_err(|e| e.to_string())?;
                }
                Ok::<_, String>(grid)
            })?
            .map_err(runtime)?
        });
        let (w, h) = (grid.width() as usize, grid.height() as usize);
        let flat = numpy::PyArray1::from_vec(py, grid.into_raw());
        flat.reshape([h, w, 3])
    }

    /// Extract many inputs (files, frame folders, folders to walk) into `out_dir` as `.npy`,
    /// batched across videos, skipping outputs that exist (a rerun resumes). Returns a dict:
    /// written, skipped, clips, failures (list of (file, error)), interrupted; failures also
    /// go to `out_dir/<failures_file>` (None: not written, e.g. from many Ray actors).
    /// `decoders` threads decode ahead of the model (several for a GPU). The device failing
    /// (out of GPU memory at this batch size) raises RuntimeError after the finished outputs
    /// are written.
    #[pyo3(signature = (inputs, out_dir, crop_face = false, sample_rate = 2, stride = 16, reduction = "none", keep_seq = false, batch_size = 4, overwrite = false, progress = true, failures_file = Some("failures.json"), decoders = 1))]
    #[allow(clippy::too_many_arguments)]
    fn extract_many<'py>(
        &self,
        py: Python<'py>,
        inputs: Vec<PathBuf>,
        out_dir: PathBuf,
        crop_face: bool,
        sample_rate: usize,
        stride: usize,
        reduction: &str,
        keep_seq: bool,
        batch_size: usize,
        overwrite: bool,
        progress: bool,
        failures_file: Option<&str>,
        decoders: usize,
    ) -> PyResult<Bound<'py, PyDict>> {
        for p in &inputs {
            must_exist(p)?;
        }
        let opts = BatchOptions {
            extract: ExtractOptions {
                sample_rate,
                stride,
                keep_seq,
                reduction: self::reduction(reduction)?,
                batch_size,
                decoders,
            },
            overwrite,
        };
        opts.extract.check().map_err(value)?;
        let found = discover(&inputs, &DiscoverOptions::new(&out_dir)).map_err(value)?;
        let s = on_model!(&self.model, |m, dev| {
            interruptible(py, |stop| {
                let faces = face_crop(crop_face, &dev)?;
                let mut report = |p: &marlin::extract::batch::Progress| {
                    if progress {
                        eprint!(
                            "\r{}/{} inputs, {:.1} clips/s   ",
                            p.done,
                            p.total,
                            p.clips_per_second()
                        );
                    }
                };
                let r = extract_to_npy(m, &found.items, &opts, faces.as_ref(), stop, &mut report)
                    .map_err(|e| e.to_string());
                if progress {
                    eprintln!();
                }
                r
            })?
            .map_err(runtime)?
        });
        let mut failures = found.failures;
        failures.extend(s.failures.iter().cloned());
        if let Some(name) = failures_file {
            write_failures_as(&out_dir, name, &failures).map_err(runtime)?;
        }
        if let Some(e) = &s.device_error {
            return Err(runtime(e));
        }
        let d = PyDict::new(py);
        d.set_item("written", s.written)?;
        d.set_item("skipped", s.skipped)?;
        d.set_item("clips", s.clips)?;
        let f: Vec<(String, String)> = failures.into_iter().map(|f| (f.file, f.error)).collect();
        d.set_item("failures", f)?;
        d.set_item("interrupted", s.interrupted)?;
        Ok(d)
    }
}

impl PyMarlin {
    fn load(
        py: Python<'_>,
        model_name: &str,
        path: &Path,
        device: &str,
        precision: Option<&str>,
    ) -> PyResult<Self> {
        must_exist(path)?;
        let cfg = resolve_config(model_name)?;
        let sd = interruptible(py, |_| StateDict::load(path))?.map_err(value)?;
        let model = load_model(&cfg, &sd, device, precision)?;
        Ok(Self {
            model,
            name: model_name.to_string(),
            device: device.to_string(),
        })
    }
}

/// `[B, 3, T, H, W]` of `cfg`, or ValueError naming both shapes.
fn clip_shape(cfg: &MarlinConfig, shape: &[usize]) -> PyResult<[usize; 5]> {
    let (t, s) = (cfg.clip_frames, cfg.img_size);
    match shape {
        &[b, 3, tt, h, w] if tt == t && h == s && w == s && b > 0 => Ok([b, 3, t, s, s]),
        _ => Err(value(format!(
            "clips of shape {shape:?}; expected [B, 3, {t}, {s}, {s}] (RGB in [0, 1])"
        ))),
    }
}

/// Register the reference's YAML config (`model/*.yaml` of the training repo) under `name`
/// for `Marlin.from_file(name, path)`.
#[pyfunction]
fn register_model_from_yaml(name: &str, path: PathBuf) -> PyResult<()> {
    must_exist(&path)?;
    let cfg = MarlinConfig::from_yaml_file(&path).map_err(value)?;
    REGISTRY
        .lock()
        .map_err(runtime)?
        .insert(name.to_string(), cfg);
    Ok(())
}

/// Precision of the models loaded after this call without a `precision=` of their own (each
/// loaded model keeps its own): "f32" (the CPU default), "tf32" (the
/// GPU default; f32 on the CPU) or "bf16" (bf16 operands, f32 sums; on the CPU AMX tiles or
/// AVX-512 BF16). Returns the CPU's precision in effect: "f32" with a warning on a CPU without
/// AVX-512 BF16, or without AMX and with bf16 dot products no faster than f32 FMAs (Intel
/// cores without AMX), where bf16 is slower than f32 (`MARLIN_BF16_WITHOUT_AMX=1` computes in
/// bf16 anyway); "bf16" on AMX and on AMD Zen 4, where bf16 is the faster. Models on a GPU
/// take the precision as given.
#[pyfunction]
fn set_precision(py: Python<'_>, precision: &str) -> PyResult<String> {
    let p: marlin::kernels::Precision = precision.parse().map_err(value)?;
    marlin::kernels::set_gpu_precision(p);
    let (effective, note) = marlin::kernels::set_cpu_precision(p);
    if p == marlin::kernels::Precision::Tf32 {
        // TF32 is the GPU's; the CPU's f32 needs no warning.
        return Ok("f32".to_string());
    }
    if let Some(n) = note {
        let warnings = py.import("warnings")?;
        warnings.call_method1("warn", (n,))?;
    }
    Ok(match effective {
        marlin::kernels::Precision::F32 | marlin::kernels::Precision::Tf32 => "f32",
        marlin::kernels::Precision::Bf16 => "bf16",
    }
    .to_string())
}

/// What this machine offers marlin (as `marlin doctor --json`): the devices built, the CPU's
/// instructions, FFmpeg, in-process H.264, the CUDA driver and GPUs, where cuBLASLt, cuDNN and
/// NVRTC were found (or what to install), Vulkan adapters.
#[pyfunction]
fn info(py: Python<'_>) -> PyResult<Py<PyAny>> {
    let text = serde_json::to_string(&marlin::doctor::report()).map_err(runtime)?;
    Ok(py.import("json")?.call_method1("loads", (text,))?.unbind())
}

/// Names of the released and registered configs.
#[pyfunction]
fn model_names() -> PyResult<Vec<String>> {
    let mut v: Vec<String> = marlin::model::config::RELEASED_MODELS
        .iter()
        .map(|s| s.to_string())
        .collect();
    v.extend(REGISTRY.lock().map_err(runtime)?.keys().cloned());
    Ok(v)
}

/// Crop the face of a video in the wild into `out` (an .mp4, or a folder of frames when `out`
/// has no extension), `size` pixels square. Returns the number of frames written.
#[pyfunction]
#[pyo3(signature = (video_path, out, size = 224))]
fn crop_video(py: Python<'_>, video_path: PathBuf, out: PathBuf, size: usize) -> PyResult<usize> {
    use marlin::face::crop_video::{crop_video as crop, CropFormat, CropVideoOptions, ImageFormat};
    must_exist(&video_path)?;
    let format = if out.extension().is_some() {
        CropFormat::Mp4
    } else {
        CropFormat::Frames(ImageFormat::Png)
    };
    let opts = CropVideoOptions {
        size,
        format,
        ..Default::default()
    };
    let r = interruptible(py, |stop| {
        let dev = Default::default();
        let det =
            Detector::<Cpu>::new(&dev, DetectOptions::default()).map_err(|e| e.to_string())?;
        let until = || stop.load(Ordering::Relaxed);
        crop(
            &marlin::video::Input::from_path(&video_path),
            &out,
            &det,
            &opts,
            &until,
        )
        .map_err(|e| e.to_string())
    })?
    .map_err(runtime)?;
    Ok(r.map_or(0, |c| c.track.frames.len()))
}

/// The LaPa label map of the largest face in an image (or frame `frame` of a video), as
/// `marlin parse` makes it: a dict with "labels" (uint8 `[size, size]`: 0 background, 1 skin,
/// 2/3 brows, 4/5 eyes, 6 nose, 7 upper lip, 8 inner mouth, 9 lower lip, 10 hair), "crop"
/// (uint8 `[size, size, 3]`, the face crop the map belongs to) and "box" (the face box in frame
/// pixels). `parser` is "mesh" (face mesh and person mask) or "template" (5-point layout).
#[pyfunction]
#[pyo3(signature = (path, frame = 0, parser = "mesh", size = 224))]
fn parse_face<'py>(
    py: Python<'py>,
    path: PathBuf,
    frame: usize,
    parser: &str,
    size: usize,
) -> PyResult<Bound<'py, PyDict>> {
    use marlin::face::parse_view::{parse_frame, ParseError, ParseOptions};
    use marlin::face::parser::{ParserKind, Parsing};
    must_exist(&path)?;
    let kind: ParserKind = parser.parse().map_err(value)?;
    if size < 16 {
        return Err(value("size must be at least 16"));
    }
    let parsed = interruptible(py, |_| {
        let dev = Default::default();
        let det =
            Detector::<Cpu>::new(&dev, DetectOptions::default()).map_err(|e| e.to_string())?;
        let parsing = Parsing::<Cpu>::new(kind, &dev).map_err(|e| e.to_string())?;
        let opts = ParseOptions {
            frame,
            size,
            ..Default::default()
        };
        parse_frame(&path, &det, &[(kind, &parsing)], &opts).map_err(|e| match e {
            ParseError::Video(v) => v.to_string(),
            other => format!("value:{other}"),
        })
    })?
    .map_err(|msg| match msg.strip_prefix("value:") {
        Some(m) => value(m),
        None => runtime(msg),
    })?;
    let map = parsed.maps[0]
        .1
        .clone()
        .ok_or_else(|| value(format!("{}: no face in the crop", path.display())))?;
    let d = PyDict::new(py);
    d.set_item(
        "labels",
        numpy::PyArray1::from_vec(py, map.labels).reshape([size, size])?,
    )?;
    d.set_item(
        "crop",
        numpy::PyArray1::from_vec(py, parsed.crop.data).reshape([size, size, 3])?,
    )?;
    d.set_item("box", parsed.face.bbox.to_vec())?;
    Ok(d)
}

/// A classifier trained by `marlin probe` / `marlin finetune` (its run folder).
#[pyclass(name = "Classifier", module = "marlin_rs", frozen)]
struct PyClassifier {
    inner: Mutex<SavedClassifier<Cpu>>,
}

#[pymethods]
impl PyClassifier {
    #[staticmethod]
    fn load(run_dir: PathBuf) -> PyResult<Self> {
        must_exist(&run_dir)?;
        let c = SavedClassifier::<Cpu>::load(&run_dir, &Default::default()).map_err(value)?;
        Ok(Self {
            inner: Mutex::new(c),
        })
    }

    /// Label or class names.
    #[getter]
    fn names(&self) -> PyResult<Vec<String>> {
        Ok(self.inner.lock().map_err(runtime)?.info.names.clone())
    }

    /// Probabilities of a `.npy` feature file or a video (a probe's videos go through `model`,
    /// the MARLIN model that made its training features).
    #[pyo3(signature = (path, model = None))]
    fn predict<'py>(
        &self,
        py: Python<'py>,
        path: PathBuf,
        model: Option<PyRef<'py, PyMarlin>>,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        must_exist(&path)?;
        let clf = self.inner.lock().map_err(runtime)?;
        let encoder = match model.as_deref().map(|m| &m.model) {
            None => None,
            Some(Model::Cpu(m)) => Some(m),
            #[allow(unreachable_patterns)]
            Some(_) => return Err(value("a classifier predicts with a model on \"cpu\"")),
        };
        let p = clf.predict_file(&path, encoder).map_err(value)?;
        let n = p.len();
        to_numpy(py, p, &[n])
    }

    /// The prediction of probabilities: the class name, or 0/1 per label.
    fn label(&self, probs: Vec<f32>) -> PyResult<String> {
        Ok(self.inner.lock().map_err(runtime)?.label(&probs))
    }
}

#[pymodule]
fn _marlin_rs(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyMarlin>()?;
    m.add_class::<PyClassifier>()?;
    m.add_function(wrap_pyfunction!(register_model_from_yaml, m)?)?;
    m.add_function(wrap_pyfunction!(model_names, m)?)?;
    m.add_function(wrap_pyfunction!(set_precision, m)?)?;
    m.add_function(wrap_pyfunction!(info, m)?)?;
    m.add_function(wrap_pyfunction!(crop_video, m)?)?;
    m.add_function(wrap_pyfunction!(parse_face, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
