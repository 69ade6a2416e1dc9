//! The few JSON values xtask reads from the daemon's answers and writes into its reports,
//! through serde_json rather than by searching the text.

use serde_json::{Map, Value};

/// Returns a top-level field of a JSON object; `None` when the text is not a JSON object or
/// has no such field.
pub fn field(json: &str, key: &str) -> Option<Value> {
    let mut object: Map<String, Value> = serde_json::from_str(json).ok()?;
    object.remove(key)
}

/// Returns a top-level string field of a JSON object.
pub fn string(json: &str, key: &str) -> Option<String> {
    match field(json, key)? {
        Value::String(text) => Some(text),
        _ => None,
    }
}

/// Returns a top-level number field of a JSON object; `None` for `null` or a missing field.
pub fn number(json: &str, key: &str) -> Option<f64> {
    field(json, key)?.as_f64()
}

/// Quotes `text` as a JSON string. A JSON string is also a TOML basic string (the same quote
/// and backslash escapes, `\uXXXX` for control characters), so this quotes TOML values too.
pub fn quote(text: &str) -> String {
    Value::from(text).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEALTH: &str = r#"{"status":"healthy","uptime_secs":3,"memory_heap_bytes":123456,"memory_rss_bytes":null,"active_sessions":0}"#;

    #[test]
    fn json_fields_are_extracted() {
        assert_eq!(field(HEALTH, "status"), Some(Value::from("healthy")));
        assert_eq!(
            field(HEALTH, "memory_heap_bytes"),
            Some(Value::from(123456))
        );
        assert_eq!(field(HEALTH, "memory_rss_bytes"), Some(Value::Null));
        assert_eq!(field(HEALTH, "active_sessions"), Some(Value::from(0)));
        assert_eq!(field(HEALTH, "missing"), None);
        assert_eq!(field("{ \"a\" : 5 }", "a"), Some(Value::from(5)));
    }

    #[test]
    fn session_ids_and_numbers_are_found_in_compact_json() {
        let body = r#"{"id":"9f2c00","created_at":1795825458}"#;
        assert_eq!(string(body, "id").as_deref(), Some("9f2c00"));
        assert_eq!(string(body, "missing"), None);
        let health = r#"{"memory_heap_bytes":404968,"memory_rss_bytes":null,"x":1}"#;
        assert_eq!(number(health, "memory_heap_bytes"), Some(404_968.0));
        assert_eq!(number(health, "memory_rss_bytes"), None);
        assert_eq!(number(health, "x"), Some(1.0));
    }
}
