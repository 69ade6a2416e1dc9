//! How to build and run blufio for one target triple: the single place that knows which
//! toolchain to use (host cargo, a rustup target plus a C cross-compiler, `cross`, or std built
//! from `rust-src`) and which environment each needs.
//!
//! `dist`, `test-cross` and `smoke` all go through [`Target`] and [`Toolchain`], so the
//! linker, `CC_*`, `JEMALLOC_SYS_WITH_LG_PAGE` and the reproducibility flags are set the same way
//! everywhere and cargo's cache is reused between tasks. This module does not decide what to
//! build; the tasks pass the cargo subcommand and its arguments.

use std::collections::BTreeSet;
use std::env;
use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::project::{Result, cargo, describe, find_in_path, run_output};

/// Facts about a target triple that blufio knows how to cross-build on Debian.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct KnownTarget {
    triple: &'static str,
    /// The GNU triple: prefix of the cross gcc and the sysroot directory under `/usr`.
    gnu: &'static str,
    qemu: &'static str,
    apt_packages: &'static [&'static str],
    /// `JEMALLOC_SYS_WITH_LG_PAGE`, when jemalloc's page size must not be auto-detected.
    lg_page: Option<&'static str>,
}

const KNOWN_TARGETS: &[KnownTarget] = &[
    KnownTarget {
        triple: "x86_64-unknown-linux-gnu",
        gnu: "x86_64-linux-gnu",
        qemu: "qemu-x86_64-static",
        apt_packages: &["gcc-x86-64-linux-gnu", "libc6-dev-amd64-cross"],
        lg_page: None,
    },
    KnownTarget {
        triple: "aarch64-unknown-linux-gnu",
        gnu: "aarch64-linux-gnu",
        qemu: "qemu-aarch64-static",
        apt_packages: &["gcc-aarch64-linux-gnu", "libc6-dev-arm64-cross"],
        // jemalloc's page size is fixed at build time and a binary built for smaller pages than
        // the kernel's aborts at start-up. 64 KiB works on 4K, 16K (Raspberry Pi 5) and 64K
        // kernels, so it must never depend on what configure happens to detect.
        lg_page: Some("16"),
    },
    KnownTarget {
        triple: "armv7-unknown-linux-gnueabihf",
        gnu: "arm-linux-gnueabihf",
        qemu: "qemu-arm-static",
        apt_packages: &["gcc-arm-linux-gnueabihf", "libc6-dev-armhf-cross"],
        lg_page: None,
    },
];

/// The targets `dist` builds when no `--target` is given.
pub const DEFAULT_TARGETS: &[&str] = &[
    "x86_64-unknown-linux-gnu",
    "aarch64-unknown-linux-gnu",
    "armv7-unknown-linux-gnueabihf",
];

/// A target triple, with what is known about cross-building for it.
#[derive(Debug, Clone)]
pub struct Target {
    triple: String,
    known: Option<KnownTarget>,
}

impl Target {
    /// Returns the target for `triple`; triples outside the known table can still be built
    /// natively or with `cross`.
    pub fn new(triple: &str) -> Target {
        Target {
            triple: triple.to_owned(),
            known: KNOWN_TARGETS
                .iter()
                .copied()
                .find(|known| known.triple == triple),
        }
    }

    /// Returns the Rust target triple.
    pub fn triple(&self) -> &str {
        &self.triple
    }

    fn cc_name(&self) -> Option<String> {
        self.known.map(|known| format!("{}-gcc", known.gnu))
    }

    fn apt_hint(&self) -> String {
        match self.known {
            Some(known) => format!(
                "apt-get install {} (or run `cargo xtask setup-cross`)",
                known.apt_packages.join(" ")
            ),
            None => "a cross toolchain for this triple".to_owned(),
        }
    }

    /// Returns the qemu-user command (program and arguments) that runs this target's binaries
    /// on `host`, or an empty list when they run natively.
    pub fn runner(&self, host: &str) -> Result<Vec<String>> {
        if self.triple == host {
            return Ok(Vec::new());
        }
        let known = self
            .known
            .ok_or_else(|| format!("no qemu-user runner is known for {}", self.triple))?;
        if find_in_path(known.qemu).is_none() {
            return Err(format!(
                "{} is not on PATH: apt-get install qemu-user-static (or run `cargo xtask setup-cross`)",
                known.qemu
            )
            .into());
        }
        Ok(vec![
            known.qemu.to_owned(),
            "-L".to_owned(),
            format!("/usr/{}", known.gnu),
        ])
    }
}

/// Returns cargo's per-target environment variable name, e.g. `CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER`.
pub fn cargo_target_var(triple: &str, suffix: &str) -> String {
    format!(
        "CARGO_TARGET_{}_{suffix}",
        triple.to_ascii_uppercase().replace(['-', '.'], "_")
    )
}

/// Returns the cc crate's per-target compiler variable name, e.g. `CC_aarch64_unknown_linux_gnu`.
pub fn cc_var(triple: &str) -> String {
    format!("CC_{}", triple.replace(['-', '.'], "_"))
}

/// How a target gets built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Toolchain {
    /// The target is the host: plain cargo.
    Host,
    /// A rustup-installed std plus the C cross-compiler as linker and `CC`.
    RustupTarget { cc: String },
    /// cross-rs in a container; it brings its own C toolchain.
    Cross,
    /// std compiled from the `rust-src` component (`-Zbuild-std`), for targets whose prebuilt
    /// std cannot be downloaded.
    BuildStd { cc: String },
}

impl fmt::Display for Toolchain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Toolchain::Host => f.write_str("cargo (host target)"),
            Toolchain::RustupTarget { cc } => write!(f, "cargo with the rustup target and {cc}"),
            Toolchain::Cross => f.write_str("cross (container)"),
            Toolchain::BuildStd { cc } => {
                write!(f, "cargo -Zbuild-std (std from rust-src) and {cc}")
            }
        }
    }
}

/// A toolchain the user asked for with `--toolchain`, skipping the automatic choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolchainChoice {
    /// rustup target + C cross-compiler.
    Cargo,
    /// cross-rs.
    Cross,
    /// `-Zbuild-std`.
    BuildStd,
}

impl ToolchainChoice {
    /// Parses the `--toolchain` value.
    pub fn parse(value: &str) -> Result<ToolchainChoice> {
        match value {
            "cargo" => Ok(ToolchainChoice::Cargo),
            "cross" => Ok(ToolchainChoice::Cross),
            "build-std" => Ok(ToolchainChoice::BuildStd),
            other => Err(format!(
                "unknown toolchain `{other}`: expected cargo, cross or build-std"
            )
            .into()),
        }
    }
}

/// The Rust installation and paths that every build in one xtask run shares.
#[derive(Debug)]
pub struct BuildEnv {
    root: PathBuf,
    host: String,
    sysroot: PathBuf,
    rustc_commit: String,
    cargo_home: PathBuf,
    /// Targets rustup reports as installed; updated when `rustup target add` succeeds.
    installed: BTreeSet<String>,
    /// Targets `rustup target add` already failed for in this run, so it is tried only once.
    add_failed: BTreeSet<String>,
}

impl BuildEnv {
    /// Probes rustc (host triple, sysroot, commit) and rustup's installed targets.
    ///
    /// # Errors
    ///
    /// Fails when `rustc` cannot be run.
    pub fn probe(root: &Path) -> Result<BuildEnv> {
        let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
        let version = run_output(Command::new(&rustc).arg("-vV"))?;
        let version = String::from_utf8_lossy(&version.stdout).into_owned();
        let field = |name: &str| {
            version
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .map(|value| value.trim().to_owned())
        };
        let host = field("host:").ok_or("`rustc -vV` printed no host line")?;
        let rustc_commit = field("commit-hash:").unwrap_or_default();
        let sysroot = run_output(Command::new(&rustc).args(["--print", "sysroot"]))?;
        let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
        let cargo_home = match env::var_os("CARGO_HOME") {
            Some(home) => std::path::absolute(PathBuf::from(&home))?,
            None => env::home_dir()
                .ok_or("cannot locate CARGO_HOME: neither CARGO_HOME nor HOME is set")?
                .join(".cargo"),
        };
        let installed = installed_rustup_targets();
        Ok(BuildEnv {
            root: root.to_path_buf(),
            host,
            sysroot,
            rustc_commit,
            cargo_home,
            installed,
            add_failed: BTreeSet::new(),
        })
    }

    /// Returns the host triple.
    pub fn host(&self) -> &str {
        &self.host
    }

    fn rust_src(&self) -> PathBuf {
        self.sysroot.join("lib/rustlib/src/rust")
    }

    /// Picks the toolchain for `target`, in the order host, rustup target, cross, build-std,
    /// unless `choice` forces one.
    ///
    /// # Errors
    ///
    /// Fails with a message naming what to install when no toolchain fits.
    pub fn select(
        &mut self,
        target: &Target,
        choice: Option<ToolchainChoice>,
    ) -> Result<Toolchain> {
        if target.triple == self.host && choice.is_none() {
            return Ok(Toolchain::Host);
        }
        let cc = target.cc_name().filter(|cc| find_in_path(cc).is_some());
        let want = |wanted: ToolchainChoice| choice.is_none_or(|choice| choice == wanted);

        if want(ToolchainChoice::Cargo) {
            if target.triple == self.host {
                return Ok(Toolchain::Host);
            }
            if let Some(cc) = &cc
                && self.ensure_rustup_target(target.triple())
            {
                return Ok(Toolchain::RustupTarget { cc: cc.clone() });
            }
        }
        if want(ToolchainChoice::Cross) && cross_available() {
            return Ok(Toolchain::Cross);
        }
        if want(ToolchainChoice::BuildStd)
            && let Some(cc) = &cc
            && self.rust_src().join("library").is_dir()
        {
            return Ok(Toolchain::BuildStd { cc: cc.clone() });
        }
        Err(self.missing_toolchain(target, choice, cc.is_some()).into())
    }

    fn missing_toolchain(
        &self,
        target: &Target,
        choice: Option<ToolchainChoice>,
        have_cc: bool,
    ) -> String {
        let triple = target.triple();
        let cross = "`cross` with a running Docker engine (`docker info` must succeed)";
        let mut needs = Vec::new();
        if target.known.is_none() {
            let known: Vec<_> = KNOWN_TARGETS.iter().map(|known| known.triple).collect();
            needs.push(format!(
                "xtask knows the Debian cross toolchains only for {}; use {cross}",
                known.join(", ")
            ));
        } else {
            if !have_cc && choice != Some(ToolchainChoice::Cross) {
                let cc = target.cc_name().unwrap_or_default();
                needs.push(format!(
                    "install the C cross-compiler {cc}: {}",
                    target.apt_hint()
                ));
            }
            let have_std = self.installed.contains(triple);
            let have_src = self.rust_src().join("library").is_dir();
            match choice {
                Some(ToolchainChoice::Cargo) if !have_std => {
                    needs.push(format!("install the prebuilt std: `rustup target add {triple}`"));
                }
                Some(ToolchainChoice::BuildStd) if !have_src => {
                    needs.push("install std's sources: `rustup component add rust-src`".to_owned());
                }
                Some(ToolchainChoice::Cross) => needs.push(format!("install {cross}")),
                None if !have_std && !have_src => needs.push(format!(
                    "install a std: `rustup target add {triple}`, or `rustup component add rust-src` \
                     to build one with -Zbuild-std"
                )),
                _ => {}
            }
            if choice.is_none() {
                needs.push(format!("or use {cross}"));
            }
        }
        format!("cannot build {triple}: {}", needs.join("; "))
    }

    /// Returns whether the rustup std for `triple` is installed, trying `rustup target add`
    /// once when it is not.
    fn ensure_rustup_target(&mut self, triple: &str) -> bool {
        if self.installed.contains(triple) {
            return true;
        }
        if self.add_failed.contains(triple) || find_in_path("rustup").is_none() {
            return false;
        }
        let mut command = Command::new("rustup");
        command.args(["target", "add", triple]);
        println!("trying `{}`", describe(&command));
        match run_output(&mut command) {
            Ok(_) => {
                self.installed.insert(triple.to_owned());
                true
            }
            Err(error) => {
                println!("note: no prebuilt std for {triple} ({error}); trying the next toolchain");
                self.add_failed.insert(triple.to_owned());
                false
            }
        }
    }

    /// Returns the flags that strip build-machine paths from binaries, so archives built in any
    /// checkout, by any user, are identical.
    fn remap_flags(&self) -> Vec<String> {
        // rustc applies the last matching prefix, so the specific rust-src mapping comes after
        // the general sysroot one. It maps std's sources to where the prebuilt std says they
        // are, so panic locations read the same whichever way std was obtained. The same flags
        // are used for every target and task, so cargo's fingerprints stay stable across runs.
        vec![
            remap(&self.cargo_home, "/cargo"),
            remap(&self.root, "/blufio"),
            remap(&self.sysroot, "/rustc"),
            remap(&self.rust_src(), &format!("/rustc/{}", self.rustc_commit)),
        ]
    }

    /// Returns a cargo (or cross) command running `subcommand --target <triple>` in the project
    /// root, with the toolchain's environment set. The caller appends the remaining arguments.
    pub fn cargo_command(
        &self,
        toolchain: &Toolchain,
        target: &Target,
        subcommand: &str,
    ) -> Command {
        let triple = target.triple();
        let mut command = match toolchain {
            Toolchain::Cross => Command::new("cross"),
            _ => Command::new(cargo()),
        };
        command.current_dir(&self.root).arg(subcommand);
        if matches!(toolchain, Toolchain::BuildStd { .. }) {
            command.arg("-Zbuild-std=std,panic_abort");
            // build-std needs nightly features; this keeps the stable toolchain instead of
            // requiring a separate nightly install.
            command.env("RUSTC_BOOTSTRAP", "1");
        }
        // An explicit --target, even for the host, keeps these flags away from build scripts
        // and proc macros and puts the output under target/<triple>/, so plain `cargo build`
        // in the same target directory is not invalidated by them.
        command.args(["--target", triple]);

        let flags = self.remap_flags();
        match toolchain {
            Toolchain::Cross => {
                // Inside the container the project is mounted at its host path and CARGO_HOME
                // is already /cargo; cross forwards RUSTFLAGS, not the encoded form.
                let mut rustflags: Vec<String> = env::var("RUSTFLAGS")
                    .map(|value| value.split_whitespace().map(str::to_owned).collect())
                    .unwrap_or_default();
                rustflags.push(remap(&self.root, "/blufio"));
                command.env("RUSTFLAGS", rustflags.join(" "));
                command.env("CROSS_CONFIG", self.root.join("cross.toml"));
            }
            _ => {
                let mut rustflags = user_rustflags();
                rustflags.extend(flags);
                command.env_remove("RUSTFLAGS");
                command.env("CARGO_ENCODED_RUSTFLAGS", rustflags.join("\u{1f}"));
            }
        }
        if let Toolchain::RustupTarget { cc } | Toolchain::BuildStd { cc } = toolchain {
            command.env(cargo_target_var(triple, "LINKER"), cc);
            command.env(cc_var(triple), cc);
        }
        if let Some(lg_page) = target.known.and_then(|known| known.lg_page) {
            command.env("JEMALLOC_SYS_WITH_LG_PAGE", lg_page);
        }
        command
    }

    /// Returns the directory cargo writes `profile` artefacts for `target` to.
    pub fn profile_dir(&self, target: &Target, profile: &str) -> PathBuf {
        crate::project::target_dir(&self.root)
            .join(target.triple())
            .join(profile)
    }
}

fn remap(from: &Path, to: &str) -> String {
    format!("--remap-path-prefix={}={to}", from.display())
}

/// Returns the rustflags the user already set, so ours are added rather than replacing them.
fn user_rustflags() -> Vec<String> {
    if let Some(encoded) = env::var_os("CARGO_ENCODED_RUSTFLAGS") {
        let encoded = encoded.to_string_lossy().into_owned();
        return encoded
            .split('\u{1f}')
            .filter(|flag| !flag.is_empty())
            .map(str::to_owned)
            .collect();
    }
    env::var("RUSTFLAGS")
        .map(|value| value.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

fn installed_rustup_targets() -> BTreeSet<String> {
    if find_in_path("rustup").is_none() {
        return BTreeSet::new();
    }
    match run_output(Command::new("rustup").args(["target", "list", "--installed"])) {
        Ok(output) => String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|line| line.trim().to_owned())
            .filter(|line| !line.is_empty())
            .collect(),
        Err(_) => BTreeSet::new(),
    }
}

/// Returns whether `cross` is on PATH and its container engine answers.
fn cross_available() -> bool {
    if find_in_path("cross").is_none() {
        return false;
    }
    let engine: OsString = env::var_os("CROSS_CONTAINER_ENGINE").unwrap_or_else(|| "docker".into());
    // A docker client without a daemon is common (it is the case on our build machines), so
    // the engine has to answer, not merely exist.
    Command::new(engine)
        .arg("info")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cargo_target_var_uppercases_and_replaces_dashes() {
        assert_eq!(
            cargo_target_var("aarch64-unknown-linux-gnu", "LINKER"),
            "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER"
        );
        assert_eq!(
            cargo_target_var("armv7-unknown-linux-gnueabihf", "RUNNER"),
            "CARGO_TARGET_ARMV7_UNKNOWN_LINUX_GNUEABIHF_RUNNER"
        );
    }

    #[test]
    fn cc_var_keeps_case_and_replaces_dashes() {
        assert_eq!(
            cc_var("armv7-unknown-linux-gnueabihf"),
            "CC_armv7_unknown_linux_gnueabihf"
        );
    }

    #[test]
    fn only_aarch64_pins_the_jemalloc_page_size() {
        for triple in DEFAULT_TARGETS {
            let lg_page = Target::new(triple).known.and_then(|known| known.lg_page);
            assert_eq!(lg_page.is_some(), triple.starts_with("aarch64"), "{triple}");
        }
    }

    #[test]
    fn every_default_target_is_known() {
        for triple in DEFAULT_TARGETS {
            assert!(Target::new(triple).known.is_some(), "{triple}");
        }
    }

    #[test]
    fn host_target_runs_without_a_runner() {
        let target = Target::new("x86_64-unknown-linux-gnu");
        assert!(
            target
                .runner("x86_64-unknown-linux-gnu")
                .unwrap()
                .is_empty()
        );
    }
}
