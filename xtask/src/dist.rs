//! `cargo xtask dist [--target TRIPLE]... [--toolchain cargo|cross|build-std]`: builds the
//! release binary per target, stages it with the docs and the systemd unit, and writes
//! reproducible `target/dist/blufio-<version>-<triple>.tar.gz` archives plus `SHA256SUMS`.
//!
//! Build → stage → archive are separate steps. The archive depends only on the staged files'
//! contents: entry order, owners, modes and times are fixed, so the same commit gives the same
//! bytes on any machine. Nothing here strips or otherwise rewrites the binary: stripping comes
//! from the release profile, so a host `strip` never touches a foreign binary.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use flate2::{Compression, GzBuilder};
use sha2::{Digest, Sha256};

use crate::project::{Result, describe, run_output, run_status, target_dir};
use crate::target::{BuildEnv, DEFAULT_TARGETS, Target, ToolchainChoice};

const PACKAGE: &str = "blufio";

/// Files staged next to the binary: (path in the project, name in the archive).
const EXTRA_FILES: &[(&str, &str)] = &[
    ("README.md", "README.md"),
    ("LICENSE", "LICENSE"),
    ("blufio.example.toml", "blufio.example.toml"),
    ("contrib/blufio.service", "blufio.service"),
];

/// Runs the `dist` task.
pub fn run(root: &Path, args: &[String]) -> Result<()> {
    let options = Options::parse(args)?;
    let version = read_version(root)?;
    let mtime = source_date_epoch(root)?;
    let dist_dir = target_dir(root).join("dist");
    fs::create_dir_all(&dist_dir)?;

    let mut build_env = BuildEnv::probe(root)?;
    let mut archives = Vec::new();
    let mut summary = Vec::new();
    for triple in &options.targets {
        let target = Target::new(triple);
        let toolchain = build_env.select(&target, options.toolchain)?;
        println!("==> {triple}: building with {toolchain}");

        let started = Instant::now();
        let mut command = build_env.cargo_command(&toolchain, &target, "build");
        command.args(["--release", "--locked", "-p", PACKAGE, "--bin", PACKAGE]);
        run_status(&mut command)?;
        let build_secs = started.elapsed().as_secs_f64();

        let binary = build_env.profile_dir(&target, "release").join(PACKAGE);
        let name = format!("{PACKAGE}-{version}-{triple}");
        let stage_dir = stage(root, &binary, &dist_dir.join(&name))?;
        let archive = dist_dir.join(format!("{name}.tar.gz"));
        write_archive(&stage_dir, &archive, mtime)?;
        let digest = sha256_file(&archive)?;
        let archive_name = file_name(&archive)?;

        let report = format!(
            "{triple}\n    toolchain: {toolchain}\n    build:     {build_secs:.1} s\n    \
             binary:    {} bytes\n    archive:   {archive_name} ({} bytes)\n    sha256:    {digest}",
            fs::metadata(&binary)?.len(),
            fs::metadata(&archive)?.len(),
        );
        println!("{report}");
        summary.push(report);
        archives.push((archive_name, digest));
    }

    let sums = dist_dir.join("SHA256SUMS");
    fs::write(&sums, sha256sums(&archives))
        .map_err(|error| format!("cannot write {}: {error}", sums.display()))?;
    // Cargo's output scrolls the per-target lines away; repeat them together at the end.
    println!("\n==> dist summary ({})", dist_dir.display());
    for report in &summary {
        println!("{report}");
    }
    println!("wrote {}", sums.display());
    Ok(())
}

#[derive(Debug)]
struct Options {
    targets: Vec<String>,
    toolchain: Option<ToolchainChoice>,
}

impl Options {
    fn parse(args: &[String]) -> Result<Options> {
        let mut targets = Vec::new();
        let mut toolchain = None;
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--target" => targets.push(args.next().ok_or("--target needs a triple")?.clone()),
                "--toolchain" => {
                    let value = args.next().ok_or("--toolchain needs a value")?;
                    toolchain = Some(ToolchainChoice::parse(value)?);
                }
                other => return Err(format!("dist: unexpected argument `{other}`").into()),
            }
        }
        if targets.is_empty() {
            targets = DEFAULT_TARGETS
                .iter()
                .map(|triple| (*triple).to_owned())
                .collect();
        }
        Ok(Options { targets, toolchain })
    }
}

/// Returns blufio's version from the root Cargo.toml.
fn read_version(root: &Path) -> Result<String> {
    let manifest = root.join("Cargo.toml");
    let text = fs::read_to_string(&manifest)
        .map_err(|error| format!("cannot read {}: {error}", manifest.display()))?;
    package_version(&text).ok_or_else(|| {
        format!(
            "cannot find `version` in the [package] table of {}",
            manifest.display()
        )
        .into()
    })
}

/// Returns the `version` of the `[package]` table of a Cargo.toml; `None` when the manifest is
/// not TOML or the table has no version string.
pub fn package_version(manifest: &str) -> Option<String> {
    let manifest: toml::Table = manifest.parse().ok()?;
    let version = manifest.get("package")?.get("version")?.as_str()?;
    Some(version.to_owned())
}

/// Returns the timestamp for archive entries: `SOURCE_DATE_EPOCH` if set, else the time of the
/// last commit, else 0 (a repository without commits, or no git).
fn source_date_epoch(root: &Path) -> Result<u64> {
    if let Ok(value) = std::env::var("SOURCE_DATE_EPOCH") {
        return value.trim().parse().map_err(|_| {
            format!("SOURCE_DATE_EPOCH is not a number of seconds: `{value}`").into()
        });
    }
    let mut command = Command::new("git");
    command
        .current_dir(root)
        .args(["log", "-1", "--format=%ct"]);
    match run_output(&mut command) {
        Ok(output) => {
            let text = String::from_utf8_lossy(&output.stdout);
            text.trim().parse().map_err(|_| {
                format!(
                    "`{}` printed `{}`, not a timestamp",
                    describe(&command),
                    text.trim()
                )
                .into()
            })
        }
        Err(error) => {
            println!("note: archive times set to 0: {error}");
            Ok(0)
        }
    }
}

/// Copies the binary and the extra files into a fresh `stage_dir`, skipping (with a note) the
/// extra files that do not exist.
fn stage(root: &Path, binary: &Path, stage_dir: &Path) -> Result<PathBuf> {
    // Starting empty keeps a file removed from the project from lingering in the archive.
    if stage_dir.exists() {
        fs::remove_dir_all(stage_dir)
            .map_err(|error| format!("cannot remove {}: {error}", stage_dir.display()))?;
    }
    fs::create_dir_all(stage_dir)?;
    copy(binary, &stage_dir.join(PACKAGE))?;
    for (source, name) in EXTRA_FILES {
        let source = root.join(source);
        if source.is_file() {
            copy(&source, &stage_dir.join(name))?;
        } else {
            println!("note: {} does not exist; not staged", source.display());
        }
    }
    Ok(stage_dir.to_path_buf())
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    fs::copy(from, to).map(drop).map_err(|error| {
        format!(
            "cannot copy {} to {}: {error}",
            from.display(),
            to.display()
        )
        .into()
    })
}

/// One file of the archive, as it will be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Path inside the archive, starting with the top folder.
    pub path: String,
    /// Unix permission bits.
    pub mode: u32,
    /// File contents; `None` for the top folder's directory entry.
    pub data: Option<Vec<u8>>,
}

/// Returns the archive entries for a staged folder: the folder itself, then its files sorted by
/// name; the binary is executable, everything else is not.
pub fn entries(top: &str, files: Vec<(String, Vec<u8>)>) -> Vec<Entry> {
    let mut files = files;
    files.sort_by(|left, right| left.0.cmp(&right.0));
    let mut entries = vec![Entry {
        path: format!("{top}/"),
        mode: 0o755,
        data: None,
    }];
    entries.extend(files.into_iter().map(|(name, data)| Entry {
        mode: if name == PACKAGE { 0o755 } else { 0o644 },
        path: format!("{top}/{name}"),
        data: Some(data),
    }));
    entries
}

/// Returns the tar header for `entry`: owner root (0/0), fixed `mtime`, and nothing taken from
/// the build machine.
pub fn header(entry: &Entry, mtime: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    match &entry.data {
        Some(data) => {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(data.len() as u64);
        }
        None => {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_size(0);
        }
    }
    header.set_mode(entry.mode);
    header.set_mtime(mtime);
    header.set_uid(0);
    header.set_gid(0);
    // Both names are ASCII and short, so setting them cannot fail.
    let _ = header.set_username("root");
    let _ = header.set_groupname("root");
    header
}

/// Writes the tar bytes of `entries` to `out`.
fn write_tar<W: Write>(out: W, entries: &[Entry], mtime: u64) -> io::Result<W> {
    let mut builder = tar::Builder::new(out);
    for entry in entries {
        let mut header = header(entry, mtime);
        let data = entry.data.as_deref().unwrap_or_default();
        builder.append_data(&mut header, &entry.path, data)?;
    }
    builder.into_inner()
}

/// Writes `stage_dir` as a reproducible `.tar.gz` at `archive`.
fn write_archive(stage_dir: &Path, archive: &Path, mtime: u64) -> Result<()> {
    let top = file_name(stage_dir)?;
    let mut files = Vec::new();
    for item in fs::read_dir(stage_dir)? {
        let item = item?;
        let name = item
            .file_name()
            .into_string()
            .map_err(|name| format!("non-UTF-8 file name in {}: {name:?}", stage_dir.display()))?;
        files.push((name, fs::read(item.path())?));
    }
    let entries = entries(&top, files);

    let fail = |error: io::Error| format!("cannot write {}: {error}", archive.display());
    let file = File::create(archive).map_err(fail)?;
    // A zero mtime and no file name keep the gzip header independent of when and where the
    // archive was written; flate2 already records the OS as "unknown".
    let encoder = GzBuilder::new().mtime(0).write(file, Compression::best());
    let encoder = write_tar(encoder, &entries, mtime).map_err(fail)?;
    // finish() and sync_all() surface errors that dropping the writers would swallow.
    let file = encoder.finish().map_err(fail)?;
    file.sync_all().map_err(fail)?;
    Ok(())
}

fn file_name(path: &Path) -> Result<String> {
    path.file_name()
        .and_then(|name| name.to_str())
        .map(str::to_owned)
        .ok_or_else(|| format!("{} has no UTF-8 file name", path.display()).into())
}

/// Returns the lowercase hex SHA-256 of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    let bytes =
        fs::read(path).map_err(|error| format!("cannot read {}: {error}", path.display()))?;
    Ok(hex(&Sha256::digest(&bytes)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Returns `SHA256SUMS` text in the format `sha256sum -c` reads: digest, two spaces (text
/// mode), file name; sorted by name.
pub fn sha256sums(archives: &[(String, String)]) -> String {
    let mut archives = archives.to_vec();
    archives.sort();
    archives.dedup();
    archives
        .iter()
        .map(|(name, digest)| format!("{digest}  {name}\n"))
        .collect()
}

/// Returns the path of the archive `dist` writes for `triple`.
pub fn archive_path(root: &Path, triple: &str) -> Result<PathBuf> {
    let version = read_version(root)?;
    Ok(target_dir(root)
        .join("dist")
        .join(format!("{PACKAGE}-{version}-{triple}.tar.gz")))
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    #[test]
    fn version_comes_from_the_package_table() {
        let manifest = r#"
[workspace]
members = ["platform"]
version = "9.9.9"

[package]
name = "blufio"
version = "0.1.0" # released
edition = "2024"

[dependencies]
version = "1"
"#;
        assert_eq!(package_version(manifest).as_deref(), Some("0.1.0"));
    }

    #[test]
    fn version_is_none_without_a_package_table() {
        assert_eq!(package_version("[workspace]\nversion = \"1.0.0\"\n"), None);
        assert_eq!(package_version("[package]\nname = \"x\"\n"), None);
    }

    #[test]
    fn the_real_manifest_has_a_version() {
        let manifest =
            fs::read_to_string(crate::project::project_root().join("Cargo.toml")).unwrap();
        assert!(package_version(&manifest).is_some());
    }

    #[test]
    fn sha256sums_uses_two_spaces_and_sorts_by_name() {
        let digest_a = "a".repeat(64);
        let digest_b = "b".repeat(64);
        let text = sha256sums(&[
            ("blufio-0.1.0-x86_64.tar.gz".to_owned(), digest_b.clone()),
            ("blufio-0.1.0-aarch64.tar.gz".to_owned(), digest_a.clone()),
        ]);
        assert_eq!(
            text,
            format!(
                "{digest_a}  blufio-0.1.0-aarch64.tar.gz\n{digest_b}  blufio-0.1.0-x86_64.tar.gz\n"
            )
        );
    }

    #[test]
    fn sha256_of_a_known_input() {
        assert_eq!(
            hex(&Sha256::digest(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn entries_start_with_the_folder_and_are_sorted() {
        let files = vec![
            ("README.md".to_owned(), b"readme".to_vec()),
            ("blufio".to_owned(), b"\x7fELF".to_vec()),
            ("LICENSE".to_owned(), b"mit".to_vec()),
        ];
        let entries = entries("blufio-0.1.0-x", files);
        let listing: Vec<_> = entries
            .iter()
            .map(|entry| (entry.path.as_str(), entry.mode))
            .collect();
        assert_eq!(
            listing,
            [
                ("blufio-0.1.0-x/", 0o755),
                ("blufio-0.1.0-x/LICENSE", 0o644),
                ("blufio-0.1.0-x/README.md", 0o644),
                ("blufio-0.1.0-x/blufio", 0o755),
            ]
        );
    }

    #[test]
    fn tar_metadata_is_fixed() {
        let entries = entries("top", vec![("blufio".to_owned(), b"binary".to_vec())]);
        let bytes = write_tar(Vec::new(), &entries, 1_700_000_000).unwrap();
        let mut archive = tar::Archive::new(bytes.as_slice());
        let mut seen = Vec::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let header = entry.header();
            assert_eq!(header.uid().unwrap(), 0);
            assert_eq!(header.gid().unwrap(), 0);
            assert_eq!(header.username().unwrap(), Some("root"));
            assert_eq!(header.groupname().unwrap(), Some("root"));
            assert_eq!(header.mtime().unwrap(), 1_700_000_000);
            let mode = header.mode().unwrap();
            let path = entry.path().unwrap().display().to_string();
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            seen.push((path, mode, data));
        }
        assert_eq!(
            seen,
            [
                ("top/".to_owned(), 0o755, Vec::new()),
                ("top/blufio".to_owned(), 0o755, b"binary".to_vec()),
            ]
        );
    }

    #[test]
    fn archives_are_byte_identical_across_runs() {
        let dir =
            crate::project::target_dir(&crate::project::project_root()).join("tmp/xtask-dist-test");
        let _ = fs::remove_dir_all(&dir);
        let stage_dir = dir.join("blufio-0.0.0-test");
        fs::create_dir_all(&stage_dir).unwrap();
        fs::write(stage_dir.join("blufio"), b"binary").unwrap();
        fs::write(stage_dir.join("README.md"), b"readme").unwrap();
        let first = dir.join("first.tar.gz");
        let second = dir.join("second.tar.gz");
        write_archive(&stage_dir, &first, 0).unwrap();
        // A different on-disk mtime and mode must not change the archive.
        fs::write(stage_dir.join("README.md"), b"readme").unwrap();
        write_archive(&stage_dir, &second, 0).unwrap();
        assert_eq!(fs::read(&first).unwrap(), fs::read(&second).unwrap());
        // The gzip header: magic, deflate, no flags (so no file name), mtime 0.
        assert_eq!(
            &fs::read(&first).unwrap()[..8],
            &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0]
        );
        let _ = fs::remove_dir_all(&dir);
    }
}
