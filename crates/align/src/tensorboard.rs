//! TensorBoard event files (`output.tensorboard`): a run's metrics as scalars TensorBoard plots,
//! under the tags transformers' `TensorBoardCallback` gives them (`train/loss`, `eval/loss`, ...).
//! A file is a sequence of records (the length, its masked CRC-32C, the bytes, their masked
//! CRC-32C), each holding one `tensorboard.Event` protobuf, encoded here by hand: it takes a
//! wall time, a step, and a file version, a session start or a summary of scalar values. Each
//! session of a run writes a file of its own, opened with a session start at the step it starts
//! from, on which TensorBoard drops the earlier files' points from that step on: those past the
//! checkpoint a run resumes from, or all of an earlier run in the same folder.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// The event format version TensorBoard expects first in a file.
const FILE_VERSION: &str = "brain.Event:2";

/// An open event file.
#[derive(Debug)]
pub struct EventFile {
    file: File,
    path: PathBuf,
}

impl EventFile {
    /// A new event file in `dir` (created if missing), opened with the file version and a
    /// session start at step `from`.
    pub fn create(dir: &Path, from: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let now = wall_time();
        let path = dir.join(format!(
            "events.out.tfevents.{:010}.burnish.{}",
            now as u64,
            std::process::id()
        ));
        let mut out = Self {
            file: File::create_new(&path)?,
            path,
        };
        out.write(&file_version_event(now, "burnish"))?;
        out.write(&session_start_event(now, from))?;
        Ok(out)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `values` (tag, value) as the scalars of `step`, now.
    pub fn scalars(&mut self, step: u64, values: &[(String, f32)]) -> std::io::Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        self.write(&scalars_event(wall_time(), step, values))
    }

    /// Appends one event's record, whole, and flushes it.
    fn write(&mut self, event: &[u8]) -> std::io::Result<()> {
        self.file.write_all(&record(event))?;
        self.file.flush()
    }
}

/// Seconds since the Unix epoch.
fn wall_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A metrics line's scalars under TensorBoard tags, with their step: a training step's values as
/// `train/<key>`, an evaluation's as `eval/<key>` (`eval_loss` as `eval/loss`), a held-out
/// check's as `check/<key>`; `None` for lines of neither kind (a skipped step). Values that are
/// not numbers are left out.
pub fn tagged_scalars(line: &serde_json::Value) -> Option<(u64, Vec<(String, f32)>)> {
    let fields = line.as_object()?;
    let (prefix, step_key) = if fields.contains_key("eval_step") {
        ("eval", "eval_step")
    } else if fields.contains_key("check") {
        ("check", "step")
    } else if fields.contains_key("step") {
        ("train", "step")
    } else {
        return None;
    };
    let step = fields.get(step_key)?.as_u64()?;
    let values = fields
        .iter()
        .filter(|(key, _)| *key != step_key)
        .filter_map(|(key, value)| {
            let name = key.strip_prefix("eval_").unwrap_or(key);
            Some((format!("{prefix}/{name}"), value.as_f64()? as f32))
        })
        .collect();
    Some((step, values))
}

/// The first event of a file: its format version and the writer's name.
fn file_version_event(wall_time: f64, writer: &str) -> Vec<u8> {
    let mut event = Vec::new();
    double_field(&mut event, 1, wall_time);
    bytes_field(&mut event, 3, FILE_VERSION.as_bytes());
    let mut source = Vec::new();
    bytes_field(&mut source, 1, writer.as_bytes());
    bytes_field(&mut event, 10, &source);
    event
}

/// A session start at `step` (`SessionLog { status: START }`).
fn session_start_event(wall_time: f64, step: u64) -> Vec<u8> {
    let mut event = Vec::new();
    double_field(&mut event, 1, wall_time);
    varint_field(&mut event, 2, step);
    let mut session = Vec::new();
    varint_field(&mut session, 1, 1);
    bytes_field(&mut event, 7, &session);
    event
}

/// A summary of scalar values at `step` (`Summary.Value { tag, simple_value }` each).
fn scalars_event(wall_time: f64, step: u64, values: &[(String, f32)]) -> Vec<u8> {
    let mut summary = Vec::new();
    for (tag, value) in values {
        let mut item = Vec::new();
        bytes_field(&mut item, 1, tag.as_bytes());
        item.push(tag_byte(2, 5));
        item.extend_from_slice(&value.to_le_bytes());
        bytes_field(&mut summary, 1, &item);
    }
    let mut event = Vec::new();
    double_field(&mut event, 1, wall_time);
    varint_field(&mut event, 2, step);
    bytes_field(&mut event, 5, &summary);
    event
}

/// A field's key for field numbers below 16: the number and the wire type.
fn tag_byte(field: u8, wire_type: u8) -> u8 {
    (field << 3) | wire_type
}

fn varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// A double, left out when zero (proto3 leaves default values out).
fn double_field(out: &mut Vec<u8>, field: u8, value: f64) {
    if value != 0.0 {
        out.push(tag_byte(field, 1));
        out.extend_from_slice(&value.to_le_bytes());
    }
}

/// An integer, left out when zero.
fn varint_field(out: &mut Vec<u8>, field: u8, value: u64) {
    if value != 0 {
        out.push(tag_byte(field, 0));
        varint(out, value);
    }
}

/// A string, bytes or an embedded message.
fn bytes_field(out: &mut Vec<u8>, field: u8, bytes: &[u8]) {
    out.push(tag_byte(field, 2));
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// One record: the length (little-endian u64) and its masked CRC, the data and its masked CRC.
fn record(data: &[u8]) -> Vec<u8> {
    let length = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&length);
    out.extend_from_slice(&masked_crc(&length).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// TFRecord's masking of a CRC-32C.
fn masked_crc(data: &[u8]) -> u32 {
    crc32c(data).rotate_right(15).wrapping_add(0xa282_ead8)
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bit by bit: records are a few hundred
/// bytes, a few per step.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0x82f6_3b78 & 0u32.wrapping_sub(crc & 1));
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The events of `scripts/golden/make_tensorboard.py`, at its wall times, are the bytes
    /// TensorBoard's own record writer and protobuf classes wrote.
    #[test]
    fn events_equal_tensorboards_bytes() {
        let scalars = |values: &[(&str, f32)]| -> Vec<(String, f32)> {
            values.iter().map(|(t, v)| (t.to_string(), *v)).collect()
        };
        let events = [
            file_version_event(1_764_374_400.25, "burnish"),
            session_start_event(1_764_374_400.25, 3),
            scalars_event(
                1_764_374_401.5,
                3,
                &scalars(&[
                    ("train/loss", 2.75),
                    ("train/lr", 1e-4),
                    ("train/grad_norm", 0.8125),
                ]),
            ),
            scalars_event(
                1_764_374_402.125,
                3,
                &scalars(&[("eval/loss", 2.5), ("eval/rewards/judge/mean", -0.375)]),
            ),
            scalars_event(1_764_374_403.0, 4, &scalars(&[("check/exact_match", 0.5)])),
        ];
        let ours: Vec<u8> = events.iter().flat_map(|e| record(e)).collect();
        let golden = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/tensorboard/events.out.tfevents.golden");
        assert_eq!(ours, std::fs::read(golden).unwrap());
    }

    /// A session's file holds whole records: the version, the resumed session's start, then
    /// the scalars written.
    #[test]
    fn a_file_holds_whole_records() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = EventFile::create(dir.path(), 7).unwrap();
        file.scalars(8, &[("train/loss".into(), 1.5)]).unwrap();
        let bytes = std::fs::read(file.path()).unwrap();
        let mut rest = &bytes[..];
        let mut events = Vec::new();
        while !rest.is_empty() {
            let length = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
            assert_eq!(&rest[8..12], &masked_crc(&rest[..8]).to_le_bytes());
            let data = &rest[12..12 + length];
            assert_eq!(
                &rest[12 + length..16 + length],
                &masked_crc(data).to_le_bytes()
            );
            events.push(data.to_vec());
            rest = &rest[16 + length..];
        }
        assert_eq!(events.len(), 3);
        assert!(events[0].windows(13).any(|w| w == FILE_VERSION.as_bytes()));
        // Session start at step 7: step field, then `session_log { status: START }`.
        assert!(events[1].ends_with(&[0x10, 7, 0x3a, 2, 0x08, 1]));
        assert!(events[2].windows(10).any(|w| w == b"train/loss"));
    }

    #[test]
    fn crc32c_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn metrics_lines_take_transformers_tags() {
        let (step, values) = tagged_scalars(&json!({
            "step": 3, "loss": 2.5, "lr": 1e-4, "rewards/judge/mean": 0.5
        }))
        .unwrap();
        assert_eq!(step, 3);
        let tags: Vec<&str> = values.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(tags, ["train/loss", "train/lr", "train/rewards/judge/mean"]);
        let (step, values) =
            tagged_scalars(&json!({"eval_step": 4, "eval_loss": 2.0, "reward": 1.0})).unwrap();
        assert_eq!(step, 4);
        assert_eq!(
            values,
            [
                ("eval/loss".to_string(), 2.0),
                ("eval/reward".to_string(), 1.0)
            ]
        );
        let (_, values) =
            tagged_scalars(&json!({"check": "after", "step": 9, "exact_match": 0.75})).unwrap();
        assert_eq!(values, [("check/exact_match".to_string(), 0.75)]);
        assert_eq!(
            tagged_scalars(&json!({"skipped_step": 2, "reason": "nan"})),
            None
        );
    }
}
