//! Unit tests of loading, validating and showing the configuration.

use std::{fs, path::Path};

use blufio_testkit::temp::TempDir;

use super::{validate::check_token, *};

fn parse(text: &str) -> Result<Config, Error> {
    Config::parse(text, Path::new("blufio.toml"))
}

fn no_env(_: &str) -> Option<String> {
    None
}

/// Returns why `text`, which parses, fails validation.
fn refusal(text: &str) -> String {
    parse(text).unwrap().validate("f").unwrap_err().to_string()
}

/// Writes `secret` to a file in `dir` and a `blufio.toml` whose last line is `key_line =`
/// that file's path; returns the config's path.
fn config_with_secret_file(dir: &Path, key_line: &str, secret: &str) -> std::path::PathBuf {
    let secret_path = dir.join("secret");
    fs::write(&secret_path, secret).unwrap();
    let config_path = dir.join("blufio.toml");
    let text = format!("{key_line} = {:?}\n", secret_path.display().to_string());
    fs::write(&config_path, text).unwrap();
    config_path
}

#[test]
fn parse_validated_rejects_what_load_rejects() {
    let path = Path::new("/etc/blufio.toml");
    let error = Config::parse_validated(
        "[daemon]\nmemory_warn_mb = 300\nmemory_limit_mb = 200\n",
        path,
    )
    .unwrap_err()
    .to_string();
    assert!(error.contains("/etc/blufio.toml"), "{error}");
    assert!(error.contains("memory_warn_mb"), "{error}");
    let config = Config::parse_validated("[gateway]\nmax_sessions = 7\n", path).unwrap();
    assert_eq!(config.gateway.max_sessions, 7);
}

#[test]
fn defaults_are_150_200_3000() {
    let config = Config::load_with_env(None, no_env).unwrap();
    assert_eq!(config.daemon.memory_warn_mb, 150);
    assert_eq!(config.daemon.memory_limit_mb, 200);
    assert_eq!(config.daemon.health_port, 3000);
    assert_eq!(config.daemon.monitor_interval_secs, 5);
    assert_eq!(config.daemon.bind, "127.0.0.1");
    assert!(config.prometheus.enabled);
    assert!(config.gateway.token.is_none());
    assert!(config.single_listener());
}

#[test]
fn custom_values_are_read() {
    let config = parse(
        "[daemon]\nmemory_warn_mb = 300\nmemory_limit_mb = 400\nhealth_port = 9100\n\
         monitor_interval_secs = 2\nbind = \"0.0.0.0\"\n[gateway]\nport = 8080\n\
         token = \"s3cret-s3cret-s3cret\"\n[prometheus]\nenabled = false\n",
    )
    .unwrap();
    config.validate("test").unwrap();
    assert_eq!(config.daemon.memory_warn_mb, 300);
    assert_eq!(config.memory_limit_bytes(), 400 * 1024 * 1024);
    assert_eq!(config.health_addr().unwrap().to_string(), "0.0.0.0:9100");
    assert_eq!(config.gateway_addr().unwrap().port(), 8080);
    assert!(!config.single_listener());
    assert!(!config.prometheus.enabled);
    assert_eq!(
        config.gateway.token.unwrap().expose(),
        "s3cret-s3cret-s3cret"
    );
}

#[test]
fn unknown_key_names_file_line_column_and_key() {
    let error = parse("[daemon]\nhealth_port = 3000\nmemroy_warn_mb = 100\n").unwrap_err();
    let message = error.to_string();
    assert!(error.is_config());
    assert!(
        message.starts_with("blufio.toml:3:1: key `memroy_warn_mb`"),
        "{message}"
    );
    assert!(message.contains("unknown field"), "{message}");
}

#[test]
fn unknown_section_is_rejected() {
    let message = parse("[deamon]\nhealth_port = 1\n")
        .unwrap_err()
        .to_string();
    assert!(message.contains("blufio.toml:1:"), "{message}");
    assert!(message.contains("deamon"), "{message}");
}

#[test]
fn wrong_type_names_the_key() {
    let message = parse("[daemon]\n\nmemory_warn_mb = \"lots\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        message.starts_with("blufio.toml:3:18: key `memory_warn_mb`"),
        "{message}"
    );
}

#[test]
fn warn_at_or_above_limit_is_invalid() {
    let config = parse("[daemon]\nmemory_warn_mb = 200\nmemory_limit_mb = 200\n").unwrap();
    let message = config.validate("blufio.toml").unwrap_err().to_string();
    assert_eq!(
        message,
        "blufio.toml: [daemon] memory_warn_mb: must be below memory_limit_mb (200 >= 200)"
    );
}

#[test]
fn zero_interval_and_port_zero_are_invalid() {
    assert!(refusal("[daemon]\nmonitor_interval_secs = 0\n").contains("monitor_interval_secs"));
    assert!(refusal("[daemon]\nhealth_port = 0\n").contains("health_port"));
    let mut config = parse("[daemon]\nhealth_port = 0\n[gateway]\nport = 0\n").unwrap();
    config.allow_ephemeral_ports = true;
    config.validate("f").unwrap();
}

#[test]
fn bad_bind_address_and_log_level_are_invalid() {
    assert!(refusal("[daemon]\nbind = \"localhost\"\n").contains("[daemon] bind"));
    assert!(refusal("[daemon]\nlog_level = \"loud\"\n").contains("log_level"));
}

#[test]
fn missing_explicit_file_is_an_error() {
    let error =
        Config::load_with_env(Some(Path::new("/nonexistent/blufio.toml")), no_env).unwrap_err();
    assert!(error.is_config());
    assert!(error.to_string().contains("/nonexistent/blufio.toml"));
}

#[test]
fn token_comes_from_env_then_file() {
    let dir = temp_dir("token");
    let config_path =
        config_with_secret_file(&dir, "[gateway]\ntoken_file", "from-file-0123456789\n");
    let config = Config::load_with_env(Some(&config_path), no_env).unwrap();
    assert_eq!(
        config.gateway.token.unwrap().expose(),
        "from-file-0123456789"
    );
    let config = Config::load_with_env(Some(&config_path), |name| {
        (name == TOKEN_ENV).then(|| "from-env-0123456789".to_owned())
    })
    .unwrap();
    assert_eq!(
        config.gateway.token.unwrap().expose(),
        "from-env-0123456789"
    );
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn provider_key_comes_from_env_then_api_key_file() {
    let dir = temp_dir("key");
    let config_path = config_with_secret_file(
        &dir,
        "[agent]\nprovider = \"anthropic\"\napi_key_file",
        "sk-from-file\n",
    );
    let config = Config::load_with_env(Some(&config_path), no_env).unwrap();
    assert_eq!(config.agent.api_key.unwrap().expose(), "sk-from-file");
    let config = Config::load_with_env(Some(&config_path), |name| {
        (name == ANTHROPIC_KEY_ENV).then(|| "sk-from-env".to_owned())
    })
    .unwrap();
    assert_eq!(
        config.agent.api_key.clone().unwrap().expose(),
        "sk-from-env"
    );
    assert!(!format!("{config:?}").contains("sk-from-env"));
    // The other provider's variable is not read.
    let error = Config::load_with_env(Some(&config_path), |name| {
        (name == OPENAI_KEY_ENV).then(|| "sk-other".to_owned())
    })
    .map(|config| config.agent.api_key.unwrap().expose().to_owned())
    .unwrap();
    assert_eq!(error, "sk-from-file");
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_old_lifetime_budget_key_is_refused_with_directions() {
    let config = parse("[agent]\nbudget_usd = 5.0\n").unwrap();
    let message = config.validate("f").unwrap_err().to_string();
    assert!(message.contains("[agent] budget_usd"), "{message}");
    assert!(message.contains("[cost] daily_budget_usd"), "{message}");
}

#[test]
fn cost_prices_parse_per_model() {
    let config = parse(
        "[cost]\ndaily_budget_usd = 2.5\n[cost.models.\"llama3.2\"]\n\
         input_usd_per_mtok = 0.1\noutput_usd_per_mtok = 0.2\n",
    )
    .unwrap();
    config.validate("f").unwrap();
    assert_eq!(config.cost.daily_budget_usd, 2.5);
    assert_eq!(config.cost.price("llama3.2").output_usd_per_mtok, 0.2);
    let message = parse("[cost.models.\"x\"]\ninput_usd_per_mtok = 1\n")
        .unwrap_err()
        .to_string();
    assert!(message.contains("output_usd_per_mtok"), "{message}");
}

#[test]
fn example_config_is_valid_and_equals_the_defaults() {
    let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/blufio.example.toml"));
    let config = Config::load_with_env(Some(path), no_env).unwrap();
    let defaults = Config::default();
    assert_eq!(
        format!("{:?}", config.daemon),
        format!("{:?}", defaults.daemon)
    );
    assert_eq!(
        format!("{:?}", config.gateway),
        format!("{:?}", defaults.gateway)
    );
    assert_eq!(config.cost.daily_budget_usd, defaults.cost.daily_budget_usd);
}

#[test]
fn thresholds_beyond_four_gib_do_not_overflow_on_32_bit() {
    let config = parse("[daemon]\nmemory_warn_mb = 6144\nmemory_limit_mb = 8192\n").unwrap();
    config.validate("f").unwrap();
    assert_eq!(config.memory_limit_bytes(), 8 * 1024 * 1024 * 1024);
    assert_eq!(config.memory_warn_bytes(), 6 * 1024 * 1024 * 1024);
}

#[test]
fn auto_thresholds_follow_the_cgroup_limit_or_the_defaults() {
    let text = "[daemon]\nmemory_warn_mb = \"auto\"\nmemory_limit_mb = \"auto\"\n";
    let mut config = parse(text).unwrap();
    config.validate("f").unwrap();
    let notes = config.resolve_auto_memory(Some(1 << 30));
    assert_eq!(config.daemon.memory_limit_mb, 768);
    assert_eq!(config.daemon.memory_warn_mb, 614);
    assert_eq!(notes.len(), 2);
    assert!(notes[0].contains("cgroup limit 1024 MiB"), "{notes:?}");
    config.validate("f").unwrap();

    let mut config = parse(text).unwrap();
    config.resolve_auto_memory(None);
    assert_eq!(config.daemon.memory_limit_mb, 200);
    assert_eq!(config.daemon.memory_warn_mb, 150);

    // An explicit limit below the cgroup's 60%: warn goes to 80% of the limit.
    let mut config = parse("[daemon]\nmemory_warn_mb = \"auto\"\nmemory_limit_mb = 100\n").unwrap();
    config.resolve_auto_memory(Some(1 << 30));
    assert_eq!(config.daemon.memory_warn_mb, 80);
    config.validate("f").unwrap();
}

#[test]
fn memory_thresholds_reject_other_words() {
    let message = parse("[daemon]\nmemory_limit_mb = \"lots\"\n")
        .unwrap_err()
        .to_string();
    assert!(message.contains("memory_limit_mb"), "{message}");
    assert!(message.contains("auto"), "{message}");
}

#[test]
fn config_show_is_valid_toml_without_secrets() {
    let mut config = parse("[gateway]\ntoken = \"hunter2\"\n[daemon]\nbind = \"::\"\n").unwrap();
    config.gateway.token_file = None;
    let text = config.to_toml();
    assert!(!text.contains("hunter2"), "{text}");
    assert!(text.contains("token = \"<redacted>\""), "{text}");
    assert!(text.contains("# token_file is not set"), "{text}");
    let again = parse(&text).unwrap();
    assert_eq!(again.daemon.bind, "::");
    assert_eq!(format!("{:?}", again.agent), format!("{:?}", config.agent));
}

#[test]
fn default_file_is_the_example_file() {
    let example =
        fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/blufio.example.toml")).unwrap();
    assert_eq!(DEFAULT_FILE, example);
    let config = parse(DEFAULT_FILE).unwrap();
    assert_eq!(
        config.to_toml(),
        Config::default().to_toml(),
        "blufio.example.toml differs from Config::default()"
    );
}

#[test]
fn secrets_are_not_printed() {
    let config = parse("[gateway]\ntoken = \"hunter2\"\n").unwrap();
    assert!(!format!("{config:?}").contains("hunter2"));
}

fn temp_dir(name: &str) -> TempDir {
    blufio_testkit::temp::temp_dir(&format!("config-{name}"))
}

#[test]
fn token_rules_reject_control_characters_whitespace_and_short_tokens() {
    assert!(check_token("0123456789abcdef").is_ok());
    assert!(check_token("~!@#$%^&*()_+-=[]{}|;:,.<>/?0123").is_ok());
    let cases = [
        ("", "is empty"),
        ("short", "is 5 bytes long; use at least 16"),
        ("0123456789\0abcdef", "contains a NUL byte at byte 10"),
        ("0123456789\nabcdef", "contains a line break at byte 10"),
        ("0123456789 abcdef", "contains whitespace at byte 10"),
        (" 0123456789abcdef", "contains whitespace at byte 0"),
        (
            "0123456789\x1babcdef",
            "contains a control character at byte 10",
        ),
        (
            "0123456789\u{e9}abcdef",
            "contains a non-ASCII character at byte 10",
        ),
    ];
    for (token, expected) in cases {
        let problem = check_token(token).unwrap_err();
        assert!(problem.starts_with(expected), "{token:?}: {problem}");
    }
}

#[test]
fn token_errors_name_their_source_and_never_the_token() {
    let config = parse("[gateway]\ntoken = \"tiny-secret\"\n").unwrap();
    let message = config.validate("blufio.toml").unwrap_err().to_string();
    assert!(
        message.starts_with("blufio.toml: [gateway] token: the token is 11 bytes long"),
        "{message}"
    );
    assert!(!message.contains("tiny-secret"), "{message}");

    let error = Config::load_with_env(None, |name| {
        (name == TOKEN_ENV).then(|| "multi\nline-secret-value".to_owned())
    })
    .unwrap_err();
    let message = error.to_string();
    assert!(error.is_config());
    assert!(
        message.starts_with("environment: BLUFIO_GATEWAY_TOKEN: the token contains a line break"),
        "{message}"
    );
    assert!(!message.contains("secret"), "{message}");
}

#[test]
fn token_file_is_relative_to_the_config_and_loses_one_trailing_newline() {
    let dir = temp_dir("relative");
    fs::write(dir.join("token"), "relative-token-0123456789\r\n").unwrap();
    let config_path = dir.join("blufio.toml");
    fs::write(&config_path, "[gateway]\ntoken_file = \"token\"\n").unwrap();
    let config = Config::load_with_env(Some(&config_path), no_env).unwrap();
    assert_eq!(
        config.gateway.token.unwrap().expose(),
        "relative-token-0123456789"
    );
    assert_eq!(config.gateway.token_file, Some(dir.join("token")));

    // A second newline is not "the" trailing newline: the token would never match.
    fs::write(dir.join("token"), "relative-token-0123456789\n\n").unwrap();
    let message = Config::load_with_env(Some(&config_path), no_env)
        .unwrap_err()
        .to_string();
    let expected = format!(
        "[gateway] token_file: the token in {} contains a line break at byte 25",
        dir.join("token").display()
    );
    assert!(message.contains(&expected), "{message}");
    assert!(!message.contains("relative-token"), "{message}");
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unreadable_token_file_is_named_as_a_token_file() {
    let dir = temp_dir("unreadable");
    let config_path = dir.join("blufio.toml");
    fs::write(&config_path, "[gateway]\ntoken_file = \"missing\"\n").unwrap();
    let error = Config::load_with_env(Some(&config_path), no_env).unwrap_err();
    assert!(error.is_config());
    assert_eq!(
        error.to_string(),
        format!("cannot read token file {}", dir.join("missing").display())
    );
    assert!(std::error::Error::source(&error).is_some());
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn devices_and_files_past_one_mib_are_refused_without_reading_them_whole() {
    let error = Config::load_with_env(Some(Path::new("/dev/zero")), no_env).unwrap_err();
    assert!(error.is_config());
    let cause = std::error::Error::source(&error).unwrap().to_string();
    assert!(cause.contains("not a regular file"), "{cause}");

    let dir = temp_dir("big-token");
    let token_path = dir.join("token");
    fs::write(&token_path, vec![b'a'; MAX_FILE_BYTES as usize + 1]).unwrap();
    let config_path = dir.join("blufio.toml");
    fs::write(&config_path, "[gateway]\ntoken_file = \"token\"\n").unwrap();
    let error = Config::load_with_env(Some(&config_path), no_env).unwrap_err();
    assert!(
        error.to_string().starts_with("cannot read token file"),
        "{error}"
    );
    let cause = std::error::Error::source(&error).unwrap().to_string();
    assert!(cause.contains("larger than"), "{cause}");
    fs::remove_dir_all(&dir).unwrap();
}

/// Pins every kind of error a document can hold, at the root and below it, to its exact line,
/// column, key and message, so a change to how the root table is read cannot move one.
/// `{root}` and `{daemon}` stand for serde's lists of the keys expected there.
#[test]
fn document_errors_keep_their_line_column_key_and_message() {
    let cases = [
        // Unknown top-level keys and sections: bare, quoted, a table header, a skipped field.
        (
            "deamon_x = 1",
            "1:1: key `deamon_x`: unknown field `deamon_x`, {root}",
        ),
        (
            "\"deamon\" = 1",
            "1:1: key `deamon`: unknown field `deamon`, {root}",
        ),
        (
            "[deamon]\nhealth_port = 1",
            "1:2: unknown field `deamon`, {root}",
        ),
        (
            "[daemon]\nbind = \"::\"\n\n[deamon]",
            "4:2: unknown field `deamon`, {root}",
        ),
        (
            "prometheus.enabled = true\n  \"deamon\" = 1",
            "2:3: key `deamon`: unknown field `deamon`, {root}",
        ),
        (
            "allow_ephemeral_ports = true",
            "1:1: key `allow_ephemeral_ports`: unknown field `allow_ephemeral_ports`, {root}",
        ),
        // A section of the wrong type.
        (
            "daemon = 5",
            "1:10: key `daemon`: invalid type: integer `5`, expected struct DaemonConfig",
        ),
        (
            "cost = 5",
            "1:8: key `cost`: invalid type: integer `5`, expected struct CostConfig",
        ),
        (
            "daemon = [1, 2]",
            "1:11: key `daemon`: invalid type: integer `1`, expected a string",
        ),
        (
            "daemon = 1979-05-27T07:32:00Z",
            "1:10: key `daemon`: unknown field `$__toml_private_datetime`, {daemon}",
        ),
        // Unknown keys and wrong values inside a section, also as dotted keys and inline tables.
        (
            "[daemon]\nhealth_port = 3000\nmemroy_warn_mb = 100",
            "3:1: key `memroy_warn_mb`: unknown field `memroy_warn_mb`, {daemon}",
        ),
        (
            "[daemon]\n\nmemory_warn_mb = \"lots\"",
            "3:18: key `memory_warn_mb`: expected a number of MiB or \"auto\"",
        ),
        (
            "[gateway]\nport = 70000",
            "2:8: key `port`: invalid value: integer `70000`, expected u16",
        ),
        (
            "daemon.bind = 5",
            "1:15: key `daemon.bind`: invalid type: integer `5`, expected a string",
        ),
        (
            "daemon = { bind = 5 }",
            "1:19: key `daemon`: invalid type: integer `5`, expected a string",
        ),
        // TOML syntax errors and duplicates, found before any field is read.
        ("[daemon", "1:8: unclosed table, expected `]`"),
        (
            "daemon =",
            "1:9: key `daemon`: string values must be quoted, expected literal string",
        ),
        (
            "\u{e9}t\u{e9} = 1",
            "1:1: key `\u{e9}t\u{e9}`: invalid unquoted key, expected letters, numbers, `-`, `_`",
        ),
        (
            "[daemon]\nbind = \"a\"\nbind = \"b\"",
            "3:1: key `bind`: duplicate key",
        ),
        ("[daemon]\n[daemon]", "2:2: duplicate key"),
        // `[providers]` and `[models]`: the maps keyed by spanned names.
        (
            "providers = 5",
            "1:13: key `providers`: invalid type: integer `5`, expected a map",
        ),
        (
            "providers = [1]",
            "1:13: key `providers`: invalid type: sequence, expected a map",
        ),
        (
            "[[providers]]\nkind = \"openai\"",
            "1:1: invalid type: sequence, expected a map",
        ),
        (
            "[providers]\nx = 5",
            "2:5: key `x`: invalid type: integer `5`, expected struct ProviderConfig",
        ),
        (
            "[providers.x]\nkind = 5",
            "2:8: key `kind`: wanted string or table",
        ),
        (
            "[providers.x]\nkind = \"openai\"\napi_key = \"sk\"",
            "3:1: key `api_key`: unknown field `api_key`, expected one of `kind`, `base_url`, \
             `api_key_file`, `api_key_env`, `ca_file`, `timeout_secs`",
        ),
        (
            "[models.m]\nfallback = \"a\"",
            "2:12: key `fallback`: invalid type: string \"a\", expected a sequence",
        ),
    ];
    let root = "expected one of `daemon`, `gateway`, `prometheus`, `agent`, `providers`, `models`, \
        `cost`, `store`";
    let daemon = "expected one of `bind`, `health_port`, `memory_warn_mb`, `memory_limit_mb`, \
        `monitor_interval_secs`, `shutdown_grace_secs`, `request_timeout_secs`, `log_level`, \
        `state_dir`, `max_connections`, `max_connections_per_ip`, `workers`";
    for (text, expected) in cases {
        let message = parse(&format!("{text}\n")).unwrap_err().to_string();
        let expected = expected.replace("{root}", root).replace("{daemon}", daemon);
        assert_eq!(message, format!("blufio.toml:{expected}"), "{text:?}");
    }
}

#[test]
fn empty_and_comment_only_files_are_the_defaults() {
    for text in ["", "\n", "# only a comment\n", "  \n\t\n"] {
        let config = parse(text).unwrap();
        assert_eq!(config.to_toml(), Config::default().to_toml(), "{text:?}");
    }
}
