//! The exchange behind `POST /v1/chat/completions`: stateless (the client sends the whole
//! conversation, no session is opened), but held to the same budget, deadline, panic
//! containment and usage ceiling as a session message, and answered by the model alias's
//! chain of providers with fallback (`provider::Upstreams`).

use std::time::{Duration, Instant};

use super::{
    MessageError,
    usage::{Prompt, Unfinished, UsageCeiling, charge},
};
use crate::{
    agent::{AgentError, DeltaSender},
    context::Context,
    openai_api::ChatRequest,
    provider::{Ask, Messages, Sampling, Served},
    routes::Route,
};

/// A served answer, and how long of the exchange was spent waiting for upstreams.
#[derive(Debug)]
pub struct ChatAnswer {
    pub(crate) served: Served,
    /// Time inside the providers' calls; the rest of the exchange is blufio's own.
    pub waited: Duration,
}

/// Answers `request` from `route` (streamed through `deltas` when given).
///
/// Dropping the future cancels the upstream call; what a stream produced is still charged.
///
/// # Errors
///
/// Returns [`MessageError::BudgetExhausted`] when today's budget is spent, or the last
/// provider's error.
pub async fn complete(
    ctx: &Context,
    route: &Route,
    request: &ChatRequest,
    deltas: Option<&DeltaSender>,
) -> Result<ChatAnswer, MessageError> {
    let deadline = match super::admit(ctx) {
        Ok(deadline) => deadline,
        Err(error) => {
            ctx.metrics.count_error(error.kind());
            return Err(error);
        }
    };
    let first = route.chain.first();
    let prompt = Prompt::of_texts(
        first
            .and_then(|target| target.system.as_deref())
            .into_iter()
            .chain(
                request
                    .messages
                    .iter()
                    .flat_map(|message| message.parts.iter().map(String::as_str)),
            ),
    );
    let mut unfinished = deltas.map(|deltas| {
        let unfinished = Unfinished::new(ctx, deltas, prompt);
        match first {
            Some(target) => unfinished.with_model(&target.model),
            None => unfinished,
        }
    });
    let ask = Ask {
        messages: Messages::Chat(&request.messages),
        max_tokens: request.max_tokens,
        // The client's own system messages travel in `messages`.
        system: None,
        sampling: Sampling {
            temperature: request.temperature,
            top_p: request.top_p,
            stop: &request.stop,
            user: request.user.as_deref(),
        },
    };
    let started = Instant::now();
    let result = super::contained(
        ctx,
        ctx.upstreams.call(route, &ask, deltas, deadline),
        deadline,
    )
    .await;
    let waited = started.elapsed();
    ctx.metrics.response_latency.record(waited.as_secs_f64());
    if let Some(unfinished) = &mut unfinished {
        unfinished.finish(result.is_ok());
    }
    let mut served = match result {
        Ok(served) => served,
        Err(error) => {
            let error = MessageError::Agent(error);
            ctx.metrics.count_error(error.kind());
            if let MessageError::Agent(
                AgentError::Upstream(detail) | AgentError::Malformed(detail),
            ) = &error
            {
                log::warn!("model {:?}: the upstream failed: {detail}", route.alias);
            }
            return Err(error);
        }
    };
    let max_tokens = request
        .max_tokens
        .or_else(|| first.map(|target| target.max_tokens))
        .unwrap_or(ctx.config.agent.max_tokens);
    let ceiling = UsageCeiling::new(
        prompt,
        served.answer.content.len() as u64,
        u64::from(max_tokens),
    );
    served.answer.usage = charge(ctx, served.answer.usage, ceiling);
    Ok(ChatAnswer { served, waited })
}
