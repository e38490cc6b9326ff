//! Reading frames: video files through FFmpeg (a streaming rgb24 pipe, any codec) and frame
//! folders through the `image` crate.

pub mod clip;
#[cfg(feature = "h264")]
pub mod h264;
pub mod windows;
pub mod writer;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};

/// One RGB frame, row-major `[H, W, 3]`, 8-bit.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum VideoError {
    #[error("{0}: no such file or folder")]
    Missing(String),
    #[error("{0}: empty file")]
    Empty(String),
    #[error("FFmpeg is not installed ({0} not found on PATH): install it (Debian/Ubuntu: `apt-get install ffmpeg`, macOS: `brew install ffmpeg`)")]
    NoFfmpeg(&'static str),
    #[error("{path}: {why}: reading it needs FFmpeg, which is not installed (H.264 in MP4/MOV does not); install it (Debian/Ubuntu: `apt-get install ffmpeg`, macOS: `brew install ffmpeg`)")]
    NeedsFfmpeg { path: String, why: String },
    #[error("{path}: not a video FFmpeg can read ({msg})")]
    Unreadable { path: String, msg: String },
    #[error("{path}: {msg}")]
    Other { path: String, msg: String },
}

/// What ffprobe tells of a video's first video stream.
#[derive(Debug, Clone, PartialEq)]
pub struct VideoInfo {
    /// Frame size as decoded, after applying the rotation flag.
    pub width: usize,
    pub height: usize,
    /// Frame count from the container (counted by demuxing when the container has none).
    pub frames: usize,
    pub fps: f64,
    /// Rotation flag in degrees (FFmpeg applies it while decoding).
    pub rotation: i64,
    pub codec: String,
}

fn run_tool(tool: &'static str, args: &[&str]) -> Result<std::process::Output, VideoError> {
    Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => VideoError::NoFfmpeg(tool),
            _ => VideoError::Other {
                path: tool.into(),
                msg: e.to_string(),
            },
        })
}

/// The error of a failed `ffmpeg` start: not installed, or why it could not run.
pub(crate) fn spawn_error(e: std::io::Error, path: &str) -> VideoError {
    match e.kind() {
        std::io::ErrorKind::NotFound => VideoError::NoFfmpeg("ffmpeg"),
        _ => VideoError::Other {
            path: path.to_string(),
            msg: e.to_string(),
        },
    }
}

/// `ffprobe -v error -select_streams v:0 ARGS PATH` (the first video stream).
fn ffprobe(path: &str, args: &[&str]) -> Result<std::process::Output, VideoError> {
    let mut all = vec!["-v", "error", "-select_streams", "v:0"];
    all.extend_from_slice(args);
    all.push(path);
    run_tool("ffprobe", &all)
}

fn check_file(path: &Path) -> Result<(), VideoError> {
    let p = path.display().to_string();
    match std::fs::metadata(path) {
        Err(_) => Err(VideoError::Missing(p)),
        Ok(m) if m.is_file() && m.len() == 0 => Err(VideoError::Empty(p)),
        Ok(_) => Ok(()),
    }
}

/// What a video file holds: from its own header for H.264 in MP4/MOV (no process started, no
/// FFmpeg needed), else from ffprobe.
pub fn probe(path: &Path) -> Result<VideoInfo, VideoError> {
    check_file(path)?;
    #[cfg(feature = "h264")]
    if let Ok(Some(v)) = h264::probe_mp4(path) {
        return Ok(v.to_info());
    }
    ffprobe_info(path)
}

/// [`probe`] through ffprobe, whatever the file.
pub fn ffprobe_info(path: &Path) -> Result<VideoInfo, VideoError> {
    check_file(path)?;
    let p = path.display().to_string();
    let out = ffprobe(&p, &["-show_streams", "-of", "json"])?;
    let unreadable = |msg: String| VideoError::Unreadable {
        path: p.clone(),
        msg,
    };
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr);
        let msg = msg
            .lines()
            .last()
            .unwrap_or("ffprobe failed")
            .trim()
            .trim_start_matches(&format!("{p}: "))
            .to_string();
        return Err(unreadable(msg));
    }
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| unreadable(e.to_string()))?;
    let Some(s) = json["streams"].get(0) else {
        return Err(unreadable("no video stream".into()));
    };
    let num = |v: &serde_json::Value| -> Option<usize> {
        v.as_u64()
            .map(|x| x as usize)
            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
    };
    let (mut width, mut height) = (
        num(&s["width"]).unwrap_or(0),
        num(&s["height"]).unwrap_or(0),
    );
    if width == 0 || height == 0 {
        return Err(unreadable("video stream has no frame size".into()));
    }
    let rotation = s["side_data_list"]
        .as_array()
        .and_then(|l| l.iter().find_map(|d| d["rotation"].as_i64()))
        .or_else(|| s["tags"]["rotate"].as_str().and_then(|r| r.parse().ok()))
        .unwrap_or(0);
    if rotation.rem_euclid(180) == 90 {
        std::mem::swap(&mut width, &mut height);
    }
    let fps = s["avg_frame_rate"]
        .as_str()
        .or(s["r_frame_rate"].as_str())
        .and_then(|r| {
            let (a, b) = r.split_once('/')?;
            let (a, b): (f64, f64) = (a.parse().ok()?, b.parse().ok()?);
            (b > 0.0).then_some(a / b)
        })
        .unwrap_or(0.0);
    let frames = match num(&s["nb_frames"]) {
        Some(n) if n > 0 => n,
        _ => count_packets(path)?,
    };
    Ok(VideoInfo {
        width,
        height,
        frames,
        fps,
        rotation,
        codec: s["codec_name"].as_str().unwrap_or("?").to_string(),
    })
}

/// Frame count by demuxing (for containers without nb_frames, e.g. Matroska/WebM).
fn count_packets(path: &Path) -> Result<usize, VideoError> {
    let p = path.display().to_string();
    let out = ffprobe(
        &p,
        &[
            "-count_packets",
            "-show_entries",
            "stream=nb_read_packets",
            "-of",
            "csv=p=0",
        ],
    )?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .trim_end_matches(',')
        .parse()
        .map_err(|_| VideoError::Unreadable {
            path: p,
            msg: "cannot count its frames".into(),
        })
}

/// Whether this build decodes H.264 in MP4/MOV in-process (the `h264` feature, on by default):
/// those videos need no FFmpeg.
pub fn h264_in_process() -> bool {
    cfg!(feature = "h264")
}

/// A source of frames in order.
pub trait FrameReader {
    /// The next frame, or None at the end.
    fn next_frame(&mut self) -> Result<Option<Frame>, VideoError>;
    /// Skip one frame without converting it (as cheap as the source allows).
    fn skip_frame(&mut self) -> Result<bool, VideoError> {
        Ok(self.next_frame()?.is_some())
    }
}

/// Decodes a video through `ffmpeg ... -f rawvideo -pix_fmt rgb24 -`, one frame at a time.
pub struct FfmpegReader {
    child: Child,
    stdout: ChildStdout,
    width: usize,
    height: usize,
    path: String,
}

impl FfmpegReader {
    /// Start decoding. Frames come out at `size` (w, h) when given (bilinear), else as decoded.
    pub fn open(
        path: &Path,
        info: &VideoInfo,
        size: Option<(usize, usize)>,
    ) -> Result<Self, VideoError> {
        let p = path.display().to_string();
        let (width, height) = size.unwrap_or((info.width, info.height));
        let mut args: Vec<String> = vec![
            "-nostdin".into(),
            "-v".into(),
            "error".into(),
            "-i".into(),
            p.clone(),
            "-map".into(),
            "0:v:0".into(),
        ];
        if (width, height) != (info.width, info.height) {
            args.push("-vf".into());
            args.push(format!("scale={width}:{height}:flags=bilinear"));
        }
        args.extend(
            [
                "-f",
                "rawvideo",
                "-pix_fmt",
                "rgb24",
                "-vsync",
                "passthrough",
                "-",
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        let mut child = Command::new("ffmpeg")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| spawn_error(e, &p))?;
        let stdout = child.stdout.take().ok_or_else(|| VideoError::Other {
            path: p.clone(),
            msg: "no ffmpeg output pipe".into(),
        })?;
        Ok(Self {
            child,
            stdout,
            width,
            height,
            path: p,
        })
    }

    fn read_raw(&mut self, buf: &mut [u8]) -> Result<bool, VideoError> {
        let mut got = 0;
        while got < buf.len() {
            match self.stdout.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(VideoError::Other {
                        path: self.path.clone(),
                        msg: format!("reading decoded frames: {e}"),
                    })
                }
            }
        }
        Ok(got == buf.len())
    }
}

impl FrameReader for FfmpegReader {
    fn next_frame(&mut self) -> Result<Option<Frame>, VideoError> {
        let mut data = vec![0u8; self.width * self.height * 3];
        let (width, height) = (self.width, self.height);
        Ok(self.read_raw(&mut data)?.then_some(Frame {
            width,
            height,
            data,
        }))
    }
}

impl Drop for FfmpegReader {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Image files of a frame folder in natural order (`2.jpg` before `10.jpg`).
pub fn list_frames(dir: &Path) -> Result<Vec<PathBuf>, VideoError> {
    let d = dir.display().to_string();
    let rd = std::fs::read_dir(dir).map_err(|_| VideoError::Missing(d.clone()))?;
    let mut files: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && is_image(p))
        .collect();
    if files.is_empty() {
        return Err(VideoError::Other {
            path: d,
            msg: "no .jpg/.jpeg/.png/.bmp frames in this folder".into(),
        });
    }
    files.sort_by(|a, b| natural_cmp(&a.to_string_lossy(), &b.to_string_lossy()));
    Ok(files)
}

pub fn is_image(p: &Path) -> bool {
    matches!(
        p.extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase())
            .as_deref(),
        Some("jpg" | "jpeg" | "png" | "bmp")
    )
}

/// Compare strings with digit runs taken as numbers.
pub fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return std::cmp::Ordering::Equal,
            (None, _) => return std::cmp::Ordering::Less,
            (_, None) => return std::cmp::Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let la = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let lb = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (na, nb) = (&a[..la], &b[..lb]);
                let strip = |s: &[u8]| -> Vec<u8> {
                    let z = s.iter().take_while(|&&c| c == b'0').count();
                    s[z.min(s.len().saturating_sub(1))..].to_vec()
                };
                let (sa, sb) = (strip(na), strip(nb));
                let ord = sa.len().cmp(&sb.len()).then(sa.cmp(&sb)).then(la.cmp(&lb));
                if ord != std::cmp::Ordering::Equal {
                    return ord;
                }
                a = &a[la..];
                b = &b[lb..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

/// An image file as 8-bit RGB.
pub fn read_rgb(p: &Path) -> Result<image::RgbImage, VideoError> {
    Ok(image::open(p)
        .map_err(|e| VideoError::Other {
            path: p.display().to_string(),
            msg: format!("cannot read image: {e}"),
        })?
        .to_rgb8())
}

/// A frame resized to `w` x `h` (triangle filter: antialiased when shrinking).
pub fn resize_frame(f: &Frame, w: usize, h: usize) -> Frame {
    let img = image::RgbImage::from_raw(f.width as u32, f.height as u32, f.data.clone())
        .map(|i| {
            image::imageops::resize(
                &i,
                w as u32,
                h as u32,
                image::imageops::FilterType::Triangle,
            )
        })
        .unwrap_or_else(|| image::RgbImage::new(w as u32, h as u32));
    Frame {
        width: w,
        height: h,
        data: img.into_raw(),
    }
}

/// An image file as a [`Frame`].
pub fn read_image(p: &Path) -> Result<Frame, VideoError> {
    let img = read_rgb(p)?;
    Ok(Frame {
        width: img.width() as usize,
        height: img.height() as usize,
        data: img.into_raw(),
    })
}

/// Reads a frame folder's images in natural order, resized to `size` when given.
pub struct FolderReader {
    files: std::vec::IntoIter<PathBuf>,
    size: Option<(usize, usize)>,
}

impl FolderReader {
    pub fn open(files: Vec<PathBuf>, size: Option<(usize, usize)>) -> Self {
        Self {
            files: files.into_iter(),
            size,
        }
    }
}

impl FrameReader for FolderReader {
    fn next_frame(&mut self) -> Result<Option<Frame>, VideoError> {
        let Some(p) = self.files.next() else {
            return Ok(None);
        };
        let img = read_rgb(&p)?;
        let img = match self.size {
            Some((w, h)) if (img.width() as usize, img.height() as usize) != (w, h) => {
                image::imageops::resize(
                    &img,
                    w as u32,
                    h as u32,
                    image::imageops::FilterType::Triangle,
                )
            }
            _ => img,
        };
        Ok(Some(Frame {
            width: img.width() as usize,
            height: img.height() as usize,
            data: img.into_raw(),
        }))
    }

    fn skip_frame(&mut self) -> Result<bool, VideoError> {
        Ok(self.files.next().is_some())
    }
}

/// An input: a video file or a folder of frames.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Input {
    Video(PathBuf),
    Frames(PathBuf),
}

impl Input {
    /// A folder is a frame folder; anything else is taken as a video file.
    pub fn from_path(p: &Path) -> Self {
        if p.is_dir() {
            Input::Frames(p.to_path_buf())
        } else {
            Input::Video(p.to_path_buf())
        }
    }
    pub fn path(&self) -> &Path {
        match self {
            Input::Video(p) | Input::Frames(p) => p,
        }
    }
}

/// Open an input for reading: the reader (frames at `size` (w, h) when given, else as
/// decoded), its frame count and its source frame size.
#[allow(clippy::type_complexity)]
pub fn open_input(input: &Input, size: Option<(usize, usize)>) -> Result<Opened, VideoError> {
    Ok(match input {
        // One picture is a one-frame input, read without FFmpeg.
        Input::Video(p) if is_image(p) => images(vec![p.clone()], size)?,
        Input::Video(p) => open_video(p, size)?,
        Input::Frames(d) => images(list_frames(d)?, size)?,
    })
}

/// Which decoder reads H.264 in MP4/MOV (`MARLIN_DECODER`): both give the same frames, byte
/// for byte, on every test video (src/video/h264.rs); the choice is speed and what is
/// installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecoderChoice {
    /// OpenH264 in-process where FFmpeg is missing or the frames are face-crop sized (up to
    /// 320x320, where it outruns the pipe: BENCHMARKS.md); FFmpeg for larger ones.
    Auto,
    /// In-process whenever the file allows (`MARLIN_DECODER=openh264`).
    InProcess,
    /// FFmpeg for every video (`MARLIN_DECODER=ffmpeg`).
    Ffmpeg,
}

impl DecoderChoice {
    pub fn from_env() -> Self {
        match std::env::var("MARLIN_DECODER").as_deref() {
            Ok("ffmpeg") => Self::Ffmpeg,
            Ok("openh264") => Self::InProcess,
            _ => Self::Auto,
        }
    }
}

/// Whether `ffmpeg` and `ffprobe` are on PATH (looked up once).
pub fn ffmpeg_available() -> bool {
    static FOUND: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FOUND.get_or_init(|| {
        let on_path = |tool: &str| {
            std::env::var_os("PATH").is_some_and(|paths| {
                std::env::split_paths(&paths).any(|d| {
                    let f = d.join(tool);
                    f.is_file()
                        && std::fs::metadata(&f).is_ok_and(|m| {
                            #[cfg(unix)]
                            {
                                use std::os::unix::fs::PermissionsExt;
                                m.permissions().mode() & 0o111 != 0
                            }
                            #[cfg(not(unix))]
                            {
                                let _ = m;
                                true
                            }
                        })
                })
            })
        };
        let exe = std::env::consts::EXE_SUFFIX;
        on_path(&format!("ffmpeg{exe}")) && on_path(&format!("ffprobe{exe}"))
    })
}

/// Why a video needs FFmpeg (another codec or container), or `None` when it is read
/// in-process. Reads only the container's header.
pub fn needs_ffmpeg(path: &Path) -> Option<String> {
    #[cfg(feature = "h264")]
    {
        match h264::inspect_mp4(path) {
            Ok(h264::Mp4Probe::H264(_)) => None,
            Ok(h264::Mp4Probe::NotMp4) => Some("not an MP4/MOV file".into()),
            Ok(h264::Mp4Probe::OtherCodec(c)) => Some(format!("its video is {c}, not H.264")),
            Ok(h264::Mp4Probe::Unsupported(why)) => Some(format!("H.264 with {why}")),
            // A broken file fails on its own, with its own line.
            Err(_) => None,
        }
    }
    #[cfg(not(feature = "h264"))]
    {
        let _ = path;
        Some("this build decodes every video with FFmpeg".into())
    }
}

/// A video file's reader: OpenH264 in-process for H.264 in MP4/MOV as [`DecoderChoice`] says,
/// FFmpeg for everything else (and for H.264 streams OpenH264 cannot start on, where FFmpeg is
/// installed).
fn open_video(p: &Path, size: Option<(usize, usize)>) -> Result<Opened, VideoError> {
    #[cfg(feature = "h264")]
    {
        let choice = DecoderChoice::from_env();
        let ffmpeg = ffmpeg_available();
        if choice != DecoderChoice::Ffmpeg {
            check_file(p)?;
            match h264::inspect_mp4(p)? {
                h264::Mp4Probe::H264(v) => {
                    let small = v.width * v.height <= 320 * 320;
                    if choice == DecoderChoice::InProcess || small || !ffmpeg {
                        let exact = size.is_none_or(h264::supports_size);
                        let opened = if exact || !ffmpeg {
                            Some(h264::H264Reader::open(p, &v, size.filter(|_| exact)))
                        } else {
                            None
                        };
                        match opened {
                            Some(Ok(r)) => {
                                let r: Box<dyn FrameReader> = match (exact, size) {
                                    (false, Some((w, h))) => Box::new(Resized {
                                        inner: Box::new(r),
                                        size: (w, h),
                                    }),
                                    _ => Box::new(r),
                                };
                                return Ok((r, v.frames, (v.width, v.height)));
                            }
                            Some(Err(e)) if !ffmpeg => return Err(e),
                            // FFmpeg decodes what OpenH264 cannot.
                            _ => {}
                        }
                    }
                }
                other if !ffmpeg => {
                    let why = match other {
                        h264::Mp4Probe::NotMp4 => "not an MP4/MOV file".to_string(),
                        h264::Mp4Probe::OtherCodec(c) => format!("its video is {c}, not H.264"),
                        h264::Mp4Probe::Unsupported(why) => format!("H.264 with {why}"),
                        h264::Mp4Probe::H264(_) => String::new(),
                    };
                    return Err(VideoError::NeedsFfmpeg {
                        path: p.display().to_string(),
                        why,
                    });
                }
                _ => {}
            }
        }
    }
    let info = probe(p)?;
    let r = FfmpegReader::open(p, &info, size)?;
    Ok((Box::new(r), info.frames, (info.width, info.height)))
}

/// Frames of another reader resized to `size` (the image crate's triangle filter): for sizes
/// the in-process decoder does not scale itself where FFmpeg is missing.
struct Resized {
    inner: Box<dyn FrameReader>,
    size: (usize, usize),
}

impl FrameReader for Resized {
    fn next_frame(&mut self) -> Result<Option<Frame>, VideoError> {
        Ok(self
            .inner
            .next_frame()?
            .map(|f| resize_frame(&f, self.size.0, self.size.1)))
    }

    fn skip_frame(&mut self) -> Result<bool, VideoError> {
        self.inner.skip_frame()
    }
}

/// An open input: its reader, frame count and source frame size `(w, h)`.
pub type Opened = (Box<dyn FrameReader>, usize, (usize, usize));

/// A reader of image `files` (at least one), their count and the first one's size.
fn images(files: Vec<PathBuf>, size: Option<(usize, usize)>) -> Result<Opened, VideoError> {
    let n = files.len();
    let first = image::image_dimensions(&files[0]).map_err(|e| VideoError::Other {
        path: files[0].display().to_string(),
        msg: format!("cannot read image: {e}"),
    })?;
    Ok((
        Box::new(FolderReader::open(files, size)),
        n,
        (first.0 as usize, first.1 as usize),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn natural_order() {
        let mut v = vec!["f10.jpg", "f2.jpg", "f1.jpg", "f002.jpg", "g1.jpg"];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(v, ["f1.jpg", "f2.jpg", "f002.jpg", "f10.jpg", "g1.jpg"]);
    }
}
