//! What a provider agent remembers of its upstream for `/v1/health` (the last error and
//! success), and the refusal episodes it logs once with a hint for the operator.

use std::{sync::Mutex, time::SystemTime};

use super::wire::Wire;
use crate::agent::{AgentError, UpstreamStatus};

/// The upstream's state, shared by the calls of one agent.
#[derive(Debug, Default)]
pub(crate) struct Health(Mutex<State>);

#[derive(Debug, Default)]
struct State {
    last_error: Option<(String, SystemTime)>,
    last_success: Option<SystemTime>,
    /// The status of the refusal episode under way (logged once).
    refusing: Option<u16>,
}

impl Health {
    /// Logs the first refusal of an episode (until a call succeeds or the status changes)
    /// with what the operator should check; the next calls are refused the same way, so
    /// repeating it would only hide other lines.
    pub(crate) fn refused(&self, wire: Wire, model: &str, status: u16) {
        let first = {
            let mut state = crate::sync::lock(&self.0);
            let first = state.refusing != Some(status);
            state.refusing = Some(status);
            first
        };
        if first {
            log::warn!(
                "{} upstream refused the call for model {model:?} with HTTP {status}: {}; \
                 further refusals are not logged until a call succeeds",
                wire.as_str(),
                refusal_hint(wire, model, status)
            );
        }
    }

    /// Records the outcome of one call.
    pub(crate) fn record(&self, wire: Wire, model: &str, outcome: Result<(), &AgentError>) {
        let mut state = crate::sync::lock(&self.0);
        match outcome {
            Ok(()) => {
                state.last_success = Some(SystemTime::now());
                state.refusing = None;
            }
            Err(AgentError::Rejected { status }) => {
                let hint = refusal_hint(wire, model, *status);
                state.last_error = Some((format!("HTTP {status}: {hint}"), SystemTime::now()));
            }
            Err(error) => state.last_error = Some((error.to_string(), SystemTime::now())),
        }
    }

    /// Returns what `/v1/health` shows.
    pub(crate) fn status(&self, wire: Wire, model: &str, api_key_set: bool) -> UpstreamStatus {
        let state = crate::sync::lock(&self.0);
        UpstreamStatus {
            provider: wire.as_str(),
            model: model.to_owned(),
            api_key_set,
            last_error: state.last_error.as_ref().map(|(error, _)| error.clone()),
            last_error_at: state.last_error.as_ref().map(|(_, at)| *at),
            last_success_at: state.last_success,
        }
    }
}

/// Returns what an operator should check when the upstream refuses calls with `status`.
fn refusal_hint(wire: Wire, model: &str, status: u16) -> String {
    match (status, wire) {
        (401 | 403, _) => format!(
            "check the API key ({} or [agent] api_key_file): the provider did not accept it",
            wire.key_env()
        ),
        (404, Wire::OpenAi) => format!(
            "the provider does not know the model or the endpoint: on Ollama, run `ollama pull \
             {model}`; otherwise check [agent] model and base_url"
        ),
        (404, Wire::Anthropic) => "the provider does not know the model or the endpoint: \
                                   check [agent] model and base_url"
            .to_owned(),
        (400 | 413 | 422, _) => "the provider found the request invalid: check [agent] model \
                                 and max_tokens, or the conversation is too long for the model"
            .to_owned(),
        _ => "check the provider's status page and the [agent] settings".to_owned(),
    }
}
