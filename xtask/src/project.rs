//! What every task shares: the error type, the project's root and target directory, the cargo
//! to call, and running a command with an error that names it.

use std::env;
use std::error::Error;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The error type of every task: the message says which command or file failed.
pub type Result<T, E = Box<dyn Error>> = std::result::Result<T, E>;

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
