//! `POST /v1/chat/completions` and `GET /v1/models`: the OpenAI Chat Completions API over
//! the configured model aliases, so the official SDKs and every tool built on them talk to
//! blufio unchanged. Errors on these two routes are in OpenAI's shape (`openai_api::ApiError`);
//! blufio's own routes keep theirs.
//!
//! A completion is stateless (the client sends the whole conversation, no session is opened)
//! but goes through memory admission, the body limit `[gateway] max_request_bytes`, the
//! daily budget and the request deadline like a session message. Its `model` is the alias
//! the client asked for even when a fallback answered; the `x-blufio-model` header names the
//! alias that did. A stream is committed at its first event (a delta, or the keep-alive
//! comment sent while the upstream is silent); a failure before that keeps its status, one
//! after it arrives as a `data: {"error": ...}` event, which the SDKs raise.

use std::{
    sync::Arc,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use trillium::{Conn, Handler, KnownHeaderName, Status};
use trillium_router::RouterConnExt;

use crate::{
    agent::AgentError,
    context::Context,
    gateway::{
        MessageError,
        chat::{self, ChatAnswer},
    },
    http::{
        body::{self, BodyFailure, Limit},
        response,
        stream::{ReplyStream, SseBody, StreamEvent, event_stream},
    },
    metrics::ErrorKind,
    openai_api::{
        ApiError, ChatRequest, ChatRole, ChunkEncoder, KEEP_ALIVE, ModelEntry, TokenUsage,
        completion, completion_id, model_object, models_list, parse_request,
    },
    routes::Route,
};

/// The header naming the alias whose provider answered (the asked-for one, or a fallback).
pub const SERVED_BY: &str = "x-blufio-model";

/// Serves `GET /v1/models`: every alias, `owned_by` its provider.
#[derive(Debug, Clone)]
pub struct ModelsHandler {
    ctx: Arc<Context>,
}

impl ModelsHandler {
    /// Creates the handler.
    pub fn new(ctx: Arc<Context>) -> ModelsHandler {
        ModelsHandler { ctx }
    }
}

impl Handler for ModelsHandler {
    async fn run(&self, conn: Conn) -> Conn {
        let created = self.ctx.started_at_unix() as u64;
        let routes = self.ctx.upstreams.routes();
        let entry = |route| model_entry(route, created);
        // `/v1/models/{id}` (the SDKs' `models.retrieve`): one model, or OpenAI's 404.
        if let Some(id) = conn.param("id") {
            let body = routes.get(id).map(|route| model_object(entry(route)));
            return match body {
                Some(body) => json(conn, Status::Ok, body),
                None => {
                    let error = ApiError::model_not_found(id);
                    response::api_error(&self.ctx, conn, &error, Some(ErrorKind::NotFound))
                }
            };
        }
        json(conn, Status::Ok, models_list(routes.iter().map(entry)))
    }
}

/// The `/v1/models` entry of `route`.
fn model_entry(route: &Route, created: u64) -> ModelEntry<'_> {
    ModelEntry {
        id: &route.alias,
        created,
        owned_by: route.provider(),
    }
}

/// Serves `POST /v1/chat/completions`.
#[derive(Debug, Clone)]
pub struct ChatCompletionsHandler {
    ctx: Arc<Context>,
}

impl ChatCompletionsHandler {
    /// Creates the handler.
    pub fn new(ctx: Arc<Context>) -> ChatCompletionsHandler {
        ChatCompletionsHandler { ctx }
    }
}

impl Handler for ChatCompletionsHandler {
    async fn run(&self, mut conn: Conn) -> Conn {
        let ctx = &self.ctx;
        if ctx.memory.rejecting() {
            let error = ApiError::overloaded(
                "the server is above its memory limit; retry in a few seconds",
            );
            return response::api_error(ctx, conn, &error, Some(ErrorKind::AdmissionRejected));
        }
        let limit = Limit {
            bytes: ctx.config.gateway.max_request_bytes,
            key: "[gateway] max_request_bytes",
        };
        let body = match body::read(ctx, &mut conn, limit).await {
            Ok(body) => body,
            Err(failure) => return body_failure(ctx, conn, failure),
        };
        let started = Instant::now();
        let parsed = parse_request(&body);
        // The conversation is parsed into its own strings; the raw body goes at once.
        drop(body);
        let request = match parsed {
            Ok(request) => request,
            Err(error) => {
                return response::api_error(ctx, conn, &error, Some(ErrorKind::BadRequest));
            }
        };
        if request
            .messages
            .iter()
            .all(|message| matches!(message.role, ChatRole::System | ChatRole::Developer))
        {
            let error = ApiError::invalid_request(
                "messages",
                "messages must include at least one user or assistant message",
            );
            return response::api_error(ctx, conn, &error, Some(ErrorKind::BadRequest));
        }
        let Some(route) = ctx.upstreams.routes().get(&request.model) else {
            let error = ApiError::model_not_found(&request.model);
            return response::api_error(ctx, conn, &error, Some(ErrorKind::NotFound));
        };
        let id = completion_id(random_bits());
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_secs());
        if request.stream {
            return stream(ctx, conn, request, id, created).await;
        }
        match chat::complete(ctx, route, &request, None).await {
            Ok(answer) => {
                let served = &answer.served;
                let body = completion(
                    &id,
                    created,
                    &request.model,
                    &served.answer.content,
                    served.answer.finish,
                    token_usage(&answer),
                );
                let conn = json(conn, Status::Ok, body)
                    .with_response_header(SERVED_BY, served.alias.clone());
                ctx.metrics.gateway_overhead.record(
                    started
                        .elapsed()
                        .saturating_sub(answer.waited)
                        .as_secs_f64(),
                );
                conn
            }
            Err(error) => exchange_error(ctx, conn, &error),
        }
    }
}

/// Answers a streamed completion: waits for the first event, then either answers an error
/// with its status (nothing was sent yet) or starts the event stream.
async fn stream(
    ctx: &Arc<Context>,
    conn: Conn,
    request: ChatRequest,
    id: String,
    created: u64,
) -> Conn {
    let encoder = ChunkEncoder::new(id, created, request.model.clone(), request.include_usage);
    let exchange_ctx = Arc::clone(ctx);
    let mut stream = ReplyStream::of(&ctx.closing, move |sender| async move {
        let ctx = exchange_ctx;
        match ctx.upstreams.routes().get(&request.model) {
            Some(route) => chat::complete(&ctx, route, &request, Some(&sender)).await,
            None => Err(MessageError::Agent(AgentError::UnknownModel(
                request.model.clone(),
            ))),
        }
    });
    let first = match stream.next().await {
        Some(StreamEvent::Finished(Err(error))) => return exchange_error(ctx, conn, &error),
        Some(StreamEvent::ShuttingDown) => {
            let error = ApiError::overloaded("the server is shutting down; retry");
            return response::api_error(
                ctx,
                conn.with_response_header(KnownHeaderName::Connection, "close"),
                &error,
                None,
            );
        }
        Some(event) => event,
        None => return conn.with_status(Status::InternalServerError).halt(),
    };
    let mut bytes = encoder.start().into_bytes();
    bytes.extend(frame(&encoder, &first));
    let served_by = match &first {
        StreamEvent::Finished(Ok(answer)) => Some(answer.served.alias.clone()),
        _ => None,
    };
    let body = SseBody::new(stream, bytes, move |event| frame(&encoder, event));
    let conn = match served_by {
        Some(alias) => conn.with_response_header(SERVED_BY, alias),
        None => conn,
    };
    event_stream(conn, body)
}

/// Frames one event of a completion stream.
fn frame(encoder: &ChunkEncoder, event: &StreamEvent<Result<ChatAnswer, MessageError>>) -> Vec<u8> {
    let text = match event {
        StreamEvent::Delta(text) => encoder.delta(text),
        StreamEvent::Heartbeat => KEEP_ALIVE.to_owned(),
        StreamEvent::Finished(Ok(answer)) => {
            encoder.finish(answer.served.answer.finish, token_usage(answer))
        }
        StreamEvent::Finished(Err(error)) => error_event(&api_error(error)),
        StreamEvent::ShuttingDown => error_event(&ApiError::overloaded(
            "the server is shutting down; the answer was cut short",
        )),
    };
    text.into_bytes()
}

/// An error after the stream started, as OpenAI sends one: a `data:` event with the error
/// object (the SDKs raise it), and no `[DONE]`.
fn error_event(error: &ApiError) -> String {
    format!("data: {}\n\n", error.to_json())
}

/// The usage an answer reports.
fn token_usage(answer: &ChatAnswer) -> TokenUsage {
    let usage = &answer.served.answer.usage;
    TokenUsage {
        prompt_tokens: usage.input_tokens,
        completion_tokens: usage.output_tokens,
    }
}

/// Returns the OpenAI error for an exchange's failure.
fn api_error(error: &MessageError) -> ApiError {
    match error {
        MessageError::BudgetExhausted { .. } => ApiError::insufficient_quota(error.to_string()),
        MessageError::Agent(AgentError::RateLimited { .. }) => {
            ApiError::rate_limited("the model provider is rate limiting requests; retry later")
        }
        MessageError::Agent(AgentError::Timeout) => {
            ApiError::upstream_timeout("the model provider did not answer in time")
        }
        MessageError::Agent(AgentError::UnknownModel(model)) => ApiError::model_not_found(model),
        // Upstream details can carry provider internals: the log has them, clients do not.
        MessageError::NoAgent | MessageError::Agent(AgentError::Upstream(_)) => {
            ApiError::upstream_failed("the model provider failed")
        }
        MessageError::Agent(AgentError::Malformed(_)) => {
            ApiError::upstream_failed("the model provider answered malformed data")
        }
        MessageError::Agent(error @ AgentError::Rejected { .. }) => {
            ApiError::upstream_failed(error.to_string())
        }
        // Completions are not stored; kept for the match to be whole.
        MessageError::Storage => ApiError::overloaded(error.to_string()),
    }
}

/// Answers an exchange's failure (already counted by the gateway), with `Retry-After` when
/// one is known.
fn exchange_error(ctx: &Context, mut conn: Conn, error: &MessageError) -> Conn {
    let retry_after = match error {
        MessageError::BudgetExhausted { retry_after } => Some(*retry_after),
        MessageError::Agent(AgentError::RateLimited { retry_after }) => *retry_after,
        _ => None,
    };
    if let Some(retry_after) = retry_after {
        conn.insert_response_header(
            KnownHeaderName::RetryAfter,
            retry_after.as_secs().max(1).to_string(),
        );
    }
    response::api_error(ctx, conn, &api_error(error), None)
}

/// Answers a body that could not be read, in OpenAI's shape.
fn body_failure(ctx: &Context, conn: Conn, failure: BodyFailure) -> Conn {
    let error = ApiError {
        status: failure.status as u16,
        message: failure.message,
        kind: "invalid_request_error",
        param: None,
        code: Some(failure.code),
    };
    let conn = conn.with_response_header(KnownHeaderName::Connection, "close");
    response::api_error(ctx, conn, &error, failure.kind)
}

fn json(conn: Conn, status: Status, body: String) -> Conn {
    conn.with_status(status)
        .with_response_header(KnownHeaderName::ContentType, "application/json")
        .with_response_header(KnownHeaderName::CacheControl, "no-store")
        .with_body(body)
        .halt()
}

/// Bits for a completion id: unique, not secret. std's `RandomState` draws its keys from the
/// OS once per thread and then steps them, so this costs no system call per request (a
/// `getrandom` per completion was one of the few a proxied request made).
fn random_bits() -> u128 {
    use std::hash::{BuildHasher, Hasher};
    let draw = || {
        let mut hasher = std::hash::RandomState::new().build_hasher();
        hasher.write_u128(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |elapsed| elapsed.as_nanos()),
        );
        hasher.finish()
    };
    (u128::from(draw()) << 64) | u128::from(draw())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completion_ids_do_not_repeat() {
        let ids: std::collections::HashSet<String> =
            (0..10_000).map(|_| completion_id(random_bits())).collect();
        assert_eq!(ids.len(), 10_000);
    }
}
