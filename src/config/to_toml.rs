//! The configuration as TOML, secrets redacted (`blufio config show`).

use super::Config;

impl Config {
    /// Renders the configuration as TOML, secrets redacted (`blufio config show`).
    pub fn to_toml(&self) -> String {
        let value = serde_json::to_value(self).unwrap_or(serde_json::Value::Null);
        let mut out = String::new();
        let Some(sections) = value.as_object() else {
            return out;
        };
        for (section, fields) in sections {
            let Some(fields) = fields.as_object() else {
                continue;
            };
            if !out.is_empty() {
                out.push('\n');
            }
            out.push_str(&format!("[{section}]\n"));
            for (key, value) in fields {
                match value {
                    // TOML has no null: an unset optional key is shown as a comment.
                    serde_json::Value::Null => out.push_str(&format!("# {key} is not set\n")),
                    // JSON strings, numbers and booleans are valid TOML values as written.
                    _ => out.push_str(&format!("{key} = {value}\n")),
                }
            }
        }
        out
    }
}
