//! Reading dataset files into JSON rows, each with the line it starts on. The layout comes from
//! the content, whatever the extension: JSON Lines (one object per line, blank lines ignored), a
//! JSON array of rows, or an object with a `data` array (a single-line object is a JSON Lines row
//! unless the file is named `.json`). A leading UTF-8 byte-order mark is skipped. A line that is
//! not JSON or not UTF-8 is a row-level problem (reported with its line, skippable); an array or
//! object that cannot be read is a file-level error. Rows keep their JSON text and are parsed
//! when used ([`RawRow::parse`]), so a large file is never held as a tree of values. Turning rows
//! into conversations is `format.rs`'s job.

use std::path::{Path, PathBuf};

use serde::de::IgnoredAny;
use serde_json::value::RawValue;

use crate::error::{DataError, Result};

/// One row of a dataset file.
#[derive(Debug, Clone)]
pub struct RawRow {
    /// The file it came from.
    pub path: PathBuf,
    /// 1-based line where the row starts.
    pub line: usize,
    /// The row's JSON text, or why its line is not text.
    pub json: std::result::Result<Box<str>, String>,
}

impl RawRow {
    /// The parsed row, or why it is not JSON.
    pub fn parse(&self) -> std::result::Result<serde_json::Value, String> {
        let json = self.json.as_deref().map_err(Clone::clone)?;
        serde_json::from_str(json).map_err(|e| format!("invalid JSON: {e}"))
    }
}

/// The UTF-8 byte-order mark some editors write at the start of a file.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Reads every row of `path`, in any of the layouts above.
pub fn read_rows(path: &Path) -> Result<Vec<RawRow>> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let bytes = bytes.strip_prefix(BOM).unwrap_or(&bytes);
    let named_json = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    let text = String::from_utf8_lossy(bytes);
    let document = match text.trim_start().chars().next() {
        Some('[') => true,
        Some('{') => is_one_document(path, &text, named_json)?,
        _ => false,
    };
    if !document {
        return Ok(read_lines(path, bytes));
    }
    if let Err(e) = std::str::from_utf8(bytes) {
        return Err(DataError::Layout {
            path: path.to_path_buf(),
            line: line_at(bytes, e.valid_up_to()),
            detail: "invalid UTF-8; re-encode the file as UTF-8".into(),
        });
    }
    read_document(path, &text)
}

/// 1-based line of byte `offset`.
fn line_at(bytes: &[u8], offset: usize) -> usize {
    1 + bytes[..offset].iter().filter(|&&b| b == b'\n').count()
}

/// Whether `text`, which starts with `{`, is one JSON object (rather than JSON Lines).
fn is_one_document(path: &Path, text: &str, named_json: bool) -> Result<bool> {
    let mut values = serde_json::Deserializer::from_str(text).into_iter::<IgnoredAny>();
    match values.next() {
        Some(Ok(_)) => {
            let end = values.byte_offset();
            let several_lines = text[..end].trim().contains('\n');
            let more = !text[end..].trim().is_empty();
            match (several_lines, more) {
                (false, false) => Ok(named_json),
                (false, true) => Ok(false),
                (true, false) => Ok(true),
                (true, true) => Err(DataError::Layout {
                    path: path.to_path_buf(),
                    line: 1,
                    detail: "a JSON object spanning several lines is followed by more JSON; in JSON Lines each row is one line: write one object per line, or put the rows in one JSON array".into(),
                }),
            }
        }
        Some(Err(e)) if named_json => Err(DataError::Json {
            path: path.to_path_buf(),
            source: e,
        }),
        _ => Ok(false),
    }
}

/// JSON Lines: a row per non-blank line; a line that is not UTF-8 is a row that fails to parse.
fn read_lines(path: &Path, bytes: &[u8]) -> Vec<RawRow> {
    bytes
        .split(|&b| b == b'\n')
        .enumerate()
        .filter_map(|(i, l)| {
            let l = l.strip_suffix(b"\r").unwrap_or(l);
            let json = match std::str::from_utf8(l) {
                Ok(t) if t.trim().is_empty() => return None,
                Ok(t) => Ok(t.into()),
                Err(e) => Err(format!(
                    "invalid UTF-8 at byte {} of the line; re-encode the file as UTF-8",
                    e.valid_up_to() + 1
                )),
            };
            Some(RawRow {
                path: path.to_path_buf(),
                line: i + 1,
                json,
            })
        })
        .collect()
}

#[derive(serde::Deserialize)]
struct Wrapped<'a> {
    #[serde(borrow)]
    data: Vec<&'a RawValue>,
}

fn read_document(path: &Path, text: &str) -> Result<Vec<RawRow>> {
    let json_error = |e: serde_json::Error| {
        if e.is_data() {
            DataError::Layout {
                path: path.to_path_buf(),
                line: e.line(),
                detail: "the file holds one JSON value, which is neither an array of rows nor an object with a `data` array of rows; for JSON Lines, write one object per line".into(),
            }
        } else {
            DataError::Json {
                path: path.to_path_buf(),
                source: e,
            }
        }
    };
    let rows: Vec<&RawValue> = if text.trim_start().starts_with('{') {
        serde_json::from_str::<Wrapped>(text)
            .map_err(json_error)?
            .data
    } else {
        serde_json::from_str(text).map_err(json_error)?
    };
    let base = text.as_ptr() as usize;
    let mut line = 1;
    let mut scanned = 0;
    Ok(rows
        .into_iter()
        .map(|raw| {
            // The row's text is a slice of `text`: its byte offset gives its line.
            let offset = raw.get().as_ptr() as usize - base;
            line += text.as_bytes()[scanned..offset]
                .iter()
                .filter(|&&b| b == b'\n')
                .count();
            scanned = offset;
            RawRow {
                path: path.to_path_buf(),
                line,
                json: Ok(raw.get().into()),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_rows_keep_their_lines_and_bad_lines_are_rows() {
        let rows = read_lines(
            Path::new("d.jsonl"),
            b"{\"a\": 1}\r\n\n{oops\n{\"a\": 2}\n{\"a\": \"\xff\"}\n",
        );
        assert_eq!(rows.len(), 4);
        assert_eq!(rows[0].parse().unwrap()["a"], 1);
        assert_eq!(rows[0].line, 1);
        assert_eq!(rows[1].line, 3);
        assert!(rows[1].parse().unwrap_err().contains("invalid JSON"));
        assert_eq!(rows[2].line, 4);
        assert_eq!(rows[2].parse().unwrap()["a"], 2);
        assert_eq!(rows[3].line, 5);
        let err = rows[3].parse().unwrap_err();
        assert!(err.contains("invalid UTF-8 at byte 8 of the line"), "{err}");
    }

    #[test]
    fn json_arrays_and_data_objects_give_row_lines() {
        let text = "[\n  {\"a\": 1},\n\n  {\"a\": 2}\n]";
        let rows = read_document(Path::new("d.json"), text).unwrap();
        assert_eq!(rows.iter().map(|r| r.line).collect::<Vec<_>>(), vec![2, 4]);
        let text = "{\"data\": [{\"a\": 1},\n{\"a\": 2}]}";
        let rows = read_document(Path::new("d.json"), text).unwrap();
        assert_eq!(rows[1].line, 2);
        let err = read_document(Path::new("d.json"), "{\"rows\": []}").unwrap_err();
        assert!(err.to_string().contains("`data` array"), "{err}");
        let err = read_document(Path::new("d.json"), "[{\"a\": 1},\n oops]").unwrap_err();
        assert!(err.to_string().contains("d.json"), "{err}");
    }
}
