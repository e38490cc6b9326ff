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
use marlin::face::draw::draw_faces;
use marlin::face::track::{detect_frames, detect_stream, plan_track, Track};
use marlin::face::{crop_resize, Detector, Face};
use marlin::util::{temp_path, write_atomic};
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
    /// cpu, cuda or cuda:N.
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
    /// cpu, cuda or cuda:N.
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
fn encode_image(f: &Frame, format: ImageFormat) -> Result<Vec<u8>, String> {
    let img = image::RgbImage::from_raw(f.width as u32, f.height as u32, f.data.clone())
        .ok_or("bad frame buffer")?;
    let mut buf = std::io::Cursor::new(Vec::new());
    match format {
        ImageFormat::Png => img.write_to(&mut buf, image::ImageFormat::Png),
        ImageFormat::Jpg => {
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, 95).encode_image(&img)
        }
    }
    .map_err(|e| e.to_string())?;
    Ok(buf.into_inner())
}

/// A PNG written atomically.
fn save_png(f: &Frame, path: &Path) -> Result<(), String> {
    let bytes =
        encode_image(f, ImageFormat::Png).map_err(|e| format!("{}: {e}", path.display()))?;
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
fn track_json(input: &Path, args: &CropArgs, fps: f64, src: (usize, usize), t: &Track) -> String {
    let frames: Vec<serde_json::Value> = t
        .frames
        .iter()
        .map(|f| {
            let lm = f.face.map(|face| {
                face.landmarks
                    .map(|p| f.crop.to_crop(p, args.size))
                    .to_vec()
            });
            serde_json::json!({
                "index": f.index,
                "examined": f.examined,
                "face": f.face,
                "crop": f.crop,
                "landmarks_crop": lm,
            })
        })
        .collect();
    serde_json::to_string_pretty(&serde_json::json!({
        "input": input.display().to_string(),
        "width": src.0,
        "height": src.1,
        "fps": fps,
        "size": args.size,
        "face_select": args.face.face_select,
        "smooth": args.face.smooth,
        "margin": args.face.margin,
        "examined": t.examined,
        "detected": t.detected,
        "frames": frames,
    }))
    .unwrap_or_default()
}

struct CropJob {
    args: CropArgs,
    items: Vec<Item>,
    stop: Arc<AtomicBool>,
}

impl CropJob {
    fn json_path(it: &Item) -> PathBuf {
        it.out.with_extension("json")
    }

    fn one<B: Backend>(
        &self,
        det: &Detector<B>,
        it: &Item,
        pb: &ProgressBar,
    ) -> Result<(), String> {
        let a = &self.args;
        let stop = || self.stop.load(Ordering::Relaxed);
        let e = |e: VideoError| e.to_string();
        let (mut reader, frames, src) = open_input(&it.input, None).map_err(e)?;
        let fps = match &it.input {
            Input::Video(v) => video::probe(v).map(|i| i.fps).unwrap_or(25.0),
            Input::Frames(_) => 25.0,
        };
        let wanted = vec![true; frames];
        pb.set_message(format!("detecting {}", it.input.path().display()));
        let dets = detect_frames(
            reader.as_mut(),
            &wanted,
            det,
            &a.face.track_options(),
            &stop,
        )
        .map_err(e)?;
        drop(reader);
        if stop() {
            return Ok(());
        }
        let track = plan_track(&dets, &wanted, &a.face.track_options())
            .map_err(|msg| format!("{}: {msg}", it.input.path().display()))?;
        let crops = track.crops();
        let ext = match a.image_format {
            ImageFormat::Jpg => "jpg",
            ImageFormat::Png => "png",
        };
        let names: Vec<String> = match &it.input {
            Input::Frames(d) => video::list_frames(d)
                .map_err(e)?
                .iter()
                .map(|f| {
                    f.with_extension(ext)
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default()
                })
                .collect(),
            Input::Video(_) => (0..crops.len()).map(|i| format!("{i:05}.{ext}")).collect(),
        };
        pb.set_message(format!("cropping {}", it.input.path().display()));
        let (mut reader, _, _) = open_input(&it.input, None).map_err(e)?;
        let tmp_dir = temp_path(&it.out);
        let mut writer = match a.format {
            CropFormat::Mp4 => Some(VideoWriter::create(&it.out, a.size, a.size, fps).map_err(e)?),
            CropFormat::Frames => {
                let _ = std::fs::remove_dir_all(&tmp_dir);
                std::fs::create_dir_all(&tmp_dir)
                    .map_err(|err| format!("{}: {err}", tmp_dir.display()))?;
                None
            }
        };
        let result = (|| -> Result<(), String> {
            for (i, c) in crops.iter().enumerate() {
                if stop() {
                    return Err("interrupted".into());
                }
                let Some(f) = reader.next_frame().map_err(e)? else {
                    break;
                };
                let Some(c) = c else { continue };
                let face = crop_resize(&f, c, a.size);
                match writer.as_mut() {
                    Some(w) => w.write(&face).map_err(e)?,
                    None => {
                        let p = tmp_dir.join(&names[i]);
                        // Plain writes: the folder is renamed into place when complete.
                        encode_image(&face, a.image_format)
                            .and_then(|b| std::fs::write(&p, b).map_err(|e| e.to_string()))
                            .map_err(|err| format!("{}: {err}", p.display()))?;
                    }
                }
            }
            Ok(())
        })();
        if let Err(msg) = result {
            let _ = std::fs::remove_dir_all(&tmp_dir);
            return if stop() { Ok(()) } else { Err(msg) };
        }
        match writer {
            Some(w) => w.finish().map_err(e)?,
            None => {
                let _ = std::fs::remove_dir_all(&it.out);
                std::fs::rename(&tmp_dir, &it.out)
                    .map_err(|err| format!("{}: {err}", it.out.display()))?;
            }
        }
        let json = Self::json_path(it);
        write_atomic(
            &json,
            track_json(it.input.path(), a, fps, src, &track).as_bytes(),
        )
        .map_err(|err| format!("{}: {err}", json.display()))
    }
}

impl BackendTask for CropJob {
    type Output = Result<(usize, Vec<Failure>), String>;

    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let det = Detector::<B>::new(&device, self.args.face.detect_options())
            .map_err(|e| e.to_string())?;
        let pb = bar(self.args.quiet, self.items.len() as u64, "videos");
        let (mut written, mut failures) = (0, Vec::new());
        for it in &self.items {
            if self.stop.load(Ordering::Relaxed) {
                break;
            }
            match self.one(&det, it, &pb) {
                Ok(()) if !self.stop.load(Ordering::Relaxed) => written += 1,
                Ok(()) => {}
                Err(msg) => failures.push(Failure::new(&it.input, msg)),
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
        &failures,
        written,
        total,
        skipped.len(),
        false,
        args.quiet,
    )
}
