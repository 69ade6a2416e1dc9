//! `cargo xtask setup-cross`: prepares a Debian or Ubuntu host to build and test blufio for
//! aarch64 and armv7: the GNU cross compilers and libc, qemu-user, the rustup std for aarch64
//! (and armv7 where it can be downloaded) and `rust-src` for `-Zbuild-std`.
//!
//! It is idempotent: installed packages, targets and components are skipped, so CI can run it on
//! every job. It installs only what the xtask needs, never `cross` or a container engine, and
//! does not touch non-Debian hosts beyond saying what to install.

use std::collections::BTreeSet;
use std::process::Command;

use crate::project::{Result, find_in_path, run_output, run_status};

const APT_PACKAGES: &[&str] = &[
    "gcc-aarch64-linux-gnu",
    "libc6-dev-arm64-cross",
    "gcc-arm-linux-gnueabihf",
    "libc6-dev-armhf-cross",
    "qemu-user-static",
];

/// (target, whether failing to add it is fatal)
const RUSTUP_TARGETS: &[(&str, bool)] = &[
    ("aarch64-unknown-linux-gnu", true),
    // No prebuilt armv7 std is downloadable on some of our machines; `dist` then builds std
    // from rust-src, so a failure here is only a note.
    ("armv7-unknown-linux-gnueabihf", false),
];

/// Runs the `setup-cross` task.
pub fn run(_root: &std::path::Path, args: &[String]) -> Result<()> {
    if let Some(arg) = args.first() {
        return Err(format!("setup-cross: unexpected argument `{arg}`").into());
    }
    install_packages()?;
    install_rustup_parts()?;
    println!("setup-cross: done");
    Ok(())
}

fn install_packages() -> Result<()> {
    if find_in_path("dpkg").is_none() || find_in_path("apt-get").is_none() {
        return Err(format!(
            "setup-cross supports Debian and Ubuntu hosts (dpkg and apt-get); install these \
             packages' equivalents by hand: {}",
            APT_PACKAGES.join(" ")
        )
        .into());
    }
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|package| {
            let installed = dpkg_installed(package);
            if installed {
                println!("skip: {package} is installed");
            }
            !installed
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }

    let sudo = privilege_prefix()?;
    let apt = |args: &[&str]| {
        let mut command = match sudo {
            Some(sudo) => {
                let mut command = Command::new(sudo);
                // sudo resets the environment; pass the variable as an assignment instead.
                command.args(["DEBIAN_FRONTEND=noninteractive", "apt-get"]);
                command
            }
            None => Command::new("apt-get"),
        };
        command.env("DEBIAN_FRONTEND", "noninteractive").args(args);
        command
    };
    println!("install: {}", missing.join(" "));
    run_status(&mut apt(&["update"]))?;
    let mut install_args = vec!["install", "-y", "--no-install-recommends"];
    install_args.extend(&missing);
    run_status(&mut apt(&install_args))?;
    Ok(())
}

/// Returns whether dpkg reports `package` as fully installed.
fn dpkg_installed(package: &str) -> bool {
    match run_output(Command::new("dpkg").args(["-s", package])) {
        Ok(output) => is_installed_status(&String::from_utf8_lossy(&output.stdout)),
        Err(_) => false,
    }
}

/// Returns whether `dpkg -s` output says the package is installed (not merely known, or
/// removed with its configuration left behind).
fn is_installed_status(dpkg_output: &str) -> bool {
    dpkg_output
        .lines()
        .filter_map(|line| line.strip_prefix("Status:"))
        .any(|status| status.split_whitespace().last() == Some("installed"))
}

/// Returns `Some("sudo")` when the package manager needs it, `None` when we already are root.
fn privilege_prefix() -> Result<Option<&'static str>> {
    let uid = run_output(Command::new("id").arg("-u"))?;
    if String::from_utf8_lossy(&uid.stdout).trim() == "0" {
        return Ok(None);
    }
    if find_in_path("sudo").is_some() {
        return Ok(Some("sudo"));
    }
    Err("setup-cross must install packages: run it as root or install sudo".into())
}

fn install_rustup_parts() -> Result<()> {
    if find_in_path("rustup").is_none() {
        println!(
            "skip: rustup is not on PATH; install the std for {} and the rust-src component by other means",
            RUSTUP_TARGETS
                .iter()
                .map(|(target, _)| *target)
                .collect::<Vec<_>>()
                .join(", ")
        );
        return Ok(());
    }
    let installed = rustup_list(&["target", "list", "--installed"])?;
    for (target, required) in RUSTUP_TARGETS {
        if installed.contains(*target) {
            println!("skip: rustup target {target} is installed");
            continue;
        }
        println!("install: rustup target {target}");
        match run_output(Command::new("rustup").args(["target", "add", target])) {
            Ok(_) => {}
            Err(error) if !required => {
                println!(
                    "note: {error}\n      {target} will be built with -Zbuild-std from rust-src"
                )
            }
            Err(error) => return Err(error),
        }
    }
    let components = rustup_list(&["component", "list", "--installed"])?;
    if components
        .iter()
        .any(|component| component == "rust-src" || component.starts_with("rust-src-"))
    {
        println!("skip: rustup component rust-src is installed");
    } else {
        println!("install: rustup component rust-src");
        run_status(Command::new("rustup").args(["component", "add", "rust-src"]))?;
    }
    Ok(())
}

fn rustup_list(args: &[&str]) -> Result<BTreeSet<String>> {
    let output = run_output(Command::new("rustup").args(args))?;
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| line.trim().to_owned())
        .filter(|line| !line.is_empty())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installed_status_is_recognised() {
        let installed =
            "Package: qemu-user-static\nStatus: install ok installed\nPriority: optional\n";
        assert!(is_installed_status(installed));
        let removed = "Package: qemu-user-static\nStatus: deinstall ok config-files\n";
        assert!(!is_installed_status(removed));
        assert!(!is_installed_status(""));
    }
}
