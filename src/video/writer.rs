//! Writing H.264 videos through `ffmpeg` (rgb24 frames on its stdin), atomically: the video is
//! encoded to a temp file beside the target and renamed into place by [`VideoWriter::finish`];
//! dropped unfinished (an error, Ctrl-C), the temp file is removed.

use super::{Frame, VideoError};
use crate::util::temp_path;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};

pub struct VideoWriter {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    tmp: PathBuf,
    path: PathBuf,
    size: (usize, usize),
}

impl VideoWriter {
    /// Start encoding `width` x `height` frames at `fps` into `path` (H.264, yuv420p, CRF 18).
    pub fn create(path: &Path, width: usize, height: usize, fps: f64) -> Result<Self, VideoError> {
        let p = path.display().to_string();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| VideoError::Other {
                path: p.clone(),
                msg: format!("cannot create folder: {e}"),
            })?;
        }
        let tmp = temp_path(path);
        let fps = if fps.is_finite() && fps > 0.0 {
            fps
        } else {
            25.0
        };
        let mut child = Command::new("ffmpeg")
            .args([
                "-nostdin", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
            ])
            .args(["-s", &format!("{width}x{height}"), "-r", &format!("{fps}")])
            .args([
                "-i", "-", "-c:v", "libx264", "-preset", "fast", "-crf", "18",
            ])
            .args(["-pix_fmt", "yuv420p", "-f", "mp4"])
            .arg(&tmp)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| super::spawn_error(e, &p))?;
        let stdin = child.stdin.take();
        Ok(Self {
            child: Some(child),
            stdin,
            tmp,
            path: path.to_path_buf(),
            size: (width, height),
        })
    }

    fn err(&self, msg: String) -> VideoError {
        VideoError::Other {
            path: self.path.display().to_string(),
            msg,
        }
    }

    pub fn write(&mut self, f: &Frame) -> Result<(), VideoError> {
        if (f.width, f.height) != self.size {
            return Err(self.err(format!(
                "frame is {}x{}, the video {}x{}",
                f.width, f.height, self.size.0, self.size.1
            )));
        }
        let r = match self.stdin.as_mut() {
            Some(s) => s.write_all(&f.data),
            None => Err(std::io::Error::other("encoder closed")),
        };
        r.map_err(|e| self.err(format!("encoding failed: {e}")))
    }

    /// Finish encoding and move the video into place.
    pub fn finish(mut self) -> Result<(), VideoError> {
        drop(self.stdin.take());
        let out = match self.child.take() {
            Some(c) => c.wait_with_output(),
            None => return Err(self.err("encoder already finished".into())),
        };
        let out = out.map_err(|e| self.err(format!("encoding failed: {e}")))?;
        if !out.status.success() {
            let msg = String::from_utf8_lossy(&out.stderr);
            let line = msg.lines().last().unwrap_or("ffmpeg failed").to_string();
            return Err(self.err(format!("encoding failed: {line}")));
        }
        std::fs::rename(&self.tmp, &self.path)
            .map_err(|e| self.err(format!("cannot move into place: {e}")))
    }
}

impl Drop for VideoWriter {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.tmp);
    }
}
