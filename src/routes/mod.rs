//! The routing table: for each model alias a client may ask for, the ordered chain of
//! upstreams to try (the alias itself, then its fallbacks), the default model, and the
//! aliases with the provider serving each (`/v1/models`' `owned_by`).
//!
//! Built once from a validated [`Config`]: `[providers]` and `[models]`, or the `[agent]`
//! shorthand (one provider named after its kind, one model named after its upstream id).
//! The configuration checks (`config/models.rs`) guarantee every reference resolves and no
//! chain loops, so building cannot fail.

use crate::config::{Config, ModelConfig, Provider, ProviderKind};

/// The model `[agent] provider = "anthropic"` asks for when `[agent] model` is unset.
pub const DEFAULT_ANTHROPIC_MODEL: &str = "claude-sonnet-4-5";

/// One upstream to try: which provider, which of its models, and the request defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The alias this hop comes from (the one asked for, or a fallback).
    pub alias: String,
    /// The `[providers.NAME]` serving it (for the shorthand: `anthropic` or `openai`).
    pub provider: String,
    /// The API that provider speaks.
    pub kind: ProviderKind,
    /// The model id sent upstream.
    pub model: String,
    /// Largest reply, in tokens, for requests that give none.
    pub max_tokens: u32,
    /// System prompt for requests that give none.
    pub system: Option<String>,
}

/// A model alias and what serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The name clients ask for.
    pub alias: String,
    /// The upstreams to try, in order: the alias's own first, then each fallback's chain
    /// (depth first, each alias once).
    pub chain: Vec<Target>,
}

impl Route {
    /// Returns the provider serving the alias itself (`/v1/models`' `owned_by`).
    pub fn provider(&self) -> &str {
        self.chain
            .first()
            .map_or("", |target| target.provider.as_str())
    }
}

/// Every model alias, sorted by name, and the default one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routes {
    routes: Vec<Route>,
    default_model: Option<String>,
}

impl Routes {
    /// Builds the table from a validated configuration; empty when there is no model
    /// provider (`[agent] provider = "none"` or `"echo"` and no `[providers]`).
    pub fn new(config: &Config) -> Routes {
        if config.providers.is_empty() {
            return Routes::from_shorthand(config);
        }
        let target = |alias: &str, model: &ModelConfig| {
            let provider = model.provider.get_ref();
            let kind = config
                .providers
                .get(provider.as_str())
                .map_or(ProviderKind::OpenAi, |p| p.kind);
            Target {
                alias: alias.to_owned(),
                provider: provider.clone(),
                kind,
                model: model.model.clone().unwrap_or_else(|| alias.to_owned()),
                max_tokens: model.max_tokens.unwrap_or(config.agent.max_tokens),
                system: model.system.clone(),
            }
        };
        let routes = config
            .models
            .keys()
            .map(|alias| Route {
                alias: alias.get_ref().clone(),
                chain: config
                    .fallback_order(alias.get_ref())
                    .into_iter()
                    .filter_map(|hop| config.models.get(hop).map(|model| target(hop, model)))
                    .collect(),
            })
            .collect::<Vec<_>>();
        let default_model = match &config.gateway.default_model {
            Some(name) => Some(name.get_ref().clone()),
            None if routes.len() == 1 => routes.first().map(|route| route.alias.clone()),
            None => None,
        };
        Routes {
            routes,
            default_model,
        }
    }

    /// The `[agent]` shorthand: one provider named after its kind, one alias named after the
    /// upstream model id.
    fn from_shorthand(config: &Config) -> Routes {
        let agent = &config.agent;
        let kind = match agent.provider {
            Provider::Anthropic => ProviderKind::Anthropic,
            Provider::OpenAi => ProviderKind::OpenAi,
            Provider::None | Provider::Echo => return Routes::default(),
        };
        let model = agent
            .model
            .clone()
            .unwrap_or_else(|| DEFAULT_ANTHROPIC_MODEL.to_owned());
        let route = Route {
            alias: model.clone(),
            chain: vec![Target {
                alias: model.clone(),
                provider: kind.as_str().to_owned(),
                kind,
                model: model.clone(),
                max_tokens: agent.max_tokens,
                system: agent.system.clone(),
            }],
        };
        Routes {
            routes: vec![route],
            default_model: Some(model),
        }
    }

    /// Returns the route of `alias`, if it is one.
    pub fn get(&self, alias: &str) -> Option<&Route> {
        self.routes
            .binary_search_by(|route| route.alias.as_str().cmp(alias))
            .ok()
            .and_then(|index| self.routes.get(index))
    }

    /// Returns the alias answering requests that name none, if there is one.
    pub fn default_model(&self) -> Option<&str> {
        self.default_model.as_deref()
    }

    /// Returns the route of `requested`, or of the default model when `None`.
    pub fn resolve(&self, requested: Option<&str>) -> Option<&Route> {
        self.get(requested.or(self.default_model())?)
    }

    /// Returns every route, sorted by alias.
    pub fn iter(&self) -> impl Iterator<Item = &Route> {
        self.routes.iter()
    }

    /// Returns whether there is no model at all.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

#[cfg(test)]
mod tests;
