//! Which tokens of a clip the encoder sees during pretraining: Fasking (facial-region guided
//! tube masking, the paper's contribution), its opposite, and VideoMAE's random, tube and frame
//! masking. `true` = visible. Tokens are in `(t, h, w)` order, as the tubelet embedding makes
//! them.
//!
//! Random draws come through [`Draws`], so a test can replay the draws of the Python
//! implementation of the notes (tools/make_mask_fixtures.py) and compare masks exactly.

use rand::seq::SliceRandom;
use rand::{rngs::StdRng, SeedableRng};

/// Masking strategy (the reference config's `mask_strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Background and skin stay visible first, then facial components in random order: the
    /// eyes, nose, mouth and hair end up masked.
    Fasking,
    /// Facial components visible first, then skin, then background.
    FaskingOpp,
    /// Uniformly random patches.
    Random,
    /// One random patch mask repeated over all tubelets.
    Tube,
    /// Whole tubelets visible or masked.
    Frame,
}

impl Strategy {
    /// The names [`Strategy::from_str`](std::str::FromStr) takes.
    pub const NAMES: [&str; 5] = ["fasking", "fasking_opp", "random", "tube", "frame"];
}

impl std::str::FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fasking" => Ok(Self::Fasking),
            "fasking_opp" => Ok(Self::FaskingOpp),
            "random" => Ok(Self::Random),
            "tube" => Ok(Self::Tube),
            "frame" => Ok(Self::Frame),
            _ => Err(format!(
                "mask strategy '{s}': expected fasking, fasking_opp, random, tube or frame"
            )),
        }
    }
}

/// LaPa region groups, in the order the keep queue indexes them: right eye, left eye, nose,
/// mouth, hair, skin, background.
pub const GROUPS: [&[u8]; 7] = [&[2, 4], &[3, 5], &[6], &[7, 8, 9], &[10], &[1], &[0]];

/// The random choices masking makes.
pub trait Draws {
    /// A random permutation of `0..n`.
    fn permutation(&mut self, n: usize) -> Vec<usize>;
    /// `k` distinct positions out of `0..n` (which visible tokens to hide).
    fn choose(&mut self, n: usize, k: usize) -> Vec<usize>;
}

/// Draws from a seeded generator.
pub struct RngDraws(pub StdRng);

impl RngDraws {
    pub fn new(seed: u64) -> Self {
        Self(StdRng::seed_from_u64(seed))
    }
}

impl Draws for RngDraws {
    fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut v: Vec<usize> = (0..n).collect();
        v.shuffle(&mut self.0);
        v
    }
    fn choose(&mut self, n: usize, k: usize) -> Vec<usize> {
        rand::seq::index::sample(&mut self.0, n, k.min(n)).into_vec()
    }
}

/// A face-parsing map (LaPa labels 0..10), `[h, w]` row-major, the size of the model's input.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsingMap {
    pub width: usize,
    pub height: usize,
    pub labels: Vec<u8>,
}

/// Token grid of a clip: `tubelets` x `grid_h` x `grid_w`, each token `patch` pixels square.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Grid {
    pub tubelets: usize,
    pub grid_h: usize,
    pub grid_w: usize,
    pub patch: usize,
}

impl Grid {
    pub fn tokens(&self) -> usize {
        self.tubelets * self.grid_h * self.grid_w
    }
    fn per_tubelet(&self) -> usize {
        self.grid_h * self.grid_w
    }
}

/// Exactly this many tokens stay visible: floor(N * (1 - mask_ratio)).
pub fn visible_count(tokens: usize, mask_ratio: f64) -> usize {
    (tokens as f64 * (1.0 - mask_ratio)).floor() as usize
}

/// Patches of `map` holding `label` anywhere in their pixels (max pooling), OR-ed into `vis`.
fn pool_label(map: &ParsingMap, label: u8, g: &Grid, vis: &mut [bool]) {
    let p = g.patch;
    for gy in 0..g.grid_h {
        for gx in 0..g.grid_w {
            let cell = &mut vis[gy * g.grid_w + gx];
            if *cell {
                continue;
            }
            'scan: for y in gy * p..((gy + 1) * p).min(map.height) {
                let row = &map.labels[y * map.width..(y + 1) * map.width];
                for &v in &row[gx * p..((gx + 1) * p).min(map.width)] {
                    if v == label {
                        *cell = true;
                        break 'scan;
                    }
                }
            }
        }
    }
}

/// The visible patches of one tubelet from its first frame's parsing: walking the keep queue
/// label by label, a patch becomes visible when it holds the label; stop as soon as the visible
/// share reaches `target`. No parsed face: everything visible.
fn tubelet_mask(map: Option<&ParsingMap>, queue: &[usize], target: f64, g: &Grid) -> Vec<bool> {
    let n = g.per_tubelet();
    let Some(map) = map.filter(|m| !m.labels.is_empty()) else {
        return vec![true; n];
    };
    let mut vis = vec![false; n];
    for &group in queue {
        for &label in GROUPS[group] {
            pool_label(map, label, g, &mut vis);
            let share = vis.iter().filter(|&&v| v).count() as f64 / n as f64;
            if share >= target {
                return vis;
            }
        }
    }
    vis
}

/// Hide visible entries of `mask` at random until `keep` remain.
fn trim(mask: &mut [bool], keep: usize, draws: &mut dyn Draws) {
    let visible: Vec<usize> = (0..mask.len()).filter(|&i| mask[i]).collect();
    // Fewer visible than asked cannot happen for these strategies (each tubelet keeps at least
    // its share); the draw is made even when nothing is dropped, as the reference does.
    for pos in draws.choose(visible.len(), visible.len().saturating_sub(keep)) {
        mask[visible[pos]] = false;
    }
}

/// The visible-token mask `[N]` of one clip. `parsing[t]` is the parsing map of tubelet t's
/// first frame (None: no parsed face); only the Fasking strategies read it.
pub fn make_mask(
    strategy: Strategy,
    mask_ratio: f64,
    parsing: &[Option<&ParsingMap>],
    g: &Grid,
    draws: &mut dyn Draws,
) -> Vec<bool> {
    let target = 1.0 - mask_ratio;
    let per = g.per_tubelet();
    let mut mask: Vec<bool> = match strategy {
        Strategy::Fasking | Strategy::FaskingOpp => {
            let perm = draws.permutation(5);
            let queue: Vec<usize> = if strategy == Strategy::Fasking {
                [6, 5].into_iter().chain(perm).collect()
            } else {
                perm.into_iter().chain([5, 6]).collect()
            };
            (0..g.tubelets)
                .flat_map(|t| tubelet_mask(parsing.get(t).copied().flatten(), &queue, target, g))
                .collect()
        }
        Strategy::Random => vec![true; g.tokens()],
        Strategy::Tube => {
            let mut first = vec![true; per];
            trim(&mut first, (per as f64 * target).ceil() as usize, draws);
            first.repeat(g.tubelets)
        }
        Strategy::Frame => {
            let mut frames = vec![true; g.tubelets];
            trim(
                &mut frames,
                (g.tubelets as f64 * target).ceil() as usize,
                draws,
            );
            frames
                .iter()
                .flat_map(|&f| std::iter::repeat_n(f, per))
                .collect()
        }
    };
    trim(&mut mask, visible_count(g.tokens(), mask_ratio), draws);
    mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_strategy_keeps_exactly_floor_n_times_one_minus_ratio() {
        let g = Grid {
            tubelets: 8,
            grid_h: 14,
            grid_w: 14,
            patch: 16,
        };
        // A map that is half skin, half background.
        let mut labels = vec![0u8; 224 * 224];
        for v in labels.iter_mut().take(224 * 112) {
            *v = 1;
        }
        let map = ParsingMap {
            width: 224,
            height: 224,
            labels,
        };
        let parsing: Vec<Option<&ParsingMap>> = (0..8).map(|_| Some(&map)).collect();
        for s in [
            Strategy::Fasking,
            Strategy::FaskingOpp,
            Strategy::Random,
            Strategy::Tube,
            Strategy::Frame,
        ] {
            for (ratio, want) in [(0.9, 156), (0.75, 392), (0.5, 784)] {
                let m = make_mask(s, ratio, &parsing, &g, &mut RngDraws::new(3));
                assert_eq!(m.len(), 1568);
                assert_eq!(m.iter().filter(|&&v| v).count(), want, "{s:?} {ratio}");
            }
        }
    }
}
