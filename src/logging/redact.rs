//! Redaction: header credentials, `Bearer`/`bearer.` tokens and configured secrets replaced
//! by `<redacted>` in a log line's text.

use std::ops::Range;

/// What replaces a secret.
const REDACTED: &str = "<redacted>";

/// Header names whose values are secrets (matched case-insensitively, also as suffixes, so
/// `authorization` covers `proxy-authorization` and `api-key` covers `x-api-key`).
const SECRET_HEADERS: [&str; 5] = [
    "authorization",
    "api-key",
    "api_key",
    "auth-token",
    "cookie",
];

/// Prefixes after which the next word is a credential.
const SECRET_PREFIXES: [&str; 2] = ["bearer.", "bearer "];

/// Returns `text` with header credentials, `Bearer` and `bearer.` tokens and every string in
/// `secrets` replaced by `<redacted>`.
pub fn redact(text: &str, secrets: &[String]) -> String {
    let mut text = text.to_owned();
    for secret in secrets {
        if text.contains(secret.as_str()) {
            text = text.replace(secret.as_str(), REDACTED);
        }
    }
    for name in SECRET_HEADERS {
        text = redact_header_values(&text, name);
    }
    for prefix in SECRET_PREFIXES {
        text = redact_after(&text, prefix);
    }
    text
}

/// Finds `needle` (ASCII, lowercase) in `haystack` ignoring ASCII case, from `from`.
fn find_ignore_case(haystack: &str, needle: &str, from: usize) -> Option<usize> {
    let haystack = haystack.as_bytes();
    let needle = needle.as_bytes();
    (from..=haystack.len().checked_sub(needle.len())?).find(|&start| {
        haystack
            .get(start..start + needle.len())
            .is_some_and(|window| window.eq_ignore_ascii_case(needle))
    })
}

/// Replaces the value after `name` followed by `:` or `=` (optionally quoted): up to the
/// closing quote, or to the end of the line.
fn redact_header_values(text: &str, name: &str) -> String {
    let bytes = text.as_bytes();
    redact_spans(text, name, |mut index| {
        // `"authorization": "…"` (JSON or Debug) or `authorization: …` (a head).
        if matches!(bytes.get(index), Some(b'"' | b'\'')) {
            index += 1;
        }
        while bytes.get(index) == Some(&b' ') {
            index += 1;
        }
        if !matches!(bytes.get(index), Some(b':' | b'=')) {
            return None;
        }
        index += 1;
        while bytes.get(index) == Some(&b' ') {
            index += 1;
        }
        let quote = match bytes.get(index) {
            Some(&quote @ (b'"' | b'\'')) => {
                index += 1;
                Some(quote)
            }
            _ => None,
        };
        let value_end = bytes
            .iter()
            .skip(index)
            .position(|&byte| match quote {
                Some(quote) => byte == quote,
                None => byte == b'\r' || byte == b'\n',
            })
            .map_or(bytes.len(), |offset| index + offset);
        Some(index..value_end)
    })
}

/// Replaces the word after `prefix` (up to whitespace, a comma, a semicolon or a quote).
fn redact_after(text: &str, prefix: &str) -> String {
    let bytes = text.as_bytes();
    redact_spans(text, prefix, |index| {
        let end = bytes
            .iter()
            .skip(index)
            .position(|&byte| byte.is_ascii_whitespace() || b",;\"'".contains(&byte))
            .map_or(bytes.len(), |offset| index + offset);
        // Already redacted (a secret replaced earlier): leave it, and search on after it.
        if &text[index..end] == REDACTED {
            return Some(end..end);
        }
        Some(index..end)
    })
}

/// Replaces by `<redacted>` the span `value` finds after each occurrence of `needle`
/// (ignoring ASCII case). `value` gets the index just past the occurrence and returns the
/// span to replace (empty: nothing), or `None` when the occurrence is no credential.
fn redact_spans(text: &str, needle: &str, value: impl Fn(usize) -> Option<Range<usize>>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut search = 0;
    while let Some(start) = find_ignore_case(text, needle, search) {
        search = start + needle.len();
        let Some(span) = value(search) else {
            continue;
        };
        if !span.is_empty() {
            out.push_str(&text[copied..span.start]);
            out.push_str(REDACTED);
            copied = span.end;
        }
        search = span.end.max(search);
    }
    out.push_str(&text[copied..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "tok-0123456789abcdef";

    #[test]
    fn request_heads_lose_every_credential() {
        let head = format!(
            "received:\nGET /ws HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n\
             Host: localhost\r\nSec-WebSocket-Protocol: blufio.v1, bearer.{TOKEN}\r\n\
             x-api-key: sk-live-1234\r\nProxy-Authorization: Basic dXNlcjpwYXNz\r\n\
             cookie: session=abc\r\n"
        );
        let redacted = redact(&head, &[]);
        for secret in [TOKEN, "sk-live-1234", "dXNlcjpwYXNz", "session=abc"] {
            assert!(!redacted.contains(secret), "{secret} in {redacted}");
        }
        for kept in [
            "Authorization: <redacted>\r\n",
            "blufio.v1, bearer.<redacted>\r\n",
            "Host: localhost\r\n",
        ] {
            assert!(redacted.contains(kept), "{redacted}");
        }
        assert!(
            redacted.starts_with("received:\nGET /ws HTTP/1.1\r\n"),
            "{redacted}"
        );
    }

    #[test]
    fn debug_and_json_forms_and_configured_secrets_are_redacted() {
        let debug = format!(r#"Headers {{ "authorization": "Bearer {TOKEN}", "host": "x" }}"#);
        let redacted = redact(&debug, &[]);
        assert_eq!(
            redacted,
            r#"Headers { "authorization": "<redacted>", "host": "x" }"#
        );
        let bare = format!("invalid token {TOKEN} from 10.0.0.1");
        assert_eq!(
            redact(&bare, &[TOKEN.to_owned()]),
            "invalid token <redacted> from 10.0.0.1"
        );
        assert_eq!(redact("BEARER abc,def", &[]), "BEARER <redacted>,def");
        assert_eq!(redact("no secrets here", &[]), "no secrets here");
        assert_eq!(
            redact("authorization required", &[]),
            "authorization required"
        );
        assert_eq!(redact("ends with bearer.", &[]), "ends with bearer.");
    }
}
