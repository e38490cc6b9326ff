//! What this machine offers marlin, for `marlin doctor` and Python's `marlin_rs.info()`: the
//! build's devices, the CPU's instructions, FFmpeg, and, for CUDA, the driver, the GPUs and
//! where NVIDIA's libraries were found (or what to install). Nothing here fails: a part that
//! cannot be read says so in its line.

use serde::Serialize;

/// One library or program: where it was found and its version, or why not.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Found {
    pub name: String,
    /// Path or soname opened; `None` when missing.
    pub at: Option<String>,
    pub version: Option<String>,
    /// What to do when missing (or a note when found).
    pub note: Option<String>,
}

/// A CUDA GPU as the driver describes it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Gpu {
    pub index: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub memory_mib: u64,
}

/// The report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub version: String,
    /// Cargo features of this build that pick devices (`cuda`, `cuda-engine`, `vulkan`, `metal`).
    pub devices_built: Vec<String>,
    /// The CPU's instructions the kernels use (`avx2`, `avx512f`, `avx512_bf16`, `amx`).
    pub cpu: Vec<String>,
    pub threads: usize,
    /// H.264 in MP4/MOV decoded in-process (no FFmpeg needed for those).
    pub h264_in_process: bool,
    pub ffmpeg: Found,
    pub cuda_driver: Found,
    pub gpus: Vec<Gpu>,
    /// cuBLASLt, cuDNN and NVRTC, as the CUDA engine finds them.
    pub cuda_libraries: Vec<Found>,
    /// Vulkan adapters (builds with `vulkan`).
    pub vulkan: Vec<String>,
    /// Where compiled GPU kernels are cached.
    pub kernel_cache: Option<String>,
}

fn cpu_features() -> Vec<String> {
    let mut v = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        for (name, on) in [
            ("avx2", std::arch::is_x86_feature_detected!("avx2")),
            ("fma", std::arch::is_x86_feature_detected!("fma")),
            ("avx512f", std::arch::is_x86_feature_detected!("avx512f")),
        ] {
            if on {
                v.push(name.to_string());
            }
        }
    }
    if crate::kernels::bf16::supported() {
        v.push("avx512_bf16".into());
    }
    if crate::kernels::bf16::amx_available() {
        v.push("amx".into());
    }
    v
}

fn ffmpeg() -> Found {
    let out = std::process::Command::new("ffmpeg")
        .arg("-version")
        .stdin(std::process::Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout);
            let first = text.lines().next().unwrap_or("").to_string();
            Found {
                name: "FFmpeg".into(),
                at: Some("ffmpeg (PATH)".into()),
                version: first.split_whitespace().nth(2).map(str::to_string),
                note: None,
            }
        }
        _ => Found {
            name: "FFmpeg".into(),
            at: None,
            version: None,
            note: Some(
                "not on PATH: H.264 MP4/MOV videos and frame folders work without it; other \
                 codecs need it (apt-get install ffmpeg, brew install ffmpeg)"
                    .into(),
            ),
        },
    }
}

#[cfg(feature = "cuda-engine")]
fn cuda() -> (Found, Vec<Gpu>, Vec<Found>) {
    use crate::kernels::cuda::libs;
    let mut driver = Found {
        name: "NVIDIA driver".into(),
        at: None,
        version: None,
        note: Some(
            "not found (libcuda.so.1): no NVIDIA GPU, or its driver is not installed".into(),
        ),
    };
    let mut gpus = Vec::new();
    // SAFETY: asks only whether cudarc's loader can open the driver library.
    if unsafe { cudarc::driver::sys::is_culib_present() } && cudarc::driver::result::init().is_ok()
    {
        let mut v = 0i32;
        // SAFETY: a valid out-pointer; the driver is initialised.
        let ok = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
        driver.at = Some("libcuda.so.1".into());
        driver.note = None;
        if ok == cudarc::driver::sys::cudaError_enum::CUDA_SUCCESS {
            driver.version = Some(format!("CUDA {}.{}", v / 1000, (v % 1000) / 10));
        }
        let n = cudarc::driver::result::device::get_count().unwrap_or(0);
        for i in 0..n.max(0) {
            let Ok(dev) = cudarc::driver::result::device::get(i) else {
                continue;
            };
            use cudarc::driver::sys::CUdevice_attribute as A;
            // SAFETY: `dev` is a device handle the driver just returned.
            let attr =
                |a| unsafe { cudarc::driver::result::device::get_attribute(dev, a) }.unwrap_or(0);
            gpus.push(Gpu {
                index: i as usize,
                name: cudarc::driver::result::device::get_name(dev).unwrap_or_default(),
                compute_capability: (
                    attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
                    attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR),
                ),
                // SAFETY: as above.
                memory_mib: unsafe { cudarc::driver::result::device::total_mem(dev) }.unwrap_or(0)
                    as u64
                    >> 20,
            });
        }
    }
    let mut found = Vec::new();
    for lib in [libs::CUBLASLT, libs::CUDNN, libs::NVRTC] {
        let f = libs::preload(&lib);
        let version = f.as_ref().and_then(|_| match lib.what {
            // SAFETY: each call is a plain version query of a library opened just above.
            "cuBLASLt" if unsafe { cudarc::cublaslt::sys::is_culib_present() } => {
                Some(unsafe { cudarc::cublaslt::sys::cublasLtGetVersion() }.to_string())
            }
            "cuDNN" => crate::kernels::cuda::sdpa::cudnn_version().map(|v| v.to_string()),
            "NVRTC" => crate::kernels::cuda::nvrtc::version()
                .ok()
                .map(|(a, b)| format!("{a}.{b}")),
            _ => None,
        });
        found.push(Found {
            name: lib.what.into(),
            note: if f.is_none() {
                Some(libs::missing(&lib))
            } else if lib.what == "cuDNN" {
                Some("bf16 attention (9.13.1 or newer; otherwise marlin's own kernel)".into())
            } else {
                None
            },
            at: f.map(|f| f.path),
            version,
        });
    }
    (driver, gpus, found)
}

#[cfg(not(feature = "cuda-engine"))]
fn cuda() -> (Found, Vec<Gpu>, Vec<Found>) {
    (
        Found {
            name: "NVIDIA driver".into(),
            at: None,
            version: None,
            note: Some("this build has no CUDA (rebuild with --features cuda)".into()),
        },
        Vec::new(),
        Vec::new(),
    )
}

/// Everything the report holds, read now.
pub fn report() -> Report {
    let mut devices_built = Vec::new();
    for (f, on) in [
        ("cuda", cfg!(feature = "cuda")),
        ("cuda-engine", cfg!(feature = "cuda-engine")),
        ("vulkan", cfg!(feature = "vulkan")),
        ("metal", cfg!(feature = "metal")),
    ] {
        if on {
            devices_built.push(f.to_string());
        }
    }
    let (cuda_driver, gpus, cuda_libraries) = cuda();
    #[cfg(feature = "vulkan")]
    let vulkan = crate::backend::wgpu::adapters(crate::backend::wgpu::Api::Vulkan)
        .iter()
        .enumerate()
        .map(|(i, a)| format!("vulkan:{i} {a}"))
        .collect();
    #[cfg(not(feature = "vulkan"))]
    let vulkan = Vec::new();
    Report {
        version: env!("CARGO_PKG_VERSION").to_string(),
        devices_built,
        cpu: cpu_features(),
        threads: rayon::current_num_threads(),
        h264_in_process: crate::video::h264_in_process(),
        ffmpeg: ffmpeg(),
        cuda_driver,
        gpus,
        cuda_libraries,
        vulkan,
        kernel_cache: crate::kernels::cuda::nvrtc::cache_dir().map(|p| p.display().to_string()),
    }
}

impl Found {
    fn line(&self) -> String {
        match (&self.at, &self.version, &self.note) {
            (Some(at), v, note) => format!(
                "{}{} ({at}){}",
                self.name,
                v.as_ref().map(|v| format!(" {v}")).unwrap_or_default(),
                note.as_ref().map(|n| format!(": {n}")).unwrap_or_default()
            ),
            (None, _, note) => format!("{}: {}", self.name, note.as_deref().unwrap_or("not found")),
        }
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "marlin {}", self.version)?;
        writeln!(
            f,
            "devices built: cpu{}",
            self.devices_built
                .iter()
                .map(|d| format!(", {d}"))
                .collect::<String>()
        )?;
        writeln!(f, "cpu: {} threads, {}", self.threads, self.cpu.join(" "))?;
        writeln!(
            f,
            "video: H.264 in MP4/MOV {}; {}",
            if self.h264_in_process {
                "in-process (OpenH264)"
            } else {
                "through FFmpeg"
            },
            self.ffmpeg.line()
        )?;
        writeln!(f, "cuda: {}", self.cuda_driver.line())?;
        for g in &self.gpus {
            writeln!(
                f,
                "  cuda:{} {} (sm_{}{}, {} MiB)",
                g.index, g.name, g.compute_capability.0, g.compute_capability.1, g.memory_mib
            )?;
        }
        for l in &self.cuda_libraries {
            writeln!(f, "  {}", l.line())?;
        }
        if let Some(c) = &self.kernel_cache {
            writeln!(f, "  compiled kernels cached in {c}")?;
        }
        for v in &self.vulkan {
            writeln!(f, "{v}")?;
        }
        Ok(())
    }
}
