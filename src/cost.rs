//! `[cost]`: what tokens cost, per model, and the daily budget's size.
//!
//! Prices are US dollars per million tokens. An operator's `[cost.models."<model>"]` entry
//! wins; otherwise a built-in table covers current Anthropic models, matched by the longest
//! prefix so dated model IDs (`claude-sonnet-4-5-20250929`) find their family. Unknown and
//! local models cost 0. The spend itself lives in `budget/`, not here.

use std::collections::BTreeMap;

use serde::Deserialize;

/// `[cost]` settings.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CostConfig {
    /// Money the agent may spend per UTC day, in US dollars; 0 means no limit.
    pub daily_budget_usd: f64,
    /// Prices per model, overriding the built-in table.
    pub models: BTreeMap<String, ModelPrice>,
}

impl Default for CostConfig {
    fn default() -> CostConfig {
        CostConfig {
            daily_budget_usd: 10.0,
            models: BTreeMap::new(),
        }
    }
}

/// `[cost.models."<model>"]`: one model's prices.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    /// US dollars per million input (prompt) tokens.
    pub input_usd_per_mtok: f64,
    /// US dollars per million output (completion) tokens.
    pub output_usd_per_mtok: f64,
}

/// Built-in prices (USD per million tokens, input then output) of Anthropic models, as
/// published by Anthropic when this table was written. Operators should check them against
/// the current price list and override them in `[cost.models]` when they differ.
pub const BUILT_IN_PRICES: &[(&str, f64, f64)] = &[
    ("claude-opus-4-5", 5.0, 25.0),
    ("claude-opus-4-1", 15.0, 75.0),
    ("claude-opus-4", 15.0, 75.0),
    ("claude-sonnet-4-5", 3.0, 15.0),
    ("claude-sonnet-4", 3.0, 15.0),
    ("claude-haiku-4-5", 1.0, 5.0),
    ("claude-3-5-haiku", 0.8, 4.0),
];

impl CostConfig {
    /// Returns the price of `model`: the operator's entry, else the longest built-in prefix,
    /// else zero.
    pub fn price(&self, model: &str) -> ModelPrice {
        if let Some(price) = self.models.get(model) {
            return *price;
        }
        BUILT_IN_PRICES
            .iter()
            .filter(|(prefix, _, _)| model.starts_with(prefix))
            .max_by_key(|(prefix, _, _)| prefix.len())
            .map_or(
                ModelPrice {
                    input_usd_per_mtok: 0.0,
                    output_usd_per_mtok: 0.0,
                },
                |(_, input, output)| ModelPrice {
                    input_usd_per_mtok: *input,
                    output_usd_per_mtok: *output,
                },
            )
    }

    /// Returns what `input_tokens` and `output_tokens` of `model` cost, in US dollars.
    pub fn cost_usd(&self, model: &str, input_tokens: u64, output_tokens: u64) -> f64 {
        let price = self.price(model);
        (input_tokens as f64 * price.input_usd_per_mtok
            + output_tokens as f64 * price.output_usd_per_mtok)
            / 1_000_000.0
    }

    /// Checks the values; the error names the key.
    pub(crate) fn validate(&self) -> Result<(), (String, String)> {
        let usable = |value: f64| value.is_finite() && value >= 0.0;
        if !usable(self.daily_budget_usd) {
            return Err((
                "[cost] daily_budget_usd".to_owned(),
                "must be a number >= 0 (0 means no limit)".to_owned(),
            ));
        }
        for (model, price) in &self.models {
            if !usable(price.input_usd_per_mtok) || !usable(price.output_usd_per_mtok) {
                return Err((
                    format!("[cost.models.\"{model}\"]"),
                    "prices must be numbers >= 0".to_owned(),
                ));
            }
        }
        Ok(())
    }
}

/// Rounds US dollars to whole micro-dollars for display: sums of prices carry binary
/// noise (`0.0005939999999999999`) that a JSON reader should not see. Spend is still kept
/// and charged unrounded.
pub fn micro_usd(usd: f64) -> f64 {
    if !usd.is_finite() {
        return 0.0;
    }
    (usd * 1_000_000.0).round() / 1_000_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dated_model_ids_find_their_family_by_longest_prefix() {
        let config = CostConfig::default();
        assert_eq!(
            config.price("claude-opus-4-5-20251101").input_usd_per_mtok,
            5.0
        );
        assert_eq!(
            config.price("claude-opus-4-20250514").output_usd_per_mtok,
            75.0
        );
        assert_eq!(
            config
                .price("claude-sonnet-4-5-20250929")
                .output_usd_per_mtok,
            15.0
        );
    }

    #[test]
    fn unknown_models_are_free_and_operator_prices_win() {
        let mut config = CostConfig::default();
        assert_eq!(config.cost_usd("llama3.2", 1_000_000, 1_000_000), 0.0);
        config.models.insert(
            "llama3.2".to_owned(),
            ModelPrice {
                input_usd_per_mtok: 1.0,
                output_usd_per_mtok: 2.0,
            },
        );
        assert_eq!(config.cost_usd("llama3.2", 500_000, 250_000), 1.0);
        assert!((config.cost_usd("claude-haiku-4-5", 1000, 1000) - 0.006).abs() < 1e-12);
    }

    #[test]
    fn negative_prices_and_budgets_are_refused() {
        let mut config = CostConfig {
            daily_budget_usd: -1.0,
            ..CostConfig::default()
        };
        assert!(
            config
                .validate()
                .unwrap_err()
                .0
                .contains("daily_budget_usd")
        );
        config.daily_budget_usd = 1.0;
        config.models.insert(
            "m".to_owned(),
            ModelPrice {
                input_usd_per_mtok: f64::NAN,
                output_usd_per_mtok: 0.0,
            },
        );
        assert!(config.validate().unwrap_err().0.contains("\"m\""));
    }
}
