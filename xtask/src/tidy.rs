//! `cargo xtask tidy`: repository conventions the compiler does not check. Every `.rs` file
//! must open with a `//!` module doc, and request handlers under `src/http/` must not call
//! `.unwrap()` (a request path answers 500 instead of panicking).
//!
//! The checks are textual on purpose: they are cheap, need no parser, and a false positive is
//! fixed by rewording. Formatting and lints stay with rustfmt and clippy.

use std::fs;
use std::path::{Path, PathBuf};

use crate::project::Result;

/// Runs the `tidy` task.
pub fn run(root: &Path, args: &[String]) -> Result<()> {
    if let Some(arg) = args.first() {
        return Err(format!("tidy: unexpected argument `{arg}`").into());
    }
    let mut files = Vec::new();
    collect_rust_files(root, &crate::project::target_dir(root), &mut files)?;
    files.sort();

    let mut problems = Vec::new();
    for file in &files {
        let text = fs::read_to_string(file)
            .map_err(|error| format!("cannot read {}: {error}", file.display()))?;
        let relative = file.strip_prefix(root).unwrap_or(file);
        if !starts_with_module_doc(&text) {
            problems.push(format!(
                "{}: does not start with a `//!` module doc",
                relative.display()
            ));
        }
        if relative.starts_with("src/http") {
            for line in unwrap_lines(&text) {
                problems.push(format!(
                    "{}:{line}: `.unwrap()` on a request path",
                    relative.display()
                ));
            }
        }
    }
    if problems.is_empty() {
        println!("tidy: {} files ok", files.len());
        Ok(())
    } else {
        Err(format!(
            "tidy found {} problem(s):\n{}",
            problems.len(),
            problems.join("\n")
        )
        .into())
    }
}

fn collect_rust_files(dir: &Path, target_dir: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
    let Ok(items) = fs::read_dir(dir) else {
        return Ok(());
    };
    for item in items {
        let path = item?.path();
        if path.is_dir() {
            // Build output (generated code included) and hidden folders such as .git are not
            // ours to check.
            let skip = path
                .file_name()
                .and_then(|name| name.to_str())
                .is_none_or(|name| name == "target" || name.starts_with('.'))
                || path == target_dir;
            if !skip {
                collect_rust_files(&path, target_dir, files)?;
            }
        } else if path.extension().is_some_and(|extension| extension == "rs") {
            files.push(path);
        }
    }
    Ok(())
}

/// Returns whether the first non-blank line is a `//!` inner doc comment.
fn starts_with_module_doc(text: &str) -> bool {
    text.lines()
        .find(|line| !line.trim().is_empty())
        .is_some_and(|line| line.trim_start().starts_with("//!"))
}

/// Returns the 1-based numbers of lines that call `.unwrap()` outside `#[cfg(test)]` code.
fn unwrap_lines(text: &str) -> Vec<usize> {
    let mut lines = Vec::new();
    for (index, line) in text.lines().enumerate() {
        // Unit tests sit at the bottom of the file (STYLE §10) and may unwrap.
        if line.trim_start().starts_with("#[cfg(test)]") {
            break;
        }
        let code = line.split("//").next().unwrap_or_default();
        if code.contains(".unwrap()") {
            lines.push(index + 1);
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_doc_must_come_first() {
        assert!(starts_with_module_doc("\n//! Docs.\nfn main() {}\n"));
        assert!(!starts_with_module_doc("use std::fs;\n//! Docs.\n"));
        assert!(!starts_with_module_doc("/// Item docs.\nfn main() {}\n"));
        assert!(!starts_with_module_doc(""));
    }

    #[test]
    fn unwrap_is_found_outside_tests_and_comments() {
        let text = "//! Doc.\nlet a = b.unwrap();\n// c.unwrap() is bad\n#[cfg(test)]\nmod tests { x.unwrap(); }\n";
        assert_eq!(unwrap_lines(text), [2]);
    }
}
