//! The configuration as TOML, secrets redacted (`blufio config show`).

use serde_json::{Map, Value};

use super::Config;

impl Config {
    /// Renders the configuration as TOML, secrets redacted (`blufio config show`).
    pub fn to_toml(&self) -> String {
        let value = serde_json::to_value(self).unwrap_or(Value::Null);
        let mut out = String::new();
        let Some(sections) = value.as_object() else {
            return out;
        };
        for (section, fields) in sections {
            if let Some(fields) = fields.as_object() {
                table(&mut out, &key(section), fields);
            }
        }
        out
    }
}

/// Writes `[path]` and its keys, then each nested table (`[providers.claude]`) as a table of
/// its own: a JSON object written inline is not TOML.
fn table(out: &mut String, path: &str, fields: &Map<String, Value>) {
    if !out.is_empty() {
        out.push('\n');
    }
    out.push_str(&format!("[{path}]\n"));
    for (name, value) in fields {
        match value {
            Value::Object(_) => {}
            // TOML has no null: an unset optional key is shown as a comment.
            Value::Null => out.push_str(&format!("# {name} is not set\n")),
            // JSON strings, numbers, booleans and arrays of them are valid TOML as written.
            _ => out.push_str(&format!("{} = {value}\n", key(name))),
        }
    }
    for (name, value) in fields {
        if let Value::Object(nested) = value {
            table(out, &format!("{path}.{}", key(name)), nested);
        }
    }
}

/// Quotes a key unless it is a bare TOML key.
fn key(name: &str) -> String {
    if !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        name.to_owned()
    } else {
        format!("{name:?}")
    }
}
