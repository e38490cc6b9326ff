//! Official weights: download into a cache with resume, retry, progress and atomic rename.
//!
//! Files live at `$MARLIN_DOWNLOAD_BASE/<name>.{encoder,full}.pt` (default: the reference's
//! GitHub release) and are cached in `$MARLIN_HOME` (else the platform cache dir + `marlin`).

use crate::model::config::RELEASED_MODELS;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Release base URL of the reference's checkpoints.
pub const DEFAULT_BASE: &str = "https://github.com/ControlNet/MARLIN/releases/download/model_v1";

/// Attempts per download before giving up (each resumes where the last stopped).
const ATTEMPTS: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("unknown model '{0}' (known: marlin_vit_small_ytf, marlin_vit_base_ytf, marlin_vit_large_ytf)")]
    UnknownModel(String),
    #[error("cannot download {url}: {msg}\n  offline? download it elsewhere and put it at {dest}, or pass --weights FILE")]
    Download {
        url: String,
        dest: String,
        msg: String,
    },
    #[error("{path}: {msg}")]
    Io { path: String, msg: String },
}

/// The cache folder: `$MARLIN_HOME`, else `<platform cache dir>/marlin`, else `.marlin`.
pub fn cache_dir() -> PathBuf {
    if let Some(h) = std::env::var_os("MARLIN_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    dirs::cache_dir()
        .map(|d| d.join("marlin"))
        .unwrap_or_else(|| PathBuf::from(".marlin"))
}

/// The release base URL (`$MARLIN_DOWNLOAD_BASE` overrides it, e.g. for a local mirror).
pub fn base_url() -> String {
    std::env::var("MARLIN_DOWNLOAD_BASE")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| DEFAULT_BASE.to_string())
        .trim_end_matches('/')
        .to_string()
}

/// File name of a released checkpoint: `<name>.encoder.pt` or `<name>.full.pt`.
pub fn file_name(model: &str, full: bool) -> Result<String, HubError> {
    if !RELEASED_MODELS.contains(&model) {
        return Err(HubError::UnknownModel(model.to_string()));
    }
    Ok(format!(
        "{model}.{}.pt",
        if full { "full" } else { "encoder" }
    ))
}

/// Path of a released checkpoint in the cache, downloading it first if missing.
pub fn fetch(model: &str, full: bool, progress: bool) -> Result<PathBuf, HubError> {
    let name = file_name(model, full)?;
    let dest = cache_dir().join(&name);
    if dest.is_file() {
        return Ok(dest);
    }
    download(&format!("{}/{name}", base_url()), &dest, progress)?;
    Ok(dest)
}

/// Download `url` to `dest`: into `dest.part`, resuming it with a Range request after a broken
/// transfer (up to 5 attempts), then renamed to `dest` once complete.
pub fn download(url: &str, dest: &Path, progress: bool) -> Result<(), HubError> {
    let err = |msg: String| HubError::Download {
        url: url.to_string(),
        dest: dest.display().to_string(),
        msg,
    };
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir).map_err(|e| HubError::Io {
            path: dir.display().to_string(),
            msg: e.to_string(),
        })?;
    }
    let part = dest.with_extension(
        dest.extension()
            .map(|e| format!("{}.part", e.to_string_lossy()))
            .unwrap_or_else(|| "part".into()),
    );
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(20))
        .timeout_read(Duration::from_secs(60))
        .build();
    let bar = if progress {
        let b = ProgressBar::new(0);
        b.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        b.set_message(format!(
            "downloading {}",
            dest.file_name().unwrap_or_default().to_string_lossy()
        ));
        b
    } else {
        ProgressBar::hidden()
    };
    let mut last_err = String::new();
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            std::thread::sleep(Duration::from_millis(200 * attempt as u64));
        }
        match attempt_once(&agent, url, &part, &bar) {
            Ok(()) => {
                std::fs::rename(&part, dest).map_err(|e| err(e.to_string()))?;
                bar.finish_and_clear();
                return Ok(());
            }
            Err(Fatal(msg)) => {
                bar.abandon();
                return Err(err(msg));
            }
            Err(Retry(msg)) => last_err = msg,
        }
    }
    bar.abandon();
    Err(err(format!(
        "gave up after {ATTEMPTS} attempts: {last_err}"
    )))
}

enum AttemptError {
    Retry(String),
    Fatal(String),
}
use AttemptError::{Fatal, Retry};

fn attempt_once(
    agent: &ureq::Agent,
    url: &str,
    part: &Path,
    bar: &ProgressBar,
) -> Result<(), AttemptError> {
    let have = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
    let mut req = agent.get(url);
    if have > 0 {
        req = req.set("Range", &format!("bytes={have}-"));
    }
    let resp = match req.call() {
        Ok(r) => r,
        Err(ureq::Error::Status(416, _)) if have > 0 => {
            // The partial file is already complete (or larger than the remote): start over.
            let _ = std::fs::remove_file(part);
            return Err(Retry("range not satisfiable; restarting".into()));
        }
        Err(ureq::Error::Status(code, _)) if code == 404 || code == 403 || code == 401 => {
            return Err(Fatal(format!("HTTP {code}")))
        }
        Err(ureq::Error::Status(code, _)) => return Err(Retry(format!("HTTP {code}"))),
        Err(e) => return Err(Retry(e.to_string())),
    };
    let resumed = resp.status() == 206;
    let offset = if resumed { have } else { 0 };
    let len: Option<u64> = resp.header("Content-Length").and_then(|v| v.parse().ok());
    if let Some(l) = len {
        bar.set_length(offset + l);
    }
    bar.set_position(offset);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(resumed)
        .truncate(!resumed)
        .open(part)
        .map_err(|e| Fatal(format!("{}: {e}", part.display())))?;
    let mut reader = resp.into_reader();
    let mut buf = vec![0u8; 1 << 16];
    let mut got = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                let _ = file.flush();
                return Err(Retry(format!(
                    "transfer broke after {} bytes: {e}",
                    offset + got
                )));
            }
        };
        file.write_all(&buf[..n])
            .map_err(|e| Fatal(format!("{}: {e}", part.display())))?;
        got += n as u64;
        bar.inc(n as u64);
    }
    file.sync_all()
        .map_err(|e| Fatal(format!("{}: {e}", part.display())))?;
    match len {
        Some(l) if got < l => Err(Retry(format!(
            "transfer broke after {} of {} bytes",
            offset + got,
            offset + l
        ))),
        _ => Ok(()),
    }
}

/// Cached files (name, bytes), and remove them all with [`clean_cache`].
pub fn cached_files() -> Vec<(PathBuf, u64)> {
    let Ok(rd) = std::fs::read_dir(cache_dir()) else {
        return vec![];
    };
    let mut v: Vec<_> = rd
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .map(|e| (e.path(), e.metadata().map(|m| m.len()).unwrap_or(0)))
        .collect();
    v.sort();
    v
}

/// Remove every cached checkpoint (and partial download). Returns (files, bytes) removed.
pub fn clean_cache() -> Result<(usize, u64), HubError> {
    let mut n = 0;
    let mut bytes = 0;
    for (p, len) in cached_files() {
        std::fs::remove_file(&p).map_err(|e| HubError::Io {
            path: p.display().to_string(),
            msg: e.to_string(),
        })?;
        n += 1;
        bytes += len;
    }
    Ok((n, bytes))
}
