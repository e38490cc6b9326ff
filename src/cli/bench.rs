//! `marlin bench`: seconds per clip of feature extraction on this machine (random weights; the
//! arithmetic is the same as with real ones), with a per-operation breakdown of one block.

use super::run_on;
use burn::tensor::{backend::Backend, Distribution, Tensor};
use clap::Args;
use marlin::backend::{BackendTask, DeviceSpec};
use marlin::model::{Marlin, MarlinConfig, Part};
use std::time::Instant;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Released model name.
    #[arg(long, default_value = "marlin_vit_base_ytf")]
    pub model: String,
    /// A custom config (YAML) instead.
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    /// Clips per forward pass.
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// Timed forward passes (after one warm-up).
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    /// Also time the parts of one transformer block.
    #[arg(long)]
    pub profile: bool,
    /// Measure this CPU's f32 FMA peak (rayon's threads) first, and give each rate as a share
    /// of it.
    #[arg(long)]
    pub peak: bool,
    /// Time pretraining steps instead (critic + generator step, random 90% masks, AdamW).
    #[arg(long)]
    pub train: bool,
    /// Time fine-tuning steps instead: the encoder on whole clips, mean-pooled, under a
    /// 40-label head (CelebV-HQ appearance), binary cross-entropy, Adam.
    #[arg(long, conflicts_with = "train")]
    pub finetune: bool,
    /// With --train or --finetune: time the training engine's step (on the CPU its host ops,
    /// on CUDA its cuBLASLt/cuDNN/NVRTC ops in fp32, tf32 or bf16) instead of burn's autodiff
    /// step.
    #[arg(long)]
    pub train_engine: bool,
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// Matrix products in fp32, tf32 (GPU tensor cores) or bf16 (f32 sums; CPUs with AVX-512
    /// BF16). Default: fp32 on the CPU, tf32 on a GPU.
    #[arg(long)]
    pub precision: Option<marlin::kernels::Precision>,
    /// Also write the benchmarked (freshly initialised) encoder as safetensors, e.g. to time
    /// `extract --weights` without a download.
    #[arg(long)]
    pub save_weights: Option<std::path::PathBuf>,
    /// With --train under torchrun/srun: each rank times its steps at --batch-size with the
    /// gradients all-reduced across the ranks, as `pretrain` does.
    #[command(flatten)]
    pub dist: super::pretrain::DistArgs,
}

/// Seconds of `iters` (at least one) runs of `run` after an untimed first one (which compiles
/// and autotunes a GPU's kernels). The device's failure (out of memory at batch `batch`) is
/// one line and exit status 1.
fn timed_runs(batch: usize, iters: usize, mut run: impl FnMut()) -> f64 {
    let timed = marlin::device_error::guard(batch, || {
        run();
        let t0 = Instant::now();
        for _ in 0..iters.max(1) {
            run();
        }
        t0.elapsed().as_secs_f64()
    });
    timed.unwrap_or_else(|e| fail(e))
}

/// One line for a failure that ends the benchmark, and exit status 1.
fn fail(e: impl std::fmt::Display) -> ! {
    eprintln!("error: {e}");
    std::process::exit(1)
}

/// Watches the GPU's memory while a benchmark runs (nothing on the CPU).
fn memory_watch(device: DeviceSpec) -> Option<marlin::backend::MemoryWatch> {
    match device {
        DeviceSpec::Cuda(i) => marlin::backend::MemoryWatch::start(i),
        // NVML reads NVIDIA GPUs only.
        DeviceSpec::Cpu | DeviceSpec::Vulkan(_) | DeviceSpec::Metal => None,
    }
}

fn report_memory(watch: Option<marlin::backend::MemoryWatch>) {
    if let Some(w) = watch {
        let start = w.start;
        let peak = w.peak();
        const GIB: f64 = (1u64 << 30) as f64;
        outln!(
            "peak GPU memory: {:.2} GiB (device-wide, NVML: weights, activations, memory pools and \
             the CUDA context; {:.2} GiB were in use before the model)",
            peak.saturating_sub(start) as f64 / GIB,
            start as f64 / GIB
        );
    }
}

struct Bench {
    cfg: MarlinConfig,
    args: BenchArgs,
    /// The precision in effect on the device.
    precision: marlin::kernels::Precision,
    /// The CPU's measured FMA peak (`--peak` on the CPU).
    peak: Option<marlin::kernels::peak::Peak>,
    /// The ranks of a data-parallel launch (`--train`).
    group: Option<std::sync::Arc<marlin::distributed::Group>>,
}

fn sync<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, D> {
    // Reading one value waits for queued device work.
    let _ = t.clone().slice_dim(0, 0..1).into_data();
    t
}

fn time<B: Backend, const D: usize>(label: &str, reps: usize, f: impl Fn() -> Tensor<B, D>) -> f64 {
    sync(f());
    let t0 = Instant::now();
    for _ in 0..reps {
        sync(f());
    }
    let s = t0.elapsed().as_secs_f64() / reps as f64;
    outln!("  {label:<28} {:>9.2} ms", s * 1e3);
    s
}

impl BackendTask for Bench {
    type Output = ();
    fn run<B: Backend>(self, device: B::Device) {
        if self.args.train {
            return train_bench::<burn::backend::Autodiff<B>>(
                &self.cfg, &self.args, self.group, &device,
            );
        }
        if self.args.finetune {
            return finetune_bench::<burn::backend::Autodiff<B>>(&self.cfg, &self.args, &device);
        }
        let (cfg, a) = (self.cfg, self.args);
        let watch = memory_watch(a.device);
        #[cfg(feature = "cuda-engine")]
        if let (DeviceSpec::Cuda(i), marlin::engine::EngineChoice::Schedule) =
            (a.device, marlin::engine::EngineChoice::from_env())
        {
            return cuda_engine_bench(&cfg, &a, i, watch);
        }
        let model = Marlin::<B>::init(&cfg, &[Part::Encoder], 0, &device);
        if let Some(p) = &a.save_weights {
            if let Err(e) = model.to_state_dict().save_safetensors(p, None) {
                eprintln!("{e}");
            }
        }
        let b = a.batch_size.max(1);
        // The CPU's extraction runs the engine's schedule on the host kernels (unless
        // MARLIN_ENGINE=burn): time that.
        let model = match marlin::engine::for_device(&model, a.device, self.precision) {
            Ok((Some(e), _)) => model.with_engine(e),
            _ => model,
        };
        let shape = [b, 3, cfg.clip_frames, cfg.img_size, cfg.img_size];
        let clip = Tensor::<B, 5>::random(shape, Distribution::Uniform(0.0, 1.0), &device);
        outln!(
            "{} on {}: batch {b}, {} threads (RAYON_NUM_THREADS={})",
            cfg.name(),
            a.device,
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "unset".into())
        );
        let elapsed = timed_runs(b, a.iters, || {
            sync(model.extract_features(clip.clone(), false));
        });
        let per_clip = elapsed / (a.iters.max(1) * b) as f64;
        outln!(
            "seconds per clip: {per_clip:.4}  (clips/s {:.2}; {})",
            1.0 / per_clip,
            match &model.engine {
                Some(e) => e.describe(),
                None => marlin::kernels::of::<B>().name().to_string(),
            }
        );
        let e = &cfg.encoder;
        let flops = marlin::kernels::peak::encoder_flops(
            1,
            cfg.num_patches(),
            e.embed_dim,
            cfg.mlp_hidden(e.embed_dim),
            e.depth,
        );
        let peak = self.peak;
        let share = |gflops: f64| match peak {
            Some(p) => format!(
                " = {:.0}% of the {} peak",
                100.0 * gflops / p.gflops,
                if p.isa == "avx512bf16" {
                    "bf16 dot-product"
                } else {
                    "FMA"
                }
            ),
            None => String::new(),
        };
        let gflops = flops / per_clip / 1e9;
        outln!(
            "encoder: {:.1} GFLOP per clip, {gflops:.1} GFLOP/s{}",
            flops / 1e9,
            share(gflops)
        );
        report_memory(watch);
        if !a.profile {
            return;
        }
        outln!("one block, batch {b}:");
        let x = model.encoder.embed(clip.clone());
        let blk = &model.encoder.blocks[0];
        let [bb, n, d] = x.dims();
        let h = cfg.encoder.num_heads;
        let reps = 2;
        let mut total = 0.0;
        total += time("embed (patchify+linear)", reps, || {
            model.encoder.embed(clip.clone())
        }) / cfg.encoder.depth as f64;
        total += time("norm1", reps, || blk.norm1.forward(x.clone()));
        let k = marlin::kernels::of::<B>();
        let lin = |l: &burn::nn::Linear<B>, x: Tensor<B, 3>| marlin::model::block::linear(k, l, x);
        // Products per call: 2 * tokens * in * out for a Linear, 4 * B * N^2 * D for attention.
        let rate = |flops: f64, s: f64| {
            let gflops = flops / s / 1e9;
            outln!("    {gflops:.1} GFLOP/s{}", share(gflops))
        };
        let tok = (bb * n) as f64;
        let hidden = cfg.mlp_hidden(d) as f64;
        let dd = d as f64;
        let s = time("qkv linear", reps, || lin(&blk.attn.qkv, x.clone()));
        rate(2.0 * tok * dd * 3.0 * dd, s);
        total += s;
        let q = Tensor::<B, 4>::random([bb, h, n, d / h], Distribution::Default, &device);
        let qkv3 = Tensor::<B, 3>::random([bb, n, 3 * d], Distribution::Default, &device);
        let s = time("attention (kernels door)", reps, || {
            k.attention(qkv3.clone(), h, ((d / h) as f32).powf(-0.5))
        });
        rate(4.0 * tok * n as f64 * dd, s);
        total += s;
        time("attention (burn fused op)", reps, || {
            burn::tensor::module::attention(
                q.clone(),
                q.clone(),
                q.clone(),
                None,
                None,
                Default::default(),
            )
        });
        time("attention (matmul+softmax)", reps, || {
            let s = q.clone().matmul(q.clone().swap_dims(2, 3)) * ((d / h) as f64).powf(-0.5);
            burn::tensor::activation::softmax(s, 3).matmul(q.clone())
        });
        time("  head split (reshape/permute)", reps, || {
            blk.attn
                .qkv
                .forward(x.clone())
                .reshape([bb, n, 3, h, d / h])
                .permute([2, 0, 3, 1, 4])
                .slice_dim(0, 0..1)
                .squeeze_dim::<4>(0)
        });
        let s = time("proj linear", reps, || lin(&blk.attn.proj, x.clone()));
        rate(2.0 * tok * dd * dd, s);
        total += s;
        total += time("norm2", reps, || blk.norm2.forward(x.clone()));
        let hdn = blk.mlp.fc1.forward(x.clone());
        let s = time("fc1 linear", reps, || lin(&blk.mlp.fc1, x.clone()));
        rate(2.0 * tok * dd * hidden, s);
        total += s;
        total += time("gelu (kernels door)", reps, || k.gelu(hdn.clone()));
        let s = time("fc2 linear", reps, || lin(&blk.mlp.fc2, hdn.clone()));
        rate(2.0 * tok * dd * hidden, s);
        total += s;
        total += time("residual adds (x2)", reps, || {
            x.clone() + x.clone() + x.clone()
        });
        let qkv_out = blk.attn.qkv.forward(x.clone());
        time("qkv output to host", reps, || {
            let v = qkv_out
                .clone()
                .into_data()
                .into_vec::<f32>()
                .unwrap_or_default();
            Tensor::<B, 1>::from_data(burn::tensor::TensorData::new(v[..8].to_vec(), [8]), &device)
        });
        let host = vec![0f32; bb * n * d];
        time("host output to tensor", reps, || {
            Tensor::<B, 3>::from_data(
                burn::tensor::TensorData::new(host.clone(), [bb, n, d]),
                &device,
            )
        });
        let bias = Tensor::<B, 1>::zeros([3 * d], &device);
        time("qkv linear with bias", reps, || {
            burn::tensor::module::linear(x.clone(), blk.attn.qkv.weight.val(), Some(bias.clone()))
        });
        time("attn module (as used)", reps, || {
            blk.attn.forward(x.clone())
        });
        time("mlp module (as used)", reps, || blk.mlp.forward(x.clone()));
        let whole = time("whole block", reps, || blk.forward(x.clone()));
        outln!(
            "  sum of parts {:.2} ms vs block {:.2} ms; x{} blocks = {:.2} s per batch",
            total * 1e3,
            whole * 1e3,
            cfg.encoder.depth,
            whole * cfg.encoder.depth as f64
        );
    }
}

/// `marlin bench --device cuda`: the CUDA engine's forward (random weights) replayed on clips
/// already on the GPU, as the peer's `extract_features` on CUDA tensors is timed; with the
/// time to a ready engine and to the first batch, peak memory and (`--profile`) each step's
/// device time.
#[cfg(feature = "cuda-engine")]
fn cuda_engine_bench(
    cfg: &MarlinConfig,
    a: &BenchArgs,
    ordinal: usize,
    watch: Option<marlin::backend::MemoryWatch>,
) {
    use marlin::engine::FeatureEngine;
    let b = a.batch_size.max(1);
    let precision = marlin::kernels::gpu_precision();
    let t0 = Instant::now();
    let host = Marlin::<marlin::backend::Cpu>::init(cfg, &[Part::Encoder], 0, &Default::default());
    if let Some(p) = &a.save_weights {
        if let Err(e) = host.to_state_dict().save_safetensors(p, None) {
            eprintln!("{e}");
        }
    }
    let w = marlin::engine::EncoderWeights::of_model(&host);
    drop(host);
    let (engine, note) = match marlin::kernels::cuda::CudaEngine::new(w, ordinal, precision) {
        Ok(e) => e,
        Err(e) => fail(e),
    };
    let ready = t0.elapsed().as_secs_f64();
    if let Some(n) = note {
        eprintln!("note: {n}");
    }
    outln!("{} on {}: batch {b}", cfg.name(), engine.describe());
    // The first batch: the eager pass (cuBLASLt's and cuDNN's first use), then the graph's
    // capture on the second.
    let t1 = Instant::now();
    let first = engine.time_forward(b, false, 1).unwrap_or_else(|e| fail(e));
    let first_s = t1.elapsed().as_secs_f64();
    let _ = first;
    outln!("engine ready in {ready:.2} s (kernels compiled or read from the cache, weights uploaded); first batch {first_s:.2} s");
    let per_batch = engine
        .time_forward(b, false, a.iters.max(1))
        .unwrap_or_else(|e| fail(e));
    let per_clip = per_batch / b as f64;
    let e = &cfg.encoder;
    let flops = marlin::kernels::peak::encoder_flops(
        1,
        cfg.num_patches(),
        e.embed_dim,
        cfg.mlp_hidden(e.embed_dim),
        e.depth,
    );
    outln!(
        "seconds per clip: {per_clip:.5}  (clips/s {:.2}; {})",
        1.0 / per_clip,
        engine.describe()
    );
    outln!(
        "encoder: {:.1} GFLOP per clip, {:.1} TFLOP/s",
        flops / 1e9,
        flops / per_clip / 1e12
    );
    // Through the host as `extract` feeds it: pinned upload on the copy stream, features back.
    let per = 3 * cfg.clip_frames * cfg.img_size * cfg.img_size;
    let clip: Vec<f32> = (0..per)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0)
        .collect();
    let clips: Vec<&[f32]> = (0..b).map(|_| clip.as_slice()).collect();
    let iters = a.iters.max(1);
    let t2 = Instant::now();
    let mut pending = None;
    for _ in 0..iters {
        let p = engine.submit(&clips, false).unwrap_or_else(|e| fail(e));
        if let Some(prev) = pending.replace(p) {
            engine.wait(prev).unwrap_or_else(|e| fail(e));
        }
    }
    if let Some(p) = pending {
        engine.wait(p).unwrap_or_else(|e| fail(e));
    }
    let host_clip = t2.elapsed().as_secs_f64() / (iters * b) as f64;
    outln!(
        "with the clips from host memory: {host_clip:.5} s per clip (clips/s {:.2}; the upload overlaps the previous batch)",
        1.0 / host_clip
    );
    report_memory(watch);
    if a.profile {
        match engine.profile(b) {
            Ok(ops) => {
                outln!("one forward, batch {b}, step by step (device time):");
                let total: f64 = ops.iter().map(|o| o.ms).sum();
                let mut by: std::collections::BTreeMap<String, (f64, f64, usize)> =
                    Default::default();
                for o in &ops {
                    let key = o
                        .label
                        .trim_end_matches(|c: char| c.is_ascii_digit() || c == '(' || c == ')')
                        .to_string();
                    let e = by.entry(key).or_default();
                    e.0 += o.ms;
                    e.1 += o.flops;
                    e.2 += 1;
                }
                for (k, (ms, fl, n)) in by {
                    let rate = if fl > 0.0 {
                        format!("  {:.1} TFLOP/s", fl / (ms * 1e-3) / 1e12)
                    } else {
                        String::new()
                    };
                    outln!(
                        "  {k:<16} {n:>3} x  {ms:>9.3} ms  {:>5.1}%{rate}",
                        100.0 * ms / total
                    );
                }
                outln!("  total            {total:>9.3} ms");
            }
            Err(e) => eprintln!("profile: {e}"),
        }
    }
}

/// Seconds per pretraining step (batch `--batch-size`, one critic and one generator update).
fn train_bench<B: burn::tensor::backend::AutodiffBackend>(
    cfg: &MarlinConfig,
    a: &BenchArgs,
    group: Option<std::sync::Arc<marlin::distributed::Group>>,
    device: &B::Device,
) {
    use marlin::masking::{make_mask, Grid, RngDraws, Strategy};
    use marlin::model::MaskIndices;
    use marlin::train::{LossConfig, Pretrainer};
    let b = a.batch_size.max(1);
    let watch = memory_watch(a.device);
    let model = Marlin::<B>::init(
        cfg,
        &[Part::Encoder, Part::Decoder, Part::Discriminator],
        0,
        device,
    );
    // The config's losses (the released ones: critic on, adv_weight 0.01, no penalty).
    let pt = match Pretrainer::new(model, LossConfig::from_config(cfg)) {
        Ok(pt) => pt,
        Err(e) => fail(e),
    };
    let mut pt = pt.with_group(group.clone());
    let g = cfg.img_size / cfg.patch_size;
    let grid = Grid {
        tubelets: cfg.clip_frames / cfg.tubelet_size,
        grid_h: g,
        grid_w: g,
        patch: cfg.patch_size,
    };
    let mut draws = RngDraws::new(0);
    let vis: Vec<bool> = (0..b)
        .flat_map(|_| make_mask(Strategy::Random, 0.9, &[], &grid, &mut draws))
        .collect();
    let idx = match MaskIndices::from_bools(&vis, b) {
        Ok(idx) => idx,
        Err(e) => fail(e),
    };
    let shape = [b, 3, cfg.clip_frames, cfg.img_size, cfg.img_size];
    let clip = Tensor::<B, 5>::random(shape, Distribution::Uniform(0.0, 1.0), device);
    let world = group.as_ref().map_or(1, |g| g.world());
    match &group {
        Some(g) => outln!(
            "{} pretraining step on {}: batch {b} per rank, {world} ranks ({}), global batch {}",
            cfg.name(),
            a.device,
            g.engine_name(),
            b * world
        ),
        None => outln!("{} pretraining step on {}: batch {b}", cfg.name(), a.device),
    }
    // The training engine's step (`--train-engine`), or burn's.
    let mut engine = None;
    if a.train_engine {
        use marlin::train::engine::engine_step;
        let dev = engine_device(a);
        let sd = pt.model().to_state_dict();
        let mut et = match engine_step(cfg, sd, None, LossConfig::from_config(cfg), dev) {
            Ok(et) => et,
            Err(e) => fail(e),
        };
        et.set_group(group.clone());
        outln!("the training engine's step on {dev:?}");
        engine = Some((et, marlin::model::load::to_f32_vec(clip.clone())));
    }
    // The collectives' cost after the untimed first step.
    let mut after_warmup = None;
    let elapsed = timed_runs(b, a.iters, || {
        let done = match &mut engine {
            Some((et, clips)) => et.step(clips, &idx, 1e-4).map(|_| ()),
            None => pt.step(clip.clone(), &idx, 1e-4, 0).map(|_| ()),
        };
        if let Err(e) = done {
            // A rank that is gone ends the benchmark (no step could follow).
            fail(e);
        }
        if after_warmup.is_none() {
            after_warmup = Some(group.as_ref().map(|g| g.stats()).unwrap_or_default());
        }
    });
    report_memory(watch);
    for n in engine.iter().flat_map(|(et, _)| et.notes()) {
        outln!("note: {n}");
    }
    if let Some((state, act)) = engine.as_ref().and_then(|(et, _)| et.buffer_bytes()) {
        let mib = |x: f64| x / (1 << 20) as f64;
        outln!(
            "the engine's step buffers: {:.0} MiB of parameters and their state (weights, \
             gradients, AdamW's moments), {:.0} MiB of activations ({:.1} MiB per clip)",
            mib(state as f64),
            mib(act as f64),
            mib(act as f64 / b as f64)
        );
    }
    let iters = a.iters.max(1) as f64;
    let per_step = elapsed / iters;
    outln!(
        "seconds per step: {per_step:.3}  (samples/s {:.2})",
        (b * world) as f64 / per_step
    );
    if let (Some(g), Some(w)) = (&group, after_warmup) {
        let s = g.stats();
        outln!(
            "all-reduce per step: {:.3} s, {:.1} MB in {} calls (waits for slower ranks included); \
             the step waited {:.3} s for it",
            (s.seconds - w.seconds) / iters,
            (s.values - w.values) as f64 * 4e-6 / iters,
            (s.calls - w.calls) as f64 / iters,
            (s.waited - w.waited) / iters
        );
    }
}

/// Where `--train-engine` runs: the host ops on the CPU, the CUDA ops on a CUDA GPU.
fn engine_device(a: &BenchArgs) -> marlin::train::engine::EngineDevice {
    use marlin::train::engine::EngineDevice;
    match a.device {
        DeviceSpec::Cpu => EngineDevice::Cpu,
        DeviceSpec::Cuda(ordinal) => EngineDevice::Cuda {
            ordinal,
            precision: a
                .precision
                .unwrap_or(marlin::kernels::Precision::default_for(true)),
        },
        _ => fail("--train-engine runs on the CPU or on CUDA"),
    }
}

/// Seconds per fine-tuning step (batch `--batch-size` clips, all tokens, a 40-label head,
/// binary cross-entropy, Adam with the reference's betas).
fn finetune_bench<B: burn::tensor::backend::AutodiffBackend>(
    cfg: &MarlinConfig,
    a: &BenchArgs,
    device: &B::Device,
) {
    use burn::optim::{AdamConfig, GradientsParams, Optimizer};
    use marlin::probe::classifier::Classifier;
    use marlin::probe::metrics::TaskKind;
    const LABELS: usize = 40;
    let b = a.batch_size.max(1);
    let watch = memory_watch(a.device);
    let model = Marlin::<B>::init(cfg, &[Part::Encoder], 0, device);
    let d = cfg.encoder.embed_dim;
    let shape = [b, 3, cfg.clip_frames, cfg.img_size, cfg.img_size];
    let clip = Tensor::<B, 5>::random(shape, Distribution::Uniform(0.0, 1.0), device);
    let y: Vec<f32> = (0..b * LABELS).map(|i| (i % 3 == 0) as u8 as f32).collect();
    let mut clf = Some(Classifier::new(Some(model.encoder), d, LABELS, 0, device));
    outln!(
        "{} fine-tuning step on {}: batch {b}, {LABELS} labels",
        cfg.name(),
        a.device
    );
    let mut engine = None;
    if a.train_engine {
        let dev = engine_device(a);
        let sd = clf.as_ref().map(|c| c.to_state_dict("bench"));
        let sd = sd.unwrap_or_else(|| fail("no classifier"));
        let e = marlin::probe::engine::finetune_engine(cfg, sd, TaskKind::Multilabel, dev)
            .unwrap_or_else(|e| fail(e));
        outln!("the training engine's step on {dev:?}");
        engine = Some((e, marlin::model::load::to_f32_vec(clip.clone())));
        clf = None;
    }
    let mut optim = AdamConfig::new()
        .with_beta_1(0.5)
        .with_beta_2(0.9)
        .with_epsilon(1e-8)
        .init::<B, Classifier<B>>();
    let elapsed = timed_runs(b, a.iters, || match (&mut engine, clf.take()) {
        (Some((e, clips)), _) => {
            if let Err(err) = e.step(clips, &y, 1e-4) {
                fail(err);
            }
        }
        (None, Some(m)) => {
            let logits = m.forward_clips(clip.clone());
            let l = marlin::probe::train::loss(logits, &y, TaskKind::Multilabel);
            let grads = GradientsParams::from_grads(l.backward(), &m);
            clf = Some(optim.step(1e-4, m, grads));
        }
        // The engine replaced the classifier, or burn's step put it back.
        (None, None) => fail("no classifier to step"),
    });
    report_memory(watch);
    let per_step = elapsed / a.iters.max(1) as f64;
    outln!(
        "seconds per step: {per_step:.3}  (samples/s {:.2})",
        b as f64 / per_step
    );
}

pub fn run(args: BenchArgs) -> Result<i32, String> {
    if args.train_engine && !(args.train || args.finetune) {
        return Err("--train-engine times --train or --finetune steps".into());
    }
    let cfg = match &args.config {
        Some(p) => MarlinConfig::from_yaml_file(p).map_err(|e| e.to_string())?,
        None => MarlinConfig::from_name(&args.model).map_err(|e| e.to_string())?,
    };
    let (p, note) = marlin::backend::set_precision(args.precision, args.device);
    if let Some(n) = note {
        eprintln!("note: {n}");
    }
    outln!("precision: {p}");
    if args.train_engine && matches!(args.device, DeviceSpec::Cuda(_)) {
        // The engine computes in `p` in its own buffers; burn's model beside it (random
        // weights, read once) stays in fp32, as in `marlin pretrain`.
        let _ = marlin::train::run::StepPath::Engine.keep_burn_in_fp32(engine_device(&args));
    }
    let precision = p;
    let device = args.device;
    let peak = args.peak.then(|| {
        let p = marlin::kernels::peak::fma_peak(1.0);
        outln!(
            "f32 FMA peak of {} threads ({}): {:.1} GFLOP/s{}",
            p.threads,
            p.isa,
            p.gflops,
            if device.is_gpu() {
                " (the CPU's; the GPU's rates are not shares of it)"
            } else {
                ""
            }
        );
        // bf16 products are shares of the bf16 dot-product peak (where the CPU has one).
        let dots = marlin::kernels::peak::bf16_dot_peak(1.0);
        if let Some(d) = dots.filter(|_| !device.is_gpu()) {
            outln!(
                "bf16 dot-product peak of {} threads ({}): {:.1} GFLOP/s ({:.2}x the f32 peak)",
                d.threads,
                d.isa,
                d.gflops,
                d.gflops / p.gflops
            );
        }
        match dots {
            Some(d) if precision == marlin::kernels::Precision::Bf16 => d,
            _ => p,
        }
    });
    let peak = peak.filter(|_| !device.is_gpu());
    let (group, device) = match args.train {
        true => args.dist.join(device)?,
        false => (None, device),
    };
    run_on(
        device,
        Bench {
            cfg,
            args,
            precision,
            peak,
            group,
        },
    )?;
    Ok(0)
}
