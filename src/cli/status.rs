//! `blufio status`: the daemon's health document, as JSON or rendered for a person.

use std::{io::IsTerminal, net::SocketAddr, process::ExitCode, time::Duration};

use blufio::{Config, Error};
use serde_json::Value;

use super::probe::fetch;

/// Prints the daemon's state. Exit status: 0 healthy, 1 degraded or an unusable answer,
/// 3 nothing listening, 4 the gateway token refused; a failure is one line on stderr.
pub fn status(config: &Config, json: bool, timeout: Duration) -> Result<ExitCode, Error> {
    let (detailed, address, health) = match fetch(config, timeout) {
        Ok(found) => found,
        Err((code, line)) => {
            eprintln!("blufio status: {line}");
            return Ok(ExitCode::from(code));
        }
    };
    let healthy = health["status"] == "healthy";
    if json {
        let mut document = health;
        if let Value::Object(fields) = &mut document {
            fields.insert("detailed".to_owned(), Value::Bool(detailed));
            fields.insert(
                "address".to_owned(),
                Value::String(format!("http://{address}")),
            );
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&document).unwrap_or_default()
        );
    } else {
        let tty = std::io::stdout().is_terminal();
        print!("{}", render_status(&health, address, detailed, tty));
    }
    Ok(if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1048576.0)
}

fn text(value: &Value) -> String {
    value
        .as_str()
        .map_or_else(|| value.to_string(), str::to_owned)
}

/// One memory line: the value, its share of warn and limit, and a bar on a terminal.
fn memory_line(label: &str, value: &Value, thresholds: Option<(u64, u64)>, tty: bool) -> String {
    let Some(bytes) = value.as_u64() else {
        return format!("  {label:<12} n/a\n");
    };
    let mut line = format!("  {label:<12} {:>10}", mib(bytes));
    if let Some((warn, limit)) = thresholds {
        let percent = |of: u64| bytes as f64 * 100.0 / of.max(1) as f64;
        line.push_str(&format!(
            "  {:>3.0}% of warn, {:>3.0}% of limit",
            percent(warn),
            percent(limit)
        ));
        if tty {
            let filled = ((percent(limit) / 5.0).round() as usize).min(20);
            line.push_str(&format!(
                "  [{}{}]",
                "#".repeat(filled),
                "-".repeat(20 - filled)
            ));
        }
    }
    line.push('\n');
    line
}

/// The human view of `blufio status`.
fn render_status(health: &Value, address: SocketAddr, detailed: bool, tty: bool) -> String {
    let mut out = String::new();
    let thresholds = health["memory_warn_bytes"]
        .as_u64()
        .zip(health["memory_limit_bytes"].as_u64());
    let state = health["status"].as_str().unwrap_or("unknown");
    out.push_str(&format!("blufio at http://{address}: {state}\n"));
    if detailed {
        out.push_str(&format!(
            "  version      {} ({})\n",
            text(&health["version"]),
            text(&health["target"])
        ));
    }
    out.push_str(&format!("  uptime       {} s\n", health["uptime_secs"]));
    out.push_str(&memory_line(
        "heap",
        &health["memory_heap_bytes"],
        thresholds,
        tty,
    ));
    if detailed {
        out.push_str(&memory_line(
            "resident",
            &health["memory_resident_bytes"],
            thresholds,
            tty,
        ));
    }
    out.push_str(&memory_line(
        "rss",
        &health["memory_rss_bytes"],
        thresholds,
        tty,
    ));
    if !detailed {
        out.push_str(&format!("  sessions     {}\n", health["active_sessions"]));
        out.push_str(
            "  (thresholds, cgroup, errors and budget need the gateway token in the config)\n",
        );
        return out;
    }
    if let Some((warn, limit)) = thresholds {
        out.push_str(&format!(
            "  thresholds   warn {}, limit {}\n",
            mib(warn),
            mib(limit)
        ));
    }
    let cgroup = match (
        health["memory_cgroup_limit_bytes"].as_u64(),
        health["memory_cgroup_usage_bytes"].as_u64(),
    ) {
        (Some(limit), Some(usage)) => format!(
            "limit {}, usage {} ({:.0}%)",
            mib(limit),
            mib(usage),
            usage as f64 * 100.0 / limit.max(1) as f64
        ),
        (None, Some(usage)) => format!("no limit, usage {}", mib(usage)),
        (Some(limit), None) => format!("limit {}", mib(limit)),
        (None, None) => "none".to_owned(),
    };
    out.push_str(&format!("  cgroup       {cgroup}\n"));
    out.push_str(&format!(
        "  pressure     {}; admission {}; readiness {}\n",
        if health["memory_pressure"] == true {
            "yes"
        } else {
            "no"
        },
        text(&health["admission"]),
        text(&health["ready"])
    ));
    out.push_str(&format!(
        "  sessions     {} of {}\n",
        health["active_sessions"], health["max_sessions"]
    ));
    let errors: Vec<String> = health["errors"]
        .as_object()
        .map(|errors| {
            errors
                .iter()
                .filter(|(_, count)| count.as_u64().unwrap_or(0) > 0)
                .map(|(kind, count)| format!("{kind} {count}"))
                .collect()
        })
        .unwrap_or_default();
    out.push_str(&format!(
        "  errors       {}\n",
        if errors.is_empty() {
            "none".to_owned()
        } else {
            errors.join(", ")
        }
    ));
    let spent = health["budget"]["spent_today_usd"].as_f64().unwrap_or(0.0);
    let budget = health["budget"]["daily_usd"].as_f64().unwrap_or(0.0);
    out.push_str(&if budget > 0.0 {
        format!(
            "  budget       ${} of ${} spent today (UTC)\n",
            usd(spent),
            usd(budget)
        )
    } else {
        format!(
            "  budget       ${} spent today (UTC), no limit\n",
            usd(spent)
        )
    });
    out.push_str(&store_line(&health["store"]));
    out.push_str(&format!(
        "  allocator    {} (page size {})\n",
        text(&health["allocator"]),
        text(&health["allocator_page_size"])
    ));
    out.push_str(&format!("  agent        {}\n", text(&health["agent"])));
    let now = std::time::SystemTime::now();
    match health["providers"].as_array() {
        Some(providers) => {
            for provider in providers {
                out.push_str(&upstream_lines(provider, now));
            }
        }
        None => out.push_str(&upstream_lines(&health["upstream"], now)),
    }
    out
}

/// Where sessions are kept, from `/v1/health`'s `store` (absent: in memory only).
fn store_line(store: &Value) -> String {
    if !store.is_object() {
        return "  store        none: sessions are in memory only ([daemon] state_dir)\n"
            .to_owned();
    }
    let path = text(&store["path"]);
    match store["error"].as_str() {
        Some(error) => format!("  store        {path} FAILING: {error}\n"),
        None => format!("  store        {path} ok\n"),
    }
}

/// The provider, its model and its last error, from `/v1/health`'s `upstream`.
fn upstream_lines(upstream: &Value, now: std::time::SystemTime) -> String {
    if !upstream.is_object() {
        return String::new();
    }
    // A `[providers.NAME]` entry shows its name and kind; the shorthand's one is named after
    // its kind.
    let kind = text(&upstream["provider"]);
    let name = match upstream["name"].as_str() {
        Some(name) if name != kind => format!("{name} ({kind})"),
        _ => kind,
    };
    let mut out = format!(
        "  upstream     {name}, model {}, API key {}\n",
        text(&upstream["model"]),
        text(&upstream["api_key"])
    );
    let now = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    let ago = |at: &Value| {
        at.as_u64()
            .map(|at| format!("{} s ago", now.saturating_sub(at)))
    };
    let success = ago(&upstream["last_success_at_unix"]);
    match upstream["last_error"].as_str() {
        Some(error) => out.push_str(&format!(
            "  last error   {}: {error}{}\n",
            ago(&upstream["last_error_at_unix"]).unwrap_or_else(|| "at an unknown time".to_owned()),
            success.map_or_else(
                || " (no call has succeeded yet)".to_owned(),
                |success| format!(" (last success {success})")
            )
        )),
        None => out.push_str(&format!(
            "  last error   none{}\n",
            success.map_or_else(String::new, |success| format!(" (last success {success})"))
        )),
    }
    out
}

/// Formats dollars with cents, and with three significant digits below a dollar (down to
/// micro-dollars, the precision of `/v1/health`), so small spends do not show as `0.00`.
fn usd(amount: f64) -> String {
    if !amount.is_finite() || amount <= 0.0 {
        return "0.00".to_owned();
    }
    if amount >= 0.995 {
        return format!("{amount:.2}");
    }
    let magnitude = amount.log10().floor() as i32;
    let decimals = (2 - magnitude).clamp(2, 6) as usize;
    let text = format!("{amount:.decimals$}");
    // Keep cents, drop zeros beyond them: 0.0500 is shown as 0.05.
    let (whole, fraction) = text.split_once('.').unwrap_or((&text, ""));
    let trimmed = fraction.trim_end_matches('0');
    let fraction = if trimmed.len() < 2 {
        fraction.get(..2).unwrap_or(fraction)
    } else {
        trimmed
    };
    format!("{whole}.{fraction}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_configured_provider_gets_its_line_with_its_last_error() {
        let now = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000);
        let claude = serde_json::json!({
            "name": "claude", "provider": "anthropic", "model": "claude-sonnet-4-5",
            "api_key": "set", "last_error": "agent upstream failed: HTTP 529",
            "last_error_at_unix": 990, "last_success_at_unix": 900,
        });
        let lines = upstream_lines(&claude, now);
        assert_eq!(
            lines,
            "  upstream     claude (anthropic), model claude-sonnet-4-5, API key set\n  \
             last error   10 s ago: agent upstream failed: HTTP 529 (last success 100 s ago)\n"
        );
        let shorthand = serde_json::json!({
            "name": "openai", "provider": "openai", "model": "llama3.2", "api_key": "unset",
            "last_error": null, "last_success_at_unix": null,
        });
        assert_eq!(
            upstream_lines(&shorthand, now),
            "  upstream     openai, model llama3.2, API key unset\n  last error   none\n"
        );
    }

    #[test]
    fn the_store_line_says_where_sessions_are_and_whether_writes_fail() {
        let ok =
            serde_json::json!({"path": "/var/lib/blufio/blufio.db", "ok": true, "error": null});
        assert_eq!(
            store_line(&ok),
            "  store        /var/lib/blufio/blufio.db ok\n"
        );
        let full = serde_json::json!({
            "path": "/var/lib/blufio/blufio.db", "ok": false,
            "error": "database or disk is full",
        });
        assert_eq!(
            store_line(&full),
            "  store        /var/lib/blufio/blufio.db FAILING: database or disk is full\n"
        );
        assert!(store_line(&Value::Null).contains("in memory only"));
    }

    #[test]
    fn dollars_keep_three_significant_digits_below_one() {
        for (amount, shown) in [
            (0.0, "0.00"),
            (0.000_593_999_999_999_999_9, "0.000594"),
            (0.000_000_4, "0.00"),
            (0.05, "0.05"),
            (0.123_456, "0.123"),
            (0.999, "1.00"),
            (10.0, "10.00"),
            (1234.5678, "1234.57"),
            (f64::NAN, "0.00"),
        ] {
            assert_eq!(usd(amount), shown, "{amount}");
        }
    }
}
