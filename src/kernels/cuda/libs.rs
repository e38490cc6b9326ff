//! Finding NVIDIA's libraries at run time. The binary links none of them: cudarc opens each
//! by its name on first use, which finds what the dynamic loader's path has (the CUDA
//! toolkit's, a distribution's packages). PyTorch's wheels keep theirs in
//! `site-packages/nvidia/*/lib`, where the loader does not look: [`preload`] opens those (and
//! any folder in `MARLIN_CUDA_LIBS`) by their full paths first, so that cudarc's later opening
//! by name finds the library already loaded (the loader matches a loaded library's soname).
//!
//! Where it looks, in order: folders in `MARLIN_CUDA_LIBS` (`:`-separated); the loader's own
//! path (`LD_LIBRARY_PATH`, the system's); `$CUDA_HOME`, `$CUDA_PATH` and `/usr/local/cuda`;
//! the `nvidia/*/lib` folders of the Python environments in `$VIRTUAL_ENV`, `$CONDA_PREFIX`,
//! `~/.local` and the system's `site-packages`/`dist-packages`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A library the engine uses: its base name and the sonames to try, newest first.
#[derive(Debug, Clone, Copy)]
pub struct Lib {
    /// What users know it as.
    pub what: &'static str,
    /// File names, newest major first (`libcublasLt.so.13`, `.12`).
    pub names: &'static [&'static str],
    /// Libraries it opens itself at run time, loaded before it from the same folder.
    pub companions: &'static [&'static str],
    /// How to install it.
    pub install: &'static str,
}

pub const CUBLASLT: Lib = Lib {
    what: "cuBLASLt",
    names: &[
        "libcublasLt.so.13",
        "libcublasLt.so.12",
        "libcublasLt.so.11",
    ],
    companions: &[],
    install: "pip install nvidia-cublas-cu12 (or the CUDA toolkit's libcublas)",
};

pub const CUDNN: Lib = Lib {
    what: "cuDNN",
    names: &["libcudnn.so.9"],
    // cuDNN 9 opens its parts by soname at run time; each needs libcudnn_graph first.
    companions: &[
        "libcudnn_graph.so.9",
        "libcudnn_engines_runtime_compiled.so.9",
        "libcudnn_engines_precompiled.so.9",
        "libcudnn_heuristic.so.9",
        "libcudnn_ops.so.9",
        "libcudnn_cnn.so.9",
        "libcudnn_adv.so.9",
    ],
    install: "pip install nvidia-cudnn-cu12 (cuDNN 9.13 or newer)",
};

pub const NVRTC: Lib = Lib {
    what: "NVRTC",
    names: &["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so.11.2"],
    companions: &[],
    install: "pip install nvidia-cuda-nvrtc-cu12 (or the CUDA toolkit's cuda-nvrtc)",
};

/// Where one library was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub what: &'static str,
    /// The file opened (its soname when the loader's own path had it).
    pub path: String,
}

/// Folders that may hold NVIDIA's libraries, in the order they are searched (after the
/// loader's own path).
pub fn search_folders() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(v) = std::env::var_os("MARLIN_CUDA_LIBS") {
        dirs.extend(std::env::split_paths(&v));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(v) = std::env::var_os(var) {
            let root = PathBuf::from(v);
            dirs.push(root.join("lib64"));
            dirs.push(root.join("lib"));
        }
    }
    dirs.push("/usr/local/cuda/lib64".into());
    dirs.push("/usr/local/cuda/targets/x86_64-linux/lib".into());
    dirs.push("/usr/local/cuda/targets/sbsa-linux/lib".into());
    let mut envs: Vec<PathBuf> = Vec::new();
    for var in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
        if let Some(v) = std::env::var_os(var) {
            envs.push(PathBuf::from(v).join("lib"));
        }
    }
    if let Some(h) = dirs::home_dir() {
        envs.push(h.join(".local/lib"));
    }
    envs.extend([
        "/usr/local/lib".into(),
        "/usr/lib".into(),
        "/opt/conda/lib".into(),
    ]);
    let mut site: Vec<PathBuf> = Vec::new();
    for lib in envs {
        for py in children(&lib).filter(|p| name_starts(p, "python3")) {
            for sp in ["site-packages", "dist-packages"] {
                site.push(py.join(sp));
            }
        }
    }
    // Elsewhere (pyenv, a custom prefix): the site folders of the `python3` on PATH.
    if !site.iter().any(|s| s.join("nvidia").is_dir()) {
        site.extend(python_site_packages().iter().cloned());
    }
    for sp in site {
        for pkg in children(&sp.join("nvidia")) {
            // CUDA 12 wheels: nvidia/<pkg>/lib; CUDA 13: nvidia/cu13/lib.
            dirs.push(pkg.join("lib"));
        }
    }
    dirs.retain(|d| d.is_dir());
    dirs.dedup();
    dirs
}

/// The site-packages folders of the `python3` on PATH (asked once; none without Python).
fn python_site_packages() -> &'static [PathBuf] {
    static SITE: OnceLock<Vec<PathBuf>> = OnceLock::new();
    SITE.get_or_init(|| {
        let out = std::process::Command::new("python3")
            .args([
                "-c",
                "import site; print('\\n'.join(site.getsitepackages() + [site.getusersitepackages()]))",
            ])
            .stderr(std::process::Stdio::null())
            .output();
        match out {
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(PathBuf::from)
                .collect(),
            _ => Vec::new(),
        }
    })
}

fn children(dir: &Path) -> impl Iterator<Item = PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    v.sort();
    v.into_iter()
}

fn name_starts(p: &Path, prefix: &str) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with(prefix))
}

/// The libraries opened so far, kept loaded for the process.
fn opened() -> &'static std::sync::Mutex<Vec<(Found, libloading::Library)>> {
    static OPENED: OnceLock<std::sync::Mutex<Vec<(Found, libloading::Library)>>> = OnceLock::new();
    OPENED.get_or_init(Default::default)
}

/// Open `lib` (and its companions) for the process: by name from the loader's path, else by
/// full path from [`search_folders`]. `None` when it is nowhere.
pub fn preload(lib: &Lib) -> Option<Found> {
    let mut held = opened().lock().unwrap_or_else(|e| e.into_inner());
    if let Some((f, _)) = held.iter().find(|(f, _)| f.what == lib.what) {
        return Some(f.clone());
    }
    // The loader's own path first: what the system has configured wins.
    for name in lib.names {
        // SAFETY: opening a library runs its initialisers, as cudarc's own opening would a
        // moment later; NVIDIA's libraries have no initialisers with preconditions.
        if let Ok(l) = unsafe { libloading::Library::new(*name) } {
            let found = Found {
                what: lib.what,
                path: (*name).to_string(),
            };
            held.push((found.clone(), l));
            return Some(found);
        }
    }
    for dir in search_folders() {
        for name in lib.names {
            let path = dir.join(name);
            if !path.exists() {
                continue;
            }
            for c in lib.companions {
                let cp = dir.join(c);
                if cp.exists() {
                    // SAFETY: as above.
                    if let Ok(l) = unsafe { libloading::Library::new(&cp) } {
                        let f = Found {
                            what: "companion",
                            path: cp.display().to_string(),
                        };
                        held.push((f, l));
                    }
                }
            }
            // NVRTC opens its builtins library (libnvrtc-builtins.so.<major>.<minor>) itself.
            if lib.what == NVRTC.what {
                for b in children(&dir).filter(|p| name_starts(p, "libnvrtc-builtins.so")) {
                    // SAFETY: as above.
                    if let Ok(l) = unsafe { libloading::Library::new(&b) } {
                        let f = Found {
                            what: "companion",
                            path: b.display().to_string(),
                        };
                        held.push((f, l));
                    }
                }
            }
            // SAFETY: as above.
            if let Ok(l) = unsafe { libloading::Library::new(&path) } {
                let found = Found {
                    what: lib.what,
                    path: path.display().to_string(),
                };
                held.push((found.clone(), l));
                return Some(found);
            }
        }
    }
    None
}

/// One line for a library that is nowhere: what was searched and what to install.
pub fn missing(lib: &Lib) -> String {
    format!(
        "{} not found (looked for {} on the loader's path, in $MARLIN_CUDA_LIBS, the CUDA \
         toolkit and Python's nvidia/*/lib folders): {}",
        lib.what,
        lib.names.join(", "),
        lib.install
    )
}

/// Every library opened so far (for `marlin doctor` and reports).
pub fn report() -> Vec<Found> {
    opened()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(f, _)| f.clone())
        .filter(|f| f.what != "companion")
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_from_the_environment_come_first_and_must_exist() {
        let d = tempfile::tempdir().unwrap();
        let nvidia = d
            .path()
            .join("lib/python3.11/site-packages/nvidia/cublas/lib");
        std::fs::create_dir_all(&nvidia).unwrap();
        // SAFETY (of the test): no other test reads these variables.
        std::env::set_var("MARLIN_CUDA_LIBS", d.path().join("nowhere"));
        std::env::set_var("VIRTUAL_ENV", d.path());
        let dirs = search_folders();
        assert!(dirs.contains(&nvidia), "{dirs:?}");
        assert!(!dirs.iter().any(|p| p.ends_with("nowhere")));
        std::env::remove_var("MARLIN_CUDA_LIBS");
        std::env::remove_var("VIRTUAL_ENV");
    }

    #[test]
    fn a_missing_library_says_what_to_install() {
        let m = missing(&CUDNN);
        assert!(m.contains("cuDNN not found") && m.contains("pip install nvidia-cudnn-cu12"));
    }
}
