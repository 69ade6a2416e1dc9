//! The `[agent]` keys a model provider needs, checked once here, and the endpoint URL the
//! provider sends to.

use trillium_client::Url;

use super::{AgentConfig, Provider};

/// Returns whether this build can speak HTTPS (the `tls` cargo feature).
pub(super) const fn has_tls() -> bool {
    cfg!(feature = "tls")
}

/// Returns the provider's public API root.
pub(super) fn default_base_url(provider: Provider) -> &'static str {
    match provider {
        Provider::OpenAi => "https://api.openai.com",
        _ => "https://api.anthropic.com",
    }
}

impl AgentConfig {
    /// Checks the `[agent]` keys a provider needs; the error names the key.
    pub(super) fn check_provider(&self) -> Result<(), (&'static str, String)> {
        if !matches!(self.provider, Provider::Anthropic | Provider::OpenAi) {
            return Ok(());
        }
        let name = self.provider.as_str();
        self.endpoint()
            .map_err(|message| ("[agent] base_url", message))?;
        if self.provider == Provider::Anthropic && self.api_key.is_none() {
            return Err((
                "[agent] api_key_file",
                "provider \"anthropic\" needs an API key: set ANTHROPIC_API_KEY or api_key_file"
                    .to_owned(),
            ));
        }
        if self.provider == Provider::OpenAi && self.model.is_none() {
            return Err((
                "[agent] model",
                "provider \"openai\" needs a model (for example \"gpt-4o-mini\", or \"llama3.2\" \
                 on Ollama)"
                    .to_owned(),
            ));
        }
        if self
            .model
            .as_deref()
            .is_some_and(|model| model.trim().is_empty())
        {
            return Err(("[agent] model", "must not be empty".to_owned()));
        }
        if self.max_tokens == 0 {
            return Err(("[agent] max_tokens", "must be greater than 0".to_owned()));
        }
        if self.ca_file.is_some() && !has_tls() {
            return Err((
                "[agent] ca_file",
                format!("provider {name:?}: this build has no TLS (cargo feature `tls`)"),
            ));
        }
        Ok(())
    }

    /// Returns the endpoint URL: `{base_url}/v1/messages` or `{base_url}/v1/chat/completions`.
    ///
    /// # Errors
    ///
    /// Returns why `base_url` is unusable: not a URL, a scheme other than http or https (or
    /// https without TLS in this build), no host, or a user or password in it.
    pub fn endpoint(&self) -> Result<Url, String> {
        endpoint(self.provider, self.base_url.as_deref())
    }
}

/// Returns the endpoint URL of a provider speaking `provider`'s API at `base_url` (default:
/// its public API): `{base_url}/v1/messages` or `{base_url}/v1/chat/completions`.
///
/// # Errors
///
/// Returns why `base_url` is unusable, as [`AgentConfig::endpoint`] does.
pub(super) fn endpoint(provider: Provider, base_url: Option<&str>) -> Result<Url, String> {
    let base = base_url.unwrap_or(default_base_url(provider));
    let url = Url::parse(base).map_err(|error| format!("{base:?} is not a URL: {error}"))?;
    match url.scheme() {
        "http" => {}
        "https" if has_tls() => {}
        "https" => {
            return Err(format!(
                "{base:?} needs TLS, which this build lacks (cargo feature `tls`)"
            ));
        }
        other => return Err(format!("{base:?}: scheme {other:?} is not http or https")),
    }
    if url.host_str().is_none() || !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "{base:?} needs a host and no user or password (keys go in api_key_file)"
        ));
    }
    let path = match provider {
        Provider::OpenAi => "v1/chat/completions",
        _ => "v1/messages",
    };
    let mut root = url.as_str().trim_end_matches('/').to_owned();
    root.push('/');
    Url::parse(&root)
        .and_then(|root| root.join(path))
        .map_err(|error| format!("{base:?}: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn agent(provider: Provider, base_url: Option<&str>) -> AgentConfig {
        AgentConfig {
            provider,
            base_url: base_url.map(str::to_owned),
            api_key: Some(Secret::new("k")),
            model: Some("m".to_owned()),
            ..AgentConfig::default()
        }
    }

    #[test]
    fn endpoints_join_the_api_path_to_the_base_url() {
        let url = |provider, base| agent(provider, base).endpoint().unwrap().to_string();
        assert_eq!(
            url(Provider::Anthropic, None),
            "https://api.anthropic.com/v1/messages"
        );
        assert_eq!(
            url(Provider::OpenAi, Some("http://127.0.0.1:11434/")),
            "http://127.0.0.1:11434/v1/chat/completions"
        );
        assert_eq!(
            url(Provider::OpenAi, Some("http://gpu.lan/proxy")),
            "http://gpu.lan/proxy/v1/chat/completions"
        );
    }

    #[test]
    fn unusable_settings_name_their_key() {
        for bad in ["not a url", "ftp://x", "http://user:pw@host"] {
            let (key, _) = agent(Provider::OpenAi, Some(bad))
                .check_provider()
                .unwrap_err();
            assert_eq!(key, "[agent] base_url", "{bad}");
        }
        let mut anthropic = agent(Provider::Anthropic, None);
        anthropic.api_key = None;
        assert_eq!(
            anthropic.check_provider().unwrap_err().0,
            "[agent] api_key_file"
        );
        let mut openai = agent(Provider::OpenAi, None);
        openai.api_key = None;
        openai.check_provider().unwrap();
        openai.model = None;
        assert_eq!(openai.check_provider().unwrap_err().0, "[agent] model");
        agent(Provider::Echo, Some("not a url"))
            .check_provider()
            .unwrap();
    }
}
