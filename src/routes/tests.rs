//! Unit tests of the routing table: chains, defaults, the `[agent]` shorthand.

use std::path::Path;

use super::*;
use crate::{
    config::{CLOUD_AND_LOCAL, Config, ProviderKind, Secret},
    error::Error,
};

fn parse(text: &str) -> Result<Config, Error> {
    Config::parse(text, Path::new("blufio.toml"))
}

fn env_with_key(name: &str) -> Option<String> {
    (name == "MY_KEY").then(|| "sk-test".to_owned())
}

/// Loads `text` from a file in a temporary directory, with `MY_KEY` set.
fn load(text: &str) -> Result<Config, Error> {
    let dir = blufio_testkit::temp::temp_dir("routes");
    let path = dir.path().join("blufio.toml");
    std::fs::write(&path, text).unwrap();
    Config::load_with_env(Some(&path), env_with_key)
}

#[test]
fn cloud_and_local_example_routes_sonnet_then_llama() {
    let config = load(CLOUD_AND_LOCAL).unwrap();
    assert_eq!(
        config.providers["claude"]
            .api_key
            .as_ref()
            .unwrap()
            .expose(),
        "sk-test"
    );
    assert!(config.providers["pi"].api_key.is_none());
    let routes = Routes::new(&config);
    assert_eq!(routes.default_model(), Some("sonnet"));
    let sonnet = routes.resolve(None).unwrap();
    assert_eq!(sonnet.alias, "sonnet");
    assert_eq!(sonnet.provider(), "claude");
    let hops: Vec<(&str, &str, &str)> = sonnet
        .chain
        .iter()
        .map(|t| (t.alias.as_str(), t.provider.as_str(), t.model.as_str()))
        .collect();
    assert_eq!(
        hops,
        [
            ("sonnet", "claude", "claude-sonnet-4-5"),
            ("llama", "pi", "llama3.2")
        ]
    );
    assert_eq!(sonnet.chain[0].kind, ProviderKind::Anthropic);
    assert_eq!(sonnet.chain[1].kind, ProviderKind::OpenAi);
    let listed: Vec<(&str, &str)> = routes
        .iter()
        .map(|r| (r.alias.as_str(), r.provider()))
        .collect();
    assert_eq!(listed, [("llama", "pi"), ("sonnet", "claude")]);
    assert!(routes.get("gpt-4o").is_none());
}

#[test]
fn model_id_defaults_to_the_alias_and_defaults_to_agent_max_tokens() {
    let config = parse(
        "[agent]\nmax_tokens = 77\n[providers.pi]\nkind = \"openai\"\n\
         [models.\"llama3.2\"]\nprovider = \"pi\"\n[models.big]\nprovider = \"pi\"\n\
         max_tokens = 4000\nsystem = \"be brief\"\n[gateway]\ndefault_model = \"big\"\n",
    )
    .unwrap();
    config.validate("f").unwrap();
    let routes = Routes::new(&config);
    let small = &routes.get("llama3.2").unwrap().chain[0];
    assert_eq!((small.model.as_str(), small.max_tokens), ("llama3.2", 77));
    let big = &routes.get("big").unwrap().chain[0];
    assert_eq!(
        (big.max_tokens, big.system.as_deref()),
        (4000, Some("be brief"))
    );
}

#[test]
fn the_only_model_is_the_default() {
    let config =
        parse("[providers.pi]\nkind = \"openai\"\n[models.llama]\nprovider = \"pi\"\n").unwrap();
    config.validate("f").unwrap();
    assert_eq!(Routes::new(&config).default_model(), Some("llama"));
}

#[test]
fn fallbacks_chain_depth_first_each_alias_once() {
    let config = parse(
        "[providers.pi]\nkind = \"openai\"\n[models.a]\nprovider = \"pi\"\nfallback = [\"b\", \"c\"]\n\
         [models.b]\nprovider = \"pi\"\nfallback = [\"c\"]\n[models.c]\nprovider = \"pi\"\n\
         [gateway]\ndefault_model = \"a\"\n",
    )
    .unwrap();
    let routes = Routes::new(&config);
    let order: Vec<&str> = routes
        .get("a")
        .unwrap()
        .chain
        .iter()
        .map(|t| t.alias.as_str())
        .collect();
    assert_eq!(order, ["a", "b", "c"]);
}

#[test]
fn agent_shorthand_is_one_provider_and_one_model() {
    let config =
        parse("[agent]\nprovider = \"openai\"\nmodel = \"llama3.2\"\nsystem = \"hi\"\n").unwrap();
    config.validate("f").unwrap();
    let routes = Routes::new(&config);
    assert_eq!(routes.default_model(), Some("llama3.2"));
    let route = routes.resolve(None).unwrap();
    assert_eq!(route.provider(), "openai");
    assert_eq!(route.chain.len(), 1);
    assert_eq!(route.chain[0].system.as_deref(), Some("hi"));
    assert_eq!(route.chain[0].kind, ProviderKind::OpenAi);
    let mut anthropic = parse("[agent]\nprovider = \"anthropic\"\n").unwrap();
    anthropic.agent.api_key = Some(Secret::new("k"));
    anthropic.validate("f").unwrap();
    let routes = Routes::new(&anthropic);
    assert_eq!(routes.resolve(None).unwrap().alias, "claude-sonnet-4-5");
    assert!(Routes::new(&Config::default()).is_empty());
}

#[test]
fn config_show_round_trips_providers_and_models() {
    let config = load(CLOUD_AND_LOCAL).unwrap();
    let text = config.to_toml();
    assert!(!text.contains("sk-test"), "{text}");
    let again = parse(&text).unwrap();
    assert_eq!(Routes::new(&again), Routes::new(&config));
    assert_eq!(
        again.providers["pi"].base_url,
        config.providers["pi"].base_url
    );
}
