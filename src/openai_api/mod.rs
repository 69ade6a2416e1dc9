//! The OpenAI Chat Completions wire format, for `POST /v1/chat/completions` and
//! `GET /v1/models`: the request parser, the response and stream encoders and the error
//! shape. Pure data in and out, with no routing and no I/O, so the HTTP handler, the
//! translation to each upstream and the fuzz target share one definition of what blufio
//! accepts.

mod chat;
mod error;
mod message;
mod params;
mod request;
mod response;
mod state;
#[cfg(test)]
mod tests;

pub use self::{
    chat::{ChatMessage, ChatRole, MAX_CONTENT_PARTS, MAX_MESSAGES, MAX_METADATA, MAX_STOP},
    error::ApiError,
    request::{ChatRequest, parse_request},
    response::{
        ChunkEncoder, DONE, FinishReason, KEEP_ALIVE, ModelEntry, TokenUsage, completion,
        completion_id, model_object, models_list,
    },
};
