//! Reward programs: GRPO rewards computed by a program of the user's own, in any language, as
//! TRL computes rewards with Python functions. The program is started once per run, in the
//! recipe's directory, and kept. It reads one JSON object per line on its standard input, each
//! describing a batch of completions with the keyword arguments TRL passes a reward function
//! (`prompts`, `completions`, `completion_ids`, and each of the prompt rows' other columns, one
//! value per completion). It answers each with one line on its standard output: a JSON array of
//! one reward per completion, a number, or `null` where the reward does not apply (TRL's `None`,
//! left out of the sums and means). Its standard error is the run's, so its logs and tracebacks
//! show as they happen.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::error::RunError;
use crate::grpo::RewardNames;

/// How long a program is given to exit after its input is closed, before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(5);

/// A running reward program with its names and weight.
#[derive(Debug)]
pub struct RewardProgram {
    pub names: RewardNames,
    pub weight: f64,
    /// The command line, as the recipe gave it (for messages).
    command: Vec<String>,
    pipes: Mutex<Pipes>,
}

#[derive(Debug)]
struct Pipes {
    child: Child,
    /// `None` once closed, so the program sees the end of its input.
    input: Option<ChildStdin>,
    output: BufReader<ChildStdout>,
}

impl RewardProgram {
    /// Starts `command` (a program and its arguments; found on `PATH` when not a path) in the
    /// directory `dir`.
    pub fn start(
        command: &[String],
        dir: &Path,
        name: &str,
        weight: f64,
    ) -> Result<Self, RunError> {
        let fail = |detail: String| RunError::RewardProgram {
            name: name.to_string(),
            detail,
        };
        let (program, args) = command
            .split_first()
            .ok_or_else(|| fail("`command` is empty: name the program and its arguments".into()))?;
        let mut child = Command::new(program)
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| {
                fail(format!(
                    "cannot start `{}` in {}: {e}; check that the program exists and can be \
                     run (relative paths are the recipe's)",
                    command.join(" "),
                    dir.display()
                ))
            })?;
        let input = child.stdin.take();
        let output = BufReader::new(child.stdout.take().expect("stdout is piped"));
        Ok(Self {
            names: RewardNames::of(name),
            weight,
            command: command.to_vec(),
            pipes: Mutex::new(Pipes {
                child,
                input,
                output,
            }),
        })
    }

    /// The rewards of the `count` completions `request` describes (one JSON object, the
    /// keyword arguments of a TRL reward function), `NaN` where the program answered `null`.
    pub fn score(&self, request: &Value, count: usize) -> Result<Vec<f64>, RunError> {
        let mut pipes = self.pipes.lock().unwrap_or_else(|e| e.into_inner());
        let mut line = serde_json::to_string(request).expect("a JSON value serializes");
        line.push('\n');
        let sent = match &mut pipes.input {
            Some(input) => input
                .write_all(line.as_bytes())
                .and_then(|()| input.flush()),
            None => Err(std::io::ErrorKind::BrokenPipe.into()),
        };
        let mut answer = String::new();
        // A closed input is a program that has ended, as is an output at its end.
        let read = match sent {
            Ok(()) => pipes.output.read_line(&mut answer),
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(0),
            Err(e) => Err(e),
        };
        match read {
            Ok(0) => {
                let status = pipes.close();
                Err(self.failed(format!(
                    "the program ended ({status}) without answering a batch of {count} \
                     completions; its error output, above, should say why"
                )))
            }
            Err(e) => {
                let status = pipes.close();
                Err(self.failed(format!(
                    "a batch of {count} completions could not be sent to it or its answer read \
                     ({e}); it was stopped ({status})"
                )))
            }
            Ok(_) => self.rewards(answer.trim_end(), count),
        }
    }

    /// The rewards an answer line gives, or why it gives none.
    fn rewards(&self, answer: &str, count: usize) -> Result<Vec<f64>, RunError> {
        let shown = || {
            let mut head: String = answer.chars().take(200).collect();
            if head.len() < answer.len() {
                head.push('…');
            }
            head
        };
        let expected = "a JSON array of one number (or null) per completion, on one line; print \
                        logs to standard error, not standard output";
        let values = match serde_json::from_str::<Value>(answer) {
            Ok(Value::Array(values)) => values,
            _ => {
                return Err(self.failed(format!(
                    "it answered `{}` where {expected} was expected",
                    shown()
                )));
            }
        };
        if values.len() != count {
            return Err(self.failed(format!(
                "it answered {} rewards for {count} completions",
                values.len()
            )));
        }
        values
            .iter()
            .enumerate()
            .map(|(i, value)| match value {
                Value::Null => Ok(f64::NAN),
                Value::Number(n) => n
                    .as_f64()
                    .ok_or_else(|| self.failed(format!("reward {i} ({n}) is not a number"))),
                other => Err(self.failed(format!(
                    "reward {i} is {other}, where {expected} was expected"
                ))),
            })
            .collect()
    }

    fn failed(&self, detail: String) -> RunError {
        RunError::RewardProgram {
            name: self.names.scorer.to_string(),
            detail: format!("`{}`: {detail}", self.command.join(" ")),
        }
    }
}

impl Pipes {
    /// Closes the program's input, so it can finish as at the end of a file; kills it if it has
    /// not exited within [`EXIT_GRACE`]. How it ended, for messages.
    fn close(&mut self) -> String {
        self.input = None;
        let start = Instant::now();
        while start.elapsed() < EXIT_GRACE {
            match self.child.try_wait() {
                Ok(Some(status)) => return status.to_string(),
                Err(e) => return format!("status not known: {e}"),
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        format!("killed after {} s", EXIT_GRACE.as_secs())
    }
}

impl Drop for RewardProgram {
    fn drop(&mut self) {
        self.pipes
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shell(script: &str) -> RewardProgram {
        let command = ["sh", "-c", script].map(String::from);
        RewardProgram::start(&command, Path::new("."), "judge", 1.0).unwrap()
    }

    fn detail(err: RunError) -> String {
        err.to_string()
    }

    /// Each request is one line in; each answer one line out, nulls read as NaN.
    #[test]
    fn a_program_answers_each_batch() {
        // Echoes back how many characters each request had, then a null.
        let program = shell(r#"while read -r line; do echo "[${#line}, null]"; done"#);
        let request = serde_json::json!({"completions": ["a", "b"]});
        let length = serde_json::to_string(&request).unwrap().len() as f64;
        for _ in 0..2 {
            let rewards = program.score(&request, 2).unwrap();
            assert_eq!(rewards[0], length);
            assert!(rewards[1].is_nan());
        }
    }

    #[test]
    fn a_wrong_answer_is_named() {
        let request = serde_json::json!({});
        let err = detail(
            shell("read -r line; echo 'score: 1'")
                .score(&request, 1)
                .unwrap_err(),
        );
        assert!(
            err.contains("reward program `judge`") && err.contains("answered `score: 1`"),
            "{err}"
        );
        let err = detail(
            shell("read -r line; echo '[1, 2]'")
                .score(&request, 3)
                .unwrap_err(),
        );
        assert!(err.contains("2 rewards for 3 completions"), "{err}");
        let err = detail(
            shell(r#"read -r line; echo '[1, "2"]'"#)
                .score(&request, 2)
                .unwrap_err(),
        );
        assert!(err.contains("reward 1 is \"2\""), "{err}");
    }

    #[test]
    fn a_program_that_ends_is_named() {
        let err = detail(
            shell("exit 3")
                .score(&serde_json::json!({}), 4)
                .unwrap_err(),
        );
        assert!(
            err.contains("ended (exit status: 3) without answering a batch of 4"),
            "{err}"
        );
        let missing = ["no-such-reward-program".to_string()];
        let err = detail(RewardProgram::start(&missing, Path::new("."), "judge", 1.0).unwrap_err());
        assert!(
            err.contains("cannot start `no-such-reward-program`"),
            "{err}"
        );
    }
}
