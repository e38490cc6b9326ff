//! Splitting one dataset over N processes (machines, GPUs, job-array tasks) so that together
//! they cover every input exactly once.
//!
//! An input belongs to shard `hash(key) % N`, where the key is its output path relative to the
//! output folder (`person/video.npy`, `/`-separated) and the hash is FNV-1a 64: the split does
//! not depend on listing order, on which outputs already exist, or on the machine. Each shard
//! writes its own failure list (`failures.shard-I-of-N.json`), and no two shards ever write the
//! same output file.

use super::inputs::Item;
use super::ExtractError;
use std::path::Path;

/// Where a process's shard came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardSource {
    /// `--shard I/N`.
    Option,
    /// A Slurm job array (`SLURM_ARRAY_TASK_ID` with `SLURM_ARRAY_TASK_COUNT`, or `_MIN`/`_MAX`
    /// and `_STEP`).
    Slurm,
    /// A Kubernetes Indexed Job (`JOB_COMPLETION_INDEX` with `MARLIN_SHARD_COUNT`).
    Kubernetes,
}

/// Shard `index` of `count` (0-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
    pub source: ShardSource,
}

fn bad(msg: String) -> ExtractError {
    ExtractError::Options(msg)
}

impl Shard {
    fn new(
        index: usize,
        count: usize,
        source: ShardSource,
        what: &str,
    ) -> Result<Self, ExtractError> {
        if count == 0 || index >= count {
            return Err(bad(format!(
                "{what}: shard {index} of {count} does not exist (shards are 0..{count})"
            )));
        }
        Ok(Self {
            index,
            count,
            source,
        })
    }

    /// `I/N` with 0 <= I < N.
    pub fn parse(s: &str) -> Result<Self, ExtractError> {
        let what = format!("--shard {s}");
        let (i, n) = s
            .split_once('/')
            .ok_or_else(|| bad(format!("{what}: expected I/N, e.g. 0/4")))?;
        let num = |v: &str| {
            v.trim()
                .parse::<usize>()
                .map_err(|_| bad(format!("{what}: expected I/N with whole numbers, e.g. 0/4")))
        };
        Self::new(num(i)?, num(n)?, ShardSource::Option, &what)
    }

    /// The shard a scheduler gave this process, read from `var` (the environment in
    /// [`Shard::from_env`]): a Slurm job array, else a Kubernetes Indexed Job. None when
    /// neither is set.
    pub fn from_vars(var: &dyn Fn(&str) -> Option<String>) -> Result<Option<Self>, ExtractError> {
        let get = |name: &str| -> Result<Option<usize>, ExtractError> {
            match var(name).filter(|v| !v.trim().is_empty()) {
                None => Ok(None),
                Some(v) => v
                    .trim()
                    .parse::<usize>()
                    .map(Some)
                    .map_err(|_| bad(format!("{name}={v}: not a whole number"))),
            }
        };
        if let Some(id) = get("SLURM_ARRAY_TASK_ID")? {
            let min = get("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
            let step = get("SLURM_ARRAY_TASK_STEP")?.unwrap_or(1).max(1);
            let count = match (get("SLURM_ARRAY_TASK_COUNT")?, get("SLURM_ARRAY_TASK_MAX")?) {
                (Some(c), _) => c,
                (None, Some(max)) if max >= min => (max - min) / step + 1,
                _ => {
                    return Err(bad(format!(
                        "SLURM_ARRAY_TASK_ID={id} without SLURM_ARRAY_TASK_COUNT or \
                         SLURM_ARRAY_TASK_MAX: how many shards is unknown (or pass --shard I/N)"
                    )))
                }
            };
            if id < min || (id - min) % step != 0 {
                return Err(bad(format!(
                    "SLURM_ARRAY_TASK_ID={id} is not in the array {min}..(step {step})"
                )));
            }
            let what = format!("SLURM_ARRAY_TASK_ID={id}");
            return Self::new((id - min) / step, count, ShardSource::Slurm, &what).map(Some);
        }
        if let Some(index) = get("JOB_COMPLETION_INDEX")? {
            let count = get("MARLIN_SHARD_COUNT")?.ok_or_else(|| {
                bad(format!(
                    "JOB_COMPLETION_INDEX={index} without MARLIN_SHARD_COUNT: set it to the \
                     Job's completions (or pass --shard I/N)"
                ))
            })?;
            let what = format!("JOB_COMPLETION_INDEX={index}");
            return Self::new(index, count, ShardSource::Kubernetes, &what).map(Some);
        }
        Ok(None)
    }

    /// [`Shard::from_vars`] on this process's environment.
    pub fn from_env() -> Result<Option<Self>, ExtractError> {
        Self::from_vars(&|name| std::env::var(name).ok())
    }

    /// Whether the input with this key (its output path relative to the output folder,
    /// `/`-separated) is this shard's.
    pub fn owns(&self, key: &str) -> bool {
        (fnv1a64(key.as_bytes()) % self.count as u64) as usize == self.index
    }

    /// This shard's items of a discovered dataset whose outputs go under `out`.
    pub fn select(&self, items: Vec<Item>, out: &Path) -> Vec<Item> {
        items
            .into_iter()
            .filter(|it| self.owns(&shard_key(&it.out, out)))
            .collect()
    }

    /// The file name of this shard's failure list.
    pub fn failures_file(&self) -> String {
        format!("failures.shard-{}-of-{}.json", self.index, self.count)
    }

    /// How the first line of a run names the shard.
    pub fn describe(&self) -> String {
        let from = match self.source {
            ShardSource::Option => "--shard",
            ShardSource::Slurm => "Slurm job array",
            ShardSource::Kubernetes => "Kubernetes Indexed Job",
        };
        format!("shard {}/{} (from {from})", self.index, self.count)
    }
}

/// The key an input is sharded by: its output path relative to `out`, `/`-separated.
pub fn shard_key(output: &Path, out: &Path) -> String {
    let rel = output.strip_prefix(out).unwrap_or(output);
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

/// FNV-1a, 64 bits: small, stable across versions and platforms.
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn parse_and_environment() {
        let s = Shard::parse("2/5").unwrap();
        assert_eq!((s.index, s.count, s.source), (2, 5, ShardSource::Option));
        for bad in ["5/5", "1", "a/3", "0/0", "-1/3"] {
            let e = Shard::parse(bad).unwrap_err().to_string();
            assert!(e.starts_with(&format!("--shard {bad}")), "{e}");
        }
        let slurm = vars(&[
            ("SLURM_ARRAY_TASK_ID", "4"),
            ("SLURM_ARRAY_TASK_COUNT", "6"),
        ]);
        let s = Shard::from_vars(&slurm).unwrap().unwrap();
        assert_eq!((s.index, s.count, s.source), (4, 6, ShardSource::Slurm));
        // --array=1-9:2 -> tasks 1,3,5,7,9 are shards 0..5.
        let stepped = vars(&[
            ("SLURM_ARRAY_TASK_ID", "7"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_MAX", "9"),
            ("SLURM_ARRAY_TASK_STEP", "2"),
        ]);
        let s = Shard::from_vars(&stepped).unwrap().unwrap();
        assert_eq!((s.index, s.count), (3, 5));
        let k8s = vars(&[("JOB_COMPLETION_INDEX", "1"), ("MARLIN_SHARD_COUNT", "3")]);
        let s = Shard::from_vars(&k8s).unwrap().unwrap();
        assert_eq!(
            (s.index, s.count, s.source),
            (1, 3, ShardSource::Kubernetes)
        );
        let e = Shard::from_vars(&vars(&[("JOB_COMPLETION_INDEX", "1")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("MARLIN_SHARD_COUNT"), "{e}");
        assert_eq!(Shard::from_vars(&vars(&[])).unwrap(), None);
    }

    #[test]
    fn every_key_has_exactly_one_shard_and_the_split_is_even() {
        let shards: Vec<Shard> = (0..4)
            .map(|i| Shard::parse(&format!("{i}/4")).unwrap())
            .collect();
        let mut sizes = [0usize; 4];
        for k in 0..4000 {
            let key = format!("person_{}/video_{k}.npy", k % 37);
            let owners: Vec<usize> = (0..4).filter(|&i| shards[i].owns(&key)).collect();
            assert_eq!(owners.len(), 1, "{key}");
            sizes[owners[0]] += 1;
        }
        for s in sizes {
            assert!((900..1100).contains(&s), "{sizes:?}");
        }
    }
}
