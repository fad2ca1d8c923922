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
//! - a command runs even when the one before it failed, as questions should. A batch may start
//!   with steps ([`Batch::push_step`]): a procedure whose first failed step ends the batch; the
//!   questions after the steps are asked only once every step succeeded, and then all of them.

use std::time::Duration;

use super::command::{Command, ExecOutput};
use super::{Error, NodeExec, Result, is_plain};

/// After a first argument saying how many of the commands are steps (the batch ends after a step
/// that failed), runs each command given as `<argc> <argv...>` and prints `<exit> <stdout bytes> <stderr bytes>`,
/// a newline, the stdout, a newline, the stderr and a newline. `LC_ALL=C` (set by the caller)
/// makes `${#var}` count bytes, not characters.
const SCRIPT: &str = r#"set -u
steps=$1; shift
err=$(mktemp) || exit 125
trap 'rm -f "$err"' EXIT
index=0
while (( $# > 0 )); do
  argc=$1; shift
  out=$("${@:1:argc}" 2>"$err"); rc=$?
  shift "$argc"
  errout=$(<"$err")
  printf '%d %d %d\n%s\n%s\n' "$rc" "${#out}" "${#errout}" "$out" "$errout"
  if (( index < steps && rc != 0 )); then exit 0; fi
  index=$((index + 1))
done
"#;

/// Commands to run in one exec, in order.
#[derive(Debug, Clone)]
pub struct Batch {
    commands: Vec<Vec<String>>,
    timeout: Duration,
    /// How many of the first commands are steps.
    steps: usize,
}

impl Batch {
    /// An empty batch whose commands together may take `timeout`.
    pub fn new(timeout: Duration) -> Batch {
        Batch {
            commands: Vec::new(),
            timeout,
            steps: 0,
        }
    }

    /// Adds `command` as a step: it runs only when every step before it succeeded, and if it
    /// fails, the batch ends with its answer. Steps come before every question.
    pub fn push_step(&mut self, command: &Command) {
        debug_assert_eq!(self.steps, self.commands.len(), "a step after a question");
        self.push(command);
        self.steps += 1;
    }

    /// Adds `command` as a question: it runs whatever the questions before it answered. Its
    /// own timeout, stdin and environment are not used (nor are a step's).
    pub fn push(&mut self, command: &Command) {
        self.commands.push(command.argv().to_vec());
    }

    pub fn len(&self) -> usize {
        self.commands.len()
    }

    pub fn is_empty(&self) -> bool {
        self.commands.is_empty()
    }

    /// Runs the batch on `node`: one output per command, in the order they were pushed, or up
    /// to and including the first step that failed.
    pub async fn run<N: NodeExec>(&self, node: &N) -> Result<Vec<ExecOutput>> {
        let steps = self.steps.to_string();
        let mut command = Command::new(["bash", "-c", SCRIPT, "bash", steps.as_str()])
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
        let output = node.exec(command).await.map_err(|e| self.named(e))?;
        if output.exit_code != 0 {
            return Err(self.named(output.into_error(node.name())));
        }
        parse(&output.stdout, &self.commands, self.steps).map_err(|reason| Error::Batch {
            container: node.name().to_string(),
            reason,
        })
    }

    /// The exec's error, naming what the batch ran ([`Batch::summary`]) instead of quoting the
    /// script and every argument: kilobytes (scripts, a kubeadm configuration) that would end up
    /// in the Machine's condition and its Events.
    fn named(&self, error: Error) -> Error {
        match error {
            Error::Timeout {
                container, after, ..
            } => Error::Timeout {
                container,
                argv: self.summary(),
                after,
            },
            Error::Exec {
                container,
                exit_code,
                output_tail,
                ..
            } => Error::Exec {
                container,
                argv: self.summary(),
                exit_code,
                output_tail,
            },
            other => other,
        }
    }

    /// Each command by its first words, up to four and up to the first that needs quoting,
    /// with `+` between commands: `sh -c + kubeadm upgrade node --config`.
    fn summary(&self) -> Vec<String> {
        let mut words = Vec::new();
        for (index, argv) in self.commands.iter().enumerate() {
            if index > 0 {
                words.push("+".to_string());
            }
            words.extend(
                argv.iter()
                    .take(4)
                    .take_while(|word| is_plain(word))
                    .cloned(),
            );
        }
        words
    }
}

/// Splits the script's stdout back into one output per command; the answers may end early, at
/// a failed step (one of the first `steps` commands).
fn parse(
    mut stdout: &[u8],
    commands: &[Vec<String>],
    steps: usize,
) -> std::result::Result<Vec<ExecOutput>, String> {
    let mut outputs: Vec<ExecOutput> = Vec::with_capacity(commands.len());
    for argv in commands {
        let step_failed =
            outputs.len() <= steps && outputs.last().is_some_and(|last| last.exit_code != 0);
        if step_failed {
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
        let outputs = parse(stdout, &argvs(2), 0).unwrap();
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
        let outputs = parse(stdout, &argvs(3), 3).unwrap();
        assert_eq!(outputs.len(), 2);
        assert_eq!(outputs[1].exit_code, 3);
        assert_eq!(outputs[1].argv, vec!["cmd1".to_string()]);
        // Stopping early is only allowed at a failure, and only at a step.
        assert!(parse(b"0 0 0\n\n\n", &argvs(2), 2).is_err());
        assert!(parse(stdout, &argvs(3), 0).is_err());
        assert!(parse(stdout, &argvs(3), 1).is_err());
        // Questions after the steps are all answered, a failed one included.
        let stdout = b"0 2 0\nok\n\n3 0 4\n\nfail\n0 0 0\n\n\n";
        assert_eq!(parse(stdout, &argvs(3), 1).unwrap().len(), 3);
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
                parse(stdout, &argvs(1), 0).is_err(),
                "{:?}",
                String::from_utf8_lossy(stdout)
            );
        }
    }
}
