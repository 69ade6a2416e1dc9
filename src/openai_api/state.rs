//! What the request visitors share: the record of where a parse failed and why, which
//! serde's error cannot carry, and the key helpers every object in the request uses.

use std::{borrow::Cow, cell::RefCell};

use serde::de::{self, MapAccess};

use super::error::ApiError;

/// What the visitors learn about a failure that serde's error cannot carry: the parameter at
/// fault and, for a rule rather than a syntax or type error, the whole refusal. The innermost
/// visitor records first and outer ones keep it.
#[derive(Default)]
pub(super) struct State {
    param: RefCell<Option<String>>,
    refusal: RefCell<Option<ApiError>>,
}

impl State {
    /// Records a refusal and returns the serde error that unwinds the parse.
    pub(super) fn refuse<E: de::Error>(&self, refusal: ApiError) -> E {
        let message = refusal.message.clone();
        let mut slot = self.refusal.borrow_mut();
        if slot.is_none() {
            *slot = Some(refusal);
        }
        E::custom(message)
    }

    /// Notes `param` as the place of a failure, unless a deeper one was noted already.
    pub(super) fn at<T, E>(
        &self,
        param: impl FnOnce() -> String,
        result: Result<T, E>,
    ) -> Result<T, E> {
        if result.is_err() {
            let mut slot = self.param.borrow_mut();
            if slot.is_none() {
                *slot = Some(param());
            }
        }
        result
    }

    pub(super) fn into_error(self, error: &serde_json::Error) -> ApiError {
        if let Some(refusal) = self.refusal.into_inner() {
            return refusal;
        }
        // A type error is about the value; a syntax error is about the body, but where it
        // happened still helps.
        let (param, message) = match (error.is_data(), self.param.into_inner()) {
            (true, Some(param)) => {
                let message = format!("invalid `{param}`: {error}");
                (param, message)
            }
            (false, Some(param)) => {
                let message = format!("the body is not valid JSON (in `{param}`): {error}");
                (param, message)
            }
            (true, None) => ("body".to_owned(), format!("invalid body: {error}")),
            (false, None) => (
                "body".to_owned(),
                format!("the body is not valid JSON: {error}"),
            ),
        };
        ApiError::invalid_request(param, message)
    }
}

/// Reads a map key as text without copying it when the input allows.
pub(super) fn next_key<'de, A: MapAccess<'de>>(
    map: &mut A,
) -> Result<Option<Cow<'de, str>>, A::Error> {
    map.next_key::<Cow<'de, str>>()
}

/// Refuses a key seen twice: serde_json would otherwise keep the last, and a proxy in front
/// might have read the first.
pub(super) fn once<E: de::Error>(
    state: &State,
    seen: &mut Vec<&'static str>,
    name: &'static str,
    param: impl FnOnce() -> String,
) -> Result<(), E> {
    if seen.contains(&name) {
        let param = param();
        return Err(state.refuse(ApiError::invalid_request(
            param.clone(),
            format!("`{param}` is given twice"),
        )));
    }
    seen.push(name);
    Ok(())
}
