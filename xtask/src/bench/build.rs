//! Building what `bench` measures: blufio (default and core-only features) and the floor with
//! blufio's release profile, the check that the floor pins blufio's crates, and the
//! counting-allocator bench.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use toml::{Table, Value};

use super::Options;
use crate::json;
use crate::project::{Result, cargo, describe, run_output, run_status, target_dir};

/// The binaries under test.
#[derive(Debug)]
pub(super) struct Binaries {
    pub(super) blufio: PathBuf,
    /// Only measured for its size; `None` when an existing binary was given.
    pub(super) core: Option<PathBuf>,
    /// `None` with `--gateway-only` or `--store-only`, which measure blufio alone.
    pub(super) floor: Option<PathBuf>,
    /// Extra environment of the blufio side (`--env`).
    pub(super) env: Vec<(String, String)>,
}

pub(super) fn build(root: &Path, options: &Options, work_dir: &Path) -> Result<Binaries> {
    let release_dir = target_dir(root).join("release");
    let manifest: Table = fs::read_to_string(root.join("Cargo.toml"))?
        .parse()
        .map_err(|error| format!("cannot read Cargo.toml: {error}"))?;
    let (blufio, core) = match &options.binary {
        Some(binary) => (binary.clone(), None),
        None => {
            let default_features = toml_list(&manifest, "features", "default");
            let core_features: Vec<String> = default_features
                .iter()
                .filter(|feature| feature.as_str() == "jemalloc")
                .cloned()
                .collect();
            // Core first, so that target/release/blufio ends up as the default build. The
            // gateway or the store alone needs only the default build.
            let alone = options.gateway_only || options.store_only;
            let core = if core_features.len() == default_features.len() || alone {
                None
            } else {
                let mut command = Command::new(cargo());
                command
                    .current_dir(root)
                    .args(["build", "--release", "--locked", "--bin", "blufio"])
                    .args(["--no-default-features", "--features"])
                    .arg(core_features.join(","));
                run_status(&mut command)?;
                let core = work_dir.join("blufio-core");
                fs::copy(release_dir.join("blufio"), &core)?;
                Some(core)
            };
            let mut command = Command::new(cargo());
            command
                .current_dir(root)
                .args(["build", "--release", "--locked", "--bin", "blufio"]);
            run_status(&mut command)?;
            // A copy, so a build started during the run cannot swap the binary under it.
            let blufio = work_dir.join("blufio");
            fs::copy(release_dir.join("blufio"), &blufio)?;
            // With no optional features besides the allocator the two builds are one.
            let core = core.or_else(|| Some(blufio.clone()));
            (blufio, core)
        }
    };
    let floor = match &options.floor {
        _ if options.gateway_only || options.store_only => None,
        Some(floor) => Some(floor.clone()),
        None => {
            let mut command = Command::new(cargo());
            command
                .current_dir(root)
                .args(["build", "--release", "--locked", "--manifest-path"])
                .arg(root.join("benches/floor/Cargo.toml"))
                .arg("--target-dir")
                .arg(target_dir(root));
            for (key, value) in release_profile(&manifest) {
                command
                    .arg("--config")
                    .arg(format!("profile.release.{key}={value}"));
            }
            run_status(&mut command)?;
            Some(release_dir.join("blufio-floor"))
        }
    };
    for binary in [Some(&blufio), floor.as_ref()].into_iter().flatten() {
        if !binary.is_file() {
            return Err(format!("{} is not a file", binary.display()).into());
        }
    }
    Ok(Binaries {
        blufio,
        core,
        floor,
        env: options.env.clone(),
    })
}

/// Returns the settings of `[profile.release]` in a Cargo manifest as `key` and TOML value
/// text, so the floor is built exactly like blufio whatever the root's profile says. Nested
/// tables (per-package overrides) are left out: `--config` takes them only one by one.
pub(super) fn release_profile(manifest: &Table) -> Vec<(String, String)> {
    let Some(profile) = manifest
        .get("profile")
        .and_then(|profiles| profiles.get("release"))
        .and_then(Value::as_table)
    else {
        return Vec::new();
    };
    profile
        .iter()
        .filter_map(|(key, value)| {
            let text = match value {
                // A JSON string is also a TOML basic string.
                Value::String(text) => json::quote(text),
                Value::Integer(number) => number.to_string(),
                Value::Float(number) => number.to_string(),
                Value::Boolean(flag) => flag.to_string(),
                _ => return None,
            };
            Some((key.clone(), text))
        })
        .collect()
}

/// Returns the strings of the array `key` in `[section]` of a manifest.
pub(super) fn toml_list(manifest: &Table, section: &str, key: &str) -> Vec<String> {
    manifest
        .get(section)
        .and_then(|table| table.get(key))
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Returns every `(name, version)` of the `[[package]]` entries of a Cargo.lock.
fn lock_packages(lock: &str) -> std::result::Result<Vec<(String, String)>, toml::de::Error> {
    let lock: Table = lock.parse()?;
    let packages = lock.get("package").and_then(Value::as_array);
    Ok(packages
        .into_iter()
        .flatten()
        .filter_map(|package| {
            let name = package.get("name")?.as_str()?;
            let version = package.get("version")?.as_str()?;
            Some((name.to_owned(), version.to_owned()))
        })
        .collect())
}

/// Returns the floor's packages whose version differs from every version of the same crate in
/// blufio's lock file, as `name floor-version (blufio: versions)`.
pub(super) fn lock_mismatches(
    root_lock: &str,
    floor_lock: &str,
) -> std::result::Result<Vec<String>, String> {
    let mut root_versions: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let root_packages = lock_packages(root_lock).map_err(|error| format!("Cargo.lock: {error}"))?;
    for (name, version) in root_packages {
        root_versions.entry(name).or_default().push(version);
    }
    let floor_packages =
        lock_packages(floor_lock).map_err(|error| format!("benches/floor/Cargo.lock: {error}"))?;
    Ok(floor_packages
        .into_iter()
        .filter_map(|(name, version)| {
            let versions = root_versions.get(&name)?;
            (!versions.contains(&version))
                .then(|| format!("{name} {version} (blufio: {})", versions.join(", ")))
        })
        .collect())
}

/// Fails unless the floor runs on exactly the crates blufio runs on.
pub(super) fn check_floor_lock(root: &Path) -> Result<()> {
    let root_lock = fs::read_to_string(root.join("Cargo.lock"))?;
    let floor_path = root.join("benches/floor/Cargo.lock");
    let floor_lock = fs::read_to_string(&floor_path)
        .map_err(|error| format!("cannot read {}: {error}", floor_path.display()))?;
    let mismatches = lock_mismatches(&root_lock, &floor_lock)?;
    if mismatches.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "benches/floor/Cargo.lock differs from Cargo.lock, so the floor would not run on \
             blufio's runtime: {}; update it (cargo update --manifest-path \
             benches/floor/Cargo.toml -p NAME --precise VERSION)",
            mismatches.join("; ")
        )
        .into())
    }
}

pub(super) fn file_size(path: &Path) -> Option<f64> {
    fs::metadata(path).ok().map(|meta| meta.len() as f64)
}

/// Runs the counting-allocator bench and returns its `key value` lines.
pub(super) fn allocation_bench(root: &Path, quick: bool) -> Result<BTreeMap<String, f64>> {
    let mut command = Command::new(cargo());
    command.current_dir(root);
    // The bench installs its own counting wrapper around jemalloc, so the library's global
    // allocator (the `jemalloc` feature) must be off; quick mode stays in the debug profile.
    if quick {
        command.args([
            "test",
            "--locked",
            "--bench",
            "alloc",
            "--no-default-features",
        ]);
    } else {
        command.args([
            "bench",
            "--locked",
            "--bench",
            "alloc",
            "--no-default-features",
        ]);
    }
    command.env("BLUFIO_ALLOC_BENCH_QUICK", if quick { "1" } else { "0" });
    let output = run_output(&mut command)?;
    let counts = parse_key_values(&String::from_utf8_lossy(&output.stdout));
    if counts.is_empty() {
        return Err(format!("`{}` printed no measurements", describe(&command)).into());
    }
    Ok(counts)
}

/// Reads `key value` lines; other lines are ignored.
pub(super) fn parse_key_values(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let key = words.next()?;
            let value = words.next()?.parse().ok()?;
            words.next().is_none().then(|| (key.to_owned(), value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_profile_and_feature_lists_are_read_from_the_manifest() {
        let manifest = "[features]\ndefault = [\"jemalloc\", \"providers\"]\n\
            jemalloc = [\"dep:x\"]\n\n[profile.release]\nlto = true\nopt-level = \"s\" # small\n\
            strip = \"symbols\"\n\n[profile.dev]\nopt-level = 1\n";
        let manifest: Table = manifest.parse().unwrap();
        assert_eq!(
            release_profile(&manifest),
            vec![
                ("lto".to_owned(), "true".to_owned()),
                ("opt-level".to_owned(), "\"s\"".to_owned()),
                ("strip".to_owned(), "\"symbols\"".to_owned()),
            ]
        );
        assert_eq!(
            toml_list(&manifest, "features", "default"),
            ["jemalloc", "providers"]
        );
        assert!(toml_list(&manifest, "features", "absent").is_empty());
    }

    #[test]
    fn floor_lock_must_pin_blufios_versions() {
        let root = "[[package]]\nname = \"trillium\"\nversion = \"1.4.0\"\n\n\
            [[package]]\nname = \"syn\"\nversion = \"1.0.0\"\n\n\
            [[package]]\nname = \"syn\"\nversion = \"2.0.1\"\n";
        let same = "[[package]]\nname = \"trillium\"\nversion = \"1.4.0\"\n\n\
            [[package]]\nname = \"syn\"\nversion = \"2.0.1\"\n\n\
            [[package]]\nname = \"blufio-floor\"\nversion = \"0.1.0\"\n";
        assert!(lock_mismatches(root, same).unwrap().is_empty());
        let newer = same.replace("1.4.0", "1.5.0");
        assert_eq!(
            lock_mismatches(root, &newer).unwrap(),
            ["trillium 1.5.0 (blufio: 1.4.0)"]
        );
    }

    #[test]
    fn key_value_lines_are_read_and_prose_ignored() {
        let text = "counting allocations\nhealth_allocations_per_request 12.5\nmonitor_tick_micros 3\n\
            a b c\n";
        let values = parse_key_values(text);
        assert_eq!(values.len(), 2);
        assert_eq!(values["health_allocations_per_request"], 12.5);
    }
}
