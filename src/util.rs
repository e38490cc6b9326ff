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
