//! `cargo xtask fuzz [--seconds N] [--sanitizer none|address] [TARGET]...`: runs each cargo-fuzz
//! target in `fuzz/` for N seconds (default 30) and reports its executions.
//!
//! The fuzz crate is its own workspace, so the normal build never compiles it. cargo-fuzz
//! passes nightly-only flags; on the stable toolchain this task sets `RUSTC_BOOTSTRAP=1`, and the
//! default sanitizer is `none` (the targets assert their own invariants, and AddressSanitizer adds
//! little to safe Rust). Each target reads the committed seeds in
//! `fuzz/corpus/<target>/` and writes what it learns to `target/fuzz-corpus/<target>/`, so a run
//! never dirties the repository. A crash fails the task and leaves the input in
//! `fuzz/artifacts/<target>/`. It does not minimise crashes or merge corpora; `cargo fuzz tmin`
//! and `cargo fuzz cmin` do.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use crate::project::{Result, cargo, describe, run_status, target_dir};

/// The targets in `fuzz/Cargo.toml`, in the order they run.
const TARGETS: &[&str] = &["config", "proc", "message", "http_request", "chat_request"];

/// Runs the `fuzz` task.
pub fn run(root: &Path, args: &[String]) -> Result<()> {
    let mut seconds: u64 = 30;
    let mut sanitizer = "none".to_owned();
    let mut targets = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--seconds" => seconds = args.next().ok_or("--seconds needs a number")?.parse()?,
            "--sanitizer" => sanitizer = args.next().ok_or("--sanitizer needs a name")?.clone(),
            name if TARGETS.contains(&name) => targets.push(name.to_owned()),
            other => {
                return Err(format!(
                    "fuzz: unknown argument `{other}` (targets: {})",
                    TARGETS.join(", ")
                )
                .into());
            }
        }
    }
    if targets.is_empty() {
        targets = TARGETS.iter().map(|&name| name.to_owned()).collect();
    }
    let fuzz_dir = root.join("fuzz");
    let fuzz = |subcommand: &str| {
        let mut command = Command::new(cargo());
        command
            .current_dir(&fuzz_dir)
            .env("RUSTC_BOOTSTRAP", "1")
            .args(["fuzz", subcommand, "--sanitizer", &sanitizer]);
        command
    };
    if Command::new(cargo())
        .args(["fuzz", "--version"])
        .output()
        .map_or(true, |output| !output.status.success())
    {
        return Err("cargo-fuzz is not installed: cargo install cargo-fuzz --locked".into());
    }
    let started = Instant::now();
    run_status(&mut fuzz("build"))?;
    println!(
        "fuzz: built the targets in {:.0} s",
        started.elapsed().as_secs_f64()
    );

    let mut report = Vec::new();
    for target in &targets {
        let corpus = target_dir(root).join("fuzz-corpus").join(target);
        fs::create_dir_all(&corpus)?;
        let mut command = fuzz("run");
        command
            .arg(target)
            .arg(&corpus)
            .arg(fuzz_dir.join("corpus").join(target))
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            // One input may take at most 10 s and 2 GiB, far above what a healthy target needs.
            .args(["-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1"]);
        println!("==> {}", describe(&command));
        let output = command
            .output()
            .map_err(|error| format!("cannot start `{}`: {error}", describe(&command)))?;
        let log = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() {
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(format!(
                "fuzz target {target} failed ({}):\n{}",
                output.status,
                tail.join("\n")
            )
            .into());
        }
        let (runs, secs) = done_line(&log)
            .ok_or_else(|| format!("fuzz target {target}: no `Done N runs` line in its output"))?;
        println!(
            "fuzz: {target}: {runs} execs in {secs} s ({} execs/s), no crash",
            runs / secs.max(1)
        );
        report.push((target.clone(), runs, secs));
    }
    println!("\nfuzz summary ({seconds} s per target):");
    for (target, runs, secs) in report {
        println!(
            "  {target:14} {runs:>10} execs  {:>8} execs/s",
            runs / secs.max(1)
        );
    }
    Ok(())
}

/// Reads libFuzzer's final `Done 432153 runs in 21 second(s)` line.
fn done_line(log: &str) -> Option<(u64, u64)> {
    let line = log.lines().rev().find(|line| line.starts_with("Done "))?;
    let mut words = line.split_whitespace();
    let runs = words.nth(1)?.parse().ok()?;
    let secs = words.nth(2)?.parse().ok()?;
    Some((runs, secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn done_line_gives_runs_and_seconds() {
        let log =
            "#432153\tDONE   cov: 4814 ft: 11877\nDone 432153 runs in 21 second(s)\nstat::x: 1\n";
        assert_eq!(done_line(log), Some((432153, 21)));
        assert_eq!(done_line("crashed\n"), None);
    }
}
