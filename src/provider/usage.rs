//! Pricing a reply's tokens, and estimating the tokens an upstream did not report.

use super::chat::{Parsed, Request};
use crate::{agent::Usage, cost::CostConfig};

/// Prices the reported tokens, estimating from the text what the upstream left out; a reply
/// that names no model is priced as the requested one.
pub(crate) fn usage(cost: &CostConfig, request: &Request<'_>, reply: &Parsed) -> Usage {
    let model = reply
        .model
        .clone()
        .unwrap_or_else(|| request.model.to_owned());
    let estimated = reply.input_tokens.is_none() || reply.output_tokens.is_none();
    let input = reply
        .input_tokens
        .unwrap_or_else(|| estimate_prompt_tokens(request));
    let output = reply
        .output_tokens
        .unwrap_or_else(|| estimate_tokens(reply.content.chars().count() as u64));
    Usage {
        cost_usd: cost.cost_usd(&model, input, output),
        model,
        input_tokens: input,
        output_tokens: output,
        estimated,
    }
}

/// Estimates tokens from characters (about four per token in English text), for upstreams
/// that report no usage.
pub fn estimate_tokens(chars: u64) -> u64 {
    chars.div_ceil(4)
}

/// Estimates what the upstream was sent: the system prompt, the history and the message.
fn estimate_prompt_tokens(request: &Request<'_>) -> u64 {
    let system = request
        .system
        .filter(|_| !request.messages.has_system())
        .map_or(0, |system| system.chars().count());
    let chars = request.messages.chars() + system;
    estimate_tokens(chars as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_round_up_to_whole_tokens() {
        assert_eq!(estimate_tokens(0), 0);
        assert_eq!(estimate_tokens(1), 1);
        assert_eq!(estimate_tokens(8), 2);
    }
}
