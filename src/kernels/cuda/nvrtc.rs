//! The engine's CUDA C++ kernels: their sources (embedded in the binary, or read from a folder
//! named by `MARLIN_CUDA_SOURCES` so that a kernel fix on a GPU machine needs no Rust rebuild),
//! compiled by NVRTC once per GPU architecture and options and kept on disk
//! (`~/.cache/marlin/kernels/`, or `MARLIN_KERNEL_CACHE`).

use std::path::PathBuf;

/// A kernel source file of `src/kernels/cuda/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Source {
    pub file: &'static str,
    pub text: &'static str,
    /// Compiled once per head size (`-DHEAD_DIM=`).
    pub per_head_dim: bool,
    /// The oldest architecture it compiles for (tensor-core `mma.sync`: 80).
    pub min_arch: u32,
}

pub const ENCODER: Source = Source {
    file: "encoder.cu",
    text: include_str!("encoder.cu"),
    per_head_dim: false,
    min_arch: 70,
};

pub const ATTENTION_SIMT: Source = Source {
    file: "attention_simt.cu",
    text: include_str!("attention_simt.cu"),
    per_head_dim: true,
    min_arch: 70,
};

pub const ATTENTION_MMA: Source = Source {
    file: "attention_mma.cu",
    text: include_str!("attention_mma.cu"),
    per_head_dim: true,
    min_arch: 80,
};

/// The training engine's small ops (LayerNorm with statistics and its backward, gathers and
/// their scatters, bias gradients, GELU/LeakyReLU backward, losses, AdamW), f32.
pub const TRAIN: Source = Source {
    file: "train.cu",
    text: include_str!("train.cu"),
    per_head_dim: false,
    min_arch: 70,
};

pub const SOURCES: [Source; 4] = [ENCODER, ATTENTION_SIMT, ATTENTION_MMA, TRAIN];

/// The environment variable naming a folder of `.cu` files to use instead of the embedded ones.
pub const SOURCES_ENV: &str = "MARLIN_CUDA_SOURCES";

impl Source {
    /// The text to compile: the file in `MARLIN_CUDA_SOURCES` if that is set, else the copy
    /// built into the binary.
    pub fn text(&self) -> Result<String, String> {
        match std::env::var_os(SOURCES_ENV) {
            Some(dir) => {
                let p = PathBuf::from(dir).join(self.file);
                std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))
            }
            None => Ok(self.text.to_string()),
        }
    }
}

/// NVRTC's options for `arch` (e.g. 90 for sm_90a, 80 for sm_80) and a head size.
pub fn options(arch: u32, head_dim: Option<usize>, ptx: bool) -> Vec<String> {
    // Hopper's cubins are built for sm_90a (its own instructions allowed); PTX for the newest
    // virtual architecture NVRTC knows when the GPU is newer than NVRTC (the driver compiles it).
    let target = match (arch, ptx) {
        (_, true) => format!("--gpu-architecture=compute_{arch}"),
        (90, false) => "--gpu-architecture=sm_90a".to_string(),
        (a, false) => format!("--gpu-architecture=sm_{a}"),
    };
    let mut o = vec![target, "--std=c++17".to_string()];
    if let Some(hd) = head_dim {
        o.push(format!("-DHEAD_DIM={hd}"));
    }
    o
}

/// FNV-1a, 64 bits: a stable name for a cached compile (Rust's own hasher may change between
/// releases).
pub fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        // Separate the parts so ("ab", "c") and ("a", "bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The on-disk cache of compiled kernels.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("MARLIN_KERNEL_CACHE") {
        return Some(PathBuf::from(d));
    }
    dirs::cache_dir().map(|d| d.join("marlin").join("kernels"))
}

/// A compiled module: a cubin, or PTX for the driver to finish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compiled {
    pub image: Vec<u8>,
    pub ptx: bool,
    /// Found in the disk cache rather than compiled now.
    pub cached: bool,
}

#[cfg(feature = "cuda-engine")]
mod compile {
    use super::*;
    use cudarc::nvrtc::sys;
    use std::ffi::{CStr, CString};

    /// NVRTC's version (major, minor), once the library is open.
    pub fn version() -> Result<(i32, i32), String> {
        open()?;
        let (mut major, mut minor) = (0, 0);
        // SAFETY: two valid out-pointers; the library is loaded (checked by `open`).
        let r = unsafe { sys::nvrtcVersion(&mut major, &mut minor) };
        if r != sys::nvrtcResult::NVRTC_SUCCESS {
            return Err(format!("nvrtcVersion failed: {r:?}"));
        }
        Ok((major, minor))
    }

    /// The architectures this NVRTC compiles for (e.g. [75, 80, ..., 90, 100, 120]).
    pub fn supported_archs() -> Result<Vec<u32>, String> {
        open()?;
        let mut n = 0;
        // SAFETY: valid out-pointer; the library is loaded.
        unsafe {
            if sys::nvrtcGetNumSupportedArchs(&mut n) != sys::nvrtcResult::NVRTC_SUCCESS {
                return Err("nvrtcGetNumSupportedArchs failed".into());
            }
            let mut v = vec![0i32; n.max(0) as usize];
            if sys::nvrtcGetSupportedArchs(v.as_mut_ptr()) != sys::nvrtcResult::NVRTC_SUCCESS {
                return Err("nvrtcGetSupportedArchs failed".into());
            }
            Ok(v.into_iter().map(|a| a.max(0) as u32).collect())
        }
    }

    /// Open NVRTC (from wherever [`super::super::libs`] finds it) or say what to install.
    pub fn open() -> Result<(), String> {
        let _ = super::super::libs::preload(&super::super::libs::NVRTC);
        // SAFETY: only asks whether cudarc's loader can open the library.
        if unsafe { sys::is_culib_present() } {
            Ok(())
        } else {
            Err(super::super::libs::missing(&super::super::libs::NVRTC))
        }
    }

    /// Compile `src` with `options` (name `file` in messages): the cubin (or PTX) image.
    /// `strict`: a warning about the source is an error (the test of every kernel file).
    pub fn compile_now(
        file: &str,
        src: &str,
        options: &[String],
        ptx: bool,
        strict: bool,
    ) -> Result<Vec<u8>, String> {
        open()?;
        let csrc = CString::new(src).map_err(|_| format!("{file}: a NUL byte in the source"))?;
        let cname = CString::new(file).map_err(|_| format!("{file}: a NUL byte in the name"))?;
        let prog = cudarc::nvrtc::result::create_program(&csrc, Some(&cname))
            .map_err(|e| format!("{file}: nvrtcCreateProgram: {e:?}"))?;
        // SAFETY: `prog` was created above and is destroyed once, at the end; the buffers
        // passed to NVRTC are sized by the sizes it reports.
        unsafe {
            let compiled = cudarc::nvrtc::result::compile_program(prog, options);
            let log = cudarc::nvrtc::result::get_program_log(prog)
                .map(|l| {
                    CStr::from_ptr(l.as_ptr())
                        .to_string_lossy()
                        .trim()
                        .to_string()
                })
                .unwrap_or_default();
            // NVRTC's own notices (an architecture it calls deprecated) are not the source's.
            let warnings: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("warning") && !l.contains("are deprecated"))
                .collect();
            let out = match compiled {
                Err(e) => Err(format!("{file} ({}): {e:?}\n{log}", options.join(" "))),
                Ok(()) if strict && !warnings.is_empty() => Err(format!(
                    "{file} ({}): compiled with warnings\n{log}",
                    options.join(" ")
                )),
                Ok(()) if ptx => cudarc::nvrtc::result::get_ptx(prog)
                    .map(|p| p.into_iter().map(|c| c as u8).collect())
                    .map_err(|e| format!("{file}: nvrtcGetPTX: {e:?}")),
                Ok(()) => {
                    let mut size = 0usize;
                    let mut r = sys::nvrtcGetCUBINSize(prog, &mut size);
                    let mut image = vec![0u8; size];
                    if r == sys::nvrtcResult::NVRTC_SUCCESS {
                        r = sys::nvrtcGetCUBIN(prog, image.as_mut_ptr() as *mut _);
                    }
                    if r == sys::nvrtcResult::NVRTC_SUCCESS {
                        Ok(image)
                    } else {
                        Err(format!("{file}: nvrtcGetCUBIN: {r:?}"))
                    }
                }
            };
            let _ = cudarc::nvrtc::result::destroy_program(prog);
            out
        }
    }

    /// `src` compiled for `arch`, from the disk cache when it was compiled before with the
    /// same text, options and NVRTC.
    pub fn compile(s: &Source, arch: u32, head_dim: Option<usize>) -> Result<Compiled, String> {
        let text = s.text()?;
        let archs = supported_archs()?;
        // A GPU newer than this NVRTC: PTX of the newest architecture it knows.
        let (arch, ptx) = if archs.contains(&arch) {
            (arch, false)
        } else {
            let best = archs.iter().copied().filter(|&a| a <= arch).max();
            (
                best.ok_or_else(|| format!("NVRTC compiles for none of sm_{arch}'s predecessors"))?,
                true,
            )
        };
        let opts = options(arch, head_dim.filter(|_| s.per_head_dim), ptx);
        let (major, minor) = version()?;
        let key = fnv1a(&[
            text.as_bytes(),
            opts.join(" ").as_bytes(),
            format!("{major}.{minor}").as_bytes(),
        ]);
        let stem = s.file.trim_end_matches(".cu");
        let name = format!("{stem}-{key:016x}.{}", if ptx { "ptx" } else { "cubin" });
        let cached = cache_dir().map(|d| d.join(&name));
        if let Some(p) = &cached {
            if let Ok(image) = std::fs::read(p) {
                if !image.is_empty() {
                    return Ok(Compiled {
                        image,
                        ptx,
                        cached: true,
                    });
                }
            }
        }
        let image = compile_now(s.file, &text, &opts, ptx, false)?;
        if let Some(p) = cached {
            // A cache that cannot be written only costs the next process a compile.
            if let Some(dir) = p.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            let _ = crate::util::write_atomic(&p, &image);
        }
        Ok(Compiled {
            image,
            ptx,
            cached: false,
        })
    }
}

#[cfg(feature = "cuda-engine")]
pub use compile::{compile, compile_now, open, supported_archs, version};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_name_the_architecture_and_the_head_size() {
        assert_eq!(
            options(90, Some(64), false),
            ["--gpu-architecture=sm_90a", "--std=c++17", "-DHEAD_DIM=64"]
        );
        assert_eq!(options(80, None, false)[0], "--gpu-architecture=sm_80");
        assert_eq!(
            options(120, None, true)[0],
            "--gpu-architecture=compute_120"
        );
    }

    #[test]
    fn cache_names_change_with_any_part() {
        let a = fnv1a(&[b"src", b"opts"]);
        assert_ne!(a, fnv1a(&[b"src", b"opts2"]));
        assert_ne!(a, fnv1a(&[b"sr", b"copts"]));
        assert_eq!(a, fnv1a(&[b"src", b"opts"]));
    }

    #[test]
    fn sources_are_self_contained() {
        // User machines may have NVRTC without the CUDA runtime's headers.
        for s in SOURCES {
            assert!(!s.text.contains("#include"), "{} includes a header", s.file);
            assert!(s.text.contains("extern \"C\""), "{}", s.file);
        }
    }

    /// Every kernel file compiles with NVRTC for the A100 (sm_80) and Hopper (sm_90a), at the
    /// head sizes of the test configs and the released ones, without warnings. NVRTC comes
    /// from the system or Python (`pip install nvidia-cuda-nvrtc-cu12`, which `.ci/run`
    /// installs); `MARLIN_SKIP_NVRTC=1` skips this where neither is available.
    #[cfg(feature = "cuda-engine")]
    #[test]
    fn every_kernel_compiles_for_sm80_and_sm90a() {
        if std::env::var_os("MARLIN_SKIP_NVRTC").is_some() {
            eprintln!("MARLIN_SKIP_NVRTC set: kernels not compiled");
            return;
        }
        if let Err(e) = open() {
            panic!("{e} (or set MARLIN_SKIP_NVRTC=1)");
        }
        let (major, minor) = version().unwrap();
        let mut built = 0;
        for s in SOURCES {
            let dims: Vec<Option<usize>> = if s.per_head_dim {
                if s.min_arch >= 80 {
                    vec![Some(16), Some(32), Some(64), Some(128)]
                } else {
                    vec![Some(4), Some(8), Some(16), Some(64), Some(128)]
                }
            } else {
                vec![None]
            };
            for arch in [80u32, 90] {
                for &hd in &dims {
                    let o = options(arch, hd, false);
                    let image = compile_now(s.file, s.text, &o, false, true)
                        .unwrap_or_else(|e| panic!("NVRTC {major}.{minor}: {e}"));
                    assert!(
                        image.len() > 1000,
                        "{}: a {}-byte cubin",
                        s.file,
                        image.len()
                    );
                    built += 1;
                }
            }
        }
        eprintln!("NVRTC {major}.{minor}: {built} cubins");
    }
}
