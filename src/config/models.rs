//! `[providers.NAME]` and `[models.ALIAS]`: the schema of several upstreams and the model
//! names clients ask for, and the checks that tie them together (every `provider =` and
//! `fallback` entry names something declared, no fallback chain loops, one default model).
//!
//! References keep their byte span in the file (`toml::Spanned`), so an error about them
//! names the line and column of the offending value, like a syntax error does.
//! The routing table built from these sections is `crate::routes`.

use std::{collections::BTreeMap, ops::Range, path::PathBuf};

use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::{ANTHROPIC_KEY_ENV, Config, OPENAI_KEY_ENV, Provider, Secret};

/// The most `[providers.NAME]` sections; a gateway in front of more is not a small daemon.
pub const MAX_PROVIDERS: usize = 64;
/// The most `[models.ALIAS]` sections; bounds the routing table (each alias holds its chain).
pub const MAX_MODELS: usize = 256;
/// The most upstreams one request may try (the alias and its fallbacks): each is tried
/// within the same deadline, so a longer chain only waits longer before it fails.
pub const MAX_CHAIN: usize = 8;

/// `[providers.NAME]`: one upstream API.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// Which API the upstream speaks.
    pub kind: ProviderKind,
    /// The API root; default: the kind's public API.
    #[serde(default)]
    pub base_url: Option<String>,
    /// File holding the API key; the environment variable wins over it.
    #[serde(default)]
    pub api_key_file: Option<PathBuf>,
    /// Environment variable holding the API key; default `ANTHROPIC_API_KEY` or
    /// `OPENAI_API_KEY` by kind.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// PEM file with the CA certificate(s) to trust instead of the built-in roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Seconds this upstream gets to answer; default `[agent] timeout_secs`.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// The resolved API key (environment, then `api_key_file`); never read from TOML.
    #[serde(skip)]
    pub api_key: Option<Secret>,
}

/// The APIs a `[providers.NAME]` can speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// The Anthropic Messages API.
    Anthropic,
    /// The OpenAI Chat Completions API (OpenAI, Ollama, llama.cpp, vLLM).
    #[serde(rename = "openai")]
    OpenAi,
}

impl ProviderKind {
    /// Returns the name used in the configuration.
    pub fn as_str(self) -> &'static str {
        self.provider().as_str()
    }

    /// Returns the `[agent] provider` value speaking the same API.
    pub fn provider(self) -> Provider {
        match self {
            ProviderKind::Anthropic => Provider::Anthropic,
            ProviderKind::OpenAi => Provider::OpenAi,
        }
    }

    /// Returns the environment variable read for the API key when `api_key_env` is unset.
    pub fn default_key_env(self) -> &'static str {
        match self {
            ProviderKind::Anthropic => ANTHROPIC_KEY_ENV,
            ProviderKind::OpenAi => OPENAI_KEY_ENV,
        }
    }
}

/// `[models.ALIAS]`: a name clients ask for, and where it is served.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The `[providers.NAME]` serving it.
    pub provider: Spanned<String>,
    /// The upstream's model id; default: the alias.
    #[serde(default)]
    pub model: Option<String>,
    /// Aliases tried in order when this one fails before its first token.
    #[serde(default)]
    pub fallback: Vec<Spanned<String>>,
    /// Largest reply, in tokens, for requests that give none; default `[agent] max_tokens`.
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// System prompt for requests that give none.
    #[serde(default)]
    pub system: Option<String>,
}

/// A problem in `[providers]`, `[models]` or `[gateway] default_model`, with where it is in
/// the file when known.
#[derive(Debug)]
pub(super) struct RoutingProblem {
    pub(super) key: String,
    pub(super) message: String,
    pub(super) span: Option<Range<usize>>,
}

fn problem(key: String, message: String, span: Option<Range<usize>>) -> RoutingProblem {
    RoutingProblem { key, message, span }
}

/// The `[agent]` keys that only the one-provider shorthand reads.
fn shorthand_keys(config: &Config) -> Vec<&'static str> {
    let agent = &config.agent;
    let mut keys = Vec::new();
    if agent.provider != Provider::None {
        keys.push("provider");
    }
    for (key, set) in [
        ("base_url", agent.base_url.is_some()),
        ("model", agent.model.is_some()),
        ("system", agent.system.is_some()),
        ("ca_file", agent.ca_file.is_some()),
        ("api_key_file", agent.api_key_file.is_some()),
    ] {
        if set {
            keys.push(key);
        }
    }
    keys
}

impl Config {
    /// Checks what ties `[providers]`, `[models]`, `[gateway] default_model` and the
    /// `[agent]` shorthand together; needs no environment or file.
    pub(super) fn check_routing(&self) -> Result<(), RoutingProblem> {
        if let Some((name, _)) = self.providers.iter().next()
            && let Some(first) = shorthand_keys(self).first()
        {
            return Err(problem(
                format!("[providers.{}]", name.get_ref()),
                format!(
                    "[agent] {first} is the one-provider shorthand and cannot be mixed with \
                     [providers]: move it into a [providers.NAME] and [models.ALIAS] section"
                ),
                Some(name.span()),
            ));
        }
        if self.providers.is_empty()
            && let Some((alias, model)) = self.models.iter().next()
        {
            return Err(problem(
                format!("[models.{}] provider", alias.get_ref()),
                format!(
                    "no [providers] are declared: add [providers.{}] (the [agent] shorthand \
                     has no models)",
                    model.provider.get_ref()
                ),
                Some(model.provider.span()),
            ));
        }
        if let Some((name, _)) = self.providers.iter().nth(MAX_PROVIDERS) {
            return Err(problem(
                "[providers]".to_owned(),
                format!("at most {MAX_PROVIDERS} providers"),
                Some(name.span()),
            ));
        }
        if let Some((alias, _)) = self.models.iter().nth(MAX_MODELS) {
            return Err(problem(
                "[models]".to_owned(),
                format!("at most {MAX_MODELS} models"),
                Some(alias.span()),
            ));
        }
        for (name, provider) in &self.providers {
            check_provider(name.get_ref(), provider)
                .map_err(|(key, message)| problem(key, message, Some(name.span())))?;
        }
        for (alias, model) in &self.models {
            self.check_model(alias, model)?;
        }
        self.check_fallback_cycles()?;
        for (alias, model) in &self.models {
            let chain = self.fallback_order(alias.get_ref());
            if chain.len() > MAX_CHAIN {
                return Err(problem(
                    format!("[models.{}] fallback", alias.get_ref()),
                    format!(
                        "the chain {} tries {} models; at most {MAX_CHAIN}",
                        chain.join(" -> "),
                        chain.len()
                    ),
                    model.fallback.first().map(Spanned::span),
                ));
            }
        }
        self.check_default_model()
    }

    fn check_model(
        &self,
        alias: &Spanned<String>,
        model: &ModelConfig,
    ) -> Result<(), RoutingProblem> {
        let name = alias.get_ref();
        if name.trim().is_empty() {
            return Err(problem(
                "[models]".to_owned(),
                "a model alias must not be empty".to_owned(),
                Some(alias.span()),
            ));
        }
        let provider = &model.provider;
        if !self.providers.contains_key(provider.get_ref().as_str()) {
            return Err(problem(
                format!("[models.{name}] provider"),
                format!(
                    "{:?} is not a declared provider (declared: {})",
                    provider.get_ref(),
                    list(self.providers.keys())
                ),
                Some(provider.span()),
            ));
        }
        if model
            .model
            .as_deref()
            .is_some_and(|id| id.trim().is_empty())
        {
            return Err(problem(
                format!("[models.{name}] model"),
                "must not be empty (leave it out to send the alias)".to_owned(),
                Some(alias.span()),
            ));
        }
        if model.max_tokens == Some(0) {
            return Err(problem(
                format!("[models.{name}] max_tokens"),
                "must be greater than 0".to_owned(),
                Some(alias.span()),
            ));
        }
        if let Some(unknown) = model
            .fallback
            .iter()
            .find(|entry| !self.models.contains_key(entry.get_ref().as_str()))
        {
            return Err(problem(
                format!("[models.{name}] fallback"),
                format!(
                    "{:?} is not a declared model (declared: {})",
                    unknown.get_ref(),
                    list(self.models.keys())
                ),
                Some(unknown.span()),
            ));
        }
        Ok(())
    }

    /// Refuses a fallback chain that comes back to a model already in it (a model in its own
    /// `fallback` included): the chain would never end.
    fn check_fallback_cycles(&self) -> Result<(), RoutingProblem> {
        // Depth-first search; `path` holds the aliases from the start to the current one.
        fn visit<'a>(
            models: &'a BTreeMap<Spanned<String>, ModelConfig>,
            alias: &'a str,
            path: &mut Vec<&'a str>,
            done: &mut Vec<&'a str>,
        ) -> Result<(), RoutingProblem> {
            if done.contains(&alias) {
                return Ok(());
            }
            path.push(alias);
            for entry in models.get(alias).map_or(&[][..], |m| &m.fallback[..]) {
                let next = entry.get_ref().as_str();
                if let Some(start) = path.iter().position(|seen| *seen == next) {
                    let mut looped = path[start..].to_vec();
                    looped.push(next);
                    return Err(problem(
                        format!("[models.{alias}] fallback"),
                        format!("the fallback chain loops: {}", looped.join(" -> ")),
                        Some(entry.span()),
                    ));
                }
                visit(models, next, path, done)?;
            }
            path.pop();
            done.push(alias);
            Ok(())
        }
        let mut done = Vec::new();
        for alias in self.models.keys() {
            visit(&self.models, alias.get_ref(), &mut Vec::new(), &mut done)?;
        }
        Ok(())
    }

    /// Returns the aliases a request for `alias` tries, in order: the alias, then depth
    /// first each fallback's own chain, each alias once (so even a loop, which the checks
    /// refuse, ends).
    pub(crate) fn fallback_order<'a>(&'a self, alias: &'a str) -> Vec<&'a str> {
        fn walk<'a>(config: &'a Config, alias: &'a str, order: &mut Vec<&'a str>) {
            let Some((name, model)) = config.models.get_key_value(alias) else {
                return;
            };
            if order.contains(&name.get_ref().as_str()) {
                return;
            }
            order.push(name.get_ref());
            for next in &model.fallback {
                walk(config, next.get_ref(), order);
            }
        }
        let mut order = Vec::new();
        walk(self, alias, &mut order);
        order
    }

    fn check_default_model(&self) -> Result<(), RoutingProblem> {
        match &self.gateway.default_model {
            Some(default) if self.providers.is_empty() => Err(problem(
                "[gateway] default_model".to_owned(),
                "names a [models.ALIAS], but there are no [models] (the [agent] shorthand has \
                 one model and needs no default)"
                    .to_owned(),
                Some(default.span()),
            )),
            Some(default) if !self.models.contains_key(default.get_ref().as_str()) => Err(problem(
                "[gateway] default_model".to_owned(),
                format!(
                    "{:?} is not a declared model (declared: {})",
                    default.get_ref(),
                    list(self.models.keys())
                ),
                Some(default.span()),
            )),
            None if self.models.len() > 1 => Err(problem(
                "[gateway] default_model".to_owned(),
                format!(
                    "is needed when there are several models ({}): it answers /v1/messages and \
                     /ws requests that name none",
                    list(self.models.keys())
                ),
                None,
            )),
            _ => Ok(()),
        }
    }
}

/// Checks one `[providers.NAME]`'s own keys (not its API key, resolved later).
fn check_provider(name: &str, provider: &ProviderConfig) -> Result<(), (String, String)> {
    let key = |key: &str| format!("[providers.{name}] {key}");
    super::provider::endpoint(provider.kind.provider(), provider.base_url.as_deref())
        .map_err(|message| (key("base_url"), message))?;
    if provider.timeout_secs == Some(0) {
        return Err((key("timeout_secs"), "must be greater than 0".to_owned()));
    }
    if provider
        .api_key_env
        .as_deref()
        .is_some_and(|env| env.is_empty() || env.contains(['=', '\0']))
    {
        return Err((
            key("api_key_env"),
            "must be an environment variable's name".to_owned(),
        ));
    }
    if provider.ca_file.is_some() && !super::provider::has_tls() {
        return Err((
            key("ca_file"),
            "this build has no TLS (cargo feature `tls`)".to_owned(),
        ));
    }
    Ok(())
}

/// Checks that every Anthropic provider has its API key, once keys are resolved.
pub(super) fn check_provider_keys(config: &Config) -> Result<(), (String, String)> {
    for (name, provider) in &config.providers {
        if provider.kind == ProviderKind::Anthropic && provider.api_key.is_none() {
            let env = provider.api_key_env.as_deref().unwrap_or(ANTHROPIC_KEY_ENV);
            return Err((
                format!("[providers.{}] api_key_file", name.get_ref()),
                format!("kind \"anthropic\" needs an API key: set {env} or api_key_file"),
            ));
        }
    }
    Ok(())
}

/// Lists names for an error message.
fn list<'a>(names: impl Iterator<Item = &'a Spanned<String>>) -> String {
    let names: Vec<&str> = names.map(|name| name.get_ref().as_str()).collect();
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(", ")
    }
}

impl ProviderConfig {
    /// Returns the endpoint URL requests go to (`{base_url}/v1/messages` or
    /// `{base_url}/v1/chat/completions`).
    ///
    /// # Errors
    ///
    /// Returns why `base_url` is unusable (never, once the configuration is validated).
    pub fn endpoint(&self) -> Result<trillium_client::Url, String> {
        super::provider::endpoint(self.kind.provider(), self.base_url.as_deref())
    }
}

/// The Anthropic plus Ollama example of the README, for the config and routing tests.
#[cfg(test)]
pub(crate) const CLOUD_AND_LOCAL: &str = r#"[providers.claude]
kind = "anthropic"
api_key_env = "MY_KEY"

[providers.pi]
kind = "openai"
base_url = "http://192.168.1.20:11434"

[models.sonnet]
provider = "claude"
model = "claude-sonnet-4-5"
fallback = ["llama"]

[models.llama]
provider = "pi"
model = "llama3.2"

[gateway]
default_model = "sonnet"
"#;
