//! Helpers shared by the CLI tests: run the real binary and look at what it did.
#![allow(dead_code, unreachable_pub)]

use std::io::Write;
use std::process::{Command, Output, Stdio};

/// What one run of `caasctl` did.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(out: Output) -> Self {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Asserts success and returns stdout.
    #[track_caller]
    pub fn ok(&self) -> &str {
        assert_eq!(
            self.code, 0,
            "caasctl failed:\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        &self.stdout
    }

    /// Asserts exit status 1 with exactly one `error: ` line on stderr and returns it.
    #[track_caller]
    pub fn err(&self) -> &str {
        assert_eq!(
            self.code, 1,
            "expected failure:\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(
            lines.len(),
            1,
            "expected one line on stderr, got: {}",
            self.stderr
        );
        assert!(lines[0].starts_with("error: "), "{}", self.stderr);
        lines[0]
    }
}

fn command(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_caasctl"));
    cmd.args(args)
        .env_remove("CAAS_GATEWAY_URL")
        .env_remove("CAAS_API_TOKEN")
        .stdin(Stdio::null());
    cmd
}

/// Runs `caasctl ARGS`.
pub fn caasctl(args: &[&str]) -> Run {
    Run::from(command(args).output().expect("run caasctl"))
}

/// Runs `caasctl ARGS` with extra environment variables.
pub fn caasctl_env(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = command(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    Run::from(cmd.output().expect("run caasctl"))
}

/// Runs `caasctl ARGS` with `input` on standard input.
pub fn caasctl_stdin(args: &[&str], input: &[u8]) -> Run {
    let mut child = command(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn caasctl");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .expect("write stdin");
    Run::from(child.wait_with_output().expect("wait caasctl"))
}

/// A path as &str.
pub fn s(p: &std::path::Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}
