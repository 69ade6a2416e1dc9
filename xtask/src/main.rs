//! Project automation for blufio, run as `cargo xtask <task>` through the alias in
//! `.cargo/config.toml`.
//!
//! This file only dispatches to one module per task and holds the few helpers every task needs
//! (the project root, the cargo to call, running a command with an error that names it). How to
//! build for a given target lives in `target.rs`, the child processes the tasks start (a guard
//! that kills them, SIGTERM, a bounded wait) in `process.rs`, and the JSON they read in
//! `json.rs`; the tasks never re-derive them. There are no shell scripts and no global state:
//! each task gets the project root as an argument.

mod bench;
mod dist;
mod fuzz;
mod json;
mod process;
mod setup_cross;
mod smoke;
mod soak;
mod target;
mod test_cross;
mod tidy;

use std::env;
use std::error::Error;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Output};

/// The error type of every task: the message says which command or file failed.
pub type Result<T, E = Box<dyn Error>> = std::result::Result<T, E>;

/// (name, arguments, description) of every task, for the usage text.
const TASKS: &[(&str, &str, &str)] = &[
    (
        "bench",
        "[--quick] [--json PATH] [--binary PATH] [--floor PATH] [--env KEY=VALUE]...",
        "build release, then measure blufio side by side with the bare trillium floor \
         (benches/floor) in one interleaved run and print one table; --binary/--floor reuse \
         existing release binaries; --env sets a variable for blufio only; --quick is a short smoke run",
    ),
    (
        "dist",
        "[--target TRIPLE]... [--toolchain cargo|cross|build-std]",
        "build release archives and SHA256SUMS into target/dist (default: x86_64, aarch64 and \
         armv7 Linux); --toolchain skips the automatic choice for every listed target",
    ),
    (
        "fuzz",
        "[--seconds N] [--sanitizer none|address] [TARGET]...",
        "run each cargo-fuzz target in fuzz/ for N seconds (default 30) from the seeds in \
         fuzz/corpus and report execs; needs `cargo install cargo-fuzz --locked`",
    ),
    (
        "setup-cross",
        "",
        "install the Debian cross compilers, qemu-user, rustup targets and rust-src (idempotent)",
    ),
    (
        "test-cross",
        "--target TRIPLE [--toolchain ...] [-- CARGO_TEST_ARGS]",
        "run the workspace's unit and integration tests for TRIPLE under qemu-user",
    ),
    (
        "smoke",
        "[--target TRIPLE] [--archive PATH]",
        "start the binary from the dist archive (default target: the host) and probe /health, \
         /metrics and SIGTERM",
    ),
    (
        "soak",
        "[--minutes N] [--seconds N] [--binary PATH]",
        "run the release binary (built unless --binary is given) under mixed and hostile load \
         (default 5 minutes), sample memory into target/soak/ (CSV, SVG) and fail if RSS or heap \
         end above max(8 MiB, 25%) over their value after warm-up",
    ),
    (
        "tidy",
        "",
        "check that every .rs file starts with //! and src/http has no .unwrap()",
    ),
];

fn main() -> ExitCode {
    let mut args = env::args().skip(1);
    let task = args.next();
    let rest: Vec<String> = args.collect();
    let root = project_root();
    let result = match task.as_deref() {
        Some("bench") => bench::run(&root, &rest),
        Some("dist") => dist::run(&root, &rest),
        Some("fuzz") => fuzz::run(&root, &rest),
        Some("setup-cross") => setup_cross::run(&root, &rest),
        Some("test-cross") => test_cross::run(&root, &rest),
        Some("smoke") => smoke::run(&root, &rest),
        Some("soak") => soak::run(&root, &rest),
        Some("tidy") => tidy::run(&root, &rest),
        Some("help" | "-h" | "--help") => {
            println!("{}", usage());
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprintln!("unknown task `{other}`\n\n{}", usage());
            return ExitCode::from(2);
        }
        None => {
            eprintln!("{}", usage());
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            let mut source = error.source();
            while let Some(cause) = source {
                eprintln!("  caused by: {cause}");
                source = cause.source();
            }
            ExitCode::FAILURE
        }
    }
}

fn usage() -> String {
    let mut text = String::from("usage: cargo xtask <task> [args]\n\ntasks:\n");
    for (name, args, help) in TASKS {
        // Writing to a String cannot fail.
        let _ = writeln!(
            text,
            "  {}\n      {help}",
            format!("{name} {args}").trim_end()
        );
    }
    text
}

/// Returns the workspace root: the parent of this crate's manifest directory.
pub fn project_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// Returns the cargo that runs this xtask, so `cargo +toolchain xtask` stays on that toolchain.
pub fn cargo() -> OsString {
    env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// Returns the target directory: `$CARGO_TARGET_DIR` when set, else `<root>/target`.
pub fn target_dir(root: &Path) -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        // Cargo resolves a relative CARGO_TARGET_DIR against the current directory; so do we.
        Some(dir) => std::path::absolute(PathBuf::from(&dir)).unwrap_or_else(|_| dir.into()),
        None => root.join("target"),
    }
}

/// Formats a command the way a user would type it, for messages.
pub fn describe(command: &Command) -> String {
    let mut text = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}

/// Runs `command` with inherited stdio and fails, naming it, unless it exits with status 0.
pub fn run_status(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .map_err(|error| format!("cannot start `{}`: {error}", describe(command)))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{}` failed: {status}", describe(command)).into())
    }
}

/// Runs `command`, captures its output and fails, naming it and quoting its stderr, unless it
/// exits with status 0.
pub fn run_output(command: &mut Command) -> Result<Output> {
    let output = command
        .output()
        .map_err(|error| format!("cannot start `{}`: {error}", describe(command)))?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(format!(
            "`{}` failed: {}: {}",
            describe(command),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )
        .into())
    }
}

/// Returns the first executable called `name` on `PATH`.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;

    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| {
            candidate
                .metadata()
                .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        })
}
