//! The face parsers against hand labels: on 10 face crops of the shared sample videos (talking,
//! mouth open, smiling, eyes closed, a tilted head, the same frame turned 30 degrees), which
//! 16-pixel patches hold the eyes (with brows), nose, mouth and hair
//! (tests/fixtures/face/parse_labels.json, how they were made is in the file). Per region, the
//! patch IoU over all crops of the mesh parser must beat the 5-point template's. Where the
//! samples are absent the test fails under CI and is skipped with a loud line elsewhere.

use marlin::backend::Cpu;
use marlin::face::parse_view::{parse_frame, ParseOptions};
use marlin::face::parser::{ParserKind, Parsing};
use marlin::face::{DetectOptions, Detector};
use marlin::masking::ParsingMap;
use std::collections::BTreeSet;

use crate::common;

/// Fasking's groups as the labels name them.
const REGIONS: [(&str, &[u8]); 4] = [
    ("eyes", &[2, 3, 4, 5]),
    ("nose", &[6]),
    ("mouth", &[7, 8, 9]),
    ("hair", &[10]),
];

/// Patches (row, column) of `map` holding any of `labels`.
fn patches(map: &ParsingMap, labels: &[u8], patch: usize) -> BTreeSet<(usize, usize)> {
    let mut out = BTreeSet::new();
    for y in 0..map.height {
        for x in 0..map.width {
            if labels.contains(&map.labels[y * map.width + x]) {
                out.insert((y / patch, x / patch));
            }
        }
    }
    out
}

#[test]
fn mesh_parser_beats_the_template_on_hand_labels() {
    let Some(dir) = common::samples() else {
        return;
    };
    let text = std::fs::read_to_string(common::face_fixtures().join("parse_labels.json")).unwrap();
    let labels: serde_json::Value = serde_json::from_str(&text).unwrap();
    let dev = Default::default();
    let det = Detector::<Cpu>::new(&dev, DetectOptions::default()).unwrap();
    let mesh = Parsing::<Cpu>::new(ParserKind::Mesh, &dev).unwrap();
    let template = Parsing::<Cpu>::new(ParserKind::Template, &dev).unwrap();
    let parsers = [(ParserKind::Mesh, &mesh), (ParserKind::Template, &template)];
    let tmp = tempfile::tempdir().unwrap();
    // [parser][region] -> (intersection, union) summed over the crops.
    let mut sums = [[(0usize, 0usize); 4]; 2];
    let cases = labels["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 10);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let mut path = dir.join(case["input"].as_str().unwrap());
        let mut frame = case["frame"].as_u64().unwrap() as usize;
        let rotate = case["rotate"].as_u64().unwrap();
        if rotate != 0 {
            let png = tmp.path().join(format!("{name}.png"));
            common::ffmpeg(&[
                "-i",
                path.to_str().unwrap(),
                "-vf",
                &format!("select=eq(n\\,{frame}),rotate={rotate}*PI/180:fillcolor=black"),
                "-frames:v",
                "1",
                png.to_str().unwrap(),
            ]);
            (path, frame) = (png, 0);
        }
        let opts = ParseOptions {
            frame,
            ..Default::default()
        };
        let parsed = parse_frame(&path, &det, &parsers, &opts).unwrap();
        let mut line = format!("{name:>10}:");
        for (p, (kind, map)) in parsed.maps.iter().enumerate() {
            let map = map
                .as_ref()
                .unwrap_or_else(|| panic!("{name}: {kind:?} found no face"));
            for (r, (region, ids)) in REGIONS.iter().enumerate() {
                let truth: BTreeSet<(usize, usize)> = case[*region]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|rc| {
                        let rc = rc.as_array().unwrap();
                        (
                            rc[0].as_u64().unwrap() as usize,
                            rc[1].as_u64().unwrap() as usize,
                        )
                    })
                    .collect();
                assert!(!truth.is_empty(), "{name}: no {region} labels");
                let ours = patches(map, ids, opts.patch);
                let i = ours.intersection(&truth).count();
                let u = ours.union(&truth).count();
                sums[p][r].0 += i;
                sums[p][r].1 += u;
                line += &format!(" {kind:?} {region} {:.2}", i as f64 / u as f64);
            }
        }
        eprintln!("{line}");
    }
    eprintln!("patch IoU over the 10 crops (region: mesh, template)");
    for (r, (region, _)) in REGIONS.iter().enumerate() {
        let iou = |p: usize| sums[p][r].0 as f64 / sums[p][r].1 as f64;
        let (m, t) = (iou(0), iou(1));
        eprintln!("{region:>6}: {m:.3}  {t:.3}");
        assert!(
            m > t,
            "{region}: the mesh parser's IoU {m:.3} is not above the template's {t:.3}"
        );
        assert!(
            m >= 0.5,
            "{region}: the mesh parser's IoU {m:.3} is below 0.5"
        );
    }
}

/// `marlin prepare --smooth 5` smooths the mesh landmarks over the frames as it smooths the
/// boxes: on the shared cropped01 (a talking face, 143 frames) the label maps change less from
/// one frame to the next than without it (measured: 2.8% of pixels against 5.3%), and every
/// frame still has its map.
#[test]
fn prepare_smooths_the_landmarks_over_the_frames() {
    let Some(dir) = common::samples() else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let video = dir.join("cropped01.mp4");
    let change = |extra: &[&str]| -> f64 {
        let out = t.path().join(format!("data{}", extra.len()));
        let mut args = vec![
            "prepare",
            video.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "-q",
        ];
        args.extend_from_slice(extra);
        let o = common::marlin(&args, &[]);
        assert!(o.status.success(), "{}", common::stderr(&o));
        let maps = out.join("face_parsing_images_DB/cropped01");
        let read = |i: usize| -> ndarray::Array2<u8> {
            ndarray_npy::read_npy(maps.join(format!("{i:05}.npy"))).unwrap()
        };
        assert_eq!(std::fs::read_dir(&maps).unwrap().count(), 143);
        let mut prev = read(0);
        let mut changed = 0usize;
        for i in 1..143 {
            let m = read(i);
            changed += m.iter().zip(prev.iter()).filter(|(a, b)| a != b).count();
            prev = m;
        }
        changed as f64 / (142.0 * 224.0 * 224.0)
    };
    let (raw, smoothed) = (change(&[]), change(&["--smooth", "5"]));
    eprintln!("label maps changed between frames: {raw:.4} raw, {smoothed:.4} with --smooth 5");
    assert!(smoothed < 0.8 * raw, "{smoothed} vs {raw}");
}
