//! Project automation for blufio, run as `cargo xtask <task>` through the alias in
//! `.cargo/config.toml`.
//!
//! This file only dispatches to one module per task. The few helpers every task needs (the
//! error type, the project root, the cargo to call, running a command with an error that names
//! it) live in `project.rs`, how to build for a given target in `target.rs`, the JSON
//! the tasks read in `json.rs`; the child processes they start (a guard that kills them,
//! SIGTERM, a bounded wait, a free port) come from the shared test kit (`testkit/`). The tasks
//! never re-derive them. There are
//! no shell scripts and no global state: each task gets the project root as an argument.

mod bench;
mod dist;
mod fuzz;
mod json;
mod project;
mod setup_cross;
mod smoke;
mod soak;
mod target;
mod test_cross;
mod tidy;

use std::env;
use std::fmt::Write as _;
use std::process::ExitCode;

use project::project_root;

/// (name, arguments, description) of every task, for the usage text.
const TASKS: &[(&str, &str, &str)] = &[
    (
        "bench",
        "[--quick] [--gateway-only | --store-only] [--json PATH] [--binary PATH] [--floor PATH] \
         [--env KEY=VALUE]...",
        "build release, then measure blufio side by side with the bare trillium floor \
         (benches/floor) in one interleaved run, then as a gateway and with and without the \
         session store, and print the tables; --gateway-only/--store-only run one of those \
         scenarios alone; --binary/--floor reuse existing release binaries; --env sets a \
         variable for blufio only; --quick is a short smoke run",
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
