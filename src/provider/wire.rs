//! Which wire protocol a [`ProviderAgent`](super::ProviderAgent) speaks, and the one place
//! that sends each step (request, key, reply, stream event) to that protocol's file.

use trillium_client::Conn;

use super::{
    anthropic,
    chat::{Parsed, Request, StreamItem},
    openai,
    sse::SseEvent,
};
use crate::config::{ANTHROPIC_KEY_ENV, OPENAI_KEY_ENV, Provider, Secret};

/// The protocol of a model provider: only these two make a `ProviderAgent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wire {
    /// The Anthropic Messages API (`anthropic.rs`).
    Anthropic,
    /// The OpenAI Chat Completions API (`openai.rs`).
    OpenAi,
}

impl Wire {
    /// Returns the wire `provider` speaks, or `None` for the providers without one.
    pub(crate) fn of(provider: Provider) -> Option<Wire> {
        match provider {
            Provider::Anthropic => Some(Wire::Anthropic),
            Provider::OpenAi => Some(Wire::OpenAi),
            Provider::None | Provider::Echo => None,
        }
    }

    /// Returns the provider's name in the configuration (and in logs and `/v1/health`).
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Wire::Anthropic => Provider::Anthropic.as_str(),
            Wire::OpenAi => Provider::OpenAi.as_str(),
        }
    }

    /// Returns the environment variable the API key may come from.
    pub(crate) fn key_env(self) -> &'static str {
        match self {
            Wire::Anthropic => ANTHROPIC_KEY_ENV,
            Wire::OpenAi => OPENAI_KEY_ENV,
        }
    }

    /// Builds the JSON request body.
    ///
    /// # Errors
    ///
    /// Only if serde_json fails to write a string or a number, which it does not.
    pub(crate) fn request_body(self, request: &Request<'_>) -> Result<Vec<u8>, serde_json::Error> {
        match self {
            Wire::Anthropic => serde_json::to_vec(&anthropic::request_body(request)),
            Wire::OpenAi => openai::request_body(request),
        }
    }

    /// Adds the key (and any version) headers.
    pub(crate) fn authorize(self, conn: Conn, key: Option<&Secret>) -> Conn {
        match self {
            Wire::Anthropic => anthropic::authorize(conn, key),
            Wire::OpenAi => openai::authorize(conn, key),
        }
    }

    /// Reads a non-streamed reply.
    pub(crate) fn parse_reply(self, body: &str) -> Result<Parsed, String> {
        match self {
            Wire::Anthropic => anthropic::parse_reply(body),
            Wire::OpenAi => openai::parse_reply(body),
        }
    }

    /// Reads one streamed event.
    pub(crate) fn parse_event(self, event: &SseEvent) -> Result<Vec<StreamItem>, String> {
        match self {
            Wire::Anthropic => anthropic::parse_event(event),
            Wire::OpenAi => openai::parse_event(event),
        }
    }
}
