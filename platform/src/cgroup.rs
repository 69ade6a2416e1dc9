//! The memory limit and usage of this process's own cgroup (containers, systemd's
//! `MemoryMax=`), cgroup v2 or v1.
//!
//! Parsing is pure and tested from fixture text; only [`CgroupReader::new`] knows where Linux
//! keeps the files. It reads what the kernel exposes and nothing else: no `memory.stat`
//! breakdown, no pressure-stall information.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

/// The cgroup's memory numbers; a field is `None` when the kernel sets no value (`max`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CgroupMemory {
    /// The hard limit (v2 `memory.max`, v1 `memory.limit_in_bytes`).
    pub limit_bytes: Option<u64>,
    /// The throttling threshold (v2 `memory.high`; v1 has none).
    pub high_bytes: Option<u64>,
    /// Memory charged to the cgroup now (v2 `memory.current`, v1 `memory.usage_in_bytes`).
    pub usage_bytes: Option<u64>,
}

/// Which cgroup hierarchy the files come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    /// The unified hierarchy.
    V2,
    /// The legacy memory controller.
    V1,
}

/// Reads one cgroup's memory files.
#[derive(Debug, Clone)]
pub struct CgroupReader {
    version: CgroupVersion,
    dir: PathBuf,
}

/// v1 reports "no limit" as the largest page-aligned signed 64-bit value; anything this large
/// is no real limit.
const V1_UNLIMITED: u64 = 1 << 62;

impl CgroupReader {
    /// Finds this process's cgroup, or `None` when it has no readable memory files.
    ///
    /// # Platform-specific behavior
    ///
    /// Linux: `/proc/self/cgroup`, then `/sys/fs/cgroup/<path>` (v2) or
    /// `/sys/fs/cgroup/memory/<path>` (v1), falling back to the mount's root when the path is
    /// not visible (inside a cgroup namespace). Other systems, and the `force-fallback`
    /// feature: always `None`.
    pub fn new() -> Option<CgroupReader> {
        #[cfg(all(target_os = "linux", not(feature = "force-fallback")))]
        {
            let proc_cgroup = fs::read_to_string("/proc/self/cgroup").ok()?;
            CgroupReader::find(Path::new("/sys/fs/cgroup"), &proc_cgroup)
        }
        #[cfg(any(not(target_os = "linux"), feature = "force-fallback"))]
        {
            None
        }
    }

    /// Finds the cgroup described by `proc_cgroup` (the text of `/proc/self/cgroup`) under
    /// the cgroup mount `root`; v2 is preferred where both exist.
    pub fn find(root: &Path, proc_cgroup: &str) -> Option<CgroupReader> {
        let paths = parse_proc_cgroup(proc_cgroup);
        let candidates = |base: PathBuf, path: Option<&str>| {
            let mut dirs = Vec::new();
            if let Some(path) = path {
                dirs.push(base.join(path.trim_start_matches('/')));
            }
            dirs.push(base);
            dirs
        };
        if paths.v2.is_some() {
            let found = candidates(root.to_owned(), paths.v2.as_deref())
                .into_iter()
                .find(|dir| dir.join("memory.current").is_file());
            if let Some(dir) = found {
                return Some(CgroupReader {
                    version: CgroupVersion::V2,
                    dir,
                });
            }
        }
        if paths.v1_memory.is_some() {
            let found = candidates(root.join("memory"), paths.v1_memory.as_deref())
                .into_iter()
                .find(|dir| dir.join("memory.usage_in_bytes").is_file());
            if let Some(dir) = found {
                return Some(CgroupReader {
                    version: CgroupVersion::V1,
                    dir,
                });
            }
        }
        None
    }

    /// Returns the hierarchy the reader uses.
    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// Reads the limit, the v2 `memory.high` and the usage now.
    ///
    /// # Errors
    ///
    /// Returns an error when a file exists but cannot be read or parsed.
    pub fn read(&self) -> io::Result<CgroupMemory> {
        let read = |name: &str| -> io::Result<Option<String>> {
            match fs::read_to_string(self.dir.join(name)) {
                Ok(text) => Ok(Some(text)),
                Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(error) => Err(error),
            }
        };
        let limit = |name: &str| -> io::Result<Option<u64>> {
            read(name)?.map_or(Ok(None), |text| parse_limit(&text))
        };
        match self.version {
            CgroupVersion::V2 => Ok(CgroupMemory {
                limit_bytes: limit("memory.max")?,
                high_bytes: limit("memory.high")?,
                usage_bytes: read("memory.current")?
                    .map(|text| parse_bytes(&text))
                    .transpose()?,
            }),
            CgroupVersion::V1 => Ok(CgroupMemory {
                limit_bytes: limit("memory.limit_in_bytes")?,
                high_bytes: None,
                usage_bytes: read("memory.usage_in_bytes")?
                    .map(|text| parse_bytes(&text))
                    .transpose()?,
            }),
        }
    }
}

/// The cgroup paths named in `/proc/self/cgroup`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupPaths {
    /// The unified (v2) path, from the `0::<path>` line.
    pub v2: Option<String>,
    /// The v1 memory controller's path, from the line listing `memory`.
    pub v1_memory: Option<String>,
}

/// Parses `/proc/self/cgroup` (`hierarchy-id:controllers:path` per line).
pub fn parse_proc_cgroup(text: &str) -> CgroupPaths {
    let mut paths = CgroupPaths::default();
    for line in text.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            paths.v2 = Some(path.to_owned());
        } else if controllers.split(',').any(|name| name == "memory") {
            paths.v1_memory = Some(path.to_owned());
        }
    }
    paths
}

/// Parses a limit file: `max` (v2) or the v1 "unlimited" value mean no limit.
///
/// # Errors
///
/// Returns `InvalidData` for anything but a number or `max`.
pub fn parse_limit(text: &str) -> io::Result<Option<u64>> {
    if text.trim() == "max" {
        return Ok(None);
    }
    let bytes = parse_bytes(text)?;
    Ok((bytes < V1_UNLIMITED).then_some(bytes))
}

/// Parses a byte count file (`memory.current`, `memory.usage_in_bytes`).
///
/// # Errors
///
/// Returns `InvalidData` for anything but a decimal number.
pub fn parse_bytes(text: &str) -> io::Result<u64> {
    text.trim().parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "not a byte count: {:?}",
                text.trim().chars().take(40).collect::<String>()
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1_PROC: &str = "12:memory:/docker/abc\n11:cpu,cpuacct:/docker/abc\n0::/\n";
    const V2_PROC: &str = "0::/system.slice/blufio.service\n";

    fn fixture(name: &str, files: &[(&str, &str)]) -> PathBuf {
        let root =
            std::env::temp_dir().join(format!("blufio-cgroup-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        for (path, text) in files {
            let path = root.join(path);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, text).unwrap();
        }
        root
    }

    #[test]
    fn proc_cgroup_names_v1_memory_and_v2_paths() {
        assert_eq!(
            parse_proc_cgroup(V1_PROC),
            CgroupPaths {
                v2: Some("/".to_owned()),
                v1_memory: Some("/docker/abc".to_owned()),
            }
        );
        assert_eq!(
            parse_proc_cgroup("5:cpu,memory:/a\n").v1_memory.as_deref(),
            Some("/a")
        );
        assert_eq!(parse_proc_cgroup("garbage\n"), CgroupPaths::default());
    }

    #[test]
    fn limits_parse_max_and_v1_unlimited_as_unknown() {
        assert_eq!(parse_limit("max\n").unwrap(), None);
        assert_eq!(parse_limit("9223372036854771712\n").unwrap(), None);
        assert_eq!(parse_limit("536870912\n").unwrap(), Some(512 << 20));
        assert!(parse_limit("lots\n").is_err());
        assert!(parse_bytes("").is_err());
    }

    #[test]
    fn v2_reads_max_high_and_current() {
        let root = fixture(
            "v2",
            &[
                ("system.slice/blufio.service/memory.max", "268435456\n"),
                ("system.slice/blufio.service/memory.high", "max\n"),
                ("system.slice/blufio.service/memory.current", "12345678\n"),
            ],
        );
        let reader = CgroupReader::find(&root, V2_PROC).unwrap();
        assert_eq!(reader.version(), CgroupVersion::V2);
        assert_eq!(
            reader.read().unwrap(),
            CgroupMemory {
                limit_bytes: Some(256 << 20),
                high_bytes: None,
                usage_bytes: Some(12_345_678),
            }
        );
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn v2_max_is_an_unknown_limit() {
        let root = fixture(
            "v2max",
            &[("memory.max", "max\n"), ("memory.current", "4096\n")],
        );
        // The process's path is not visible (a cgroup namespace): the mount root is used.
        let reader = CgroupReader::find(&root, V2_PROC).unwrap();
        let memory = reader.read().unwrap();
        assert_eq!(memory.limit_bytes, None);
        assert_eq!(memory.usage_bytes, Some(4096));
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn v1_reads_limit_and_usage_when_v2_has_no_memory_files() {
        let root = fixture(
            "v1",
            &[
                ("memory/docker/abc/memory.limit_in_bytes", "1073741824\n"),
                ("memory/docker/abc/memory.usage_in_bytes", "2048\n"),
            ],
        );
        let reader = CgroupReader::find(&root, V1_PROC).unwrap();
        assert_eq!(reader.version(), CgroupVersion::V1);
        assert_eq!(
            reader.read().unwrap(),
            CgroupMemory {
                limit_bytes: Some(1 << 30),
                high_bytes: None,
                usage_bytes: Some(2048),
            }
        );
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn no_memory_files_means_no_reader() {
        let root = fixture("none", &[("cpu/x", "1")]);
        assert!(CgroupReader::find(&root, V1_PROC).is_none());
        fs::remove_dir_all(root).unwrap();
    }
}
