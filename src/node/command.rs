//! Commands run on a node, their output, and the pure parts of running them.

use std::collections::VecDeque;
use std::time::Duration;

use super::{Error, Result};

/// How long a command may run when the caller does not say.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// How much of each of stdout and stderr [`ExecOutput`] keeps by default (the last bytes).
pub const DEFAULT_OUTPUT_LIMIT: usize = 16 * 1024 * 1024;
/// How much of the combined output an [`Error::Exec`] carries.
pub(super) const ERROR_TAIL: usize = 64 * 1024;
/// Grace between coreutils `timeout`'s TERM and its KILL inside the node.
pub(super) const KILL_AFTER: Duration = Duration::from_secs(5);
/// The environment variable that marks every process an exec starts, so that the processes can
/// be found and killed from inside the node when the client gives up on the exec.
pub(super) const EXEC_MARKER_VAR: &str = "CAPD_INPLACE_EXEC";

/// A command to run on a node: an argv, never a shell string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub(super) argv: Vec<String>,
    pub(super) timeout: Duration,
    pub(super) env: Vec<(String, String)>,
    pub(super) stdin: Option<bytes::Bytes>,
    pub(super) output_limit: usize,
}

impl Command {
    pub fn new<S: Into<String>>(argv: impl IntoIterator<Item = S>) -> Command {
        Command {
            argv: argv.into_iter().map(Into::into).collect(),
            timeout: DEFAULT_TIMEOUT,
            env: Vec::new(),
            stdin: None,
            output_limit: DEFAULT_OUTPUT_LIMIT,
        }
    }

    pub fn arg(mut self, arg: impl Into<String>) -> Command {
        self.argv.push(arg.into());
        self
    }

    pub fn args<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Command {
        self.argv.extend(args.into_iter().map(Into::into));
        self
    }

    /// How long the command may run; it is killed after that (default 60 s).
    pub fn timeout(mut self, timeout: Duration) -> Command {
        self.timeout = timeout;
        self
    }

    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Command {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Bytes fed to the command's stdin, which is then closed.
    pub fn stdin(mut self, input: impl Into<bytes::Bytes>) -> Command {
        self.stdin = Some(input.into());
        self
    }

    /// How many bytes of each of stdout and stderr to keep (the last ones).
    pub fn output_limit(mut self, bytes: usize) -> Command {
        self.output_limit = bytes;
        self
    }

    pub fn argv(&self) -> &[String] {
        &self.argv
    }

    /// Refuses what Docker or the node would mangle or misread.
    pub(super) fn validate(&self) -> Result<()> {
        let invalid = |reason| {
            Err(Error::InvalidCommand {
                argv: self.argv.clone(),
                reason,
            })
        };
        match self.argv.first() {
            None => return invalid("the argv is empty"),
            Some(program) if program.is_empty() => return invalid("the program name is empty"),
            Some(_) => {}
        }
        if self.argv.iter().any(|arg| arg.contains('\0')) {
            return invalid("an argument contains a NUL byte");
        }
        if self.timeout.is_zero() {
            return invalid("the timeout is zero");
        }
        for (key, value) in &self.env {
            if key.is_empty() || key.contains(['=', '\0']) || value.contains('\0') {
                return invalid("an environment variable name is empty or contains '=' or NUL");
            }
            if key == EXEC_MARKER_VAR {
                return invalid("the environment variable CAPD_INPLACE_EXEC is reserved");
            }
        }
        Ok(())
    }

    /// The argv actually executed: the command under coreutils `timeout`, which TERMs the
    /// command's process group at the deadline and KILLs it [`KILL_AFTER`] later.
    pub(super) fn node_argv(&self) -> Vec<String> {
        let seconds = self.timeout.as_secs_f64().ceil().max(1.0) as u64;
        let mut argv = vec![
            "timeout".to_string(),
            format!("--kill-after={}", KILL_AFTER.as_secs()),
            seconds.to_string(),
        ];
        argv.extend(self.argv.iter().cloned());
        argv
    }

    /// How long the client waits before it gives up and kills the exec from outside: the
    /// in-node timeout, its kill grace, and a margin for Docker itself.
    pub(super) fn client_deadline(&self) -> Duration {
        Duration::from_secs(self.timeout.as_secs_f64().ceil().max(1.0) as u64)
            + KILL_AFTER
            + Duration::from_secs(3)
    }
}

/// What a finished command returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// The command as the caller gave it (without the `timeout` wrapper).
    pub argv: Vec<String>,
    pub exit_code: i64,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// True when stdout or stderr exceeded the output limit and only their end was kept.
    pub truncated: bool,
    /// The last `ERROR_TAIL` bytes of stdout and stderr interleaved as they arrived.
    pub output_tail: Vec<u8>,
}

impl ExecOutput {
    pub fn success(&self) -> bool {
        self.exit_code == 0
    }

    pub fn stdout_lossy(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// The [`Error::Exec`] for this output, whatever its exit code.
    pub fn into_error(self, container: &str) -> Error {
        Error::Exec {
            container: container.to_string(),
            argv: self.argv,
            exit_code: self.exit_code,
            output_tail: String::from_utf8_lossy(&self.output_tail).into_owned(),
        }
    }
}

/// Keeps the last `limit` bytes written to it.
#[derive(Debug)]
pub(super) struct TailBuffer {
    bytes: VecDeque<u8>,
    limit: usize,
    dropped: bool,
}

impl TailBuffer {
    pub(super) fn new(limit: usize) -> TailBuffer {
        TailBuffer {
            bytes: VecDeque::new(),
            limit,
            dropped: false,
        }
    }

    pub(super) fn push(&mut self, chunk: &[u8]) {
        let chunk = if chunk.len() > self.limit {
            self.dropped = true;
            self.bytes.clear();
            &chunk[chunk.len() - self.limit..]
        } else {
            chunk
        };
        let overflow = (self.bytes.len() + chunk.len()).saturating_sub(self.limit);
        if overflow > 0 {
            self.dropped = true;
            self.bytes.drain(..overflow);
        }
        self.bytes.extend(chunk);
    }

    pub(super) fn dropped(&self) -> bool {
        self.dropped
    }

    pub(super) fn into_vec(self) -> Vec<u8> {
        self.bytes.into()
    }
}

/// Whether an exit code means the in-node `timeout` stopped the command: 124 when TERM
/// sufficed, 137 (128 + KILL) when it took the KILL. A command that exits so by itself before
/// its deadline is not a timeout.
pub(super) fn timed_out_in_node(exit_code: i64, elapsed: Duration, timeout: Duration) -> bool {
    matches!(exit_code, 124 | 137) && elapsed >= timeout
}

/// The argv that lists the processes carrying `marker` in their environment, as
/// `/proc/<pid>/environ` lines. No shell: `find` walks /proc and `grep` tests each file.
pub(super) fn find_marked_argv(marker: &str) -> Vec<String> {
    [
        "find",
        "/proc",
        "-mindepth",
        "2",
        "-maxdepth",
        "2",
        "-name",
        "environ",
        "-exec",
        "grep",
        "-l",
        "-s",
        "-z",
        "-x",
        "-F",
        "-e",
        marker,
        "{}",
        "+",
    ]
    .into_iter()
    .map(String::from)
    .collect()
}

/// The pids in `find`'s output from [`find_marked_argv`]; anything else is ignored.
pub(super) fn parse_marked_pids(output: &str) -> Vec<u32> {
    output
        .lines()
        .filter_map(|line| {
            line.strip_prefix("/proc/")?
                .strip_suffix("/environ")?
                .parse()
                .ok()
        })
        .filter(|pid| *pid > 1)
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn builder_and_node_argv() {
        let command = Command::new(["kubeadm", "upgrade"])
            .arg("node")
            .args(["--v", "5"])
            .timeout(Duration::from_millis(2500));
        assert_eq!(command.argv(), ["kubeadm", "upgrade", "node", "--v", "5"]);
        assert_eq!(
            command.node_argv(),
            [
                "timeout",
                "--kill-after=5",
                "3",
                "kubeadm",
                "upgrade",
                "node",
                "--v",
                "5"
            ]
        );
        assert_eq!(command.client_deadline(), Duration::from_secs(11));
    }

    #[test]
    fn program_starting_with_dash_stays_an_argument_of_timeout() {
        // coreutils timeout stops option parsing at the duration, so the command is never
        // taken for one of timeout's options.
        let argv = Command::new(["--help"]).node_argv();
        assert_eq!(argv[3], "--help");
        assert_eq!(argv[2], "60");
    }

    #[test]
    fn validation() {
        let bad = [
            (Command::new(Vec::<String>::new()), "empty"),
            (Command::new([""]), "program name"),
            (Command::new(["echo", "a\0b"]), "NUL"),
            (Command::new(["true"]).timeout(Duration::ZERO), "zero"),
            (Command::new(["true"]).env("", "x"), "environment"),
            (Command::new(["true"]).env("A=B", "x"), "environment"),
            (Command::new(["true"]).env(EXEC_MARKER_VAR, "x"), "reserved"),
        ];
        for (command, want) in bad {
            match command.validate() {
                Err(Error::InvalidCommand { reason, .. }) => {
                    assert!(reason.contains(want), "{command:?}: {reason}")
                }
                other => panic!("{command:?} gave {other:?}"),
            }
        }
        assert!(
            Command::new(["sh", "-c", "a;b"])
                .env("PATH", "/bin")
                .validate()
                .is_ok()
        );
    }

    #[test]
    fn tail_buffer_keeps_the_end() {
        let mut tail = TailBuffer::new(5);
        tail.push(b"abc");
        assert!(!tail.dropped());
        tail.push(b"def");
        assert!(tail.dropped());
        assert_eq!(tail.into_vec(), b"bcdef");

        let mut tail = TailBuffer::new(3);
        tail.push(b"0123456789");
        assert_eq!(tail.into_vec(), b"789");

        let mut tail = TailBuffer::new(4);
        tail.push(b"ab");
        tail.push(b"cd");
        assert!(!tail.dropped());
        assert_eq!(tail.into_vec(), b"abcd");
    }

    #[test]
    fn timeout_exit_codes() {
        let limit = Duration::from_secs(10);
        assert!(timed_out_in_node(124, Duration::from_secs(10), limit));
        assert!(timed_out_in_node(137, Duration::from_secs(15), limit));
        assert!(!timed_out_in_node(124, Duration::from_secs(1), limit));
        assert!(!timed_out_in_node(1, Duration::from_secs(20), limit));
        assert!(!timed_out_in_node(0, Duration::from_secs(20), limit));
    }

    #[test]
    fn marked_pids() {
        let output = "/proc/42/environ\n/proc/self/environ\n/proc/1/environ\n/proc/x/environ\nfind: '/proc/77': No such file\n/proc/108/environ\n";
        assert_eq!(parse_marked_pids(output), [42, 108]);
        let argv = find_marked_argv("CAPD_INPLACE_EXEC=abc");
        assert_eq!(argv[0], "find");
        assert!(argv.contains(&"CAPD_INPLACE_EXEC=abc".to_string()));
    }

    #[test]
    fn exec_error_from_output() {
        let output = ExecOutput {
            argv: vec!["false".into()],
            exit_code: 1,
            stdout: vec![],
            stderr: b"boom".to_vec(),
            truncated: false,
            output_tail: b"boom".to_vec(),
        };
        match output.into_error("c") {
            Error::Exec {
                container,
                argv,
                exit_code,
                output_tail,
            } => {
                assert_eq!(container, "c");
                assert_eq!(argv, ["false"]);
                assert_eq!(exit_code, 1);
                assert_eq!(output_tail, "boom");
            }
            other => panic!("{other:?}"),
        }
    }
}
