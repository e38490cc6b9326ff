//! Small shared helpers.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The temp path beside `path` that [`write_atomic`] writes before renaming.
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp{}", std::process::id()))
}

/// Write `data` to `path` atomically: a temp file in the same folder, fsync, then rename, so a
/// killed run never leaves a half-written file under the final name.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = temp_path(path);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Write `array` as a `.npy` file atomically (see [`write_atomic`]).
pub fn write_npy_atomic<A, D>(path: &Path, array: &ndarray::ArrayBase<A, D>) -> std::io::Result<()>
where
    A: ndarray::Data,
    A::Elem: ndarray_npy::WritableElement,
    D: ndarray::Dimension,
{
    let mut buf = Vec::new();
    ndarray_npy::WriteNpyExt::write_npy(array, &mut buf)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
    write_atomic(path, &buf)
}

/// The unit tests' comparisons, with the integration suite's rule (`tests/suite/common`): a
/// NaN or infinity on either side, different lengths or nothing to compare fail the test
/// instead of scoring 0 under `f32::max`.
#[cfg(test)]
pub(crate) mod check {
    /// Max abs diff of `a` against `b`; panics on any non-finite value, on different lengths
    /// and on empty input.
    pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len(), "lengths differ");
        assert!(!a.is_empty(), "nothing to compare");
        a.iter().zip(b).enumerate().fold(0f32, |m, (i, (x, y))| {
            assert!(
                x.is_finite() && y.is_finite(),
                "element {i} is not finite: {x} vs {y}"
            );
            m.max((x - y).abs())
        })
    }

    /// A float tensor's values as f32 (the tests' read-back; `convert` makes it f32 whatever
    /// the backend's float type, so reading it as f32 cannot fail).
    pub fn values<B: burn::tensor::backend::Backend, const D: usize>(
        t: burn::tensor::Tensor<B, D>,
    ) -> Vec<f32> {
        t.into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .expect("data converted to f32")
    }

    /// The largest absolute value; panics on a non-finite one or empty input.
    pub fn max_abs(x: &[f32]) -> f32 {
        assert!(!x.is_empty(), "nothing to measure");
        x.iter().enumerate().fold(0f32, |m, (i, v)| {
            assert!(v.is_finite(), "element {i} is not finite: {v}");
            m.max(v.abs())
        })
    }

    #[test]
    fn a_nan_fails_the_comparison() {
        assert_eq!(max_abs_diff(&[1.0, 2.0], &[1.5, 2.0]), 0.5);
        assert!(std::panic::catch_unwind(|| max_abs_diff(&[f32::NAN], &[0.0])).is_err());
        assert!(std::panic::catch_unwind(|| max_abs_diff(&[0.0], &[f32::INFINITY])).is_err());
        assert!(std::panic::catch_unwind(|| max_abs_diff(&[0.0], &[0.0, 1.0])).is_err());
        assert!(std::panic::catch_unwind(|| max_abs(&[1.0, f32::NAN])).is_err());
        assert_eq!(max_abs(&[1.0, -3.0]), 3.0);
    }
}
