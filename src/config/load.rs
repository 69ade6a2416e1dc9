//! Loading the configuration: the file (through `small_file`), the environment variables,
//! and the token and API key files, with parse errors that name file, line, column and key.

use std::path::Path;

use serde::{
    Deserialize, Deserializer,
    de::{DeserializeSeed, Error as _, MapAccess, Visitor},
};
use toml::{
    Spanned,
    de::{DeTable, DeValue, ValueDeserializer},
};

use super::{
    ANTHROPIC_KEY_ENV, Config, OPENAI_KEY_ENV, Provider, Secret, TOKEN_ENV, log_env_override,
    validate::{check_token, invalid},
};
use crate::{error::Error, notify::NotifySettings, small_file::read_capped};

/// Where a configuration comes from, for error messages.
const DEFAULTS_ORIGIN: &str = "built-in defaults";

impl Config {
    /// Loads the configuration: the file at `path` when given (it must exist), else built-in
    /// defaults, then the environment (`BLUFIO_GATEWAY_TOKEN`), then validates it.
    ///
    /// # Errors
    ///
    /// Returns a configuration error naming the file, line, column and key.
    pub fn load(path: Option<&Path>) -> Result<Config, Error> {
        Config::load_with_env(path, |name| std::env::var(name).ok())
    }

    /// Like [`Config::load`], reading environment variables through `env` (for tests).
    ///
    /// # Errors
    ///
    /// Returns a configuration error naming the file, line, column and key.
    pub fn load_with_env(
        path: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, Error> {
        let (mut config, origin) = match path {
            Some(path) => {
                let text = read_capped(path).map_err(|source| Error::ConfigRead {
                    path: path.to_owned(),
                    source,
                })?;
                let mut config = Config::parse(&text, path)?;
                config.resolve_paths(path);
                (config, path.display().to_string())
            }
            None => (Config::default(), DEFAULTS_ORIGIN.to_owned()),
        };
        config.resolve_token(&origin, env(TOKEN_ENV))?;
        let key_env = match config.agent.provider {
            Provider::Anthropic => env(ANTHROPIC_KEY_ENV),
            Provider::OpenAi => env(OPENAI_KEY_ENV),
            Provider::None | Provider::Echo => None,
        };
        config.resolve_api_key(&origin, key_env)?;
        config.resolve_provider_keys(&origin, &env)?;
        config.validate(&origin)?;
        Ok(config)
    }

    /// Parses TOML text; `path` is only used in error messages.
    ///
    /// # Errors
    ///
    /// Returns [`Error::ConfigSyntax`] with the line, column and key of the problem.
    /// The references among `[providers]`, `[models]` and `[gateway] default_model` are
    /// checked here too, where the text is at hand to say where a bad one is.
    pub fn parse(text: &str, path: &Path) -> Result<Config, Error> {
        let root = DeTable::parse(text).map(Spanned::into_inner);
        let config = root.and_then(|root| Config::deserialize(Root(root)));
        let config = config.map_err(|error| {
            let offset = error.span().map_or(0, |span| span.start);
            let (line, column) = line_and_column(text, offset);
            Error::ConfigSyntax {
                path: path.to_owned(),
                line,
                column,
                key: key_at(text, offset),
                message: error.message().trim().to_owned(),
            }
        })?;
        config
            .check_routing()
            .map_err(|problem| match problem.span {
                Some(span) => {
                    let (line, column) = line_and_column(text, span.start);
                    Error::ConfigSyntax {
                        path: path.to_owned(),
                        line,
                        column,
                        key: Some(problem.key),
                        message: problem.message,
                    }
                }
                None => invalid(&path.display().to_string(), &problem.key, &problem.message),
            })?;
        Ok(config)
    }

    /// Parses and validates TOML text as [`Config::load`] does, without the environment: the
    /// whole path from file text to a `Config` the daemon accepts, and what the config fuzz
    /// target runs. `path` names the file in errors.
    ///
    /// # Errors
    ///
    /// Returns a configuration error naming the file, line, column and key.
    pub fn parse_validated(text: &str, path: &Path) -> Result<Config, Error> {
        let mut config = Config::parse(text, path)?;
        let origin = path.display().to_string();
        config.resolve_token(&origin, None)?;
        config.validate(&origin)?;
        Ok(config)
    }

    /// Returns the log filter: `BLUFIO_LOG` when set, else `[daemon] log_level`.
    pub fn log_filter(&self) -> String {
        log_env_override().unwrap_or_else(|| self.daemon.log_level.clone())
    }

    /// Returns where to send service-manager notifications, from `NOTIFY_SOCKET`,
    /// `WATCHDOG_USEC` and `WATCHDOG_PID`; `None` when not run by a manager that asks for them.
    pub fn notify_settings() -> Option<NotifySettings> {
        NotifySettings::from_vars(
            std::env::var_os("NOTIFY_SOCKET"),
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::process::id(),
        )
    }

    /// Makes relative paths in the file relative to the file's own directory, so the daemon
    /// finds them whatever its working directory (systemd starts it in `/`).
    fn resolve_paths(&mut self, config_path: &Path) {
        let base = config_path.parent().unwrap_or(Path::new(""));
        if let Some(token_file) = &mut self.gateway.token_file
            && token_file.is_relative()
        {
            *token_file = base.join(&*token_file);
        }
        let provider_files = self
            .providers
            .values_mut()
            .flat_map(|provider| [&mut provider.api_key_file, &mut provider.ca_file]);
        for path in [
            &mut self.agent.api_key_file,
            &mut self.agent.ca_file,
            &mut self.daemon.state_dir,
        ]
        .into_iter()
        .chain(provider_files)
        .flatten()
        {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        }
    }

    fn resolve_token(&mut self, origin: &str, from_env: Option<String>) -> Result<(), Error> {
        if let Some(token) = from_env.filter(|token| !token.is_empty()) {
            check_token(&token).map_err(|problem| {
                invalid("environment", TOKEN_ENV, &format!("the token {problem}"))
            })?;
            self.gateway.token = Some(Secret(token));
            return Ok(());
        }
        if let Some(path) = &self.gateway.token_file {
            if self.gateway.token.is_some() {
                return Err(invalid(
                    origin,
                    "[gateway] token_file",
                    "set either token or token_file, not both",
                ));
            }
            let text = read_capped(path).map_err(|source| Error::FileRead {
                what: "token file",
                path: path.clone(),
                source,
            })?;
            // Editors and `echo` end files with a newline; anything else is part of the token.
            let token = text.strip_suffix('\n').map_or(text.as_str(), |rest| {
                rest.strip_suffix('\r').unwrap_or(rest)
            });
            check_token(token).map_err(|problem| {
                invalid(
                    origin,
                    "[gateway] token_file",
                    &format!("the token in {} {problem}", path.display()),
                )
            })?;
            self.gateway.token = Some(Secret(token.to_owned()));
        }
        Ok(())
    }

    fn resolve_api_key(&mut self, origin: &str, from_env: Option<String>) -> Result<(), Error> {
        if let Some(key) = from_env.filter(|key| !key.trim().is_empty()) {
            self.agent.api_key = Some(Secret(key.trim().to_owned()));
            return Ok(());
        }
        if let Some(path) = &self.agent.api_key_file {
            self.agent.api_key = Some(read_key_file(origin, "[agent] api_key_file", path)?);
        }
        Ok(())
    }
}

impl Config {
    /// Resolves each `[providers.NAME]`'s API key: its environment variable (`api_key_env`,
    /// default by kind), else its `api_key_file`.
    fn resolve_provider_keys(
        &mut self,
        origin: &str,
        env: &impl Fn(&str) -> Option<String>,
    ) -> Result<(), Error> {
        for (name, provider) in &mut self.providers {
            let var = provider
                .api_key_env
                .as_deref()
                .unwrap_or(provider.kind.default_key_env());
            if let Some(key) = env(var).filter(|key| !key.trim().is_empty()) {
                provider.api_key = Some(Secret(key.trim().to_owned()));
                continue;
            }
            let Some(path) = &provider.api_key_file else {
                continue;
            };
            let key = format!("[providers.{}] api_key_file", name.get_ref());
            provider.api_key = Some(read_key_file(origin, &key, path)?);
        }
        Ok(())
    }
}

/// Reads an API key from `path` (bounded, trimmed); an empty file is an error naming `key`.
fn read_key_file(origin: &str, key: &str, path: &Path) -> Result<Secret, Error> {
    let text = read_capped(path).map_err(|source| Error::FileRead {
        what: "API key file",
        path: path.to_path_buf(),
        source,
    })?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(invalid(
            origin,
            key,
            &format!("{} is empty", path.display()),
        ));
    }
    Ok(Secret(secret.to_owned()))
}

/// Converts a byte offset into a 1-based line and column (in characters).
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |index| index + 1);
    let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, column)
}

/// Finds the key on the line containing `offset` (`key = value`), if that line has one.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let before = text.get(..offset)?;
    let line_start = before.rfind('\n').map_or(0, |index| index + 1);
    let line = text.get(line_start..)?.lines().next()?;
    let (key, _) = line.split_once('=')?;
    let key = key.trim().trim_matches('"');
    (!key.is_empty() && !key.starts_with('[')).then(|| key.to_owned())
}

/// A TOML document's root table, as a deserializer that can only be a table.
///
/// `toml::from_str` reads the root through toml's value deserializer, which could also be an
/// array or a datetime. Since `Config` holds the `[providers]` and `[models]` maps its derived
/// `Deserialize` is no longer inlined there, so those impossible branches, and what they call,
/// stayed in the binary: this reader takes 11,648 bytes off the stripped x86_64 release build.
/// Errors are toml's own, with the same spans: each key is read through a `ValueDeserializer`
/// spanning the key, each value through one spanning the value, as toml does.
struct Root<'i>(DeTable<'i>);

impl<'de> Deserializer<'de> for Root<'de> {
    type Error = toml::de::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_map(Entries {
            entries: self.0.into_iter(),
            value: None,
        })
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map struct enum identifier
        ignored_any
    }
}

/// The root table's entries, handed out key then value.
struct Entries<'i> {
    entries: toml::map::IntoIter<Spanned<toml::de::DeString<'i>>, Spanned<DeValue<'i>>>,
    /// The value of the key handed out last.
    value: Option<Spanned<DeValue<'i>>>,
}

impl<'de> MapAccess<'de> for Entries<'de> {
    type Error = toml::de::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Self::Error> {
        let Some((key, value)) = self.entries.next() else {
            return Ok(None);
        };
        self.value = Some(value);
        // Read as a string value spanning the key, so an unknown key's error points at it.
        let key = Spanned::new(key.span(), DeValue::String(key.into_inner()));
        seed.deserialize(ValueDeserializer::from(key)).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, Self::Error> {
        // serde asks for a value only after its key; this is never taken, but is no panic.
        let value = self
            .value
            .take()
            .ok_or_else(|| toml::de::Error::custom("a value without a key"))?;
        seed.deserialize(ValueDeserializer::from(value))
    }
}
