//! Which inputs a batch job has and where each one's output goes: files, frame folders,
//! directories walked for both, list files; outputs keep the inputs' relative paths.

use super::ExtractError;
use crate::video::{self, Input, VideoError};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// An input that produced no output, and why (one line).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Failure {
    pub file: String,
    pub error: String,
}

impl Failure {
    pub fn new(input: &Input, error: impl ToString) -> Self {
        Self {
            file: input.path().display().to_string(),
            error: error.to_string(),
        }
    }
}

/// The video patterns a directory walk takes by default.
pub const DEFAULT_GLOB: &str = "*.mp4,*.avi,*.mov,*.mkv,*.webm,*.m4v,*.mpg,*.mpeg,*.flv";

/// One unit of work: an input and where its output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub input: Input,
    pub out: PathBuf,
}

/// How inputs are found and named.
#[derive(Debug, Clone)]
pub struct DiscoverOptions {
    /// Output folder.
    pub out: PathBuf,
    /// A text file with one input path per line (`#` comments), read after the inputs.
    pub list: Option<PathBuf>,
    /// Comma-separated file patterns of videos when walking a directory (case-insensitive).
    pub glob: String,
    /// How an output is named after the input's path relative to what was given.
    pub name: OutputName,
}

/// How an output is named after its input's relative path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputName {
    /// With this extension: `a/b.mp4` -> `a/b.npy`, a frame folder `a/c` -> `a/c.npy`.
    Extension(String),
    /// Without the extension (a folder per video): `a/b.mp4` -> `a/b`.
    Stem,
}

impl OutputName {
    pub fn apply(&self, rel: &Path) -> PathBuf {
        match self {
            OutputName::Stem => rel.with_extension(""),
            OutputName::Extension(ext) => {
                if rel.extension().is_some() && !rel.as_os_str().is_empty() {
                    return rel.with_extension(ext);
                }
                let mut s = rel.as_os_str().to_owned();
                s.push(".");
                s.push(ext);
                PathBuf::from(s)
            }
        }
    }
}

impl DiscoverOptions {
    /// `.npy` outputs under `out`, the default video patterns, no list file.
    pub fn new(out: impl Into<PathBuf>) -> Self {
        Self {
            out: out.into(),
            list: None,
            glob: DEFAULT_GLOB.into(),
            name: OutputName::Extension("npy".into()),
        }
    }
}

/// What [`discover`] found.
#[derive(Debug, Clone, Default)]
pub struct Discovered {
    pub items: Vec<Item>,
    /// Paths that do not exist, directories with nothing to read, inputs that would write
    /// another input's output.
    pub failures: Vec<Failure>,
}

fn glob_set(globs: &str) -> Result<globset::GlobSet, ExtractError> {
    let mut b = globset::GlobSetBuilder::new();
    for g in globs.split(',').map(str::trim).filter(|g| !g.is_empty()) {
        b.add(
            globset::GlobBuilder::new(g)
                .case_insensitive(true)
                .build()
                .map_err(|e| ExtractError::Options(format!("--glob '{g}': {e}")))?,
        );
    }
    b.build().map_err(|e| ExtractError::Options(e.to_string()))
}

fn has_images(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .any(|e| e.path().is_file() && video::is_image(&e.path()))
        })
        .unwrap_or(false)
}

/// Expand `inputs` (files, frame folders, directories to walk for videos matching the glob and
/// for frame folders) and the list file into items whose output is `out` joined with the name
/// of the relative path; paths that do not exist become failures, and so does an input whose
/// output another input already writes.
pub fn discover(inputs: &[PathBuf], opts: &DiscoverOptions) -> Result<Discovered, ExtractError> {
    let globs = glob_set(&opts.glob)?;
    let mut paths = inputs.to_vec();
    if let Some(list) = &opts.list {
        let text = std::fs::read_to_string(list).map_err(|e| {
            ExtractError::Options(format!("{}: cannot read list: {e}", list.display()))
        })?;
        paths.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(PathBuf::from),
        );
    }
    let out = &opts.out;
    let name = |rel: &Path| opts.name.apply(rel);
    let mut found = Discovered::default();
    let items = &mut found.items;
    let fail = |p: &Path, error: String| Failure {
        file: p.display().to_string(),
        error,
    };
    for p in paths {
        if !p.exists() {
            let e = VideoError::Missing(p.display().to_string()).to_string();
            found.failures.push(fail(&p, e));
            continue;
        }
        let file_name = PathBuf::from(p.file_name().unwrap_or(p.as_os_str()));
        if p.is_file() {
            items.push(Item {
                input: Input::Video(p.clone()),
                out: out.join(name(&file_name)),
            });
        } else if has_images(&p) {
            items.push(Item {
                input: Input::Frames(p.clone()),
                out: out.join(name(&file_name)),
            });
        } else {
            let before = items.len();
            for e in walkdir::WalkDir::new(&p)
                .sort_by_file_name()
                .into_iter()
                .filter_map(|e| e.ok())
            {
                let ep = e.path();
                let rel = ep.strip_prefix(&p).unwrap_or(ep).to_path_buf();
                if e.file_type().is_file()
                    && globs.is_match(ep.file_name().map(Path::new).unwrap_or(ep))
                {
                    items.push(Item {
                        input: Input::Video(ep.to_path_buf()),
                        out: out.join(name(&rel)),
                    });
                } else if e.file_type().is_dir() && ep != p && has_images(ep) {
                    items.push(Item {
                        input: Input::Frames(ep.to_path_buf()),
                        out: out.join(name(&rel)),
                    });
                }
            }
            if items.len() == before {
                let e = format!(
                    "{}: no videos matching '{}' and no frame folders inside",
                    p.display(),
                    opts.glob
                );
                found.failures.push(fail(&p, e));
            }
        }
    }
    // Two inputs that would write the same output: keep the first, fail the others.
    let mut seen = BTreeSet::new();
    let all = std::mem::take(&mut found.items);
    for it in all {
        if seen.insert(it.out.clone()) {
            found.items.push(it);
        } else {
            let e = format!(
                "{}: another input already writes {}",
                it.input.path().display(),
                it.out.display()
            );
            found.failures.push(fail(it.input.path(), e));
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_keep_relative_paths_and_clashes_fail() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        std::fs::create_dir_all(d.join("in/a")).unwrap();
        for f in ["in/x.mp4", "in/a/y.MOV", "in/a/notes.txt", "x.mp4"] {
            std::fs::write(d.join(f), b"").unwrap();
        }
        let found = discover(
            &[d.join("in"), d.join("x.mp4"), d.join("missing.mp4")],
            &DiscoverOptions::new(d.join("out")),
        )
        .unwrap();
        let outs: Vec<PathBuf> = found.items.iter().map(|i| i.out.clone()).collect();
        assert_eq!(outs, vec![d.join("out/a/y.npy"), d.join("out/x.npy")]);
        assert_eq!(found.failures.len(), 2, "{:?}", found.failures);
        assert!(found.failures[0].error.contains("missing.mp4"));
        assert!(found.failures[1]
            .error
            .contains("another input already writes"));
    }
}
