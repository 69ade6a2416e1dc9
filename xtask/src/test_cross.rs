//! `cargo xtask test-cross --target TRIPLE [--toolchain ...] [-- CARGO_TEST_ARGS]`: runs the
//! workspace's unit and integration tests for another architecture under qemu-user, so the statm
//! reader and jemalloc are exercised on ARM.
//!
//! The build environment comes from `target.rs`, exactly as `dist` uses it; this file only adds
//! the qemu runner. Doctests are not run: rustdoc's cross-target support is fragile, and the host
//! run already covers them. The xtask itself is excluded, since it is a host tool.

use std::path::Path;

use crate::project::Result;
use crate::target::{BuildEnv, Target, Toolchain, ToolchainChoice, cargo_target_var};

/// Runs the `test-cross` task.
pub fn run(root: &Path, args: &[String]) -> Result<()> {
    let mut triple = None;
    let mut toolchain = None;
    let mut extra = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--target" => triple = Some(args.next().ok_or("--target needs a triple")?.clone()),
            "--toolchain" => {
                let value = args.next().ok_or("--toolchain needs a value")?;
                toolchain = Some(ToolchainChoice::parse(value)?);
            }
            "--" => {
                extra.extend(args.by_ref().cloned());
            }
            other => return Err(format!("test-cross: unexpected argument `{other}`").into()),
        }
    }
    let triple = triple.ok_or("test-cross needs --target TRIPLE")?;
    let target = Target::new(&triple);

    let mut build_env = BuildEnv::probe(root)?;
    let toolchain = build_env.select(&target, toolchain)?;
    // cross images bring their own runner; only a local build needs qemu on this host.
    let runner = match toolchain {
        Toolchain::Cross => Vec::new(),
        _ => target.runner(build_env.host())?,
    };
    println!("==> {triple}: testing with {toolchain}");
    if !runner.is_empty() {
        println!("    runner: {}", runner.join(" "));
    }

    let mut command = build_env.cargo_command(&toolchain, &target, "test");
    command.args([
        "--locked",
        "--workspace",
        "--exclude",
        "xtask",
        "--lib",
        "--tests",
    ]);
    // Under emulation a run is slow; report every failing test binary, not just the first.
    if !extra.iter().any(|arg| arg == "--no-fail-fast") {
        command.arg("--no-fail-fast");
    }
    command.args(&extra);
    if !runner.is_empty() {
        // Cargo splits the runner on spaces; the qemu paths contain none.
        command.env(cargo_target_var(&triple, "RUNNER"), runner.join(" "));
    }
    crate::project::run_status(&mut command)
}
