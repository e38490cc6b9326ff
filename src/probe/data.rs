//! Labelled datasets of the downstream tasks, checked row by row before any training:
//!
//! - CelebV-HQ, the reference layout: `ROOT/celebvhq_info.json` (`clips.<name>.attributes.<task>`,
//!   label names in `meta_info.<task>_mapping`), `ROOT/{train,val,test}.txt` (one clip name per
//!   line), videos in `ROOT/cropped/<name>.mp4`; tasks `appearance` (40 labels) and `action`
//!   (35), multilabel.
//! - Generic CSV: `DIR/{train,val,test}.csv`, rows `path,label` (binary when every label is 0 or
//!   1, else multiclass with the training labels as classes) or `path,label_1,...,label_k`
//!   (multilabel, each 0 or 1). An optional header row starts with `path`; its other cells name
//!   the labels. Paths are relative to the CSV's folder (or absolute).

use super::metrics::TaskKind;
use rand::seq::SliceRandom;
use rand::{rngs::StdRng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// One labelled video.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Where the row came from, for messages: `train.csv:12`.
    pub origin: String,
    /// The video file.
    pub video: PathBuf,
    /// Its features' name under a features folder, without extension (`a/b` -> `a/b.npy`).
    pub key: PathBuf,
    /// Binary: `[0|1]`; multilabel: `[0|1; k]`; multiclass: `[class index]`.
    pub target: Vec<f32>,
}

/// A label file, dataset layout or split that cannot be used. Each message names the file
/// (and row).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DataError {
    /// A file that cannot be read, a row or entry that cannot be used (`file:row: what`), a
    /// layout that is neither CelebV-HQ nor split CSVs.
    #[error("{0}")]
    Invalid(String),
    /// A features file or video that a row names and that does not exist.
    #[error("{origin}: {what} {path} not found{hint}")]
    Missing {
        origin: String,
        what: &'static str,
        path: String,
        hint: &'static str,
    },
}

/// A message naming the file (and row): an unusable input.
impl From<String> for DataError {
    fn from(msg: String) -> Self {
        DataError::Invalid(msg)
    }
}

/// A dataset with its three splits.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    pub kind: TaskKind,
    /// Label names (multilabel), class names (multiclass) or the one label's name (binary).
    pub names: Vec<String>,
    pub train: Vec<Sample>,
    pub val: Vec<Sample>,
    pub test: Vec<Sample>,
}

pub const SPLITS: [&str; 3] = ["train", "val", "test"];

impl Dataset {
    /// Outputs of the linear head: 1 for binary, else the number of labels / classes.
    pub fn width(&self) -> usize {
        match self.kind {
            TaskKind::Binary => 1,
            _ => self.names.len(),
        }
    }

    pub fn split(&self, name: &str) -> &[Sample] {
        match name {
            "train" => &self.train,
            "val" => &self.val,
            _ => &self.test,
        }
    }

    /// A CelebV-HQ root (with `celebvhq_info.json`, `task` appearance or action) or a folder with
    /// `train.csv`, `val.csv` and `test.csv`.
    pub fn load(path: &Path, task: &str) -> Result<Self, DataError> {
        if path.join("celebvhq_info.json").is_file() {
            load_celebvhq(path, task)
        } else if path.is_dir() {
            load_csv_dir(path)
        } else {
            Err(DataError::Invalid(format!(
                "{}: not a CelebV-HQ root (celebvhq_info.json) nor a folder with train.csv, val.csv and test.csv",
                path.display()
            )))
        }
    }

    /// The features file of each sample under `dir`, or an error naming the first row without
    /// one. Tries `dir/<key>.npy`, then `dir/<file stem>.npy` (features of a walked folder).
    pub fn feature_paths(&self, dir: &Path) -> Result<BTreeMap<String, Vec<PathBuf>>, DataError> {
        let mut out = BTreeMap::new();
        for split in SPLITS {
            let mut v = Vec::new();
            for s in self.split(split) {
                let mut full = dir.join(&s.key).into_os_string();
                full.push(".npy");
                let full = PathBuf::from(full);
                let stem = s
                    .key
                    .file_name()
                    .map(|n| dir.join(n).with_extension("npy"))
                    .unwrap_or_else(|| full.clone());
                let p = [full.clone(), stem]
                    .into_iter()
                    .find(|p| p.is_file())
                    .ok_or_else(|| DataError::Missing {
                        origin: s.origin.clone(),
                        what: "features",
                        path: full.display().to_string(),
                        hint: " (run `marlin extract` on the videos first)",
                    })?;
                v.push(p);
            }
            out.insert(split.to_string(), v);
        }
        Ok(out)
    }

    /// Every video exists, or an error naming the first row whose video is missing.
    pub fn check_videos(&self) -> Result<(), DataError> {
        for split in SPLITS {
            for s in self.split(split) {
                if !s.video.is_file() {
                    return Err(DataError::Missing {
                        origin: s.origin.clone(),
                        what: "video",
                        path: s.video.display().to_string(),
                        hint: "",
                    });
                }
            }
        }
        Ok(())
    }
}

fn read_text(p: &Path) -> Result<String, DataError> {
    std::fs::read_to_string(p).map_err(|e| DataError::Invalid(format!("{}: {e}", p.display())))
}

fn load_celebvhq(root: &Path, task: &str) -> Result<Dataset, DataError> {
    if task != "appearance" && task != "action" {
        return Err(format!("--task {task}: CelebV-HQ tasks are appearance and action").into());
    }
    let info_path = root.join("celebvhq_info.json");
    let info: serde_json::Value = serde_json::from_str(&read_text(&info_path)?)
        .map_err(|e| format!("{}: {e}", info_path.display()))?;
    let names: Vec<String> = info["meta_info"][format!("{task}_mapping")]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|v| {
                    v.as_str()
                        .map(String::from)
                        .unwrap_or_else(|| v.to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    let mut width = (!names.is_empty()).then_some(names.len());
    let mut splits = Vec::new();
    for split in SPLITS {
        let list = root.join(format!("{split}.txt"));
        let text = read_text(&list)?;
        let mut v = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let name = line.trim();
            if name.is_empty() {
                continue;
            }
            let origin = format!("{}:{}", list.display(), i + 1);
            let attrs = &info["clips"][name]["attributes"][task];
            let labels = attrs.as_array().ok_or_else(|| {
                format!("{origin}: '{name}' has no {task} labels in celebvhq_info.json")
            })?;
            let target: Vec<f32> = labels
                .iter()
                .map(|l| match l.as_f64() {
                    Some(x) if x == 0.0 || x == 1.0 => Ok(x as f32),
                    _ => Err(format!("{origin}: '{name}': label {l} is not 0 or 1")),
                })
                .collect::<Result<_, String>>()?;
            let w = *width.get_or_insert(target.len());
            if target.len() != w {
                return Err(format!(
                    "{origin}: '{name}' has {} {task} labels, expected {w}",
                    target.len()
                )
                .into());
            }
            v.push(Sample {
                origin,
                video: root.join("cropped").join(format!("{name}.mp4")),
                key: PathBuf::from(name),
                target,
            });
        }
        splits.push(v);
    }
    let w = width.unwrap_or(0);
    let names = if names.is_empty() {
        (0..w).map(|i| format!("{task}_{i}")).collect()
    } else {
        names
    };
    let [train, val, test]: [Vec<Sample>; 3] =
        splits.try_into().map_err(|_| "three splits".to_string())?;
    Ok(Dataset {
        kind: TaskKind::Multilabel,
        names,
        train,
        val,
        test,
    })
}

/// The rows of one CSV: (origin, path, label cells), and the header's label names.
type Rows = (Vec<(String, String, Vec<String>)>, Option<Vec<String>>);

fn read_csv(p: &Path) -> Result<Rows, DataError> {
    let mut r = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_path(p)
        .map_err(|e| format!("{}: {e}", p.display()))?;
    let mut rows = Vec::new();
    let mut header = None;
    let mut width = None;
    for (i, rec) in r.records().enumerate() {
        let origin = format!("{}:{}", p.display(), i + 1);
        let rec = rec.map_err(|e| format!("{origin}: {e}"))?;
        if rec.iter().all(str::is_empty) {
            continue;
        }
        if i == 0 && rec.get(0).is_some_and(|c| c.eq_ignore_ascii_case("path")) {
            header = Some(rec.iter().skip(1).map(String::from).collect::<Vec<_>>());
            width = Some(rec.len());
            continue;
        }
        let w = *width.get_or_insert(rec.len());
        if rec.len() != w || w < 2 {
            return Err(format!(
                "{origin}: {} column(s), expected {} (path and label(s))",
                rec.len(),
                w.max(2)
            )
            .into());
        }
        let cells: Vec<String> = rec.iter().map(String::from).collect();
        rows.push((origin, cells[0].clone(), cells[1..].to_vec()));
    }
    Ok((rows, header))
}

fn load_csv_dir(dir: &Path) -> Result<Dataset, DataError> {
    let mut all = Vec::new();
    let mut header = None;
    let mut width = None;
    for split in SPLITS {
        let p = dir.join(format!("{split}.csv"));
        if !p.is_file() {
            return Err(format!(
                "{}: missing (make the splits with `marlin split LABELS.csv`)",
                p.display()
            )
            .into());
        }
        let (rows, h) = read_csv(&p)?;
        if header.is_none() {
            header = h;
        }
        if let Some((origin, _, cells)) = rows.first() {
            let w = *width.get_or_insert(cells.len());
            if cells.len() != w {
                return Err(format!(
                    "{origin}: {} label column(s), train.csv has {w}",
                    cells.len()
                )
                .into());
            }
        }
        all.push(rows);
    }
    let k = width.unwrap_or(1);
    let is01 = |c: &str| c == "0" || c == "1";
    let kind = if k > 1 {
        TaskKind::Multilabel
    } else if all.iter().flatten().all(|(_, _, c)| is01(&c[0])) {
        TaskKind::Binary
    } else {
        TaskKind::Multiclass
    };
    // Classes of a multiclass task: the training labels, numbers in numeric order.
    let classes: Vec<String> = {
        let set: BTreeSet<String> = all[0].iter().map(|(_, _, c)| c[0].clone()).collect();
        let mut v: Vec<String> = set.into_iter().collect();
        if v.iter().all(|c| c.parse::<i64>().is_ok()) {
            v.sort_by_key(|c| c.parse::<i64>().unwrap_or(0));
        }
        v
    };
    let names = match kind {
        TaskKind::Multiclass => classes.clone(),
        _ => header
            .filter(|h| h.len() == k)
            .unwrap_or_else(|| (0..k).map(|i| format!("label_{}", i + 1)).collect()),
    };
    let mut splits = Vec::new();
    for rows in all {
        let mut v = Vec::new();
        for (origin, path, cells) in rows {
            let target = match kind {
                TaskKind::Multiclass => {
                    let c = classes.iter().position(|c| *c == cells[0]).ok_or_else(|| {
                        format!(
                            "{origin}: label '{}' is not among the training labels ({})",
                            cells[0],
                            classes.join(", ")
                        )
                    })?;
                    vec![c as f32]
                }
                _ => cells
                    .iter()
                    .enumerate()
                    .map(|(j, c)| {
                        if is01(c) {
                            Ok(if c == "1" { 1.0 } else { 0.0 })
                        } else {
                            Err(format!(
                                "{origin}: label {} is '{c}', expected 0 or 1",
                                j + 1
                            ))
                        }
                    })
                    .collect::<Result<Vec<f32>, String>>()?,
            };
            let rel = PathBuf::from(&path);
            let video = if rel.is_absolute() {
                rel.clone()
            } else {
                dir.join(&rel)
            };
            v.push(Sample {
                origin,
                video,
                key: rel.with_extension(""),
                target,
            });
        }
        splits.push(v);
    }
    let [train, val, test]: [Vec<Sample>; 3] =
        splits.try_into().map_err(|_| "three splits".to_string())?;
    if train.is_empty() {
        return Err(format!("{}: no rows", dir.join("train.csv").display()).into());
    }
    Ok(Dataset {
        kind,
        names,
        train,
        val,
        test,
    })
}

/// Indices `0..n` shuffled with `seed` and cut 80/10/10 (train, val, test).
pub fn split_indices(n: usize, seed: u64) -> [Vec<usize>; 3] {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut StdRng::seed_from_u64(seed));
    let n_train = (n as f64 * 0.8).round() as usize;
    let n_val = (n as f64 * 0.1).round() as usize;
    let test = idx.split_off((n_train + n_val).min(n));
    let val = idx.split_off(n_train.min(idx.len()));
    [idx, val, test]
}

/// `marlin split`: a CelebV-HQ root (its `cropped/*.mp4` clips, those with labels when
/// `celebvhq_info.json` is there) -> `train.txt`/`val.txt`/`test.txt`; or a labels CSV ->
/// `train.csv`/`val.csv`/`test.csv` beside it (header kept). Returns the files written and
/// their row counts. Refuses to overwrite unless `overwrite`.
pub fn make_split(
    input: &Path,
    seed: u64,
    overwrite: bool,
) -> Result<Vec<(PathBuf, usize)>, DataError> {
    split_files(input, seed, overwrite)
}

fn split_files(
    input: &Path,
    seed: u64,
    overwrite: bool,
) -> Result<Vec<(PathBuf, usize)>, DataError> {
    let (dir, ext, header, rows): (PathBuf, &str, Option<String>, Vec<String>) = if input.is_dir() {
        let cropped = input.join("cropped");
        let rd = std::fs::read_dir(&cropped).map_err(|_| {
            format!(
                "{}: no cropped/ folder (a CelebV-HQ root has one)",
                input.display()
            )
        })?;
        let info: Option<serde_json::Value> =
            std::fs::read_to_string(input.join("celebvhq_info.json"))
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok());
        let mut names: Vec<String> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x.eq_ignore_ascii_case("mp4")))
            .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
            .filter(|n| info.as_ref().is_none_or(|i| !i["clips"][n].is_null()))
            .collect();
        names.sort();
        (input.to_path_buf(), "txt", None, names)
    } else {
        let text = read_text(input)?;
        let mut lines = text.lines().filter(|l| !l.trim().is_empty());
        let first = lines
            .next()
            .ok_or_else(|| format!("{}: empty", input.display()))?;
        let (header, mut rows) = if first.trim_start().to_ascii_lowercase().starts_with("path") {
            (Some(first.to_string()), Vec::new())
        } else {
            (None, vec![first.to_string()])
        };
        rows.extend(lines.map(String::from));
        let dir = input
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        (dir, "csv", header, rows)
    };
    if rows.len() < 3 {
        return Err(format!(
            "{}: {} item(s); a split needs at least 3",
            input.display(),
            rows.len()
        )
        .into());
    }
    let targets: Vec<PathBuf> = SPLITS
        .iter()
        .map(|s| dir.join(format!("{s}.{ext}")))
        .collect();
    if !overwrite {
        if let Some(t) = targets.iter().find(|t| t.exists()) {
            return Err(format!("{}: exists (use --overwrite)", t.display()).into());
        }
    }
    let parts = split_indices(rows.len(), seed);
    let mut written = Vec::new();
    for (t, idx) in targets.iter().zip(parts) {
        let mut text = header.clone().map(|h| h + "\n").unwrap_or_default();
        for i in &idx {
            text += &rows[*i];
            text.push('\n');
        }
        crate::util::write_atomic(t, text.as_bytes())
            .map_err(|e| format!("{}: {e}", t.display()))?;
        written.push((t.clone(), idx.len()));
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_80_10_10_and_seeded() {
        let [a, b, c] = split_indices(100, 3);
        assert_eq!((a.len(), b.len(), c.len()), (80, 10, 10));
        let mut all: Vec<usize> = a.iter().chain(&b).chain(&c).copied().collect();
        all.sort();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
        assert_eq!(split_indices(100, 3)[0], a);
        assert_ne!(split_indices(100, 4)[0], a);
    }
}
