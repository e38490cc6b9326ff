//! One manifest over a sharded (or plain) extraction: every input of the dataset with its
//! output, the output's shape, and its status: done (the `.npy` is there), failed (a failure
//! list of any shard names it) or missing (neither: re-run the same command or the shard that
//! owns it; finished outputs are skipped).

use super::inputs::{Failure, Item};
use super::ExtractError;
use std::collections::BTreeMap;
use std::path::Path;

/// Where an input stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Done,
    Failed,
    Missing,
}

/// One input of the manifest.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Row {
    pub input: String,
    pub output: String,
    pub status: Status,
    /// The output's shape (`[clips, D]`, `[clips, N, D]` or reduced), when done.
    pub shape: Option<Vec<usize>>,
    /// The failure's one-line message, when failed.
    pub error: Option<String>,
}

/// Every input's row, in discovery order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Manifest {
    pub rows: Vec<Row>,
}

impl Manifest {
    /// The manifest of `items` (the dataset as `extract` discovers it) against what is in
    /// `out`: the `.npy` outputs and every `failures*.json` there (one per shard).
    pub fn build(items: &[Item], out: &Path) -> Result<Self, ExtractError> {
        let failures = read_failures(out)?;
        let rows = items
            .iter()
            .map(|it| {
                let input = it.input.path().display().to_string();
                let output = it.out.display().to_string();
                if it.out.is_file() {
                    let shape = npy_shape(&it.out);
                    let error = shape
                        .is_none()
                        .then(|| format!("{output}: not a readable .npy file"));
                    return Row {
                        input,
                        output,
                        status: if shape.is_some() {
                            Status::Done
                        } else {
                            Status::Failed
                        },
                        shape,
                        error,
                    };
                }
                match failures.get(&input) {
                    Some(e) => Row {
                        input,
                        output,
                        status: Status::Failed,
                        shape: None,
                        error: Some(e.clone()),
                    },
                    None => Row {
                        input,
                        output,
                        status: Status::Missing,
                        shape: None,
                        error: None,
                    },
                }
            })
            .collect();
        Ok(Self { rows })
    }

    pub fn count(&self, status: Status) -> usize {
        self.rows.iter().filter(|r| r.status == status).count()
    }

    /// The manifest as CSV (`input,output,status,shape,error`; shape as `clips x D`).
    pub fn to_csv(&self) -> Result<String, ExtractError> {
        let err = |e: csv::Error| ExtractError::Options(format!("manifest: {e}"));
        let mut w = csv::Writer::from_writer(Vec::new());
        w.write_record(["input", "output", "status", "shape", "error"])
            .map_err(err)?;
        for r in &self.rows {
            let shape = r.shape.as_ref().map_or(String::new(), |s| shape_text(s));
            let status = status_name(r.status);
            w.write_record([
                r.input.as_str(),
                r.output.as_str(),
                status,
                shape.as_str(),
                r.error.as_deref().unwrap_or(""),
            ])
            .map_err(err)?;
        }
        let bytes = w
            .into_inner()
            .map_err(|e| ExtractError::Options(format!("manifest: {e}")))?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

impl Manifest {
    /// The manifest as Parquet: UTF-8 columns input, output, status (required), shape
    /// (`clips x D`, null unless done) and error (null unless failed).
    pub fn to_parquet(&self) -> Result<Vec<u8>, ExtractError> {
        use parquet::data_type::{ByteArray, ByteArrayType};
        use parquet::file::properties::WriterProperties;
        use parquet::file::writer::SerializedFileWriter;
        use parquet::schema::parser::parse_message_type;
        use std::sync::Arc;
        let err = |e: parquet::errors::ParquetError| {
            ExtractError::Options(format!("manifest (Parquet): {e}"))
        };
        let schema = parse_message_type(
            "message manifest {
                REQUIRED BYTE_ARRAY input (UTF8);
                REQUIRED BYTE_ARRAY output (UTF8);
                REQUIRED BYTE_ARRAY status (UTF8);
                OPTIONAL BYTE_ARRAY shape (UTF8);
                OPTIONAL BYTE_ARRAY error (UTF8);
            }",
        )
        .map_err(err)?;
        let props = Arc::new(WriterProperties::builder().build());
        let mut buf = Vec::new();
        let mut w = SerializedFileWriter::new(&mut buf, Arc::new(schema), props).map_err(err)?;
        let mut rg = w.next_row_group().map_err(err)?;
        let columns: [Vec<Option<String>>; 5] = [
            self.rows.iter().map(|r| Some(r.input.clone())).collect(),
            self.rows.iter().map(|r| Some(r.output.clone())).collect(),
            self.rows
                .iter()
                .map(|r| Some(status_name(r.status).to_string()))
                .collect(),
            self.rows
                .iter()
                .map(|r| r.shape.as_ref().map(|s| shape_text(s)))
                .collect(),
            self.rows.iter().map(|r| r.error.clone()).collect(),
        ];
        for (i, values) in columns.iter().enumerate() {
            let Some(mut col) = rg.next_column().map_err(err)? else {
                break;
            };
            let present: Vec<ByteArray> = values
                .iter()
                .flatten()
                .map(|v| ByteArray::from(v.as_str()))
                .collect();
            let defs: Vec<i16> = values.iter().map(|v| v.is_some() as i16).collect();
            // The first three columns are required: no definition levels.
            let defs = (i >= 3).then_some(defs.as_slice());
            col.typed::<ByteArrayType>()
                .write_batch(&present, defs, None)
                .map_err(err)?;
            col.close().map_err(err)?;
        }
        rg.close().map_err(err)?;
        w.close().map_err(err)?;
        Ok(buf)
    }
}

fn status_name(s: Status) -> &'static str {
    match s {
        Status::Done => "done",
        Status::Failed => "failed",
        Status::Missing => "missing",
    }
}

fn shape_text(s: &[usize]) -> String {
    s.iter().map(usize::to_string).collect::<Vec<_>>().join("x")
}

/// Input -> error of every `failures*.json` in `out` (the plain run's and each shard's).
fn read_failures(out: &Path) -> Result<BTreeMap<String, String>, ExtractError> {
    let mut map = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(out) else {
        return Ok(map);
    };
    let mut files: Vec<_> = dir
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("failures") && n.ends_with(".json"))
        })
        .collect();
    files.sort();
    for p in files {
        let text = std::fs::read_to_string(&p).map_err(|e| ExtractError::Write {
            path: p.display().to_string(),
            msg: format!("cannot read: {e}"),
        })?;
        let list: Vec<Failure> = serde_json::from_str(&text).map_err(|e| {
            ExtractError::Options(format!("{}: not a failure list: {e}", p.display()))
        })?;
        for f in list {
            map.insert(f.file, f.error);
        }
    }
    Ok(map)
}

/// The shape in a `.npy` header (None when the file is not one).
fn npy_shape(path: &Path) -> Option<Vec<usize>> {
    use std::io::Read;
    let mut head = vec![0u8; 4096];
    let n = std::fs::File::open(path).ok()?.read(&mut head).ok()?;
    let head = &head[..n];
    if n < 10 || &head[..6] != b"\x93NUMPY" {
        return None;
    }
    let (len, start) = match head[6] {
        1 => (u16::from_le_bytes([head[8], head[9]]) as usize, 10),
        _ if n >= 12 => (
            u32::from_le_bytes([head[8], head[9], head[10], head[11]]) as usize,
            12,
        ),
        _ => return None,
    };
    let dict = std::str::from_utf8(head.get(start..start + len)?).ok()?;
    let shape = dict.split("'shape':").nth(1)?;
    let inner = shape.split('(').nth(1)?.split(')').next()?;
    inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().ok())
        .collect()
}
