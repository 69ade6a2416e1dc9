//! Errors in the OpenAI API's shape, `{"error": {"message", "type", "param", "code"}}`, with
//! the HTTP statuses the official SDKs turn into their exception classes (400
//! `BadRequestError`, 401 `AuthenticationError`, 404 `NotFoundError`, 429 `RateLimitError`,
//! 5xx `InternalServerError`), so a client's own error handling works against blufio.

use std::fmt;

use serde::Serialize;

/// One refusal of a `/v1/chat/completions` or `/v1/models` request, ready to be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: u16,
    /// What went wrong, for a person.
    pub message: String,
    /// OpenAI's error class (`invalid_request_error`, `insufficient_quota`, ...).
    pub kind: &'static str,
    /// The request parameter at fault (`model`, `messages.[2].content`), when there is one.
    pub param: Option<String>,
    /// A machine-readable code (`invalid_api_key`, `model_not_found`, ...), when there is one.
    pub code: Option<&'static str>,
}

/// What [`ApiError::to_json`] gives should serialising ever fail.
const FALLBACK_BODY: &str =
    r#"{"error":{"message":"internal error","type":"server_error","param":null,"code":null}}"#;

/// The body as serialised: the error object under one `error` key.
#[derive(Serialize)]
struct Body<'a> {
    error: Object<'a>,
}

#[derive(Serialize)]
struct Object<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    fn new(status: u16, kind: &'static str, code: Option<&'static str>, message: String) -> Self {
        Self {
            status,
            message,
            kind,
            param: None,
            code,
        }
    }

    /// Names the parameter at fault.
    #[must_use]
    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    /// 400: the request is malformed or breaks a rule; `param` names what is wrong.
    pub fn invalid_request(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(400, "invalid_request_error", None, message.into()).with_param(param)
    }

    /// 400: a value is of the right type but out of range or otherwise not allowed.
    pub fn invalid_value(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(
            400,
            "invalid_request_error",
            Some("invalid_value"),
            message.into(),
        )
        .with_param(param)
    }

    /// 400: a field this API does not have (OpenAI's own server refuses them too).
    pub fn unknown_parameter(param: &str) -> Self {
        // An empty key (`{"": 1}`, found by fuzzing) would leave the message naming nothing.
        let message = match param.strip_suffix('.') {
            _ if param.is_empty() => {
                "Unrecognized request argument supplied: an empty key".to_owned()
            }
            Some(parent) => {
                format!("Unrecognized request argument supplied: an empty key in `{parent}`")
            }
            None => format!("Unrecognized request argument supplied: {param}"),
        };
        Self::new(
            400,
            "invalid_request_error",
            Some("unknown_parameter"),
            message,
        )
        .with_param(param)
    }

    /// 400: a parameter OpenAI has but blufio cannot honour; refused rather than ignored, so
    /// a client never gets an answer that silently differs from what it asked for.
    pub fn unsupported(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(
            400,
            "invalid_request_error",
            Some("unsupported_parameter"),
            message.into(),
        )
        .with_param(param)
    }

    /// 401: no token, or not the configured one.
    pub fn invalid_api_key() -> Self {
        Self::new(
            401,
            "invalid_request_error",
            Some("invalid_api_key"),
            "Incorrect API key provided.".to_owned(),
        )
    }

    /// 404: the request names a model alias that is not configured.
    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            404,
            "invalid_request_error",
            Some("model_not_found"),
            format!("The model `{model}` does not exist."),
        )
        .with_param("model")
    }

    /// 429: too many requests (the client's throttle or an upstream's 429 after fallback).
    pub fn rate_limited(message: impl Into<String>) -> Self {
        Self::new(429, "requests", Some("rate_limit_exceeded"), message.into())
    }

    /// 429: today's budget is spent. The SDKs read `insufficient_quota` as "do not retry".
    pub fn insufficient_quota(message: impl Into<String>) -> Self {
        Self::new(
            429,
            "insufficient_quota",
            Some("insufficient_quota"),
            message.into(),
        )
    }

    /// 503: blufio is above its memory limit or shutting down; the SDKs retry 503.
    pub fn overloaded(message: impl Into<String>) -> Self {
        Self::new(503, "server_error", Some("overloaded"), message.into())
    }

    /// 502: every upstream tried failed or answered something unusable.
    pub fn upstream_failed(message: impl Into<String>) -> Self {
        Self::new(502, "server_error", Some("upstream_error"), message.into())
    }

    /// 504: the upstream did not answer within the request's deadline.
    pub fn upstream_timeout(message: impl Into<String>) -> Self {
        Self::new(
            504,
            "server_error",
            Some("upstream_timeout"),
            message.into(),
        )
    }

    /// The JSON body.
    pub fn to_json(&self) -> String {
        let body = Body {
            error: Object {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code,
            },
        };
        // Serialising borrowed strings and options into a `String` cannot fail; the fallback
        // keeps the request path free of panics all the same.
        serde_json::to_string(&body).unwrap_or_else(|_| FALLBACK_BODY.to_owned())
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.param {
            Some(param) => write!(f, "{} ({param}): {}", self.status, self.message),
            None => write!(f, "{}: {}", self.status, self.message),
        }
    }
}

impl std::error::Error for ApiError {}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::ApiError;

    fn body(error: &ApiError) -> Value {
        serde_json::from_str(&error.to_json()).unwrap()
    }

    #[test]
    fn every_error_class_has_the_status_type_and_code_the_sdks_expect() {
        let cases = [
            (
                ApiError::invalid_api_key(),
                401,
                "invalid_request_error",
                Some("invalid_api_key"),
            ),
            (
                ApiError::model_not_found("gpt-9"),
                404,
                "invalid_request_error",
                Some("model_not_found"),
            ),
            (
                ApiError::invalid_request("messages", "empty"),
                400,
                "invalid_request_error",
                None,
            ),
            (
                ApiError::invalid_value("n", "zero"),
                400,
                "invalid_request_error",
                Some("invalid_value"),
            ),
            (
                ApiError::unknown_parameter("foo"),
                400,
                "invalid_request_error",
                Some("unknown_parameter"),
            ),
            (
                ApiError::unsupported("tools", "no"),
                400,
                "invalid_request_error",
                Some("unsupported_parameter"),
            ),
            (
                ApiError::rate_limited("slow down"),
                429,
                "requests",
                Some("rate_limit_exceeded"),
            ),
            (
                ApiError::insufficient_quota("spent"),
                429,
                "insufficient_quota",
                Some("insufficient_quota"),
            ),
            (
                ApiError::overloaded("busy"),
                503,
                "server_error",
                Some("overloaded"),
            ),
            (
                ApiError::upstream_failed("down"),
                502,
                "server_error",
                Some("upstream_error"),
            ),
            (
                ApiError::upstream_timeout("late"),
                504,
                "server_error",
                Some("upstream_timeout"),
            ),
        ];
        for (error, status, kind, code) in cases {
            assert_eq!(error.status, status, "{error}");
            let body = body(&error);
            assert_eq!(body["error"]["type"], kind, "{error}");
            assert_eq!(body["error"]["code"], json!(code), "{error}");
            assert_eq!(body["error"]["message"], error.message.as_str());
        }
    }

    #[test]
    fn the_body_is_one_error_object_with_all_four_keys_even_when_null() {
        assert_eq!(
            body(&ApiError::upstream_failed("down")),
            json!({"error": {
                "message": "down", "type": "server_error", "param": null, "code": "upstream_error"
            }})
        );
    }

    #[test]
    fn model_not_found_names_the_model_and_the_param() {
        let body = body(&ApiError::model_not_found("gpt-9"));
        assert_eq!(body["error"]["param"], "model");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("`gpt-9`")
        );
    }

    #[test]
    fn an_unknown_empty_key_is_called_an_empty_key_not_left_blank() {
        let top = ApiError::unknown_parameter("");
        assert_eq!(
            top.message,
            "Unrecognized request argument supplied: an empty key"
        );
        assert_eq!(top.param.as_deref(), Some(""));
        let nested = ApiError::unknown_parameter("messages.[0].");
        assert_eq!(
            nested.message,
            "Unrecognized request argument supplied: an empty key in `messages.[0]`"
        );
        assert_eq!(
            ApiError::unknown_parameter("temprature").message,
            "Unrecognized request argument supplied: temprature"
        );
    }

    #[test]
    fn messages_are_escaped_as_json_strings() {
        let error = ApiError::invalid_request("model", "a \"quoted\"\nline");
        assert_eq!(body(&error)["error"]["message"], "a \"quoted\"\nline");
    }
}
