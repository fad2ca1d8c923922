//! Several commands in one exec.
//!
//! Every `docker exec` costs several Engine round trips (create, start, stream, inspect) whatever
//! it runs: tens of milliseconds. An upgrade that asks a node a dozen small questions (versions,
//! files, the Node object) pays more for the asking than for the answers. A [`Batch`] runs its
//! commands one after the other inside a single exec and returns one [`ExecOutput`] per
//! command, as if each had run alone.
//!
//! The script is a constant; every argv reaches it as arguments, never as shell text. What
//! differs from separate execs, and why callers do not mind:
//! - trailing newlines of each stdout and stderr are dropped and NUL bytes are removed (bash
//!   command substitution): the answers batched are text that is parsed, not copied;
//! - the commands share the batch's one timeout;
//! - a command runs even when the one before it failed, as questions should; a batch made
//!   with [`Batch::stop_at_failure`] is a procedure instead, and answers only up to the first
//!   command that failed.

use std::time::Duration;

use super::command::{Command, ExecOutput};
use super::{Error, NodeExec, Result};

/// After a first argument saying whether to stop at the first failure (`1`) or not (`0`), runs
/// each command given as `<argc> <argv...>` and prints `<exit> <stdout bytes> <stderr bytes>`,
/// a newline, the stdout, a newline, the stderr and a newline. `LC_ALL=C` (set by the caller)
/// makes `${#var}` count bytes, not characters.
const SCRIPT: &str = r#"set -u
stop=$1; shift
err=$(mktemp) || exit 125
trap 'rm -f "$err"' EXIT
while (( $# > 0 )); do
  argc=$1; shift
  out=$("${@:1:argc}" 2>"$err"); rc=$?
  shift "$argc"
  errout=$(<"$err")
  printf '%d %d %d\n%s\n%s\n' "$rc" "${#out}" "${#errout}" "$out" "$errout"
  if (( stop && rc != 0 )); then exit 0; fi
done
"#;

/// Commands to run in one exec, in order.
#[derive(Debug, Clone)]
pub struct Batch {
    commands: Vec<Vec<String>>,
    timeout: Duration,
    stop_at_failure: bool,
}

impl Batch {
    /// An empty batch whose commands together may take `timeout`.
    pub fn new(timeout: Duration) -> Batch {
        Batch {
            commands: Vec::new(),
            timeout,
            stop_at_failure: false,
        }
    }

    /// Makes the batch a procedure: a command runs only when every one before it succeeded, and
    /// the answers end with the first failure.
    pub fn stop_at_failure(mut self) -> Batch {
        self.stop_at_failure = true;
        self
    }

    /// Adds `command`'s argv. Its own timeout, stdin and environment are not used.
    pub fn push(&mut self, command: &Command) {
        self.commands.push(command.argv().to_vec());
    }

    pub fn len(&self) -> usize {
        self.commands.len()
    }

    pub fn is_empty(&self) -> bool {
        self.commands.is_empty()
    }

    /// Runs the batch on `node`: one output per command, in the order they were pushed (for a
    /// procedure, up to and including the first that failed).
    pub async fn run<N: NodeExec>(&self, node: &N) -> Result<Vec<ExecOutput>> {
        let stop = if self.stop_at_failure { "1" } else { "0" };
        let mut command = Command::new(["bash", "-c", SCRIPT, "bash", stop])
            .env("LC_ALL", "C")
            .timeout(self.timeout);
        for argv in &self.commands {
            if argv.is_empty() {
                return Err(Error::InvalidCommand {
                    argv: argv.clone(),
                    reason: "the argv is empty",
                });
            }
            command = command
                .arg(argv.len().to_string())
                .args(argv.iter().cloned());
        }
        let output = node.exec(command).await?;
        if output.exit_code != 0 {
            return Err(output.into_error(node.name()));
        }
        parse(&output.stdout, &self.commands, self.stop_at_failure).map_err(|reason| Error::Batch {
            container: node.name().to_string(),
            reason,
        })
    }
}

/// Splits the script's stdout back into one output per command; a procedure's answers may end
/// early, at a failure.
fn parse(
    mut stdout: &[u8],
    commands: &[Vec<String>],
    stop_at_failure: bool,
) -> std::result::Result<Vec<ExecOutput>, String> {
    let mut outputs: Vec<ExecOutput> = Vec::with_capacity(commands.len());
    for argv in commands {
        if stop_at_failure && outputs.last().is_some_and(|last| last.exit_code != 0) {
            break;
        }
        let newline = stdout
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| format!("no header for `{}`", argv.join(" ")))?;
        let header = std::str::from_utf8(&stdout[..newline]).map_err(|e| e.to_string())?;
        let numbers: Vec<i64> = header
            .split(' ')
            .map(str::parse)
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| format!("malformed header {header:?}"))?;
        let [exit_code, out_len, err_len] = numbers[..] else {
            return Err(format!("malformed header {header:?}"));
        };
        stdout = &stdout[newline + 1..];
        let (out, rest) = take_line(stdout, out_len)?;
        let (err, rest) = take_line(rest, err_len)?;
        stdout = rest;
        let mut output_tail = out.to_vec();
        output_tail.extend_from_slice(err);
        outputs.push(ExecOutput {
            argv: argv.clone(),
            exit_code,
            stdout: out.to_vec(),
            stderr: err.to_vec(),
            truncated: false,
            output_tail,
        });
    }
    if !stdout.is_empty() {
        return Err(format!(
            "{} unexpected bytes after the last answer",
            stdout.len()
        ));
    }
    Ok(outputs)
}

/// `len` bytes followed by a newline.
fn take_line(bytes: &[u8], len: i64) -> std::result::Result<(&[u8], &[u8]), String> {
    let len = usize::try_from(len).map_err(|_| format!("negative length {len}"))?;
    match bytes.get(len) {
        Some(b'\n') => Ok((&bytes[..len], &bytes[len + 1..])),
        _ => Err(format!(
            "an answer of {len} bytes is cut short or not terminated"
        )),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    fn argvs(n: usize) -> Vec<Vec<String>> {
        (0..n).map(|i| vec![format!("cmd{i}")]).collect()
    }

    #[test]
    fn splits_answers_with_newlines_and_empty_parts() {
        let stdout = b"0 9 0\nv1.32.3\nx\n\n1 0 12\n\nno such file\n";
        let outputs = parse(stdout, &argvs(2), false).unwrap();
        assert_eq!(outputs[0].exit_code, 0);
        assert_eq!(outputs[0].stdout, b"v1.32.3\nx");
        assert!(outputs[0].stderr.is_empty());
        assert_eq!(outputs[1].exit_code, 1);
        assert!(outputs[1].stdout.is_empty());
        assert_eq!(outputs[1].stderr, b"no such file");
        assert_eq!(outputs[1].argv, vec!["cmd1".to_string()]);
    }

    #[test]
    fn a_procedure_answers_up_to_its_first_failure() {
        let stdout = b"0 2 0\nok\n\n3 0 4\n\nfail\n";
        let outputs = parse(stdout, &argvs(3), true).unwrap();
        assert_eq!(outputs.len(), 2);
        assert_eq!(outputs[1].exit_code, 3);
        assert_eq!(outputs[1].argv, vec!["cmd1".to_string()]);
        // Stopping early is only allowed at a failure, and only for a procedure.
        assert!(parse(b"0 0 0\n\n\n", &argvs(2), true).is_err());
        assert!(parse(stdout, &argvs(3), false).is_err());
    }

    #[test]
    fn refuses_what_does_not_add_up() {
        let cases: [&[u8]; 6] = [
            b"",
            b"0 5 0\nabc\n\n",
            b"0 3 0\nabcd\n\n",
            b"zero 0 0\n\n\n",
            b"0 0\n\n\n",
            b"0 0 0\n\n\ntrailing",
        ];
        for stdout in cases {
            assert!(
                parse(stdout, &argvs(1), false).is_err(),
                "{:?}",
                String::from_utf8_lossy(stdout)
            );
        }
    }
}
