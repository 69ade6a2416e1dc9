//! What one exchange may be charged: the prompt measured, the [`UsageCeiling`] that holds an
//! upstream's reported usage to what was sent and received, the charge itself, and the
//! charge of a stream that did not finish ([`Unfinished`]).

use std::time::SystemTime;

use crate::{
    agent::{DeltaSender, StreamProgress, Turn, Usage},
    context::Context,
    cost::{CostConfig, micro_usd},
    metrics::{ErrorKind, TokenType},
};

/// What was sent to the agent for one exchange, measured for estimates and for the
/// [`UsageCeiling`]: the system prompt, the history and the new message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Prompt {
    chars: u64,
    bytes: u64,
    turns: u64,
}

impl Prompt {
    pub(super) fn measure(system: Option<&str>, history: &[Turn], content: &str) -> Prompt {
        let texts = system
            .into_iter()
            .chain(history.iter().map(|turn| turn.content.as_str()))
            .chain(std::iter::once(content));
        Prompt::of_texts(texts)
    }

    /// Measures `texts`, one turn each.
    pub(super) fn of_texts<'a>(texts: impl IntoIterator<Item = &'a str>) -> Prompt {
        let mut prompt = Prompt {
            chars: 0,
            bytes: 0,
            turns: 0,
        };
        for text in texts {
            prompt.chars += text.chars().count() as u64;
            prompt.bytes += text.len() as u64;
            prompt.turns += 1;
        }
        prompt
    }
}

/// Tokens a chat template adds around each message (role markers, separators), at most.
const TOKENS_PER_TURN: u64 = 16;
/// Tokens an upstream may add to any prompt (its own preamble), at most.
const TOKENS_PER_PROMPT: u64 = 512;

/// The most one exchange can plausibly use, so an upstream reporting absurd usage (by bug or
/// by malice) cannot charge the day's budget beyond what was actually sent and received.
///
/// Tokenizers in use are byte-level: a token covers at least one byte of text, so a text
/// never has more tokens than bytes. Input is bounded by the prompt's bytes plus template
/// overhead; output by the request's `max_tokens` (which the upstream must honour), or the
/// reply's bytes for an agent that ignores it, plus one turn's overhead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct UsageCeiling {
    input_tokens: u64,
    output_tokens: u64,
}

impl UsageCeiling {
    pub(super) fn new(prompt: Prompt, reply_bytes: u64, max_tokens: u64) -> UsageCeiling {
        UsageCeiling {
            input_tokens: prompt
                .bytes
                .saturating_add(prompt.turns.saturating_mul(TOKENS_PER_TURN))
                .saturating_add(TOKENS_PER_PROMPT),
            output_tokens: max_tokens.max(reply_bytes).saturating_add(TOKENS_PER_TURN),
        }
    }

    /// Returns `usage` with its tokens held to the ceiling and its cost priced again, or
    /// `None` when it is within the ceiling.
    fn clamp(&self, usage: &Usage, cost: &CostConfig) -> Option<Usage> {
        if usage.input_tokens <= self.input_tokens && usage.output_tokens <= self.output_tokens {
            return None;
        }
        let input_tokens = usage.input_tokens.min(self.input_tokens);
        let output_tokens = usage.output_tokens.min(self.output_tokens);
        let price = cost.price(&usage.model);
        let cost_usd = if price.input_usd_per_mtok > 0.0 || price.output_usd_per_mtok > 0.0 {
            cost.cost_usd(&usage.model, input_tokens, output_tokens)
        } else {
            // An agent that prices its own model: scale its figure with the tokens.
            let reported = usage.input_tokens.saturating_add(usage.output_tokens);
            let kept = input_tokens.saturating_add(output_tokens);
            usage.cost_usd * (kept as f64 / reported.max(1) as f64)
        };
        Some(Usage {
            model: usage.model.clone(),
            input_tokens,
            output_tokens,
            cost_usd,
            estimated: usage.estimated,
        })
    }
}

/// Charges `usage`, held to `ceiling`, and returns what was charged. Usage beyond the
/// ceiling is counted as `agent_malformed` and logged, not charged.
pub(super) fn charge(ctx: &Context, usage: Usage, ceiling: UsageCeiling) -> Usage {
    let usage = match ceiling.clamp(&usage, &ctx.config.cost) {
        None => usage,
        Some(clamped) => {
            ctx.metrics.count_error(ErrorKind::AgentMalformed);
            log::warn!(
                "model {}: the upstream reported {} input and {} output tokens (${}), more than \
                 this exchange can use; charging {} and {} (${}) instead",
                usage.model,
                usage.input_tokens,
                usage.output_tokens,
                micro_usd(usage.cost_usd),
                clamped.input_tokens,
                clamped.output_tokens,
                micro_usd(clamped.cost_usd),
            );
            clamped
        }
    };
    account(ctx, &usage);
    usage
}

/// Counts tokens and charges the cost to today's budget.
fn account(ctx: &Context, usage: &Usage) {
    ctx.metrics
        .count_tokens(&usage.model, TokenType::Input, usage.input_tokens);
    ctx.metrics
        .count_tokens(&usage.model, TokenType::Output, usage.output_tokens);
    // The spend writer saves it off the executor and reports a failing disk itself.
    ctx.budget.spend(
        &usage.model,
        usage.cost_usd,
        ctx.live().daily_budget_usd,
        SystemTime::now(),
    );
}

/// Charges what a stream produced when it does not finish normally: the client went away
/// (the future is dropped) or the upstream failed after sending text.
pub(super) struct Unfinished<'a> {
    ctx: &'a Context,
    deltas: &'a DeltaSender,
    prompt: Prompt,
    /// The model charged when the stream never named one.
    model: Option<String>,
    armed: bool,
}

impl<'a> Unfinished<'a> {
    /// Arms the charge of a stream sending through `deltas` for `prompt`.
    pub(super) fn new(ctx: &'a Context, deltas: &'a DeltaSender, prompt: Prompt) -> Unfinished<'a> {
        Unfinished {
            ctx,
            deltas,
            prompt,
            model: None,
            armed: true,
        }
    }

    /// Charges an unnamed stream to `model` rather than the agent's first model.
    pub(super) fn with_model(mut self, model: &str) -> Unfinished<'a> {
        self.model = Some(model.to_owned());
        self
    }

    /// Records time to first token; charges the partial stream unless it `succeeded` (then
    /// the reply's usage is charged instead).
    pub(super) fn finish(&mut self, succeeded: bool) {
        if !self.armed {
            return;
        }
        self.armed = false;
        let progress = self.deltas.progress();
        if let Some(first) = progress.first_delta_after {
            self.ctx
                .metrics
                .time_to_first_token
                .record(first.as_secs_f64());
        }
        if succeeded {
            return;
        }
        let produced = progress.sent_chars > 0 || progress.output_tokens.is_some();
        if !produced {
            return;
        }
        let (input_tokens, output_tokens, estimated) = partial_tokens(&progress, self.prompt);
        let model = progress
            .model
            .or_else(|| self.model.take())
            .or_else(|| {
                self.ctx
                    .agent
                    .as_ref()
                    .and_then(|agent| agent.models().into_iter().next())
            })
            .unwrap_or_else(|| "unknown".to_owned());
        let usage = Usage {
            cost_usd: self
                .ctx
                .config
                .cost
                .cost_usd(&model, input_tokens, output_tokens),
            model,
            input_tokens,
            output_tokens,
            estimated,
        };
        // Text is at most four bytes a character.
        let ceiling = UsageCeiling::new(
            self.prompt,
            progress.sent_chars.saturating_mul(4),
            u64::from(self.ctx.config.agent.max_tokens),
        );
        let usage = charge(self.ctx, usage, ceiling);
        log::info!(
            "stream ended early; charged {} input and {} output tokens{}",
            usage.input_tokens,
            usage.output_tokens,
            if usage.estimated { " (estimated)" } else { "" }
        );
    }
}

/// Returns the input and output tokens to charge for a stream that did not finish, and
/// whether they are estimates.
///
/// Upstreams report output tokens at the start (Anthropic: 1) and at the end, so a cut
/// stream's report lags what it delivered: at least an estimate of the text sent is charged.
fn partial_tokens(progress: &StreamProgress, prompt: Prompt) -> (u64, u64, bool) {
    let input = progress.input_tokens;
    let delivered = crate::provider::estimate_tokens(progress.sent_chars);
    let output = progress
        .output_tokens
        .filter(|reported| *reported >= delivered);
    (
        input.unwrap_or_else(|| crate::provider::estimate_tokens(prompt.chars)),
        output.unwrap_or(delivered),
        input.is_none() || output.is_none(),
    )
}

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        self.finish(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(model: &str, input_tokens: u64, output_tokens: u64, cost_usd: f64) -> Usage {
        Usage {
            model: model.to_owned(),
            input_tokens,
            output_tokens,
            cost_usd,
            estimated: false,
        }
    }

    #[test]
    fn usage_beyond_what_was_sent_and_received_is_held_to_the_ceiling() {
        let prompt = Prompt {
            chars: 100,
            bytes: 120,
            turns: 3,
        };
        let ceiling = UsageCeiling::new(prompt, 200, 1024);
        assert_eq!(
            ceiling,
            UsageCeiling {
                input_tokens: 120 + 3 * 16 + 512,
                output_tokens: 1024 + 16,
            }
        );
        let cost = CostConfig::default();
        // Plausible usage passes untouched.
        assert_eq!(
            ceiling.clamp(&usage("claude-sonnet-4-5", 600, 1000, 0.0168), &cost),
            None
        );
        // 10^18 tokens of a priced model: held to the ceiling and priced again.
        let clamped = ceiling
            .clamp(
                &usage("claude-sonnet-4-5", 1e18 as u64, 1e18 as u64, 9e13),
                &cost,
            )
            .unwrap();
        assert_eq!((clamped.input_tokens, clamped.output_tokens), (680, 1040));
        assert!((clamped.cost_usd - (680.0 * 3.0 + 1040.0 * 15.0) / 1e6).abs() < 1e-12);
        // An agent pricing its own model: its figure shrinks with the tokens.
        let clamped = ceiling
            .clamp(&usage("own-model", 6800, 0, 10.0), &cost)
            .unwrap();
        assert_eq!(clamped.input_tokens, 680);
        assert!((clamped.cost_usd - 1.0).abs() < 1e-12);
        // A reply longer than max_tokens (an agent that ignores it) may cost its bytes.
        let long = UsageCeiling::new(prompt, 5000, 1024);
        assert_eq!(long.output_tokens, 5016);
    }

    #[test]
    fn a_cut_stream_is_charged_at_least_the_text_it_delivered() {
        let prompt = Prompt {
            chars: 400,
            bytes: 400,
            turns: 2,
        };
        // Anthropic says 1 output token at the start; 40 characters went out.
        let progress = StreamProgress {
            input_tokens: Some(50),
            output_tokens: Some(1),
            sent_chars: 40,
            ..StreamProgress::default()
        };
        assert_eq!(partial_tokens(&progress, prompt), (50, 10, true));
        // A report ahead of the text is kept as reported.
        let progress = StreamProgress {
            output_tokens: Some(30),
            ..progress
        };
        assert_eq!(partial_tokens(&progress, prompt), (50, 30, false));
        // Nothing reported: both estimated, the prompt (system prompt included) by its size.
        let progress = StreamProgress {
            sent_chars: 8,
            ..StreamProgress::default()
        };
        assert_eq!(partial_tokens(&progress, prompt), (100, 2, true));
    }
}
