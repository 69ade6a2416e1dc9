//! Cgroup memory through the real `/metrics` and `/v1/health`, with a fixture cgroup tree
//! standing in for `/sys/fs/cgroup`, and the "auto" thresholds derived from it.

use blufio::{AUTO_MB, Context};
use blufio_platform::CgroupReader;
use blufio_testkit::assert_contains;
use blufio_testkit::temp::{TempDir, temp_dir};

use crate::{prometheus, support};

const MIB: u64 = 1024 * 1024;

fn fixture(name: &str, max: &str, current: &str) -> TempDir {
    let root = temp_dir(&format!("cgroup-{name}"));
    let dir = root.join("system.slice/blufio.service");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("memory.max"), max).unwrap();
    std::fs::write(dir.join("memory.current"), current).unwrap();
    root
}

/// Starts a daemon in the cgroup under `root`, with "auto" thresholds.
fn start_in(root: &std::path::Path) -> support::TestDaemon {
    let reader = CgroupReader::find(root, "0::/system.slice/blufio.service\n");
    let mut config = support::config_with_token("cgroup-token-0123456789");
    config.daemon.memory_limit_mb = AUTO_MB;
    config.daemon.memory_warn_mb = AUTO_MB;
    support::start_with(Context::builder(config).with_cgroup_reader(reader))
}

#[test]
fn cgroup_limit_and_usage_are_exported_and_auto_thresholds_follow_them() {
    let root = fixture("v2", "1073741824\n", "52428800\n");
    let daemon = start_in(&root);

    let exposition = prometheus::parse(&daemon.get_ok("/metrics"));
    assert_eq!(
        exposition.value("blufio_memory_cgroup_limit_bytes", &[]),
        Some((1u64 << 30) as f64)
    );
    assert_eq!(
        exposition.value("blufio_memory_cgroup_usage_bytes", &[]),
        Some((50 * MIB) as f64)
    );
    let health = daemon
        .authed("cgroup-token-0123456789", "GET", "/v1/health", None)
        .json();
    assert_eq!(health["memory_cgroup_limit_bytes"], 1u64 << 30);
    assert_eq!(health["memory_cgroup_usage_bytes"], 50 * MIB);
    // "auto": 75% and 60% of 1 GiB.
    assert_eq!(health["memory_limit_bytes"], 768 * MIB);
    assert_eq!(health["memory_warn_bytes"], 614 * MIB);

    // The usage is read again on each monitor tick.
    std::fs::write(
        root.join("system.slice/blufio.service/memory.current"),
        "62914560\n",
    )
    .unwrap();
    daemon.ctx.cgroup.refresh();
    assert_eq!(
        support::metric(&daemon, "blufio_memory_cgroup_usage_bytes", &[]),
        Some((60 * MIB) as f64)
    );
    daemon.stop();
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn an_unlimited_cgroup_exports_no_limit_and_auto_falls_back_to_defaults() {
    let root = fixture("max", "max\n", "4096\n");
    let daemon = start_in(&root);
    let metrics = daemon.get_ok("/metrics");
    assert!(
        !metrics.contains("blufio_memory_cgroup_limit_bytes"),
        "{metrics}"
    );
    assert_contains(&metrics, "blufio_memory_cgroup_usage_bytes 4096");
    let health = daemon
        .authed("cgroup-token-0123456789", "GET", "/v1/health", None)
        .json();
    assert!(health["memory_cgroup_limit_bytes"].is_null());
    assert_eq!(health["memory_limit_bytes"], 200 * MIB);
    assert_eq!(health["memory_warn_bytes"], 150 * MIB);
    daemon.stop();
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn no_cgroup_exports_neither_gauge() {
    let daemon =
        support::start_with(Context::builder(blufio::Config::for_tests()).with_cgroup_reader(None));
    let metrics = daemon.get_ok("/metrics");
    assert!(!metrics.contains("blufio_memory_cgroup"), "{metrics}");
    daemon.stop();
}
