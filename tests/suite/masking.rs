//! Masks equal those of a Python implementation of the notes' masking
//! (tools/make_mask_fixtures.py) for the same random draws, on synthetic face-parsing maps:
//! fasking, fasking_opp, random, tube and frame at mask ratios 0.9 and 0.75; every mask keeps
//! exactly floor(N * (1 - ratio)) tokens.

use marlin::masking::{make_mask, visible_count, Draws, Grid, ParsingMap, Strategy};
use serde_json::Value;
use std::collections::VecDeque;
use std::path::Path;

struct Replay {
    permutation: Option<Vec<usize>>,
    trims: VecDeque<Vec<usize>>,
}

impl Draws for Replay {
    fn permutation(&mut self, n: usize) -> Vec<usize> {
        let p = self.permutation.take().expect("a recorded permutation");
        assert_eq!(p.len(), n);
        p
    }
    fn choose(&mut self, n: usize, k: usize) -> Vec<usize> {
        let t = self.trims.pop_front().expect("a recorded trim");
        assert_eq!(t.len(), k, "trim size (of {n})");
        t
    }
}

#[test]
fn masks_equal_the_reference_algorithm_for_the_same_draws() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/masking");
    let fx: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("masks.json")).unwrap()).unwrap();
    let no_face: Vec<u64> = fx["no_face"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let maps: Vec<Option<ParsingMap>> = (0..8)
        .map(|t| {
            if no_face.contains(&(t as u64)) {
                return None;
            }
            let img = image::open(dir.join(format!("parsing_{t}.png")))
                .unwrap()
                .to_luma8();
            Some(ParsingMap {
                width: img.width() as usize,
                height: img.height() as usize,
                labels: img.into_raw(),
            })
        })
        .collect();
    let parsing: Vec<Option<&ParsingMap>> = maps.iter().map(Option::as_ref).collect();
    let g = Grid {
        tubelets: 8,
        grid_h: 14,
        grid_w: 14,
        patch: 16,
    };
    let cases = fx["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 10);
    for c in cases {
        let strategy: Strategy = c["strategy"].as_str().unwrap().parse().unwrap();
        let ratio = c["mask_ratio"].as_f64().unwrap();
        let mut draws = Replay {
            permutation: c["draws"]["permutation"]
                .as_array()
                .map(|a| a.iter().map(|v| v.as_u64().unwrap() as usize).collect()),
            trims: c["draws"]["trims"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| {
                    t.as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_u64().unwrap() as usize)
                        .collect()
                })
                .collect(),
        };
        let mask = make_mask(strategy, ratio, &parsing, &g, &mut draws);
        assert!(draws.trims.is_empty(), "{strategy:?}: unused draws");
        let visible: Vec<u64> = (0..mask.len())
            .filter(|&i| mask[i])
            .map(|i| i as u64)
            .collect();
        let want: Vec<u64> = c["visible"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(
            visible.len(),
            visible_count(1568, ratio),
            "{strategy:?} {ratio}"
        );
        assert_eq!(visible, want, "{strategy:?} {ratio}");
        if matches!(strategy, Strategy::Fasking) {
            // Fasking keeps background first, then skin: in a tubelet with a parsed face the
            // visible tokens lie in the patches the shortest such prefix (background, or
            // background and skin) reaches that covers the 1 - ratio quota. Tubelets without a
            // parsing map had every patch as a candidate.
            let mut restricted = 0;
            for (t, m) in maps.iter().enumerate() {
                let Some(m) = m else { continue };
                let has = |r: usize, labels: &[u8]| {
                    let (gy, gx) = (r / 14, r % 14);
                    (gy * 16..gy * 16 + 16).any(|y| {
                        (gx * 16..gx * 16 + 16).any(|x| labels.contains(&m.labels[y * 224 + x]))
                    })
                };
                let reach = [&[0u8][..], &[0, 1]].into_iter().find_map(|labels| {
                    let set: Vec<usize> = (0..196).filter(|&r| has(r, labels)).collect();
                    (set.len() as f64 / 196.0 >= 1.0 - ratio).then_some(set)
                });
                let Some(allowed) = reach else { continue };
                restricted += usize::from(allowed.len() < 196);
                for &i in visible.iter().filter(|&&i| i as usize / 196 == t) {
                    let r = i as usize % 196;
                    assert!(
                        allowed.contains(&r),
                        "{strategy:?} {ratio}: token {i} (tubelet {t}) lies outside the \
                         background/skin patches the keep queue reaches first"
                    );
                }
            }
            assert!(
                restricted > 0,
                "no tubelet where the check restricts anything"
            );
        }
    }
}
