//! Reading dataset files into JSON rows, each with the line it starts on: JSON Lines (one object
//! per line, blank lines ignored), or a JSON document holding an array of rows or an object with
//! a `data` array. A malformed JSON line is a row-level problem (reported with its line, skippable);
//! a malformed JSON document is a file-level error. Rows keep their JSON text and are parsed
//! when used ([`RawRow::parse`]), so a large file is never held as a tree of values. Turning rows
//! into conversations is `format.rs`'s job.

use std::path::{Path, PathBuf};

use serde_json::value::RawValue;

use crate::error::{DataError, Result};

/// One row of a dataset file.
#[derive(Debug, Clone)]
pub struct RawRow {
    /// The file it came from.
    pub path: PathBuf,
    /// 1-based line where the row starts.
    pub line: usize,
    /// The row's JSON text.
    pub json: Box<str>,
}

impl RawRow {
    /// The parsed row, or why it is not JSON.
    pub fn parse(&self) -> std::result::Result<serde_json::Value, String> {
        serde_json::from_str(&self.json).map_err(|e| format!("invalid JSON: {e}"))
    }
}

/// Reads every row of `path`: `.json` files as one JSON document, anything else as JSON Lines.
pub fn read_rows(path: &Path) -> Result<Vec<RawRow>> {
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let is_json = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    if is_json {
        read_document(path, &text)
    } else {
        Ok(read_lines(path, &text))
    }
}

fn read_lines(path: &Path, text: &str) -> Vec<RawRow> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| RawRow {
            path: path.to_path_buf(),
            line: i + 1,
            json: l.into(),
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
            DataError::BadRow {
                path: path.to_path_buf(),
                line: e.line(),
                reason: "a JSON dataset must be an array of rows or an object with a `data` array"
                    .into(),
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
                json: raw.get().into(),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_rows_keep_their_lines_and_bad_lines_are_rows() {
        let rows = read_lines(Path::new("d.jsonl"), "{\"a\": 1}\n\n{oops\n{\"a\": 2}\n");
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].line, 1);
        assert_eq!(rows[1].line, 3);
        assert!(rows[1].parse().unwrap_err().contains("invalid JSON"));
        assert_eq!(rows[2].line, 4);
        assert_eq!(rows[2].parse().unwrap()["a"], 2);
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
