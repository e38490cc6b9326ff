//! Features of a downstream dataset from `marlin extract`'s `.npy` files, combined over clips.

use super::data::Dataset;
use super::inputs::{Inputs, ProbeError};
use std::path::PathBuf;

/// A video's clip features `[clips, D]` (or `[D]`) combined over clips: mean, max or min.
pub fn reduce_clips(a: ndarray::ArrayD<f32>, how: &str) -> Result<Vec<f32>, ProbeError> {
    let a = if a.ndim() == 1 {
        a.insert_axis(ndarray::Axis(0))
    } else {
        a
    };
    let ax = ndarray::Axis(0);
    let r = match how {
        "mean" => a
            .mean_axis(ax)
            .ok_or_else(|| ProbeError::Input("no clips".into()))?,
        "max" => a.fold_axis(ax, f32::NEG_INFINITY, |m, &v| m.max(v)),
        "min" => a.fold_axis(ax, f32::INFINITY, |m, &v| m.min(v)),
        other => {
            return Err(ProbeError::Input(format!(
                "--reduction {other}: expected mean, max or min"
            )))
        }
    };
    Ok(r.iter().copied().collect())
}

/// Features of every sample of each split from `.npy` files (`[clips, D]` or `[D]`), reduced
/// over clips by `reduction` (mean, max or min) -> `[n, D]` per split.
pub fn load_features(
    paths: &std::collections::BTreeMap<String, Vec<PathBuf>>,
    data: &Dataset,
    reduction: &str,
) -> Result<Inputs, ProbeError> {
    read_features(paths, data, reduction)
}

fn read_features(
    paths: &std::collections::BTreeMap<String, Vec<PathBuf>>,
    data: &Dataset,
    reduction: &str,
) -> Result<Inputs, ProbeError> {
    let mut d = None;
    let mut out: Vec<Vec<f32>> = Vec::new();
    for split in super::data::SPLITS {
        let mut rows = Vec::new();
        for (p, s) in paths[split].iter().zip(data.split(split)) {
            let a: ndarray::ArrayD<f32> = ndarray_npy::read_npy(p)
                .map_err(|e| format!("{}: {}: cannot read features: {e}", s.origin, p.display()))?;
            let a = match a.ndim() {
                1 => a.insert_axis(ndarray::Axis(0)),
                2 => a,
                _ => {
                    return Err(format!(
                        "{}: {}: features of shape {:?}; expected [clips, D] or [D] (extract without --keep-seq)",
                        s.origin,
                        p.display(),
                        a.shape()
                    ).into())
                }
            };
            if a.shape()[0] == 0 {
                return Err(format!("{}: {}: no clips", s.origin, p.display()).into());
            }
            let width = a.shape()[1];
            if *d.get_or_insert(width) != width {
                return Err(format!(
                    "{}: {}: {width} features, others have {}",
                    s.origin,
                    p.display(),
                    d.unwrap_or(0)
                )
                .into());
            }
            rows.extend(reduce_clips(a, reduction).map_err(|e| e.to_string())?);
        }
        out.push(rows);
    }
    let [train, val, test]: [Vec<f32>; 3] =
        out.try_into().map_err(|_| "three splits".to_string())?;
    Ok(Inputs::Features {
        d: d.unwrap_or(0),
        train,
        val,
        test,
    })
}
