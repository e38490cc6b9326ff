//! Host tensors and state dicts: the types that the key map ([`super::keys`]), the loader
//! ([`super::load`]) and the checkpoint files ([`super::weights`]) share, so that none of those
//! imports another for them.

use burn::tensor::{backend::Backend, Tensor};
use std::collections::BTreeMap;

/// A tensor in host memory, PyTorch layout, float32.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Self { shape, data }
    }
    pub fn numel(&self) -> usize {
        self.data.len()
    }
}

/// Errors while reading, checking or writing a checkpoint. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{file}: cannot read checkpoint: {msg}")]
    Read { file: String, msg: String },
    #[error(
        "{file}: not a MARLIN checkpoint: no key ends in '{probe}' (found {n} tensors{sample})"
    )]
    NotMarlin {
        file: String,
        probe: String,
        n: usize,
        sample: String,
    },
    #[error("{file}: missing key '{key}' (expected shape {expected:?}){hint}")]
    Missing {
        file: String,
        key: String,
        expected: Vec<usize>,
        hint: String,
    },
    #[error("{file}: key '{key}' has shape {found:?} but config '{config}' expects {expected:?}")]
    Shape {
        file: String,
        key: String,
        config: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{file}: cannot write checkpoint: {msg}")]
    Write { file: String, msg: String },
}

/// `src` `[rows, cols]` row-major transposed to `[cols, rows]`, in 32 x 32 tiles on all
/// cores: loading ViT-B's Linears (86 M values) the value-by-value loop, whose writes walk a
/// column, was 8% of a one-clip `marlin extract`.
pub fn transpose2d(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    use rayon::prelude::*;
    const T: usize = 32;
    assert_eq!(src.len(), rows * cols, "not a [rows, cols] matrix");
    let mut out = vec![0f32; src.len()];
    if rows == 0 || cols == 0 {
        return out;
    }
    // Each task writes T whole rows of the output (T columns of `src`).
    out.par_chunks_mut(T * rows)
        .enumerate()
        .for_each(|(cb, dst)| {
            let c0 = cb * T;
            let cn = dst.len() / rows;
            for r0 in (0..rows).step_by(T) {
                for r in r0..(r0 + T).min(rows) {
                    let row = &src[r * cols + c0..r * cols + c0 + cn];
                    for (c, &v) in row.iter().enumerate() {
                        dst[c * rows + r] = v;
                    }
                }
            }
        });
    out
}

/// Official key names -> host tensors, with the file they came from (for messages).
#[derive(Debug, Clone, Default)]
pub struct StateDict {
    pub tensors: BTreeMap<String, HostTensor>,
    /// Where the tensors came from, for error messages.
    pub source: String,
}

impl StateDict {
    pub fn new(source: impl Into<String>) -> Self {
        Self {
            tensors: BTreeMap::new(),
            source: source.into(),
        }
    }
}

/// A float tensor's values as `f32`, row-major.
pub fn to_f32_vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    // `convert::<f32>` makes the data f32 whatever the backend's float type, so reading it
    // back as f32 cannot fail.
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("data converted to f32 reads back as f32")
}

/// A tensor back to host memory.
pub fn to_host<B: Backend, const D: usize>(t: &Tensor<B, D>) -> HostTensor {
    HostTensor::new(t.dims().to_vec(), to_f32_vec(t.clone()))
}

/// The first value of a tensor (a loss) as f64 (NaN for an empty tensor).
pub fn to_scalar<B: Backend, const D: usize>(t: Tensor<B, D>) -> f64 {
    to_f32_vec(t).first().copied().unwrap_or(f32::NAN) as f64
}

#[cfg(test)]
mod tests {
    #[test]
    fn transpose2d_is_the_transpose() {
        for (rows, cols) in [(1, 1), (3, 70), (65, 33), (100, 1)] {
            let src: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let t = super::transpose2d(&src, rows, cols);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        t[c * rows + r],
                        src[r * cols + c],
                        "{rows}x{cols} at {r},{c}"
                    );
                }
            }
        }
    }
}
