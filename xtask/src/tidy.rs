//! `cargo xtask tidy`: repository conventions the compiler does not check. Every `.rs` file
//! must open with a `//!` module doc, request handlers under `src/http/` must not call
//! `.unwrap()` (a request path answers 500 instead of panicking), and the library's modules
//! must import one way down: no module may reach, through `crate::` paths, a module that
//! reaches it (ARCHITECTURE.md, "Layers").
//!
//! The checks are textual on purpose: they are cheap, need no parser, and a false positive is
//! fixed by rewording. Formatting and lints stay with rustfmt and clippy.

use std::collections::{BTreeMap, BTreeSet};
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
    let mut imports: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let text = fs::read_to_string(file)
            .map_err(|error| format!("cannot read {}: {error}", file.display()))?;
        let relative = file.strip_prefix(root).unwrap_or(file);
        if let Some(module) = library_module(relative) {
            let reached = imports.entry(module.clone()).or_default();
            reached.extend(
                crate_imports(&text)
                    .into_iter()
                    .filter(|name| *name != module),
            );
        }
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
    for circle in circles(&imports) {
        problems.push(format!(
            "src/: modules import each other in a circle: {}",
            circle.join(" -> ")
        ));
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

/// Returns the library module `relative` belongs to (`src/foo.rs` and `src/foo/…` are
/// `foo`); `None` outside the library and for its roots (`lib.rs`) and the binary (`main.rs`,
/// `cli/`).
fn library_module(relative: &Path) -> Option<String> {
    let mut parts = relative
        .iter()
        .map(|part| part.to_str().unwrap_or_default());
    if parts.next() != Some("src") {
        return None;
    }
    let first = parts.next()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(name, "lib" | "main" | "cli")).then(|| name.to_owned())
}

/// Returns the top-level modules `text` names through `crate::` paths, comments left out:
/// `crate::a::X` and `use crate::{a::X, b}` name `a` and `b`.
fn crate_imports(text: &str) -> BTreeSet<String> {
    let code: String = text
        .lines()
        .map(|line| line.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n");
    let mut names = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::") {
        let preceded = rest[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_');
        rest = &rest[at + "crate::".len()..];
        if preceded {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            // The names at the group's first level, each after `{` or `,`.
            let mut depth = 1;
            let mut expect_name = true;
            for (index, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 1 => expect_name = true,
                    c if expect_name && depth == 1 && (c.is_alphabetic() || c == '_') => {
                        names.insert(identifier(&group[index..]));
                        expect_name = false;
                    }
                    _ => {}
                }
                if depth == 0 {
                    break;
                }
            }
        } else {
            names.insert(identifier(rest));
        }
    }
    names.retain(|name| !name.is_empty() && name.chars().next().is_some_and(char::is_lowercase));
    names
}

fn identifier(text: &str) -> String {
    text.chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

/// Returns each group of modules that reach one another through their imports (the
/// strongly connected components with more than one module), as a path that closes.
fn circles(imports: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    let reaches = |from: &str| {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.to_owned()];
        while let Some(module) = stack.pop() {
            for next in imports.get(&module).into_iter().flatten() {
                if seen.insert(next.clone()) {
                    stack.push(next.clone());
                }
            }
        }
        seen
    };
    let reach: BTreeMap<&String, BTreeSet<String>> = imports
        .keys()
        .map(|module| (module, reaches(module)))
        .collect();
    let mut done = BTreeSet::new();
    let mut found = Vec::new();
    for (module, reached) in &reach {
        if done.contains(*module) || !reached.contains(*module) {
            continue;
        }
        let mut circle: Vec<String> = reached
            .iter()
            .filter(|other| reach.get(other).is_some_and(|back| back.contains(*module)))
            .cloned()
            .collect();
        done.extend(circle.iter().cloned());
        circle.push(circle[0].clone());
        found.push(circle);
    }
    found
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

    #[test]
    fn crate_paths_name_their_top_level_modules() {
        let text = "//! Doc.\nuse crate::{\n    agent::{Agent, Turn},\n    config::Config,\n    sync,\n};\nfn f() { crate::metrics::count(); }\n// crate::commented::out\nlet x = notcrate::y;\n";
        let names: Vec<String> = crate_imports(text).into_iter().collect();
        assert_eq!(names, ["agent", "config", "metrics", "sync"]);
    }

    #[test]
    fn a_circle_is_found_and_one_way_down_is_not() {
        let graph = |edges: &[(&str, &str)]| {
            let mut imports: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            for (from, to) in edges {
                imports
                    .entry((*from).to_owned())
                    .or_default()
                    .insert((*to).to_owned());
                imports.entry((*to).to_owned()).or_default();
            }
            imports
        };
        let down = graph(&[
            ("context", "sessions"),
            ("sessions", "agent"),
            ("context", "agent"),
        ]);
        assert!(circles(&down).is_empty());
        let knot = graph(&[
            ("context", "memory"),
            ("memory", "context"),
            ("memory", "sync"),
        ]);
        assert_eq!(circles(&knot), [["context", "memory", "context"]]);
    }

    #[test]
    fn library_modules_are_named_by_their_top_level_path() {
        assert_eq!(
            library_module(Path::new("src/memory/pressure.rs")).as_deref(),
            Some("memory")
        );
        assert_eq!(
            library_module(Path::new("src/context.rs")).as_deref(),
            Some("context")
        );
        assert_eq!(library_module(Path::new("src/cli/status.rs")), None);
        assert_eq!(library_module(Path::new("src/lib.rs")), None);
        assert_eq!(library_module(Path::new("xtask/src/tidy.rs")), None);
    }
}
