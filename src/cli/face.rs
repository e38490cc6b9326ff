//! `marlin detect` (look at what the detector finds) and `marlin crop` (faces in the wild ->
//! face videos or frame folders plus their tracks as JSON).

use super::extract::report;
use super::face_args::FaceArgs;
use super::run_on;
use burn::tensor::backend::Backend;
use clap::{Args, ValueEnum};
use indicatif::ProgressBar;
use marlin::backend::{BackendTask, DeviceSpec};
use marlin::extract::batch::Failure;
use marlin::extract::inputs::{discover, DiscoverOptions, Item, OutputName};
use marlin::face::crop_video::{
    crop_video_with_track, encode_image, CropFormat as LibFormat, CropVideoOptions,
    ImageFormat as LibImage,
};
use marlin::face::draw::draw_faces;
use marlin::face::track::detect_stream;
use marlin::face::{Detector, Face};
use marlin::util::write_atomic;
use marlin::video::writer::VideoWriter;
use marlin::video::{self, Frame, VideoError};
use marlin::video::{open_input, Input};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct DetectArgs {
    /// An image, a video file or a frame folder.
    pub input: PathBuf,
    /// Draw boxes and landmarks: a PNG (the image, or frame --frame of a video), or an MP4 of
    /// the whole video when the name ends in .mp4.
    #[arg(long)]
    pub draw: Option<PathBuf>,
    /// The video frame drawn into a PNG.
    #[arg(long, default_value_t = 0)]
    pub frame: usize,
    /// Save every frame's faces as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    #[command(flatten)]
    pub face: FaceArgs,
    /// cpu, cuda[:N], vulkan[:N] or metal (GPUs need a build with that cargo feature).
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CropFormat {
    /// H.264 video `<name>.mp4`.
    Mp4,
    /// A folder `<name>/` of frames (the reference's crop_images_DB layout).
    Frames,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ImageFormat {
    /// JPEG, quality 95 (the reference's YouTube Faces layout; ~5x smaller).
    Jpg,
    /// PNG, lossless.
    Png,
}

#[derive(Args, Debug)]
pub struct CropArgs {
    /// Video files, frame folders, or directories to walk.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Output folder: `<name>.mp4` or `<name>/`, and `<name>.json` (boxes, landmarks, crops).
    #[arg(long, short)]
    pub out: PathBuf,
    /// Side of the square output frames.
    #[arg(long, default_value_t = 224)]
    pub size: usize,
    #[arg(long, value_enum, default_value_t = CropFormat::Mp4)]
    pub format: CropFormat,
    /// Image type of `--format frames`.
    #[arg(long, value_enum, default_value_t = ImageFormat::Jpg)]
    pub image_format: ImageFormat,
    /// File patterns of videos when walking a directory (comma-separated).
    #[arg(
        long,
        default_value = "*.mp4,*.avi,*.mov,*.mkv,*.webm,*.m4v,*.mpg,*.mpeg,*.flv"
    )]
    pub glob: String,
    #[command(flatten)]
    pub face: FaceArgs,
    /// cpu, cuda[:N], vulkan[:N] or metal (GPUs need a build with that cargo feature).
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// Redo outputs that already exist.
    #[arg(long)]
    pub overwrite: bool,
    #[arg(long, short)]
    pub quiet: bool,
}

fn faces_json(faces: &[Face]) -> serde_json::Value {
    serde_json::to_value(faces).unwrap_or_default()
}

/// A frame encoded as PNG or JPEG (quality 95).
/// A PNG written atomically.
pub(super) fn save_png(f: &Frame, path: &Path) -> Result<(), String> {
    let bytes = encode_image(f, LibImage::Png).map_err(|e| format!("{}: {e}", path.display()))?;
    write_atomic(path, &bytes).map_err(|e| format!("{}: {e}", path.display()))
}

fn bar(quiet: bool, len: u64, what: &str) -> ProgressBar {
    super::progress_bar(
        quiet,
        len,
        &format!("{{bar:30}} {{pos}}/{{len}} {what}  {{per_sec}}  elapsed {{elapsed}}  ETA {{eta}}  {{msg}}"),
    )
}

struct DetectJob {
    args: DetectArgs,
    stop: Arc<AtomicBool>,
}

impl BackendTask for DetectJob {
    type Output = Result<i32, String>;

    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let a = &self.args;
        let det =
            Detector::<B>::new(&device, a.face.detect_options()).map_err(|e| e.to_string())?;
        let p = &a.input;
        if p.is_file() && video::is_image(p) {
            let mut f = video::read_image(p).map_err(|e| e.to_string())?;
            let faces = det.detect(&[&f]).remove(0);
            outln!(
                "{}",
                serde_json::to_string_pretty(&faces_json(&faces)).unwrap_or_default()
            );
            if !a.quiet {
                eprintln!("{}: {} face(s)", p.display(), faces.len());
            }
            if let Some(d) = &a.draw {
                draw_faces(&mut f, &faces);
                save_png(&f, d)?;
            }
            if let Some(j) = &a.json {
                let text = serde_json::to_string_pretty(&faces_json(&faces)).unwrap_or_default();
                write_atomic(j, text.as_bytes()).map_err(|e| format!("{}: {e}", j.display()))?;
            }
            return Ok(0);
        }
        let input = Input::from_path(p);
        let (mut reader, frames, _) = open_input(&input, None).map_err(|e| e.to_string())?;
        let fps = match &input {
            Input::Video(v) => video::probe(v).map(|i| i.fps).unwrap_or(25.0),
            Input::Frames(_) => 25.0,
        };
        let mp4 = a
            .draw
            .as_ref()
            .filter(|d| d.extension().is_some_and(|e| e.eq_ignore_ascii_case("mp4")));
        let mut writer: Option<VideoWriter> = None;
        let mut per_frame = Vec::new();
        let (mut with_face, mut drawn_png) = (0usize, false);
        let pb = bar(a.quiet, frames as u64, "frames");
        let started = Instant::now();
        let stop = &self.stop;
        let examined = detect_stream(
            reader.as_mut(),
            &vec![true; frames],
            &det,
            &a.face.track_options(),
            &|| stop.load(Ordering::Relaxed),
            &mut |i, mut f, faces| {
                with_face += usize::from(!faces.is_empty());
                pb.inc(1);
                if let Some(out) = mp4 {
                    if writer.is_none() {
                        writer = Some(VideoWriter::create(out, f.width, f.height, fps)?);
                    }
                    draw_faces(&mut f, &faces);
                    if let Some(w) = writer.as_mut() {
                        w.write(&f)?;
                    }
                } else if let Some(out) = a.draw.as_ref().filter(|_| i == a.frame) {
                    draw_faces(&mut f, &faces);
                    save_png(&f, out).map_err(|msg| VideoError::Other {
                        path: out.display().to_string(),
                        msg,
                    })?;
                    drawn_png = true;
                }
                per_frame.push(serde_json::json!({"index": i, "faces": faces_json(&faces)}));
                Ok(())
            },
        )
        .map_err(|e| e.to_string())?;
        pb.finish_and_clear();
        if stop.load(Ordering::Relaxed) {
            eprintln!("interrupted: nothing written");
            return Ok(130);
        }
        if let Some(w) = writer {
            w.finish().map_err(|e| e.to_string())?;
        }
        if examined == 0 {
            return Err(format!("{}: no frame could be decoded", p.display()));
        }
        if a.draw.is_some() && mp4.is_none() && !drawn_png {
            return Err(format!(
                "{}: --frame {} is past the last frame ({examined} frames)",
                p.display(),
                a.frame
            ));
        }
        if let Some(j) = &a.json {
            let text = serde_json::to_string_pretty(&serde_json::json!({
                "input": p.display().to_string(),
                "frames": per_frame,
            }))
            .unwrap_or_default();
            write_atomic(j, text.as_bytes()).map_err(|e| format!("{}: {e}", j.display()))?;
        }
        let secs = started.elapsed().as_secs_f64();
        outln!(
            "{}: a face in {with_face} of {examined} frames ({:.1}%), {:.1} frames/s",
            p.display(),
            100.0 * with_face as f64 / examined as f64,
            examined as f64 / secs.max(1e-9)
        );
        Ok(0)
    }
}

pub fn detect(args: DetectArgs) -> Result<i32, String> {
    args.face.check()?;
    if !args.input.exists() {
        return Err(VideoError::Missing(args.input.display().to_string()).to_string());
    }
    let stop = Arc::new(AtomicBool::new(false));
    super::stop_on_ctrlc(&stop);
    run_on(args.device, DetectJob { args, stop })?
}

/// The track of a crop, as JSON: settings, and per frame the detection (frame pixels), the crop
/// square and the landmarks in crop pixels (for face parsing).
struct CropJob {
    args: CropArgs,
    items: Vec<Item>,
    stop: Arc<AtomicBool>,
}

impl CropJob {
    fn json_path(it: &Item) -> PathBuf {
        it.out.with_extension("json")
    }

    fn options(&self) -> CropVideoOptions {
        let a = &self.args;
        CropVideoOptions {
            size: a.size,
            format: match a.format {
                CropFormat::Mp4 => LibFormat::Mp4,
                CropFormat::Frames => LibFormat::Frames(match a.image_format {
                    ImageFormat::Jpg => LibImage::Jpg,
                    ImageFormat::Png => LibImage::Png,
                }),
            },
            track: a.face.track_options(),
        }
    }
}

impl BackendTask for CropJob {
    type Output = Result<(usize, Vec<Failure>), String>;

    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let det = Detector::<B>::new(&device, self.args.face.detect_options())
            .map_err(|e| e.to_string())?;
        let pb = bar(self.args.quiet, self.items.len() as u64, "videos");
        let (mut written, mut failures) = (0, Vec::new());
        let opts = self.options();
        for it in &self.items {
            if self.stop.load(Ordering::Relaxed) {
                break;
            }
            pb.set_message(format!("{}", it.input.path().display()));
            let stop = || self.stop.load(Ordering::Relaxed);
            let json = Self::json_path(it);
            match crop_video_with_track(&it.input, &it.out, &json, &det, &opts, &stop) {
                Ok(Some(_)) => written += 1,
                Ok(None) => {}
                Err(e) => failures.push(Failure::new(&it.input, e)),
            }
            pb.inc(1);
        }
        pb.finish_and_clear();
        Ok((written, failures))
    }
}

pub fn crop(args: CropArgs) -> Result<i32, String> {
    args.face.check()?;
    if args.size < 16 {
        return Err("--size must be at least 16".into());
    }
    let name = match args.format {
        CropFormat::Mp4 => OutputName::Extension("mp4".into()),
        CropFormat::Frames => OutputName::Stem,
    };
    let found = discover(
        &args.inputs,
        &DiscoverOptions {
            glob: args.glob.clone(),
            name,
            ..DiscoverOptions::new(&args.out)
        },
    )
    .map_err(|e| e.to_string())?;
    let (mut failures, all) = (found.failures, found.items);
    let total = all.len();
    let (items, skipped): (Vec<Item>, Vec<Item>) = all
        .into_iter()
        .partition(|it| args.overwrite || !(it.out.exists() && CropJob::json_path(it).exists()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut written = 0;
    if !items.is_empty() {
        super::stop_on_ctrlc(&stop);
        let (device, quiet, out) = (args.device, args.quiet, args.out.clone());
        let job = CropJob {
            args,
            items,
            stop: stop.clone(),
        };
        let (w, f) = run_on(device, job)??;
        written = w;
        failures.extend(f);
        return report(
            &out,
            "failures.json",
            &failures,
            written,
            total,
            skipped.len(),
            stop.load(Ordering::Relaxed),
            quiet,
        );
    }
    report(
        &args.out,
        "failures.json",
        &failures,
        written,
        total,
        skipped.len(),
        false,
        args.quiet,
    )
}
