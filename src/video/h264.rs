//! H.264 in MP4/MOV decoded in-process: the common case of face videos (CelebV-HQ,
//! FaceForensics++, LRS2, VoxCeleb and the bundled sample are all H.264 in MP4) read without
//! FFmpeg. Everything else (other codecs, other containers, H.264 features OpenH264 lacks)
//! stays with the FFmpeg reader, chosen per file: [`probe_mp4`] answers `Ok(None)` for those.
//!
//! - Container: the `mp4-atom` crate decodes the `moov` box; the sample table (`stts`, `ctts`,
//!   `stsc`, `stsz`, `stco`/`co64`, `stss`) and the edit list are expanded here as FFmpeg's
//!   MOV demuxer does, so the same frames come out (an edit list that starts mid-GOP decodes
//!   from the keyframe before it and drops the frames before its start).
//! - Decoder: OpenH264 (Cisco), compiled from the source bundled with the `openh264` crate.
//!   Samples are length-prefixed (AVCC) NAL units, rewritten as an Annex B byte stream with
//!   the `avcC` parameter sets in front. Pictures are put in presentation order here (by each
//!   sample's composition time), not by OpenH264's own reordering heuristic.
//! - Pixels: the display matrix is applied as FFmpeg's autorotate does (transpose, hflip,
//!   vflip on the YUV planes), then YUV 4:2:0 goes to RGB24 with libswscale's arithmetic
//!   (FFmpeg 5.1 on x86-64): at the decoded size its SSSE3 `yuv420_rgb24` routine (chroma
//!   repeated, not interpolated), with a resize its `flags=bilinear` scaler (filter
//!   coefficients, 15-bit horizontal pass, vertical pass and RGB tables as libswscale builds
//!   them). Colour matrix and range come from the SPS VUI (else the `colr` box), BT.601
//!   limited range when neither says.
//!
//! The RGB frames equal FFmpeg 5.1's `-pix_fmt rgb24 -vsync passthrough` output byte for byte
//! (same frame count, edit lists and rotations included; resized ones too): on every H.264
//! test video (`extract_parity::in_process_h264_frames_are_ffmpegs_byte_for_byte`). That takes
//! a one-line fix of OpenH264 2.7.0, vendored (`vendor/README.md`): it did not filter the
//! inner edges of B_Skip macroblocks whose direct prediction moves their 8x8 blocks
//! differently (its `WelsDeblockingMb` zeroed their boundary strengths as for a P_Skip), and a
//! few macroblocks of some B-frames differed by up to 13 levels. Other FFmpeg builds may round
//! the colour conversion differently (their SIMD routines): a level here and there.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;

use mp4_atom::{Codec, Decode, Mvhd, Trak};

use super::{Frame, FrameReader, VideoError, VideoInfo};

// ---------------------------------------------------------------------------------------------
// Public API
// ---------------------------------------------------------------------------------------------

/// What the MP4/MOV container says of its first video track, an H.264 one that this module
/// decodes (the fields of [`VideoInfo`], as ffprobe reports them, and a little more).
#[derive(Clone)]
pub struct Mp4Video {
    /// Frame size as decoded, after applying the rotation.
    pub width: usize,
    pub height: usize,
    /// Sample count of the track (ffprobe's `nb_frames`).
    pub frames: usize,
    /// Frames the reader yields: `frames` less those an edit list cuts away (equal for files
    /// as encoders write them). FFmpeg's `-vsync passthrough` pipe yields the same count.
    pub output_frames: usize,
    /// Average frame rate (ffprobe's `avg_frame_rate`).
    pub fps: f64,
    /// Rotation of the display matrix in degrees, as ffprobe reports it (`-90` for a phone
    /// video shot upright); 0 without one.
    pub rotation: i64,
    /// Always `"h264"`.
    pub codec: String,
    /// The H.264 profile, as ffprobe names it (`"High"`, `"Main"`, `"Constrained Baseline"`).
    pub profile: String,
    track: Arc<Track>,
}

impl std::fmt::Debug for Mp4Video {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Without the sample table.
        f.debug_struct("Mp4Video")
            .field("width", &self.width)
            .field("height", &self.height)
            .field("frames", &self.frames)
            .field("output_frames", &self.output_frames)
            .field("fps", &self.fps)
            .field("rotation", &self.rotation)
            .field("codec", &self.codec)
            .field("profile", &self.profile)
            .finish_non_exhaustive()
    }
}

impl Mp4Video {
    /// The same facts as the repo's ffprobe-based `VideoInfo`.
    pub fn to_info(&self) -> VideoInfo {
        VideoInfo {
            width: self.width,
            height: self.height,
            frames: self.frames,
            fps: self.fps,
            rotation: self.rotation,
            codec: self.codec.clone(),
        }
    }
}

/// What [`inspect_mp4`] found, for a caller that wants to say why a file goes to FFmpeg.
#[derive(Debug, Clone)]
pub enum Mp4Probe {
    /// H.264 in MP4/MOV that [`H264Reader`] decodes.
    H264(Mp4Video),
    /// Not an MP4/MOV file (another container, or not a video).
    NotMp4,
    /// MP4/MOV whose first video track is not H.264 (the sample entry's four-character code,
    /// e.g. `mp4v`, `hvc1`), or that has no video track.
    OtherCodec(String),
    /// H.264 in MP4/MOV that this module does not decode (why, in a few words): 10-bit or
    /// 4:2:2/4:4:4 profiles, interlaced coding, fragmented files, edit lists other than one
    /// plain edit, rotations other than multiples of 90 degrees, sample tables it cannot read.
    Unsupported(String),
}

/// The first video track of an MP4/MOV file when this module decodes it; `Ok(None)` when the
/// file is not MP4/MOV, its video is not H.264, or it uses something OpenH264 or this module
/// does not support (the caller decodes it with FFmpeg). An error when the file is missing,
/// empty, or an MP4 that no reader can use (no `moov` box: truncated or incomplete).
pub fn probe_mp4(path: &Path) -> Result<Option<Mp4Video>, VideoError> {
    Ok(match inspect_mp4(path)? {
        Mp4Probe::H264(v) => Some(v),
        _ => None,
    })
}

/// [`probe_mp4`] with the reason a file is left to FFmpeg.
pub fn inspect_mp4(path: &Path) -> Result<Mp4Probe, VideoError> {
    let p = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|_| VideoError::Missing(p.clone()))?;
    if meta.is_file() && meta.len() == 0 {
        return Err(VideoError::Empty(p));
    }
    let mut file = File::open(path).map_err(|e| io_error(&p, "cannot open", &e))?;
    let len = file
        .metadata()
        .map_err(|e| io_error(&p, "cannot read", &e))?
        .len();
    let top = match scan_top_level(&mut file, len).map_err(|e| io_error(&p, "cannot read", &e))? {
        Some(top) => top,
        None => return Ok(Mp4Probe::NotMp4),
    };
    if top.fragmented {
        return Ok(Mp4Probe::Unsupported("fragmented MP4".into()));
    }
    let Some((moov_at, moov_len)) = top.moov else {
        return Err(VideoError::Unreadable {
            path: p,
            msg: if top.truncated {
                "truncated MP4, no moov box: the file ends early".into()
            } else {
                "MP4 without a moov box".into()
            },
        });
    };
    let mut moov = vec![0u8; moov_len];
    file.seek(SeekFrom::Start(moov_at))
        .and_then(|_| file.read_exact(&mut moov))
        .map_err(|e| io_error(&p, "cannot read its moov box", &e))?;
    Ok(match parse_moov(&moov, len) {
        Ok(track) => Mp4Probe::H264(video_of(track)),
        Err(Skip::OtherCodec(c)) => Mp4Probe::OtherCodec(c),
        Err(Skip::Unsupported(why)) => Mp4Probe::Unsupported(why),
    })
}

/// Whether [`H264Reader::open`] can produce frames of `size` (w, h) exactly as FFmpeg's
/// `scale=W:H:flags=bilinear`: FFmpeg takes another output path for odd widths, which this
/// module does not reproduce (use FFmpeg for those).
pub fn supports_size(size: (usize, usize)) -> bool {
    size.0 > 0 && size.1 > 0 && size.0.is_multiple_of(2) && size.0 <= MAX_DIM && size.1 <= MAX_DIM
}

/// Decodes the H.264 track [`probe_mp4`] found, one RGB frame at a time, in presentation order.
pub struct H264Reader {
    path: String,
    file: File,
    track: Arc<Track>,
    decoder: Decoder,
    /// Next position in `track.plan` to feed the decoder.
    next_feed: usize,
    /// Decoded pictures waiting for their turn, by presentation rank.
    pending: BTreeMap<usize, Yuv>,
    /// Rank of the next frame to hand out.
    next_rank: usize,
    /// The decoder has been drained (no more pictures will come).
    drained: bool,
    /// An error met while feeding (a corrupt sample): returned once the frames before it are out.
    deferred: Option<VideoError>,
    /// The file ends before its last sample: the stream ends after the frames decoded.
    truncated: bool,
    converter: Converter,
    /// The first picture, decoded by `open` to find a stream OpenH264 cannot start on before
    /// any frame is handed out.
    peeked: Option<Yuv>,
    sample: Vec<u8>,
    annexb: Vec<u8>,
}

impl H264Reader {
    /// Start decoding. Frames come out at `size` (w, h) when given (as FFmpeg's
    /// `scale=W:H:flags=bilinear`), else at the size `v` reports.
    ///
    /// The first frame is decoded here: an error from `open` (a stream OpenH264 cannot decode,
    /// a size [`supports_size`] refuses) comes before any frame, so the caller can still
    /// decode the file with FFmpeg instead. Errors after that (a corrupt or truncated file)
    /// come from [`FrameReader::next_frame`] once the frames before them are out.
    pub fn open(
        path: &Path,
        v: &Mp4Video,
        size: Option<(usize, usize)>,
    ) -> Result<Self, VideoError> {
        let p = path.display().to_string();
        let other = |msg: String| VideoError::Other {
            path: p.clone(),
            msg,
        };
        let file = File::open(path).map_err(|e| io_error(&p, "cannot open", &e))?;
        let track = v.track.clone();
        let (w, h) = (v.width, v.height);
        let converter = match size {
            Some(s) if s != (w, h) => {
                if !supports_size(s) {
                    return Err(other(format!(
                        "cannot resize to {}x{} in-process (odd width): decode it with FFmpeg",
                        s.0, s.1
                    )));
                }
                Converter::Scaled(Box::new(
                    Scaler::new((w, h), s, track.color).map_err(other)?,
                ))
            }
            _ => Converter::Direct(Box::new(SimdCoeffs::new(track.color))),
        };
        let decoder = Decoder::new().map_err(|e| other(format!("cannot start OpenH264: {e}")))?;
        let mut reader = Self {
            path: p,
            file,
            track,
            decoder,
            next_feed: 0,
            pending: BTreeMap::new(),
            next_rank: 0,
            drained: false,
            deferred: None,
            truncated: false,
            converter,
            peeked: None,
            sample: Vec::new(),
            annexb: Vec::new(),
        };
        reader.peeked = reader.next_yuv()?;
        Ok(reader)
    }

    /// The next picture in presentation order, decoded but not converted.
    fn next_yuv(&mut self) -> Result<Option<Yuv>, VideoError> {
        if let Some(yuv) = self.peeked.take() {
            return Ok(Some(yuv));
        }
        loop {
            if let Some(yuv) = self.pending.remove(&self.next_rank) {
                self.next_rank += 1;
                return Ok(Some(yuv));
            }
            if self.next_rank >= self.track.output_frames {
                return Ok(None);
            }
            // Pictures come out at most a decoded picture buffer (16) plus OpenH264's own
            // reordering list (16) late: with many more waiting, the next one is lost.
            if !self.drained && self.pending.len() <= MAX_PENDING {
                self.pump()?;
                continue;
            }
            if let Some(e) = self.deferred.take() {
                return Err(e);
            }
            if self.truncated {
                return Ok(None);
            }
            // A frame is missing: OpenH264 gave no picture for it.
            return Err(VideoError::Other {
                path: self.path.clone(),
                msg: format!(
                    "H.264 decoding (OpenH264) gave no picture for frame {} of {}: decode it \
                     with FFmpeg",
                    self.next_rank + 1,
                    self.track.output_frames
                ),
            });
        }
    }

    /// Feed one sample to the decoder (or drain it at the end), keeping what comes out.
    fn pump(&mut self) -> Result<(), VideoError> {
        let track = self.track.clone();
        if self.next_feed >= track.plan.len() || self.deferred.is_some() {
            let mut pics = Vec::new();
            let res = self.decoder.drain(&mut |tag, pic| pics.push((tag, pic)));
            self.drained = true;
            self.keep(&track, pics)?;
            if let (Err(state), None) = (res, &self.deferred) {
                self.deferred = Some(self.decode_error(state, None));
            }
            return Ok(());
        }
        let pos = self.next_feed;
        self.next_feed += 1;
        let item = track.plan[pos];
        let s = track.samples[item.sample];
        if s.offset
            .checked_add(s.size as u64)
            .is_none_or(|e| e > track.file_len)
        {
            // A truncated file ends here, as FFmpeg's stream does: the frames decoded so far
            // come out, then the end (the caller says "decoded N of M frames").
            self.truncated = true;
            self.next_feed = track.plan.len();
            return Ok(());
        }
        if let Err(msg) = self.read_sample(&track, s, pos == 0) {
            // Hand out the frames decoded so far, then the error.
            self.deferred = Some(VideoError::Other {
                path: self.path.clone(),
                msg,
            });
            return Ok(());
        }
        let mut pics = Vec::new();
        let res = self
            .decoder
            .decode(&self.annexb, pos as u64 + 1, &mut |tag, pic| {
                pics.push((tag, pic))
            });
        self.keep(&track, pics)?;
        if let Err(state) = res {
            // Hand out the frames decoded so far, then the error.
            self.deferred = Some(self.decode_error(state, Some(s.index)));
        }
        Ok(())
    }

    /// File decoded pictures by presentation rank (dropping those an edit list cuts).
    fn keep(&mut self, track: &Track, pics: Vec<(u64, Yuv)>) -> Result<(), VideoError> {
        for (tag, yuv) in pics {
            let item = (tag as usize)
                .checked_sub(1)
                .and_then(|i| track.plan.get(i))
                .ok_or_else(|| VideoError::Other {
                    path: self.path.clone(),
                    msg: "OpenH264 returned a picture of no known frame".into(),
                })?;
            if (yuv.w, yuv.h) != (track.coded_w, track.coded_h) {
                return Err(VideoError::Other {
                    path: self.path.clone(),
                    msg: format!(
                        "frame size changes mid-stream ({}x{} after {}x{}): decode it with FFmpeg",
                        yuv.w, yuv.h, track.coded_w, track.coded_h
                    ),
                });
            }
            if let Some(rank) = item.rank {
                if rank >= self.next_rank {
                    self.pending.insert(rank, yuv);
                }
            }
        }
        Ok(())
    }

    /// OpenH264's failure on sample `index` (or when draining), as an error.
    fn decode_error(&self, state: i32, index: Option<usize>) -> VideoError {
        let at = match index {
            Some(i) => format!("at sample {} of {}", i + 1, self.track.samples.len()),
            None => "at the end of the stream".into(),
        };
        VideoError::Other {
            path: self.path.clone(),
            msg: format!(
                "H.264 decoding (OpenH264) failed {at} (decoder state {state:#x}): the stream is \
                 corrupt or uses something OpenH264 lacks; decode it with FFmpeg"
            ),
        }
    }

    /// Read sample `s` and rewrite it as Annex B into `self.annexb` (the `avcC` parameter
    /// sets in front when `first`).
    fn read_sample(&mut self, track: &Track, s: Sample, first: bool) -> Result<(), String> {
        let size = s.size as usize;
        let ends = s.offset.checked_add(s.size as u64);
        if ends.is_none_or(|e| e > track.file_len) {
            return Err(format!(
                "truncated file: the data of sample {} of {} lies past its end ({} bytes)",
                s.index + 1,
                track.samples.len(),
                track.file_len
            ));
        }
        self.sample.resize(size, 0);
        self.file
            .seek(SeekFrom::Start(s.offset))
            .and_then(|_| self.file.read_exact(&mut self.sample))
            .map_err(|e| format!("reading sample {}: {e}", s.index + 1))?;
        self.annexb.clear();
        if first {
            for ps in &track.param_sets {
                self.annexb.extend_from_slice(&[0, 0, 0, 1]);
                self.annexb.extend_from_slice(ps);
            }
        }
        avcc_to_annexb(&self.sample, track.length_size, &mut self.annexb)
            .map_err(|e| format!("corrupt sample {}: {e}", s.index + 1))
    }
}

impl FrameReader for H264Reader {
    fn next_frame(&mut self) -> Result<Option<Frame>, VideoError> {
        let Some(yuv) = self.next_yuv()? else {
            return Ok(None);
        };
        let yuv = match self.track.orient {
            Orient::Identity => yuv,
            o => yuv.oriented(o),
        };
        Ok(Some(self.converter.convert(&yuv)))
    }

    fn skip_frame(&mut self) -> Result<bool, VideoError> {
        // Every frame is decoded (later ones may refer to it); only the conversion is saved.
        Ok(self.next_yuv()?.is_some())
    }
}

fn io_error(path: &str, what: &str, e: &std::io::Error) -> VideoError {
    VideoError::Other {
        path: path.to_string(),
        msg: format!("{what}: {e}"),
    }
}

/// Most decoded pictures held back for presentation order.
const MAX_PENDING: usize = 64;

/// Largest frame side accepted (H.264 level 6.2 tops out at 8192x4320).
const MAX_DIM: usize = 16384;

// ---------------------------------------------------------------------------------------------
// Container
// ---------------------------------------------------------------------------------------------

/// Why a file is left to FFmpeg.
#[derive(Debug)]
enum Skip {
    OtherCodec(String),
    Unsupported(String),
}

fn unsupported<T>(why: impl Into<String>) -> Result<T, Skip> {
    Err(Skip::Unsupported(why.into()))
}

/// What the top-level boxes say.
struct TopLevel {
    /// Offset and size of the `moov` box.
    moov: Option<(u64, usize)>,
    /// A box runs past the end of the file.
    truncated: bool,
    /// `moof` boxes (fragmented MP4).
    fragmented: bool,
}

/// Largest `moov` box read (a 3-hour 60 fps video has ~20 MB of sample tables).
const MAX_MOOV: u64 = 512 << 20;

/// Walk the top-level boxes; `None` when the file does not start as an MP4/MOV does.
fn scan_top_level(file: &mut File, len: u64) -> std::io::Result<Option<TopLevel>> {
    const FIRST: [&[u8; 4]; 9] = [
        b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot", b"uuid", b"junk",
    ];
    let mut top = TopLevel {
        moov: None,
        truncated: false,
        fragmented: false,
    };
    let mut pos = 0u64;
    let mut first = true;
    while pos + 8 <= len {
        let mut head = [0u8; 16];
        file.seek(SeekFrom::Start(pos))?;
        let want = if pos + 16 <= len { 16 } else { 8 };
        file.read_exact(&mut head[..want])?;
        let size32 = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as u64;
        let kind = [head[4], head[5], head[6], head[7]];
        if first && !FIRST.contains(&&kind) {
            return Ok(None);
        }
        let (size, header) = match size32 {
            0 => (len - pos, 8),
            1 if want == 16 => (
                u64::from_be_bytes([
                    head[8], head[9], head[10], head[11], head[12], head[13], head[14], head[15],
                ]),
                16,
            ),
            1 => {
                top.truncated = true;
                break;
            }
            s => (s, 8),
        };
        if size < header {
            if first {
                return Ok(None);
            }
            break;
        }
        first = false;
        let end = pos.saturating_add(size);
        if end > len {
            top.truncated = true;
            // A moov that the file cuts short is no moov.
            break;
        }
        match &kind {
            b"moov" if top.moov.is_none() => {
                if size - header > MAX_MOOV {
                    break;
                }
                top.moov = Some((pos + header, (size - header) as usize));
            }
            b"moof" => top.fragmented = true,
            _ => {}
        }
        pos = end;
    }
    Ok(Some(top))
}

/// One sample of the video track.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Sample {
    /// Index in the sample table.
    index: usize,
    offset: u64,
    size: u32,
    /// Decoding and presentation (decoding + composition offset) times, media timescale.
    dts: i64,
    pts: i64,
    key: bool,
}

/// One step of decoding: a sample, and its rank in presentation order unless an edit list
/// drops its picture.
#[derive(Debug, Clone, Copy, PartialEq)]
struct PlanItem {
    sample: usize,
    rank: Option<usize>,
}

/// Colour matrix and range, as FFmpeg decides them for the frames.
#[derive(Debug, Clone, Copy, PartialEq)]
struct ColorParams {
    /// libswscale's `inv_table` row for the frame's colour matrix.
    inv_table: [i64; 4],
    full_range: bool,
}

/// How FFmpeg's autorotate moves the pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Orient {
    Identity,
    /// `transpose` with FFmpeg's `dir` (0 cclock_flip, 1 clock, 2 cclock, 3 clock_flip).
    Transpose(u8),
    HFlip,
    VFlip,
    HVFlip,
}

/// The video track, ready to decode.
#[derive(Debug)]
struct Track {
    samples: Vec<Sample>,
    plan: Vec<PlanItem>,
    output_frames: usize,
    /// SPS and PPS NAL units of the `avcC` box.
    param_sets: Vec<Vec<u8>>,
    length_size: usize,
    /// Picture size as decoded (before rotation).
    coded_w: usize,
    coded_h: usize,
    orient: Orient,
    rotation: i64,
    color: ColorParams,
    fps: f64,
    profile: String,
    file_len: u64,
}

fn video_of(track: Track) -> Mp4Video {
    let (mut width, mut height) = (track.coded_w, track.coded_h);
    if matches!(track.orient, Orient::Transpose(_)) {
        std::mem::swap(&mut width, &mut height);
    }
    Mp4Video {
        width,
        height,
        frames: track.samples.len(),
        output_frames: track.output_frames,
        fps: track.fps,
        rotation: track.rotation,
        codec: "h264".into(),
        profile: track.profile.clone(),
        track: Arc::new(track),
    }
}

/// Children of a box body: (four-character code, whole box including its header).
fn child_boxes(body: &[u8]) -> Vec<([u8; 4], &[u8])> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos + 8 <= body.len() {
        let size32 = u32::from_be_bytes([body[pos], body[pos + 1], body[pos + 2], body[pos + 3]]);
        let kind = [body[pos + 4], body[pos + 5], body[pos + 6], body[pos + 7]];
        let size = match size32 {
            0 => body.len() - pos,
            1 if pos + 16 <= body.len() => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&body[pos + 8..pos + 16]);
                usize::try_from(u64::from_be_bytes(b)).unwrap_or(usize::MAX)
            }
            s => s as usize,
        };
        if size < 8 || size > body.len() - pos {
            break;
        }
        out.push((kind, &body[pos..pos + size]));
        pos += size;
    }
    out
}

/// The first video track of a `moov` body, checked for what OpenH264 and this module decode.
fn parse_moov(moov: &[u8], file_len: u64) -> Result<Track, Skip> {
    let mut mvhd = None;
    let mut video = None;
    for (kind, bytes) in child_boxes(moov) {
        match &kind {
            b"mvhd" => {
                mvhd = Mvhd::decode(&mut &bytes[..]).ok();
            }
            b"trak" if video.is_none() => match Trak::decode(&mut &bytes[..]) {
                Ok(t) if t.mdia.hdlr.handler == b"vide".into() => video = Some(t),
                Ok(_) => {}
                // A track we cannot read might be the first video track: FFmpeg decides.
                Err(e) => return unsupported(format!("cannot read a track of the MP4 ({e})")),
            },
            _ => {}
        }
    }
    let Some(trak) = video else {
        return Err(Skip::OtherCodec("no video track".into()));
    };
    let Some(mvhd) = mvhd else {
        return unsupported("MP4 without a movie header");
    };
    track_of(&trak, &mvhd, file_len)
}

fn track_of(trak: &Trak, mvhd: &Mvhd, file_len: u64) -> Result<Track, Skip> {
    let stbl = &trak.mdia.minf.stbl;
    let (avcc, colr) = match stbl.stsd.codecs.first() {
        Some(Codec::Avc1(a)) => (&a.avcc, a.colr.as_ref()),
        Some(Codec::Avc3(a)) => (&a.avcc, a.colr.as_ref()),
        Some(Codec::Unknown(four, _)) => return Err(Skip::OtherCodec(four.to_string())),
        Some(c) => return Err(Skip::OtherCodec(codec_name(c))),
        None => return Err(Skip::OtherCodec("no sample description".into())),
    };
    if stbl.stsd.codecs.len() > 1 {
        return unsupported("several sample descriptions");
    }
    let Some(sps_nal) = avcc.sequence_parameter_sets.first() else {
        return unsupported("no SPS in the avcC box");
    };
    let sps = parse_sps(sps_nal).map_err(|e| Skip::Unsupported(format!("SPS: {e}")))?;
    sps.check()?;
    if !(1..=4).contains(&avcc.length_size) {
        return unsupported("NAL length size");
    }
    let timescale = trak.mdia.mdhd.timescale as i64;
    if timescale <= 0 {
        return unsupported("media timescale 0");
    }
    let samples = sample_table(stbl, file_len)?;
    if samples.is_empty() {
        return unsupported("no samples");
    }
    let edits = edit_list(trak, mvhd, timescale)?;
    let has_ctts = stbl.ctts.as_ref().is_some_and(|c| !c.entries.is_empty());
    let (plan, output_frames) = plan_frames(&samples, edits, has_ctts);
    let (orient, rotation) = orientation(&trak.tkhd.matrix, &mvhd.matrix)?;
    let color = color_params(&sps, colr);
    let fps = {
        let total: i64 = stbl
            .stts
            .entries
            .iter()
            .map(|e| e.sample_count as i64 * e.sample_delta as i64)
            .sum();
        let n: i64 = stbl
            .stts
            .entries
            .iter()
            .map(|e| e.sample_count as i64)
            .sum();
        if total > 0 && n > 0 {
            (timescale as f64 * n as f64) / total as f64
        } else {
            0.0
        }
    };
    let mut param_sets: Vec<Vec<u8>> = avcc.sequence_parameter_sets.clone();
    param_sets.extend(avcc.picture_parameter_sets.iter().cloned());
    Ok(Track {
        samples,
        plan,
        output_frames,
        param_sets,
        length_size: avcc.length_size as usize,
        coded_w: sps.width,
        coded_h: sps.height,
        orient,
        rotation,
        color,
        fps,
        profile: sps.profile_name().into(),
        file_len,
    })
}

/// FFmpeg's codec name for a sample entry other than H.264.
fn codec_name(c: &Codec) -> String {
    match c {
        Codec::Hev1(_) | Codec::Hvc1(_) => "hevc",
        Codec::Vp08(_) => "vp8",
        Codec::Vp09(_) => "vp9",
        Codec::Av01(_) => "av1",
        Codec::Jpeg(_) => "mjpeg",
        _ => "not video",
    }
    .into()
}

/// Samples at most this many (a day at 120 fps); more is a corrupt table.
const MAX_SAMPLES: u64 = 12 << 20;

/// Expand the sample table: offsets from `stsc` + `stco`/`co64` + `stsz`, times from `stts` +
/// `ctts`, keyframes from `stss` (all samples when it is absent).
fn sample_table(stbl: &mp4_atom::Stbl, file_len: u64) -> Result<Vec<Sample>, Skip> {
    let bad = |what: &str| Skip::Unsupported(format!("unreadable sample table ({what})"));
    let n_stts: u64 = stbl
        .stts
        .entries
        .iter()
        .map(|e| e.sample_count as u64)
        .sum();
    let sizes: Vec<u32> = match &stbl.stsz.samples {
        mp4_atom::StszSamples::Identical { count, size } => {
            if *count as u64 > MAX_SAMPLES || *count as u64 > file_len {
                return Err(bad("stsz"));
            }
            vec![*size; *count as usize]
        }
        mp4_atom::StszSamples::Different { sizes } => sizes.clone(),
    };
    let n = sizes.len();
    if n as u64 != n_stts {
        return Err(bad("stts and stsz disagree"));
    }
    let chunks: Vec<u64> = match (&stbl.stco, &stbl.co64) {
        (Some(c), _) => c.entries.iter().map(|&o| o as u64).collect(),
        (None, Some(c)) => c.entries.clone(),
        (None, None) => return Err(bad("no chunk offsets")),
    };
    // Offsets: walk the chunks, each with the sample count of its stsc run.
    let mut offsets = Vec::with_capacity(n);
    let runs = &stbl.stsc.entries;
    for (r, run) in runs.iter().enumerate() {
        if run.first_chunk == 0 || run.sample_description_index != 1 {
            return Err(bad("stsc"));
        }
        let first = run.first_chunk as usize - 1;
        let last = match runs.get(r + 1) {
            Some(next) if (next.first_chunk as usize) > run.first_chunk as usize => {
                next.first_chunk as usize - 1
            }
            Some(_) => return Err(bad("stsc order")),
            None => chunks.len(),
        };
        for &chunk in chunks.get(first..last.min(chunks.len())).unwrap_or(&[]) {
            let mut off = chunk;
            for _ in 0..run.samples_per_chunk {
                let Some(&size) = sizes.get(offsets.len()) else {
                    break;
                };
                offsets.push(off);
                off = off.saturating_add(size as u64);
            }
            if offsets.len() == n {
                break;
            }
        }
    }
    if offsets.len() != n {
        return Err(bad("stsc and stsz disagree"));
    }
    // Composition offsets, signed as FFmpeg reads them.
    let mut cts = Vec::with_capacity(n);
    if let Some(ctts) = &stbl.ctts {
        for e in &ctts.entries {
            let off = e.sample_offset as i32 as i64;
            if off.abs() >= 1 << 28 {
                return Err(bad("ctts"));
            }
            for _ in 0..e.sample_count {
                if cts.len() == n {
                    break;
                }
                cts.push(off);
            }
        }
    }
    cts.resize(n, 0);
    let mut key = vec![stbl.stss.is_none(); n];
    if let Some(stss) = &stbl.stss {
        for &k in &stss.entries {
            if let Some(slot) = (k as usize).checked_sub(1).and_then(|i| key.get_mut(i)) {
                *slot = true;
            }
        }
    }
    let mut out = Vec::with_capacity(n);
    let mut dts = 0i64;
    let mut i = 0usize;
    for e in &stbl.stts.entries {
        for _ in 0..e.sample_count {
            out.push(Sample {
                index: i,
                offset: offsets[i],
                size: sizes[i],
                dts,
                pts: dts + cts[i],
                key: key[i],
            });
            dts += e.sample_delta as i64;
            i += 1;
        }
    }
    Ok(out)
}

/// The one edit FFmpeg applies: `(media_time, duration)` in media timescale units; `None`
/// without an edit list (every sample shown).
fn edit_list(trak: &Trak, mvhd: &Mvhd, timescale: i64) -> Result<Option<(i64, i64)>, Skip> {
    let Some(elst) = trak.edts.as_ref().and_then(|e| e.elst.as_ref()) else {
        return Ok(None);
    };
    let mut media = Vec::new();
    for e in &elst.entries {
        match e.media_time {
            None if media.is_empty() => {} // leading empty edit: a start delay only
            None => return unsupported("edit list with an empty edit after media"),
            Some(t) => media.push((t, e.segment_duration)),
        }
    }
    match media.as_slice() {
        [] => Ok(None),
        [(t, d)] => {
            let movie_ts = mvhd.timescale as i128;
            if movie_ts == 0 {
                return unsupported("movie timescale 0");
            }
            let t = i64::try_from(*t).map_err(|_| Skip::Unsupported("edit list".into()))?;
            // av_rescale (round to nearest) of the duration to the media timescale.
            let d = (*d as i128 * timescale as i128 + movie_ts / 2) / movie_ts;
            let d = i64::try_from(d).map_err(|_| Skip::Unsupported("edit list".into()))?;
            if d <= 0 || t.checked_add(d).is_none() {
                return unsupported("edit list of zero duration");
            }
            Ok(Some((t, d)))
        }
        _ => unsupported("edit list with several edits"),
    }
}

/// Which samples to decode and where each picture goes, as FFmpeg's `mov_fix_index` (5.1)
/// arranges them for one edit `(media_time, duration)`: decoding starts at the keyframe at or
/// before the edit start, pictures presented before it or after its end are decoded and
/// dropped. Returns the plan and the number of pictures shown.
fn plan_frames(
    samples: &[Sample],
    edit: Option<(i64, i64)>,
    has_ctts: bool,
) -> (Vec<PlanItem>, usize) {
    let mut items: Vec<(usize, bool)> = Vec::new(); // (sample, shown)
    match edit {
        None => items.extend((0..samples.len()).map(|i| (i, true))),
        Some((start, dur)) => {
            let end = start + dur;
            // FFmpeg's find_prev_closest_index: the last keyframe decoded at or before the
            // start, then (with composition offsets) back to a keyframe presented at or before
            // it; failing that the start of the track (or, without offsets, the last sample
            // decoded before the start).
            let last = samples.partition_point(|s| s.dts <= start);
            let key = (0..last).rev().find(|&i| samples[i].key);
            let first = if has_ctts {
                key.and_then(|k| {
                    (0..=k)
                        .rev()
                        .find(|&i| samples[i].key && samples[i].pts <= start)
                })
                .unwrap_or(0)
            } else {
                key.or(last.checked_sub(1)).unwrap_or(0)
            };
            let mut key_after_end = false;
            for (i, s) in samples.iter().enumerate().skip(first) {
                let duration = samples.get(i + 1).map_or(dur, |n| n.dts - s.dts);
                let shown = s.pts >= start && s.pts < end;
                items.push((i, shown));
                if s.pts + duration >= end && s.key {
                    if has_ctts && !key_after_end {
                        key_after_end = true;
                        continue;
                    }
                    break;
                }
            }
        }
    }
    // Presentation order: by presentation time, decoding order breaking ties.
    let mut shown: Vec<(i64, usize)> = items
        .iter()
        .enumerate()
        .filter(|(_, (_, s))| *s)
        .map(|(pos, &(i, _))| (samples[i].pts, pos))
        .collect();
    shown.sort_unstable();
    let mut rank = vec![None; items.len()];
    for (r, &(_, pos)) in shown.iter().enumerate() {
        rank[pos] = Some(r);
    }
    let plan = items
        .iter()
        .zip(rank)
        .map(|(&(sample, _), rank)| PlanItem { sample, rank })
        .collect();
    (plan, shown.len())
}

/// FFmpeg's rotation of the display matrix (`tkhd` times `mvhd`, as the MOV demuxer builds
/// it): the pixel moves its autorotate makes and the angle ffprobe reports.
fn orientation(tkhd: &mp4_atom::Matrix, mvhd: &mp4_atom::Matrix) -> Result<(Orient, i64), Skip> {
    let t = [
        [tkhd.a, tkhd.b, tkhd.u],
        [tkhd.c, tkhd.d, tkhd.v],
        [tkhd.x, tkhd.y, tkhd.w],
    ];
    let m = [
        [mvhd.a, mvhd.b, mvhd.u],
        [mvhd.c, mvhd.d, mvhd.v],
        [mvhd.x, mvhd.y, mvhd.w],
    ];
    let sh = [16, 16, 30];
    let mut r = [0i32; 9];
    for i in 0..3 {
        for j in 0..3 {
            let mut acc = 0i64;
            for e in 0..3 {
                acc += (t[i][e] as i64 * m[e][j] as i64) >> sh[e];
            }
            r[i * 3 + j] = acc as i32;
        }
    }
    let ident = [1 << 16, 0, 0, 0, 1 << 16, 0, 0, 0, 1 << 30];
    if r == ident {
        return Ok((Orient::Identity, 0));
    }
    // av_display_rotation_get
    let f = |v: i32| v as f64 / 65536.0;
    let scale0 = f(r[0]).hypot(f(r[3]));
    let scale1 = f(r[1]).hypot(f(r[4]));
    if scale0 == 0.0 || scale1 == 0.0 {
        return unsupported("degenerate display matrix");
    }
    let angle = -((f(r[1]) / scale1).atan2(f(r[0]) / scale0) * 180.0 / std::f64::consts::PI);
    // fftools' get_rotation
    let mut theta = -angle.round();
    theta -= 360.0 * (theta / 360.0 + 0.9 / 360.0).floor();
    let orient = if (theta - 90.0).abs() < 1.0 {
        Orient::Transpose(if r[3] > 0 { 0 } else { 1 })
    } else if (theta - 180.0).abs() < 1.0 {
        match (r[0] < 0, r[4] < 0) {
            (true, true) => Orient::HVFlip,
            (true, false) => Orient::HFlip,
            (false, true) => Orient::VFlip,
            (false, false) => Orient::Identity,
        }
    } else if (theta - 270.0).abs() < 1.0 {
        Orient::Transpose(if r[3] < 0 { 3 } else { 2 })
    } else if theta.abs() > 1.0 {
        return unsupported(format!("rotation by {theta} degrees"));
    } else if r[4] < 0 {
        Orient::VFlip
    } else {
        Orient::Identity
    };
    Ok((orient, angle as i64))
}

/// libswscale's `ff_yuv2rgb_coeffs` rows, by colour space (AVColorSpace = H.264
/// `matrix_coefficients`).
const YUV2RGB_COEFFS: [[i64; 4]; 11] = [
    [117489, 138438, 13975, 34925],
    [117489, 138438, 13975, 34925],
    [104597, 132201, 25675, 53279],
    [104597, 132201, 25675, 53279],
    [104448, 132798, 24759, 53109],
    [104597, 132201, 25675, 53279],
    [104597, 132201, 25675, 53279],
    [117579, 136230, 16907, 35559],
    [0, 0, 0, 0],
    [110013, 140363, 12277, 42626],
    [110013, 140363, 12277, 42626],
];

/// The frame's colour space and range as FFmpeg's H.264 decoder sets them (the SPS VUI, else
/// the container's `colr` box) and as `vf_scale` then picks its coefficients.
fn color_params(sps: &Sps, colr: Option<&mp4_atom::Colr>) -> ColorParams {
    let (mut matrix, mut full) = (2u32, None);
    match colr {
        Some(mp4_atom::Colr::Nclx {
            matrix_coefficients,
            full_range_flag,
            ..
        }) => {
            matrix = *matrix_coefficients as u32;
            full = Some(*full_range_flag);
        }
        Some(mp4_atom::Colr::Nclc {
            matrix_coefficients,
            ..
        }) => matrix = *matrix_coefficients as u32,
        _ => {}
    }
    if matrix > 14 {
        matrix = 2; // not a colour space FFmpeg names: unspecified
    }
    if let Some(f) = sps.full_range {
        full = Some(f);
    }
    if let Some(m) = sps.matrix_coefficients {
        matrix = m;
    }
    // vf_scale's parse_yuv_type("auto", colorspace)
    if !(1..=10).contains(&matrix) || matrix == 8 {
        matrix = 5;
    }
    ColorParams {
        inv_table: YUV2RGB_COEFFS[matrix as usize],
        full_range: full.unwrap_or(false),
    }
}

// ---------------------------------------------------------------------------------------------
// H.264 bitstream
// ---------------------------------------------------------------------------------------------

/// Rewrite AVCC (NAL units each behind a `length_size`-byte big-endian length) as Annex B
/// (each behind a `00 00 00 01` start code), appending to `out`.
fn avcc_to_annexb(sample: &[u8], length_size: usize, out: &mut Vec<u8>) -> Result<(), String> {
    let mut pos = 0usize;
    while pos < sample.len() {
        let Some(head) = sample.get(pos..pos + length_size) else {
            return Err("cut NAL unit length".into());
        };
        let len = head.iter().fold(0usize, |acc, &b| (acc << 8) | b as usize);
        pos += length_size;
        let Some(nal) = sample.get(pos..pos.saturating_add(len)) else {
            return Err(format!(
                "NAL unit of {len} bytes overruns the sample ({} bytes)",
                sample.len()
            ));
        };
        if !nal.is_empty() {
            out.extend_from_slice(&[0, 0, 0, 1]);
            out.extend_from_slice(nal);
        }
        pos += len;
    }
    Ok(())
}

/// A NAL unit's payload without emulation prevention bytes (`00 00 03` -> `00 00`).
fn unescape_rbsp(nal: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(nal.len());
    let mut zeros = 0;
    for &b in nal {
        if zeros >= 2 && b == 3 {
            zeros = 0;
            continue;
        }
        zeros = if b == 0 { zeros + 1 } else { 0 };
        out.push(b);
    }
    out
}

/// Reads bits and Exp-Golomb codes from an RBSP.
struct Bits<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Bits<'_> {
    fn bit(&mut self) -> Result<u32, String> {
        let byte = self
            .data
            .get(self.pos / 8)
            .ok_or_else(|| "cut short".to_string())?;
        let b = (byte >> (7 - self.pos % 8)) & 1;
        self.pos += 1;
        Ok(b as u32)
    }
    fn bits(&mut self, n: u32) -> Result<u32, String> {
        let mut v = 0;
        for _ in 0..n {
            v = (v << 1) | self.bit()?;
        }
        Ok(v)
    }
    fn flag(&mut self) -> Result<bool, String> {
        Ok(self.bit()? == 1)
    }
    fn ue(&mut self) -> Result<u32, String> {
        let mut zeros = 0;
        while self.bit()? == 0 {
            zeros += 1;
            if zeros > 31 {
                return Err("bad Exp-Golomb code".into());
            }
        }
        Ok(((1u64 << zeros) - 1 + self.bits(zeros)? as u64) as u32)
    }
    fn se(&mut self) -> Result<i32, String> {
        let k = self.ue()? as i64;
        Ok(if k % 2 == 1 { (k + 1) / 2 } else { -(k / 2) } as i32)
    }
}

/// What this module needs of a sequence parameter set.
#[derive(Debug, Clone, PartialEq)]
struct Sps {
    profile_idc: u8,
    constraint_flags: u8,
    chroma_format_idc: u32,
    bit_depth_luma: u32,
    bit_depth_chroma: u32,
    transform_bypass: bool,
    frame_mbs_only: bool,
    crop_left: u32,
    /// Cropped picture size.
    width: usize,
    height: usize,
    /// VUI `video_full_range_flag` when the video signal type is present.
    full_range: Option<bool>,
    /// VUI `matrix_coefficients` when the colour description is present.
    matrix_coefficients: Option<u32>,
}

fn parse_sps(nal: &[u8]) -> Result<Sps, String> {
    if nal.first().map(|b| b & 0x1f) != Some(7) {
        return Err("not an SPS NAL unit".into());
    }
    let rbsp = unescape_rbsp(&nal[1..]);
    let mut r = Bits {
        data: &rbsp,
        pos: 0,
    };
    let profile_idc = r.bits(8)? as u8;
    let constraint_flags = r.bits(8)? as u8;
    let _level = r.bits(8)?;
    let _id = r.ue()?;
    let (mut chroma_format_idc, mut bit_depth_luma, mut bit_depth_chroma) = (1, 8, 8);
    let mut transform_bypass = false;
    if matches!(
        profile_idc,
        100 | 110 | 122 | 244 | 44 | 83 | 86 | 118 | 128 | 138 | 139 | 134 | 135
    ) {
        chroma_format_idc = r.ue()?;
        if chroma_format_idc == 3 {
            let _separate_colour_planes = r.flag()?;
        }
        bit_depth_luma = r.ue()? + 8;
        bit_depth_chroma = r.ue()? + 8;
        transform_bypass = r.flag()?;
        if r.flag()? {
            let lists = if chroma_format_idc == 3 { 12 } else { 8 };
            for i in 0..lists {
                if r.flag()? {
                    let size = if i < 6 { 16 } else { 64 };
                    let (mut last, mut next) = (8i32, 8i32);
                    for _ in 0..size {
                        if next != 0 {
                            next = (last + r.se()? + 256).rem_euclid(256);
                        }
                        if next != 0 {
                            last = next;
                        }
                    }
                }
            }
        }
    }
    let _log2_max_frame_num = r.ue()?;
    match r.ue()? {
        0 => {
            let _log2_max_poc_lsb = r.ue()?;
        }
        1 => {
            let _delta_always_zero = r.flag()?;
            let _offset_non_ref = r.se()?;
            let _offset_top_bottom = r.se()?;
            let n = r.ue()?;
            if n > 255 {
                return Err("bad POC cycle".into());
            }
            for _ in 0..n {
                r.se()?;
            }
        }
        _ => {}
    }
    let _max_refs = r.ue()?;
    let _gaps = r.flag()?;
    let width_mbs = r.ue()? as usize + 1;
    let height_units = r.ue()? as usize + 1;
    let frame_mbs_only = r.flag()?;
    if !frame_mbs_only {
        let _mbaff = r.flag()?;
    }
    let _direct_8x8 = r.flag()?;
    let mut crop = [0u32; 4];
    if r.flag()? {
        for c in &mut crop {
            *c = r.ue()?;
        }
    }
    let (mut full_range, mut matrix_coefficients) = (None, None);
    if r.flag()? {
        if r.flag()? && r.bits(8)? == 255 {
            r.bits(32)?; // sar
        }
        if r.flag()? {
            r.flag()?; // overscan_appropriate
        }
        if r.flag()? {
            let _video_format = r.bits(3)?;
            full_range = Some(r.flag()?);
            if r.flag()? {
                let _primaries = r.bits(8)?;
                let _transfer = r.bits(8)?;
                matrix_coefficients = Some(r.bits(8)?);
            }
        }
    }
    let (sub_w, sub_h) = match chroma_format_idc {
        1 => (2, 2),
        2 => (2, 1),
        _ => (1, 1),
    };
    let unit_x = if chroma_format_idc == 0 { 1 } else { sub_w };
    let unit_y = (if chroma_format_idc == 0 { 1 } else { sub_h }) * (2 - frame_mbs_only as usize);
    let full_w = width_mbs.saturating_mul(16);
    let full_h = height_units.saturating_mul(16 * (2 - frame_mbs_only as usize));
    let crop_w = (crop[0] as usize)
        .saturating_add(crop[1] as usize)
        .saturating_mul(unit_x);
    let crop_h = (crop[2] as usize)
        .saturating_add(crop[3] as usize)
        .saturating_mul(unit_y);
    if crop_w >= full_w || crop_h >= full_h || full_w > MAX_DIM || full_h > MAX_DIM {
        return Err("bad picture size".into());
    }
    Ok(Sps {
        profile_idc,
        constraint_flags,
        chroma_format_idc,
        bit_depth_luma,
        bit_depth_chroma,
        transform_bypass,
        frame_mbs_only,
        crop_left: crop[0],
        width: full_w - crop_w,
        height: full_h - crop_h,
        full_range,
        matrix_coefficients,
    })
}

impl Sps {
    /// ffprobe's name of the profile.
    fn profile_name(&self) -> &'static str {
        let c1 = self.constraint_flags & 0x40 != 0;
        let c3 = self.constraint_flags & 0x10 != 0;
        match self.profile_idc {
            66 if c1 => "Constrained Baseline",
            66 => "Baseline",
            77 => "Main",
            88 => "Extended",
            100 => "High",
            110 if c3 => "High 10 Intra",
            110 => "High 10",
            122 => "High 4:2:2",
            244 => "High 4:4:4 Predictive",
            44 => "CAVLC 4:4:4",
            _ => "unknown",
        }
    }

    /// Whether OpenH264 and this module decode the stream as FFmpeg does.
    fn check(&self) -> Result<(), Skip> {
        if !matches!(self.profile_idc, 66 | 77 | 100) {
            return unsupported(format!("H.264 profile {}", self.profile_name()));
        }
        if self.chroma_format_idc != 1 || self.bit_depth_luma != 8 || self.bit_depth_chroma != 8 {
            return unsupported("H.264 other than 8-bit 4:2:0");
        }
        if self.transform_bypass {
            return unsupported("lossless H.264");
        }
        if !self.frame_mbs_only {
            return unsupported("interlaced H.264");
        }
        if self.crop_left != 0 {
            // FFmpeg keeps some left-cropped columns for alignment: its frames differ.
            return unsupported("H.264 cropped on the left");
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Decoder
// ---------------------------------------------------------------------------------------------

/// One decoded picture, YUV 4:2:0, planes packed (strides = widths).
#[derive(Debug, Clone, PartialEq)]
struct Yuv {
    w: usize,
    h: usize,
    y: Vec<u8>,
    u: Vec<u8>,
    v: Vec<u8>,
}

impl Yuv {
    fn chroma_size(&self) -> (usize, usize) {
        (self.w.div_ceil(2), self.h.div_ceil(2))
    }

    /// The picture moved as FFmpeg's autorotate filters move it.
    fn oriented(&self, o: Orient) -> Yuv {
        let (cw, ch) = self.chroma_size();
        let (w, h) = match o {
            Orient::Transpose(_) => (self.h, self.w),
            _ => (self.w, self.h),
        };
        Yuv {
            w,
            h,
            y: orient_plane(&self.y, self.w, self.h, o),
            u: orient_plane(&self.u, cw, ch, o),
            v: orient_plane(&self.v, cw, ch, o),
        }
    }
}

/// A `w` x `h` plane moved as `transpose`/`hflip`/`vflip` do.
fn orient_plane(src: &[u8], w: usize, h: usize, o: Orient) -> Vec<u8> {
    let mut out = vec![0u8; w * h];
    match o {
        Orient::Identity => out.copy_from_slice(&src[..w * h]),
        Orient::HFlip | Orient::VFlip | Orient::HVFlip => {
            let (fx, fy) = (o != Orient::VFlip, o != Orient::HFlip);
            for r in 0..h {
                let sr = if fy { h - 1 - r } else { r };
                let row = &src[sr * w..sr * w + w];
                let dst = &mut out[r * w..r * w + w];
                if fx {
                    dst.iter_mut()
                        .zip(row.iter().rev())
                        .for_each(|(d, s)| *d = *s);
                } else {
                    dst.copy_from_slice(row);
                }
            }
        }
        Orient::Transpose(dir) => {
            // vf_transpose: output (r, c), r < w rows, c < h columns, reads input row
            // c (or h-1-c with dir & 1), column r; rows written bottom-up with dir & 2.
            let (ow, oh) = (h, w);
            for r in 0..oh {
                let orow = if dir & 2 != 0 { oh - 1 - r } else { r };
                for c in 0..ow {
                    let irow = if dir & 1 != 0 { h - 1 - c } else { c };
                    out[orow * ow + c] = src[irow * w + r];
                }
            }
        }
    }
    out
}

/// OpenH264, through the `openh264` crate's decoder and its raw entry points (which carry a
/// timestamp per input, the key to put pictures in presentation order).
struct Decoder {
    inner: openh264::decoder::Decoder,
}

impl Decoder {
    fn new() -> Result<Self, String> {
        // Error concealment off (the default config): a damaged picture is an error, not a
        // guess; one decoding thread.
        let config = openh264::decoder::DecoderConfig::new();
        let inner = openh264::decoder::Decoder::with_api_config(
            openh264::OpenH264API::from_source(),
            config,
        )
        .map_err(|e| e.to_string())?;
        Ok(Self { inner })
    }

    /// Decode one access unit (Annex B) tagged `tag` (non-zero); `out` gets each picture
    /// that comes out, with its tag. Errors are OpenH264's decoding state bits.
    fn decode(&mut self, au: &[u8], tag: u64, out: &mut dyn FnMut(u64, Yuv)) -> Result<(), i32> {
        let len = i32::try_from(au.len()).map_err(|_| openh264_sys2::dsInvalidArgument)?;
        let mut dst = [std::ptr::null_mut::<u8>(); 3];
        let mut info = openh264_sys2::SBufferInfo {
            uiInBsTimeStamp: tag,
            ..Default::default()
        };
        // SAFETY: `au` is a live buffer of `len` bytes that OpenH264 only reads during the
        // call; `dst` and `info` are valid for writes. The raw API is the crate's own entry
        // point for this (no decoder option is changed).
        let state = unsafe {
            self.inner.raw_api().decode_frame_no_delay(
                au.as_ptr(),
                len,
                dst.as_mut_ptr(),
                &mut info,
            )
        };
        if info.iBufferStatus == 1 {
            // SAFETY: status 1 means OpenH264 returned a picture in `dst`/`info`, valid until
            // the next call into the decoder.
            if let Some(p) = unsafe { picture(&dst, &info) } {
                out(info.uiOutYuvTimeStamp, p);
            }
        }
        if state != openh264_sys2::dsErrorFree {
            return Err(state);
        }
        Ok(())
    }

    /// Take out every picture OpenH264 still holds (end of stream).
    fn drain(&mut self, out: &mut dyn FnMut(u64, Yuv)) -> Result<(), i32> {
        for _ in 0..64 {
            let mut left: i32 = 0;
            // SAFETY: the option writes one int to `left`.
            unsafe {
                self.inner.raw_api().get_option(
                    openh264_sys2::DECODER_OPTION_NUM_OF_FRAMES_REMAINING_IN_BUFFER,
                    (&mut left as *mut i32).cast(),
                );
            }
            if left <= 0 {
                return Ok(());
            }
            let mut dst = [std::ptr::null_mut::<u8>(); 3];
            let mut info = openh264_sys2::SBufferInfo::default();
            // SAFETY: `dst` and `info` are valid for writes.
            let state = unsafe {
                self.inner
                    .raw_api()
                    .flush_frame(dst.as_mut_ptr(), &mut info)
            };
            if state != openh264_sys2::dsErrorFree {
                return Err(state);
            }
            if info.iBufferStatus != 1 {
                return Ok(());
            }
            // SAFETY: as in `decode`.
            if let Some(p) = unsafe { picture(&dst, &info) } {
                out(info.uiOutYuvTimeStamp, p);
            }
        }
        Ok(())
    }
}

/// Copy the picture OpenH264 returned into a [`Yuv`].
///
/// # Safety
/// `dst` and `info` must be what a decoding call just returned with `iBufferStatus == 1`:
/// three plane pointers to (cropped) pictures of `iWidth` x `iHeight` luma samples with
/// strides `iStride`, valid until the next call into the decoder.
unsafe fn picture(dst: &[*mut u8; 3], info: &openh264_sys2::SBufferInfo) -> Option<Yuv> {
    // SAFETY: the union's one member is the system buffer OpenH264 filled in.
    let buf = unsafe { info.UsrData.sSystemBuffer };
    let (w, h) = (buf.iWidth, buf.iHeight);
    let (sy, sc) = (buf.iStride[0], buf.iStride[1]);
    if dst.iter().any(|p| p.is_null()) || w <= 0 || h <= 0 || sy < w || sc < (w + 1) / 2 {
        return None;
    }
    let (w, h, sy, sc) = (w as usize, h as usize, sy as usize, sc as usize);
    let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
    let plane = |p: *mut u8, pw: usize, ph: usize, stride: usize| {
        let mut out = Vec::with_capacity(pw * ph);
        for r in 0..ph {
            // SAFETY: row `r` of a plane of `ph` rows of `stride` >= `pw` bytes (the caller's
            // contract), read before the decoder is called again.
            out.extend_from_slice(unsafe { std::slice::from_raw_parts(p.add(r * stride), pw) });
        }
        out
    };
    Some(Yuv {
        w,
        h,
        y: plane(dst[0], w, h, sy),
        u: plane(dst[1], cw, ch, sc),
        v: plane(dst[2], cw, ch, sc),
    })
}

// ---------------------------------------------------------------------------------------------
// YUV -> RGB, as libswscale (FFmpeg 5.1, x86-64)
// ---------------------------------------------------------------------------------------------

/// Converts decoded pictures to RGB24 frames.
enum Converter {
    /// Same size: libswscale's SSSE3 `yuv420_rgb24` (its unscaled converter).
    Direct(Box<SimdCoeffs>),
    /// Resize: libswscale's scaler with `flags=bilinear`.
    Scaled(Box<Scaler>),
}

impl Converter {
    fn convert(&mut self, yuv: &Yuv) -> Frame {
        match self {
            Converter::Direct(c) => c.convert(yuv),
            Converter::Scaled(s) => s.convert(yuv),
        }
    }
}

/// libswscale's `roundToInt16`: `f / 65536` rounded, as the int16 lanes hold it.
fn round_to_i16(f: i64) -> i16 {
    let r = (f + (1 << 15)) >> 16;
    r.clamp(-0x8000, 0x7fff) as i16
}

/// The coefficients `ff_yuv2rgb_c_init_tables` derives from a colour matrix and range (no
/// brightness, contrast or saturation change): `(cy, oy, crv, cbu, cgu, cgv)`.
fn base_coeffs(c: ColorParams) -> (i64, i64, i64, i64, i64, i64) {
    let [mut crv, mut cbu, cgu, cgv] = c.inv_table;
    let (mut cgu, mut cgv) = (-cgu, -cgv);
    let (mut cy, mut oy) = (1i64 << 16, 0i64);
    if c.full_range {
        crv = crv * 224 / 255;
        cbu = cbu * 224 / 255;
        cgu = cgu * 224 / 255;
        cgv = cgv * 224 / 255;
    } else {
        cy = cy * 255 / 219;
        oy = 16 << 16;
    }
    (cy, oy, crv, cbu, cgu, cgv)
}

/// The 16-bit coefficients of libswscale's x86 `yuv420_rgb24` routines.
#[derive(Debug, Clone, Copy)]
struct SimdCoeffs {
    /// Per-value terms: `y` of luma, `vr`/`vg` of V, `ub`/`ug` of U (all in pixel units).
    y: [i16; 256],
    vr: [i16; 256],
    vg: [i16; 256],
    ub: [i16; 256],
    ug: [i16; 256],
}

impl SimdCoeffs {
    fn new(c: ColorParams) -> Self {
        let (cy, oy, crv, cbu, cgu, cgv) = base_coeffs(c);
        let y_coeff = round_to_i16(cy * (1 << 13)) as i32;
        let vr_coeff = round_to_i16(crv * (1 << 13)) as i32;
        let ub_coeff = round_to_i16(cbu * (1 << 13)) as i32;
        let vg_coeff = round_to_i16(cgv * (1 << 13)) as i32;
        let ug_coeff = round_to_i16(cgu * (1 << 13)) as i32;
        let y_offset = round_to_i16(oy * (1 << 3));
        // pmulhw: the high 16 bits of the signed product.
        let mulhi = |a: i16, b: i32| ((a as i32 * b) >> 16) as i16;
        let mut s = SimdCoeffs {
            y: [0; 256],
            vr: [0; 256],
            vg: [0; 256],
            ub: [0; 256],
            ug: [0; 256],
        };
        for i in 0..256usize {
            // psllw 3, then psubw the offset (luma) or psubsw 128 << 3 (chroma).
            let y8 = ((i as i16) << 3).wrapping_sub(y_offset);
            let c8 = ((i as i16) << 3) - 1024;
            s.y[i] = mulhi(y8, y_coeff);
            s.vr[i] = mulhi(c8, vr_coeff);
            s.vg[i] = mulhi(c8, vg_coeff);
            s.ub[i] = mulhi(c8, ub_coeff);
            s.ug[i] = mulhi(c8, ug_coeff);
        }
        s
    }

    fn convert(&self, yuv: &Yuv) -> Frame {
        let (w, h) = (yuv.w, yuv.h);
        let (cw, _) = yuv.chroma_size();
        let mut data = vec![0u8; w * h * 3];
        // The chroma terms of the current chroma row: R (V), G (U and V), B (U).
        let mut chroma = vec![[0i16; 3]; cw];
        let clip = |x: i16| x.clamp(0, 255) as u8;
        for (r, out) in data.chunks_exact_mut(w * 3).enumerate() {
            if r % 2 == 0 {
                let (us, vs) = (&yuv.u[(r / 2) * cw..][..cw], &yuv.v[(r / 2) * cw..][..cw]);
                for ((c, &u), &v) in chroma.iter_mut().zip(us).zip(vs) {
                    let (u, v) = (u as usize, v as usize);
                    *c = [
                        self.vr[v],
                        self.ug[u].saturating_add(self.vg[v]),
                        self.ub[u],
                    ];
                }
            }
            let ys = &yuv.y[r * w..][..w];
            for ((px2, y2), c) in out.chunks_mut(6).zip(ys.chunks(2)).zip(&chroma) {
                for (px, &y) in px2.chunks_exact_mut(3).zip(y2) {
                    // paddsw, then packuswb.
                    let yv = self.y[y as usize];
                    px[0] = clip(yv.saturating_add(c[0]));
                    px[1] = clip(yv.saturating_add(c[1]));
                    px[2] = clip(yv.saturating_add(c[2]));
                }
            }
        }
        Frame {
            width: w,
            height: h,
            data,
        }
    }
}

/// A libswscale filter: for output `i`, `coef[i*size..][..size]` on inputs from `pos[i]`.
#[derive(Debug, Clone, PartialEq)]
struct Filter {
    size: usize,
    pos: Vec<i32>,
    coef: Vec<i16>,
}

/// `av_log2` for a non-negative value (0 for 0).
fn av_log2(x: i64) -> i64 {
    if x <= 1 {
        0
    } else {
        63 - x.leading_zeros() as i64
    }
}

/// C's `ROUNDED_DIV`.
fn rounded_div(a: i64, b: i64) -> i64 {
    if a >= 0 {
        (a + (b >> 1)) / b
    } else {
        (a - (b >> 1)) / b
    }
}

/// libswscale's `initFilter` for `SWS_BILINEAR` (FFmpeg 5.1), x86 alignment, no source or
/// destination vectors, positions `pos` (1/256 pixel, 128 = centred) on both sides.
fn init_filter(
    x_inc: i64,
    src_w: i64,
    dst_w: i64,
    mut align: i64,
    one: i64,
    pos: i64,
) -> Result<Filter, String> {
    let fone: i64 = 1 << (54 - av_log2(src_w / dst_w).min(8));
    let dw = dst_w as usize;
    let (mut fsize, mut filter, mut fpos): (i64, Vec<i64>, Vec<i64>);
    if (x_inc - 0x10000).abs() < 10 {
        fsize = 1;
        filter = vec![fone; dw];
        fpos = (0..dst_w).collect();
    } else {
        let size_factor = 2; // bilinear
        fsize = if x_inc <= 1 << 16 {
            1 + size_factor
        } else {
            1 + (size_factor * src_w + dst_w - 1) / dst_w
        };
        fsize = fsize.min(src_w - 2).max(1);
        let fs = fsize as usize;
        filter = vec![0; dw * fs];
        fpos = vec![0; dw];
        let mut x_dst_in_src = ((pos * x_inc) >> 7) - ((pos * 0x10000) >> 7);
        for i in 0..dw {
            let xx0 = (x_dst_in_src - (fsize - 2) * (1 << 16)) / (1 << 17);
            fpos[i] = xx0;
            for (j, xx) in (xx0..xx0 + fsize).enumerate() {
                let mut d = (xx * (1 << 17) - x_dst_in_src).abs() << 13;
                if x_inc > 1 << 16 {
                    d = d * dst_w / src_w;
                }
                let coeff = ((1i64 << 30) - d).max(0) * (fone >> 30);
                filter[i * fs + j] = coeff;
            }
            x_dst_in_src += 2 * x_inc;
        }
    }
    // Reduce: drop near-zero coefficients on the left (moving the start) and count those on
    // the right.
    let f2 = fsize as usize;
    let cutoff = 0.002 * fone as f64;
    let mut min_size = 0usize;
    for i in (0..dw).rev() {
        let mut min = f2;
        let mut cut = 0i64;
        for _ in 0..f2 {
            cut += filter[i * f2].abs();
            if cut as f64 > cutoff {
                break;
            }
            if i < dw - 1 && fpos[i] >= fpos[i + 1] {
                break;
            }
            filter.copy_within(i * f2 + 1..i * f2 + f2, i * f2);
            filter[i * f2 + f2 - 1] = 0;
            fpos[i] += 1;
        }
        cut = 0;
        for j in (1..f2).rev() {
            cut += filter[i * f2 + j].abs();
            if cut as f64 > cutoff {
                break;
            }
            min -= 1;
        }
        min_size = min_size.max(min);
    }
    if min_size == 1 && align == 2 {
        align = 1;
    }
    let size = ((min_size as i64 + align - 1) & !(align - 1)) as usize;
    if size >= 256 {
        return Err("scaling filter too long".into());
    }
    let mut f = vec![0i64; dw * size];
    for i in 0..dw {
        for j in 0..size.min(f2) {
            f[i * size + j] = filter[i * f2 + j];
        }
    }
    // Fix borders.
    for i in 0..dw {
        let row = &mut f[i * size..(i + 1) * size];
        if fpos[i] < 0 {
            for j in 1..size {
                let left = (j as i64 + fpos[i]).max(0) as usize;
                row[left] += row[j];
                row[j] = 0;
            }
            fpos[i] = 0;
        }
        if fpos[i] + size as i64 > src_w {
            let shift = fpos[i] + (size as i64 - src_w).min(0);
            let mut acc = 0;
            for j in (0..size).rev() {
                if fpos[i] + j as i64 >= src_w {
                    acc += row[j];
                    row[j] = 0;
                }
            }
            for j in (0..size).rev() {
                row[j] = if (j as i64) < shift {
                    0
                } else {
                    row[j - shift as usize]
                };
            }
            fpos[i] -= shift;
            row[(src_w - 1 - fpos[i]) as usize] += acc;
        }
    }
    // Normalize to `one`, carrying the rounding error along the row.
    let mut coef = vec![0i16; dw * size];
    for i in 0..dw {
        let row = &f[i * size..(i + 1) * size];
        let mut sum: i64 = row.iter().sum();
        sum = (sum + one / 2) / one;
        if sum == 0 {
            sum = 1;
        }
        let mut error = 0i64;
        for j in 0..size {
            let v = row[j] + error;
            let int_v = rounded_div(v, sum);
            coef[i * size + j] = int_v as i16;
            error = v - int_v * sum;
        }
    }
    Ok(Filter {
        size,
        pos: fpos.into_iter().map(|p| p as i32).collect(),
        coef,
    })
}

/// The RGB tables of `ff_yuv2rgb_c_init_tables` for 24-bit output: a pixel's R is
/// `y_table[r_off[V] + Y]`, G `y_table[gu_off[U] + gv[V] + Y]`, B `y_table[b_off[U] + Y]`
/// (V, U, Y the 8-bit results of the vertical pass, offset by the headroom).
struct RgbTables {
    y_table: Vec<u8>,
    r_off: Vec<i64>,
    gu_off: Vec<i64>,
    gv: Vec<i64>,
    b_off: Vec<i64>,
}

const HEADROOM: i64 = 512;

impl RgbTables {
    fn new(c: ColorParams) -> Self {
        let (cy, oy, crv, cbu, cgu, cgv) = base_coeffs(c);
        let yoffs = if c.full_range { 384 } else { 326 } + HEADROOM;
        let plane = 1024 + 2 * HEADROOM;
        let div = cy.max(1);
        let (crv, cbu, cgu, cgv) = (
            (crv * (1 << 16) + 0x8000) / div,
            (cbu * (1 << 16) + 0x8000) / div,
            (cgu * (1 << 16) + 0x8000) / div,
            (cgv * (1 << 16) + 0x8000) / div,
        );
        let mut yb = -(384i64 << 16) - HEADROOM * cy - oy;
        let mut y_table = vec![0u8; plane as usize];
        for v in &mut y_table {
            *v = ((yb + 0x8000) >> 16).clamp(0, 255) as u8;
            yb += cy;
        }
        let n = (256 + 2 * HEADROOM) as usize;
        let entry = |inc: i64, i: usize| ((i as i64 - HEADROOM).clamp(0, 255) * inc) >> 16;
        let table =
            |inc: i64| -> Vec<i64> { (0..n).map(|i| yoffs - (inc >> 9) + entry(inc, i)).collect() };
        RgbTables {
            r_off: table(crv),
            gu_off: table(cgu),
            b_off: table(cbu),
            gv: (0..n).map(|i| -(cgv >> 9) + entry(cgv, i)).collect(),
            y_table,
        }
    }

    /// Two pixels sharing chroma (`yuv2rgb_write` for RGB24).
    #[inline(always)]
    fn put(&self, out: &mut [u8], y1: i32, y2: i32, u: i32, v: i32) {
        let idx = |c: i32| (c as i64 + HEADROOM).clamp(0, 256 + 2 * HEADROOM - 1) as usize;
        let (vi, ui) = (idx(v), idx(u));
        let (r, g, b) = (
            self.r_off[vi],
            self.gu_off[ui] + self.gv[vi],
            self.b_off[ui],
        );
        let last = self.y_table.len() as i64 - 1;
        let at = |base: i64, y: i32| self.y_table[(base + y as i64).clamp(0, last) as usize];
        out[0] = at(r, y1);
        out[1] = at(g, y1);
        out[2] = at(b, y1);
        if out.len() >= 6 {
            out[3] = at(r, y2);
            out[4] = at(g, y2);
            out[5] = at(b, y2);
        }
    }
}

/// libswscale's yuv420p -> rgb24 scaler with `SWS_BILINEAR` (as `scale=W:H:flags=bilinear`
/// sets it up in FFmpeg 5.1): horizontal pass to 15 bits, vertical pass to 8 bits, RGB
/// tables; chroma at half the output width.
struct Scaler {
    src: (usize, usize),
    dst: (usize, usize),
    h_lum: Filter,
    h_chr: Filter,
    v_lum: Filter,
    v_chr: Filter,
    chr_src: (usize, usize),
    chr_dst_w: usize,
    tables: RgbTables,
    /// Horizontally scaled rows: luma `src.1 x dst.0`, chroma `chr_src.1 x chr_dst_w`.
    lum: Vec<i16>,
    cu: Vec<i16>,
    cv: Vec<i16>,
}

impl Scaler {
    fn new(src: (usize, usize), dst: (usize, usize), color: ColorParams) -> Result<Self, String> {
        let (sw, sh) = (src.0 as i64, src.1 as i64);
        let (dw, dh) = (dst.0 as i64, dst.1 as i64);
        if sw < 4 || sh < 4 || dw < 2 || dh < 1 {
            return Err(format!(
                "cannot resize {}x{} to {}x{}",
                src.0, src.1, dst.0, dst.1
            ));
        }
        let (csw, csh) = ((sw + 1) >> 1, (sh + 1) >> 1);
        let (cdw, cdh) = ((dw + 1) >> 1, dh);
        let inc = |s: i64, d: i64| ((s << 16) + (d >> 1)) / d;
        // Horizontal filters align to 4 taps, vertical to 2 (x86); 128 = centred samples.
        let h_lum = init_filter(inc(sw, dw), sw, dw, 4, 1 << 14, 128)?;
        let h_chr = init_filter(inc(csw, cdw), csw, cdw, 4, 1 << 14, 128)?;
        let v_lum = init_filter(inc(sh, dh), sh, dh, 2, 1 << 12, 128)?;
        let v_chr = init_filter(inc(csh, cdh), csh, cdh, 2, 1 << 12, 128)?;
        Ok(Scaler {
            src,
            dst,
            h_lum,
            h_chr,
            v_lum,
            v_chr,
            chr_src: (csw as usize, csh as usize),
            chr_dst_w: cdw as usize,
            tables: RgbTables::new(color),
            lum: vec![0; src.1 * dst.0],
            cu: vec![0; csh as usize * cdw as usize],
            cv: vec![0; csh as usize * cdw as usize],
        })
    }

    /// `hScale8To15`: one row through a horizontal filter.
    fn hscale(f: &Filter, src: &[u8], dst: &mut [i16]) {
        let last = src.len() - 1;
        for ((d, taps), &p) in dst.iter_mut().zip(f.coef.chunks_exact(f.size)).zip(&f.pos) {
            let p = p as usize;
            let val: i32 = match src.get(p..p + f.size) {
                Some(px) => px
                    .iter()
                    .zip(taps)
                    .map(|(&s, &c)| s as i32 * c as i32)
                    .sum(),
                // Only where the filter is longer than the row: those taps are zero.
                None => (0..f.size)
                    .map(|j| src[(p + j).min(last)] as i32 * taps[j] as i32)
                    .sum(),
            };
            *d = (val >> 7).min((1 << 15) - 1) as i16;
        }
    }

    fn convert(&mut self, yuv: &Yuv) -> Frame {
        let (sw, sh) = self.src;
        let (dw, dh) = self.dst;
        let (csw, csh) = self.chr_src;
        let cdw = self.chr_dst_w;
        for r in 0..sh {
            Self::hscale(
                &self.h_lum,
                &yuv.y[r * sw..(r + 1) * sw],
                &mut self.lum[r * dw..(r + 1) * dw],
            );
        }
        for r in 0..csh {
            let (src_u, src_v) = (
                &yuv.u[r * csw..(r + 1) * csw],
                &yuv.v[r * csw..(r + 1) * csw],
            );
            Self::hscale(&self.h_chr, src_u, &mut self.cu[r * cdw..(r + 1) * cdw]);
            Self::hscale(&self.h_chr, src_v, &mut self.cv[r * cdw..(r + 1) * cdw]);
        }
        let mut data = vec![0u8; dw * dh * 3];
        let (lf, cf) = (&self.v_lum, &self.v_chr);
        let lum_row = |k: usize| &self.lum[k.min(sh - 1) * dw..][..dw];
        let cu_row = |k: usize| &self.cu[k.min(csh - 1) * cdw..][..cdw];
        let cv_row = |k: usize| &self.cv[k.min(csh - 1) * cdw..][..cdw];
        for (y, out) in data.chunks_exact_mut(dw * 3).enumerate() {
            let (lp, cp) = (lf.pos[y] as usize, cf.pos[y] as usize);
            let lc = &lf.coef[y * lf.size..(y + 1) * lf.size];
            let cc = &cf.coef[y * cf.size..(y + 1) * cf.size];
            let sums = |c: &[i16]| c.len() == 2 && c[0] as u16 as u32 + c[1] as u16 as u32 == 4096;
            if lf.size == 1 && (cf.size == 1 || sums(cc)) {
                // yuv2rgb24_1: unscaled luma.
                let (y0, u0, v0) = (lum_row(lp), cu_row(cp), cv_row(cp));
                let uvalpha = if cf.size == 1 { 0 } else { cc[1] as u16 as i32 };
                let (u1, v1) = (cu_row(cp + 1), cv_row(cp + 1));
                for (i, px) in out.chunks_mut(6).enumerate() {
                    let y1 = (y0[2 * i] as i32 + 64) >> 7;
                    let y2 = y0.get(2 * i + 1).map_or(0, |&v| (v as i32 + 64) >> 7);
                    let (u, v) = if uvalpha < 2048 {
                        ((u0[i] as i32 + 64) >> 7, (v0[i] as i32 + 64) >> 7)
                    } else {
                        (
                            (u0[i] as i32 + u1[i] as i32 + 128) >> 8,
                            (v0[i] as i32 + v1[i] as i32 + 128) >> 8,
                        )
                    };
                    self.tables.put(px, y1, y2, u, v);
                }
            } else if sums(lc) && sums(cc) {
                // yuv2rgb24_2: two-tap vertical filters.
                let (ya, yb) = (lc[1] as i32, 4096 - lc[1] as i32);
                let (ca, cb) = (cc[1] as i32, 4096 - cc[1] as i32);
                let (y0, y1r) = (lum_row(lp), lum_row(lp + 1));
                let (u0, u1, v0, v1) = (cu_row(cp), cu_row(cp + 1), cv_row(cp), cv_row(cp + 1));
                for (i, px) in out.chunks_mut(6).enumerate() {
                    let yv = |k: usize| {
                        (y0.get(k).map_or(0, |&v| v as i32) * yb
                            + y1r.get(k).map_or(0, |&v| v as i32) * ya)
                            >> 19
                    };
                    let u = (u0[i] as i32 * cb + u1[i] as i32 * ca) >> 19;
                    let v = (v0[i] as i32 * cb + v1[i] as i32 * ca) >> 19;
                    self.tables.put(px, yv(2 * i), yv(2 * i + 1), u, v);
                }
            } else {
                // yuv2rgb24_X: general vertical filters.
                for (i, px) in out.chunks_mut(6).enumerate() {
                    let (mut y1, mut y2, mut u, mut v) =
                        (1i32 << 18, 1i32 << 18, 1i32 << 18, 1i32 << 18);
                    for (j, &c) in lc.iter().enumerate() {
                        let row = lum_row(lp + j);
                        y1 += row[2 * i] as i32 * c as i32;
                        y2 += row.get(2 * i + 1).map_or(0, |&v| v as i32) * c as i32;
                    }
                    for (j, &c) in cc.iter().enumerate() {
                        u += cu_row(cp + j)[i] as i32 * c as i32;
                        v += cv_row(cp + j)[i] as i32 * c as i32;
                    }
                    self.tables.put(px, y1 >> 19, y2 >> 19, u >> 19, v >> 19);
                }
            }
        }
        Frame {
            width: dw,
            height: dh,
            data,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BT601: ColorParams = ColorParams {
        inv_table: YUV2RGB_COEFFS[5],
        full_range: false,
    };

    /// FNV-1a, to compare frames with FFmpeg's output without storing it.
    fn fnv(data: impl IntoIterator<Item = u8>) -> u64 {
        data.into_iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        })
    }

    fn fixture(rel: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
    }

    #[test]
    fn avcc_becomes_annex_b() {
        let mut out = vec![9];
        avcc_to_annexb(
            &[0, 0, 0, 3, 0x65, 1, 2, 0, 0, 0, 0, 0, 0, 0, 1, 0x41],
            4,
            &mut out,
        )
        .expect("well-formed sample");
        assert_eq!(out, [9, 0, 0, 0, 1, 0x65, 1, 2, 0, 0, 0, 1, 0x41]);
        out.clear();
        avcc_to_annexb(&[0, 2, 0x67, 7, 0, 1, 0x68], 2, &mut out).expect("2-byte lengths");
        assert_eq!(out, [0, 0, 0, 1, 0x67, 7, 0, 0, 0, 1, 0x68]);
        assert!(avcc_to_annexb(&[0, 0, 0, 9, 0x65, 1], 4, &mut out).is_err());
        assert!(avcc_to_annexb(&[0, 0, 1], 4, &mut out).is_err());
    }

    #[test]
    fn emulation_prevention_bytes_are_removed() {
        assert_eq!(
            unescape_rbsp(&[1, 0, 0, 3, 0, 0, 3, 1, 3]),
            [1, 0, 0, 0, 0, 1, 3]
        );
        assert_eq!(unescape_rbsp(&[0, 3, 0, 0, 3]), [0, 3, 0, 0]);
    }

    #[test]
    fn sps_of_x264_streams() {
        // assets/sample_face.mp4: High, 224x224, no VUI colour information.
        let sps = parse_sps(&[
            0x67, 0x64, 0x00, 0x0c, 0xac, 0xd9, 0x83, 0x87, 0x68, 0x40, 0x00, 0x00, 0x03, 0x00,
            0x40, 0x00, 0x00, 0x0c, 0x83, 0xc5, 0x0a, 0x66, 0x80,
        ])
        .expect("valid SPS");
        assert_eq!(
            (sps.width, sps.height, sps.profile_name()),
            (224, 224, "High")
        );
        assert_eq!((sps.full_range, sps.matrix_coefficients), (None, None));
        assert!(sps.check().is_ok());
        // 226x170: cropped from 240x176.
        let sps = parse_sps(&[
            0x67, 0x64, 0x00, 0x0c, 0xac, 0xd9, 0x43, 0xc5, 0xf8, 0x89, 0x3f, 0xf0, 0x15, 0x40,
            0x15, 0x31, 0x00, 0x00, 0x03, 0x00, 0x01, 0x00, 0x00, 0x03, 0x00, 0x3c, 0x0f, 0x14,
            0x29, 0x96,
        ])
        .expect("valid SPS");
        assert_eq!((sps.width, sps.height), (226, 170));
        // Full range, then BT.709 in the VUI.
        let sps = parse_sps(&[
            0x67, 0x64, 0x00, 0x0d, 0xac, 0xd9, 0x41, 0x41, 0xfb, 0x01, 0x6c, 0x80, 0x00, 0x00,
            0x03, 0x00, 0x80, 0x00, 0x00, 0x1e, 0x07, 0x8a, 0x14, 0xcb,
        ])
        .expect("valid SPS");
        assert_eq!(
            (sps.full_range, sps.matrix_coefficients),
            (Some(true), None)
        );
        let sps = parse_sps(&[
            0x67, 0x64, 0x00, 0x0d, 0xac, 0xd9, 0x41, 0x41, 0xfb, 0x01, 0x6a, 0x02, 0x02, 0x02,
            0x80, 0x00, 0x00, 0x03, 0x00, 0x80, 0x00, 0x00, 0x1e, 0x07, 0x8a, 0x14, 0xcb,
        ])
        .expect("valid SPS");
        assert_eq!(
            (sps.full_range, sps.matrix_coefficients),
            (Some(false), Some(1))
        );
        assert_eq!(color_params(&sps, None).inv_table, YUV2RGB_COEFFS[1]);
        // Constrained Baseline, and interlaced High (refused).
        let sps = parse_sps(&[
            0x67, 0x42, 0xc0, 0x0d, 0xd9, 0x01, 0x41, 0xfb, 0x01, 0x10, 0x00, 0x00, 0x03, 0x00,
            0x10, 0x00, 0x00, 0x03, 0x03, 0xc0, 0xf1, 0x42, 0xa4, 0x80,
        ])
        .expect("valid SPS");
        assert_eq!((sps.width, sps.height), (320, 240));
        assert_eq!(sps.profile_name(), "Constrained Baseline");
        let sps = parse_sps(&[
            0x67, 0x64, 0x00, 0x15, 0xac, 0xd9, 0x41, 0x41, 0x0f, 0xcb, 0x80, 0x88, 0x00, 0x00,
            0x03, 0x00, 0x08, 0x00, 0x00, 0x03, 0x01, 0xe0, 0xf8, 0xa1, 0x4c, 0xb0,
        ])
        .expect("valid SPS");
        assert!(!sps.frame_mbs_only && sps.check().is_err());
        assert!(parse_sps(&[0x67, 0x64]).is_err());
        assert!(parse_sps(&[0x68, 0xee, 0x3c, 0x80]).is_err());
    }

    /// A 16x2 frame through `ffmpeg -f rawvideo -pix_fmt yuv420p -s 16x2 -i - -pix_fmt rgb24`
    /// (FFmpeg 5.1, x86-64): limited and (as yuvj420p) full range.
    #[test]
    fn yuv_to_rgb_as_ffmpeg() {
        let y: Vec<u8> = (0..32).map(|i| (i * 17 % 256) as u8).collect();
        let yuv = Yuv {
            w: 16,
            h: 2,
            y,
            u: vec![0, 40, 90, 128, 128, 170, 220, 255],
            v: vec![255, 200, 128, 60, 128, 20, 100, 0],
        };
        let limited = [
            183, 0, 0, 203, 0, 0, 134, 0, 0, 154, 15, 0, 60, 74, 0, 80, 94, 3, 0, 155, 100, 10,
            174, 119, 139, 139, 139, 159, 159, 159, 6, 249, 255, 26, 255, 255, 173, 203, 255, 193,
            223, 255, 53, 255, 255, 73, 255, 255, 202, 0, 0, 221, 0, 0, 153, 14, 0, 173, 34, 0, 79,
            93, 2, 98, 112, 21, 9, 173, 118, 29, 193, 138, 158, 158, 158, 178, 178, 178, 24, 255,
            255, 44, 255, 255, 192, 222, 255, 212, 242, 255, 72, 255, 255, 0, 52, 254,
        ];
        let full = [
            178, 0, 0, 195, 0, 0, 134, 12, 0, 151, 29, 0, 68, 81, 0, 85, 98, 17, 6, 150, 102, 23,
            167, 119, 136, 136, 136, 153, 153, 153, 18, 232, 244, 35, 249, 255, 164, 191, 255, 181,
            208, 255, 58, 255, 255, 75, 255, 255, 194, 0, 0, 211, 0, 0, 150, 28, 0, 167, 45, 0, 84,
            97, 16, 101, 114, 33, 22, 166, 118, 39, 183, 135, 152, 152, 152, 169, 169, 169, 34,
            248, 255, 51, 255, 255, 180, 207, 255, 197, 224, 255, 74, 255, 255, 0, 62, 240,
        ];
        let f = SimdCoeffs::new(BT601).convert(&yuv);
        assert_eq!((f.width, f.height), (16, 2));
        assert_eq!(f.data, limited);
        let full_range = ColorParams {
            full_range: true,
            ..BT601
        };
        assert_eq!(SimdCoeffs::new(full_range).convert(&yuv).data, full);
    }

    /// A 16x8 frame through FFmpeg's `scale=6:4:flags=bilinear` to rgb24.
    #[test]
    fn resize_as_ffmpeg() {
        let (w, h) = (16usize, 8usize);
        let y = (0..h)
            .flat_map(|r| (0..w).map(move |c| ((c * 13 + r * 29 + (c * r) % 7) % 256) as u8))
            .collect();
        let u = (0..h / 2)
            .flat_map(|r| (0..w / 2).map(move |c| ((c * 31 + r * 17) % 256) as u8))
            .collect();
        let v = (0..h / 2)
            .flat_map(|r| (0..w / 2).map(move |c| ((200 + 256 - c * 23 + r * 41) % 256) as u8))
            .collect();
        let yuv = Yuv { w, h, y, u, v };
        let expected = [
            95, 13, 0, 134, 53, 0, 83, 111, 58, 123, 151, 97, 70, 210, 255, 107, 246, 255, 226, 40,
            0, 255, 81, 0, 212, 134, 157, 252, 174, 196, 148, 182, 255, 96, 130, 255, 65, 218, 20,
            104, 255, 60, 255, 153, 244, 255, 94, 185, 88, 16, 251, 76, 4, 239, 105, 255, 117, 116,
            255, 127, 214, 44, 174, 152, 0, 112, 162, 23, 102, 200, 60, 139,
        ];
        let mut s = Scaler::new((16, 8), (6, 4), BT601).expect("valid sizes");
        let f = s.convert(&yuv);
        assert_eq!((f.width, f.height), (6, 4));
        assert_eq!(f.data, expected);
        assert!(supports_size((224, 224)) && !supports_size((225, 224)));
    }

    #[test]
    fn rotation_moves_planes_as_ffmpeg() {
        let p = [1, 2, 3, 4, 5, 6]; // 3x2
        let t = |dir| orient_plane(&p, 3, 2, Orient::Transpose(dir));
        assert_eq!(t(1), [4, 1, 5, 2, 6, 3]); // clock
        assert_eq!(t(2), [3, 6, 2, 5, 1, 4]); // cclock
        assert_eq!(t(0), [1, 4, 2, 5, 3, 6]); // cclock_flip
        assert_eq!(t(3), [6, 3, 5, 2, 4, 1]); // clock_flip
        assert_eq!(orient_plane(&p, 3, 2, Orient::HFlip), [3, 2, 1, 6, 5, 4]);
        assert_eq!(orient_plane(&p, 3, 2, Orient::VFlip), [4, 5, 6, 1, 2, 3]);
        assert_eq!(orient_plane(&p, 3, 2, Orient::HVFlip), [6, 5, 4, 3, 2, 1]);
        let yuv = Yuv {
            w: 4,
            h: 2,
            y: (0..8).collect(),
            u: vec![10, 11],
            v: vec![20, 21],
        };
        let r = yuv.oriented(Orient::Transpose(1));
        assert_eq!((r.w, r.h, r.u, r.v), (2, 4, vec![10, 11], vec![20, 21]));
    }

    #[test]
    fn display_matrix_rotations() {
        let m = |a: i32, b: i32, c: i32, d: i32| mp4_atom::Matrix {
            a: a << 16,
            b: b << 16,
            u: 0,
            c: c << 16,
            d: d << 16,
            v: 0,
            x: 0,
            y: 0,
            w: 1 << 30,
        };
        let id = m(1, 0, 0, 1);
        let o = |t: &mp4_atom::Matrix| orientation(t, &id).ok();
        assert_eq!(o(&id), Some((Orient::Identity, 0)));
        // A phone video shot upright: ffprobe's rotation -90, autorotate's transpose=clock.
        assert_eq!(o(&m(0, 1, -1, 0)), Some((Orient::Transpose(1), -90)));
        assert_eq!(o(&m(0, -1, 1, 0)), Some((Orient::Transpose(2), 90)));
        assert_eq!(o(&m(-1, 0, 0, -1)), Some((Orient::HVFlip, -180)));
        assert_eq!(o(&m(1, 0, 0, -1)).map(|r| r.0), Some(Orient::VFlip));
        let half = 46341; // 45 degrees
        let odd = mp4_atom::Matrix {
            a: half,
            b: half,
            c: -half,
            d: half,
            ..id
        };
        assert!(o(&odd).is_none());
    }

    fn samples(pts: &[i64], keys: &[usize]) -> Vec<Sample> {
        pts.iter()
            .enumerate()
            .map(|(i, &p)| Sample {
                index: i,
                offset: i as u64,
                size: 1,
                dts: i as i64 * 10,
                pts: p,
                key: keys.contains(&i),
            })
            .collect()
    }

    #[test]
    fn edit_lists_as_ffmpeg() {
        // I P B B P B B (decoding order), B-frames two behind: presentation order by pts.
        let s = samples(&[20, 50, 30, 40, 80, 60, 70], &[0]);
        let (plan, n) = plan_frames(&s, None, true);
        assert_eq!(n, 7);
        let ranks: Vec<_> = plan.iter().map(|p| p.rank).collect();
        assert_eq!(ranks, [0, 3, 1, 2, 6, 4, 5].map(Some));
        // The usual x264 edit (start at the first pts): every frame shown.
        assert_eq!(plan_frames(&s, Some((20, 70)), true).1, 7);
        // Cut at pts 40: decode from the keyframe, drop what precedes the edit.
        let (plan, n) = plan_frames(&s, Some((40, 1000)), true);
        assert_eq!(n, 5);
        assert_eq!(plan.len(), 7);
        assert_eq!(
            (plan[0].rank, plan[2].rank, plan[3].rank),
            (None, None, Some(0))
        );
        // An edit ending early stops after the next keyframes.
        let s = samples(&[0, 10, 20, 30, 40, 50], &[0, 2, 4]);
        let (plan, n) = plan_frames(&s, Some((0, 20)), false);
        assert_eq!((n, plan.len()), (2, 3));
    }

    #[test]
    fn not_mp4_missing_empty_truncated() {
        let dir = tempfile::tempdir().expect("temp dir");
        let put = |name: &str, data: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, data).expect("write temp file");
            p
        };
        let garbage = put("garbage.mp4", b"\x1a\x45\xdf\xa3 matroska or anything else");
        assert!(matches!(inspect_mp4(&garbage), Ok(Mp4Probe::NotMp4)));
        assert!(matches!(
            inspect_mp4(&dir.path().join("none.mp4")),
            Err(VideoError::Missing(_))
        ));
        assert!(matches!(
            inspect_mp4(&put("empty.mp4", b"")),
            Err(VideoError::Empty(_))
        ));
        let ftyp = b"\0\0\0\x14ftypisom\0\0\x02\0isom\0\0\x10\0mdat";
        let e = inspect_mp4(&put("cut.mp4", ftyp)).expect_err("no moov");
        assert!(e.to_string().contains("cut.mp4") && e.to_string().contains("no moov"));
    }

    #[test]
    fn decodes_fixtures_as_ffmpeg() {
        let path = fixture("tests/fixtures/video/h264_10.mp4");
        let v = probe_mp4(&path).expect("readable").expect("H.264 in MP4");
        assert_eq!(
            (v.width, v.height, v.frames, v.output_frames),
            (224, 224, 10, 10)
        );
        assert_eq!((v.fps, v.rotation, v.codec.as_str()), (25.0, 0, "h264"));
        assert_eq!(v.to_info().frames, 10);
        let read_all = |size| {
            let mut r = H264Reader::open(&path, &v, size).expect("opens");
            let mut frames = Vec::new();
            while let Some(f) = r.next_frame().expect("decodes") {
                frames.push(f);
            }
            frames
        };
        // Hashes of `ffmpeg -i h264_10.mp4 [-vf scale=112:112:flags=bilinear] -f rawvideo
        // -pix_fmt rgb24 -vsync passthrough -` (FFmpeg 5.1).
        let frames = read_all(None);
        assert_eq!(frames.len(), 10);
        assert_eq!(
            fnv(frames.iter().flat_map(|f| f.data.iter().copied())),
            0xf2ca_aea0_7af4_f441
        );
        let small = read_all(Some((112, 112)));
        assert_eq!(
            (small.len(), small[0].width, small[0].height),
            (10, 112, 112)
        );
        assert_eq!(
            fnv(small.iter().flat_map(|f| f.data.iter().copied())),
            0xebec_cc57_703f_fd38
        );
        let mut r = H264Reader::open(&path, &v, None).expect("opens");
        assert!(r.skip_frame().expect("decodes"));
        assert_eq!(r.next_frame().expect("decodes"), Some(frames[1].clone()));
        // MPEG-4 Part 2 stays with FFmpeg.
        let mpeg4 = fixture("tests/fixtures/video/mpeg4_20.mp4");
        assert!(matches!(inspect_mp4(&mpeg4), Ok(Mp4Probe::OtherCodec(c)) if c == "mp4v"));
        assert!(probe_mp4(&mpeg4).expect("readable").is_none());
    }

    #[test]
    fn truncated_file_ends_after_its_frames() {
        // assets/sample_face.mp4 keeps its moov in front: cut in the middle of the media data.
        let data = std::fs::read(fixture("assets/sample_face.mp4")).expect("sample video");
        let dir = tempfile::tempdir().expect("temp dir");
        let cut = dir.path().join("cut.mp4");
        std::fs::write(&cut, &data[..data.len() * 2 / 3]).expect("write temp file");
        let v = probe_mp4(&cut).expect("moov is whole").expect("H.264");
        let mut r = H264Reader::open(&cut, &v, None).expect("first frame is there");
        let mut n = 0;
        loop {
            match r.next_frame() {
                Ok(Some(_)) => n += 1,
                Ok(None) => break,
                Err(e) => panic!("a truncated file ends as FFmpeg's stream does: {e}"),
            }
        }
        // As FFmpeg's pipe: the frames whose data is there, then the end.
        assert!(n > 1 && n < v.output_frames, "{n} frames");
    }

    #[test]
    fn reader_can_move_to_a_decoding_thread() {
        fn send<T: Send>() {}
        send::<H264Reader>();
    }
}
