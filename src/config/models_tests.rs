//! Unit tests of `[providers]`, `[models]` and `[gateway] default_model`: every rule and
//! error message.

use std::path::Path;

use super::{
    models::{MAX_CHAIN, MAX_MODELS, MAX_PROVIDERS},
    *,
};

use super::models::CLOUD_AND_LOCAL;

fn parse(text: &str) -> Result<Config, Error> {
    Config::parse(text, Path::new("blufio.toml"))
}

/// Returns the error for `text`, which must fail to parse.
fn parse_error(text: &str) -> String {
    parse(text).unwrap_err().to_string()
}

fn env_with_key(name: &str) -> Option<String> {
    (name == "MY_KEY").then(|| "sk-test".to_owned())
}

/// Loads `text` from a file in a temporary directory, with `MY_KEY` set.
fn load(text: &str) -> Result<Config, Error> {
    let dir = blufio_testkit::temp::temp_dir("models");
    let path = dir.path().join("blufio.toml");
    std::fs::write(&path, text).unwrap();
    Config::load_with_env(Some(&path), env_with_key)
}

#[test]
fn several_models_without_default_model_are_refused() {
    let message = parse(
        "[providers.pi]\nkind = \"openai\"\n[models.a]\nprovider = \"pi\"\n\
         [models.b]\nprovider = \"pi\"\n",
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        message,
        "blufio.toml: [gateway] default_model: is needed when there are several models (a, b): \
         it answers /v1/messages and /ws requests that name none"
    );
}

#[test]
fn unknown_default_model_names_line_and_column() {
    let text = CLOUD_AND_LOCAL.replace("default_model = \"sonnet\"", "default_model = \"opus\"");
    assert_eq!(
        parse_error(&text),
        "blufio.toml:19:17: key `[gateway] default_model`: \"opus\" is not a declared model \
         (declared: llama, sonnet)"
    );
}

#[test]
fn unknown_provider_names_line_column_and_key() {
    let text = CLOUD_AND_LOCAL.replace("provider = \"pi\"", "provider = \"gpu\"");
    assert_eq!(
        parse_error(&text),
        "blufio.toml:15:12: key `[models.llama] provider`: \"gpu\" is not a declared provider \
         (declared: claude, pi)"
    );
}

#[test]
fn unknown_fallback_names_line_column_and_key() {
    let text = CLOUD_AND_LOCAL.replace(
        "fallback = [\"llama\"]",
        "fallback = [\"llama\", \"mistral\"]",
    );
    assert_eq!(
        parse_error(&text),
        "blufio.toml:12:22: key `[models.sonnet] fallback`: \"mistral\" is not a declared model \
         (declared: llama, sonnet)"
    );
}

#[test]
fn fallback_cycles_are_refused_with_the_loop() {
    let text = CLOUD_AND_LOCAL.replace(
        "model = \"llama3.2\"",
        "model = \"llama3.2\"\nfallback = [\"sonnet\"]",
    );
    assert_eq!(
        parse_error(&text),
        "blufio.toml:12:13: key `[models.sonnet] fallback`: the fallback chain loops: \
         llama -> sonnet -> llama"
    );
    let own =
        "[providers.pi]\nkind = \"openai\"\n[models.a]\nprovider = \"pi\"\nfallback = [\"a\"]\n";
    assert_eq!(
        parse_error(own),
        "blufio.toml:5:13: key `[models.a] fallback`: the fallback chain loops: a -> a"
    );
}

#[test]
fn unknown_kind_names_line_column_and_key() {
    let message = parse_error("[providers.x]\nkind = \"gemini\"\n");
    assert!(
        message.starts_with("blufio.toml:2:8: key `kind`: "),
        "{message}"
    );
    assert!(
        message.contains("anthropic") && message.contains("openai"),
        "{message}"
    );
}

#[test]
fn unknown_keys_in_providers_and_models_are_refused() {
    let message = parse_error("[providers.x]\nkind = \"openai\"\napi_key = \"sk\"\n");
    assert!(
        message.starts_with("blufio.toml:3:1: key `api_key`"),
        "{message}"
    );
    let message =
        parse_error("[providers.x]\nkind = \"openai\"\n[models.m]\nprovider = \"x\"\ntemp = 1\n");
    assert!(
        message.starts_with("blufio.toml:5:1: key `temp`"),
        "{message}"
    );
}

#[test]
fn mixing_the_agent_shorthand_with_providers_names_both() {
    let message = parse_error(&format!(
        "[agent]\nprovider = \"openai\"\nmodel = \"m\"\n{CLOUD_AND_LOCAL}"
    ));
    assert!(
        message.starts_with(
            "blufio.toml:4:12: key `[providers.claude]`: [agent] provider is the \
             one-provider shorthand and cannot be mixed with [providers]"
        ),
        "{message}"
    );
    let message = parse_error(&format!("[agent]\nsystem = \"hi\"\n{CLOUD_AND_LOCAL}"));
    assert!(message.contains("[agent] system"), "{message}");
}

#[test]
fn models_without_providers_are_refused() {
    let message = parse_error("[models.m]\nprovider = \"p\"\n");
    assert_eq!(
        message,
        "blufio.toml:2:12: key `[models.m] provider`: no [providers] are declared: add \
         [providers.p] (the [agent] shorthand has no models)"
    );
}

#[test]
fn provider_keys_are_checked_and_named() {
    let cases = [
        ("base_url = \"ftp://x\"", "[providers.x] base_url"),
        ("timeout_secs = 0", "[providers.x] timeout_secs"),
        ("api_key_env = \"\"", "[providers.x] api_key_env"),
    ];
    for (line, key) in cases {
        let message = parse_error(&format!("[providers.x]\nkind = \"openai\"\n{line}\n"));
        assert!(
            message.starts_with(&format!("blufio.toml:1:12: key `{key}`")),
            "{message}"
        );
    }
    let base = "[providers.x]\nkind = \"openai\"\n[models.m]\nprovider = \"x\"\n";
    let message = parse_error(&format!("{base}max_tokens = 0\n"));
    assert!(
        message.contains("key `[models.m] max_tokens`: must be greater than 0"),
        "{message}"
    );
    let message = parse_error(&format!("{base}model = \" \"\n"));
    assert!(
        message.contains("key `[models.m] model`: must not be empty"),
        "{message}"
    );
}

#[test]
fn anthropic_provider_needs_a_key_from_its_env_or_file() {
    let text = "[providers.c]\nkind = \"anthropic\"\n[models.m]\nprovider = \"c\"\n";
    let message = load(text).unwrap_err().to_string();
    assert!(
        message.ends_with(
            "[providers.c] api_key_file: kind \"anthropic\" needs an API key: set \
             ANTHROPIC_API_KEY or api_key_file"
        ),
        "{message}"
    );
    let dir = blufio_testkit::temp::temp_dir("models-key");
    std::fs::write(dir.path().join("key"), "sk-file\n").unwrap();
    let path = dir.path().join("blufio.toml");
    let with_file = text.replace(
        "kind = \"anthropic\"\n",
        "kind = \"anthropic\"\napi_key_file = \"key\"\n",
    );
    std::fs::write(&path, with_file).unwrap();
    let config = Config::load_with_env(Some(&path), |_| None).unwrap();
    assert_eq!(
        config.providers["c"].api_key.as_ref().unwrap().expose(),
        "sk-file"
    );
    let from_env = Config::load_with_env(Some(&path), |name| {
        (name == "ANTHROPIC_API_KEY").then(|| "sk-env".to_owned())
    })
    .unwrap();
    assert_eq!(
        from_env.providers["c"].api_key.as_ref().unwrap().expose(),
        "sk-env"
    );
}

#[test]
fn default_model_with_the_agent_shorthand_is_refused() {
    let message = parse_error(
        "[agent]\nprovider = \"openai\"\nmodel = \"m\"\n[gateway]\ndefault_model = \"m\"\n",
    );
    assert!(
        message.starts_with("blufio.toml:5:17: key `[gateway] default_model`: names a"),
        "{message}"
    );
}

#[test]
fn empty_alias_and_bad_api_key_env_are_refused() {
    let message =
        parse_error("[providers.x]\nkind = \"openai\"\n[models.\"\"]\nprovider = \"x\"\n");
    assert_eq!(
        message,
        "blufio.toml:3:9: key `[models]`: a model alias must not be empty"
    );
    let message = parse_error("[providers.x]\nkind = \"openai\"\napi_key_env = \"A=B\"\n");
    assert!(
        message
            .ends_with("key `[providers.x] api_key_env`: must be an environment variable's name"),
        "{message}"
    );
}

#[test]
fn relative_provider_files_are_read_beside_the_config_file() {
    let dir = blufio_testkit::temp::temp_dir("models-relative");
    std::fs::write(dir.path().join("pi.key"), "sk-pi\n").unwrap();
    let path = dir.path().join("blufio.toml");
    std::fs::write(
        &path,
        "[providers.pi]\nkind = \"openai\"\napi_key_file = \"pi.key\"\n\
         [models.m]\nprovider = \"pi\"\n",
    )
    .unwrap();
    let config = Config::load_with_env(Some(&path), |_| None).unwrap();
    let pi = &config.providers["pi"];
    assert_eq!(
        pi.api_key_file.as_deref(),
        Some(dir.path().join("pi.key").as_path())
    );
    assert_eq!(pi.api_key.as_ref().unwrap().expose(), "sk-pi");
}

#[test]
fn provider_endpoints_default_by_kind() {
    let config = load(CLOUD_AND_LOCAL).unwrap();
    assert_eq!(
        config.providers["claude"].endpoint().unwrap().as_str(),
        "https://api.anthropic.com/v1/messages"
    );
    assert_eq!(
        config.providers["pi"].endpoint().unwrap().as_str(),
        "http://192.168.1.20:11434/v1/chat/completions"
    );
}

#[test]
fn fallback_chains_longer_than_the_limit_are_refused() {
    let mut text =
        String::from("[providers.pi]\nkind = \"openai\"\n[gateway]\ndefault_model = \"m0\"\n");
    for index in 0..=MAX_CHAIN {
        text.push_str(&format!("[models.m{index}]\nprovider = \"pi\"\n"));
        if index < MAX_CHAIN {
            text.push_str(&format!("fallback = [\"m{}\"]\n", index + 1));
        }
    }
    let message = parse_error(&text);
    assert!(
        message.contains(
            "key `[models.m0] fallback`: the chain m0 -> m1 -> m2 -> m3 -> m4 -> m5 -> m6 -> m7 \
             -> m8 tries 9 models; at most 8"
        ),
        "{message}"
    );
    let shorter = text.replace("fallback = [\"m8\"]\n", "");
    parse(&shorter).unwrap();
}

#[test]
fn more_models_or_providers_than_the_limits_are_refused() {
    let mut text =
        String::from("[providers.pi]\nkind = \"openai\"\n[gateway]\ndefault_model = \"m000\"\n");
    for index in 0..MAX_MODELS {
        text.push_str(&format!("[models.m{index:03}]\nprovider = \"pi\"\n"));
    }
    parse(&text).unwrap();
    text.push_str("[models.m999]\nprovider = \"pi\"\n");
    assert!(parse_error(&text).contains("key `[models]`: at most 256 models"));
    let mut text = String::new();
    for index in 0..=MAX_PROVIDERS {
        text.push_str(&format!("[providers.p{index:03}]\nkind = \"openai\"\n"));
    }
    assert!(parse_error(&text).contains("key `[providers]`: at most 64 providers"));
}
