//! `"auto"` memory thresholds, resolved against the cgroup memory limit.

use super::{AUTO_MB, Config, DaemonConfig};

impl Config {
    /// Replaces `"auto"` thresholds: 75% (limit) and 60% (warn) of `cgroup_limit_bytes`, or
    /// the defaults (200 and 150 MiB) without a cgroup limit. A warn threshold that would not
    /// be below the limit becomes 80% of it. Returns one line per replaced value.
    pub fn resolve_auto_memory(&mut self, cgroup_limit_bytes: Option<u64>) -> Vec<String> {
        let defaults = DaemonConfig::default();
        let daemon = &mut self.daemon;
        let mut notes = Vec::new();
        let source = cgroup_limit_bytes.map_or("no cgroup limit: default".to_owned(), |bytes| {
            format!("cgroup limit {} MiB", bytes / (1024 * 1024))
        });
        if daemon.memory_limit_mb == AUTO_MB {
            daemon.memory_limit_mb = cgroup_limit_bytes.map_or(defaults.memory_limit_mb, |bytes| {
                crate::cgroup::share_mb(bytes, crate::cgroup::AUTO_LIMIT_PERCENT)
            });
            notes.push(format!(
                "memory_limit_mb = \"auto\": {} MiB ({source})",
                daemon.memory_limit_mb
            ));
        }
        if daemon.memory_warn_mb == AUTO_MB {
            let warn = cgroup_limit_bytes.map_or(defaults.memory_warn_mb, |bytes| {
                crate::cgroup::share_mb(bytes, crate::cgroup::AUTO_WARN_PERCENT)
            });
            daemon.memory_warn_mb = if warn < daemon.memory_limit_mb {
                warn
            } else {
                (daemon.memory_limit_mb * 4 / 5).max(1)
            };
            notes.push(format!(
                "memory_warn_mb = \"auto\": {} MiB ({source})",
                daemon.memory_warn_mb
            ));
        }
        notes
    }
}
