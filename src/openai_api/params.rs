//! The visitors of single request parameters: those accepted only at the value that changes
//! nothing (`logit_bias`, `response_format`, `modalities`), those refused unless `null`, and
//! the small objects and arrays (`stream_options`, `stop`, `metadata`) with their limits.

use std::{borrow::Cow, fmt};

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use super::{
    chat::{MAX_METADATA, MAX_STOP},
    error::ApiError,
    state::{State, next_key, once},
};

/// Reads `null` as `None` and anything else with the inner seed.
pub(super) struct Nullable<S>(pub(super) S);

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for Nullable<S> {
    type Value = Option<S::Value>;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_option(self)
    }
}

impl<'de, S: DeserializeSeed<'de>> Visitor<'de> for Nullable<S> {
    type Value = Option<S::Value>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a value or null")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        self.0.deserialize(deserializer).map(Some)
    }
}

/// A parameter blufio cannot honour: `null` passes, anything else is refused at its first
/// token, so its value (a tool schema, say) is never walked.
pub(super) struct NullOnly<'s>(pub(super) &'s State, pub(super) &'static str);

impl<'de> DeserializeSeed<'de> for NullOnly<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for NullOnly<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("null")
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_some<D: Deserializer<'de>>(self, _: D) -> Result<(), D::Error> {
        let name = self.1;
        Err(self.0.refuse(ApiError::unsupported(
            name,
            format!("`{name}` is not supported by this gateway"),
        )))
    }
}

/// `logit_bias`: `null` or `{}` change nothing; the first entry of a non-empty map is refused.
pub(super) struct NullOrEmptyMap<'s>(pub(super) &'s State, pub(super) &'static str);

impl<'de> DeserializeSeed<'de> for NullOrEmptyMap<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for NullOrEmptyMap<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an empty object or null")
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        match next_key(&mut map)? {
            None => Ok(()),
            Some(_) => {
                let name = self.1;
                Err(self.0.refuse(ApiError::unsupported(
                    name,
                    format!("`{name}` is not supported"),
                )))
            }
        }
    }
}

pub(super) struct StreamOptionsSeed<'s>(pub(super) &'s State);

impl<'de> DeserializeSeed<'de> for StreamOptionsSeed<'_> {
    type Value = Option<bool>;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Option<bool>, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for StreamOptionsSeed<'_> {
    type Value = Option<bool>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object")
    }

    /// `Some(include_usage)` even when only other options are given, so `stream_options`
    /// without `stream` is still caught; `include_obfuscation` pads chunks against a network
    /// observer, which a text answer does without.
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<bool>, A::Error> {
        let state = self.0;
        let mut include_usage = None;
        let mut seen = Vec::new();
        while let Some(key) = next_key(&mut map)? {
            let name = match &*key {
                "include_usage" => "include_usage",
                "include_obfuscation" => "include_obfuscation",
                other => {
                    return Err(state.refuse(ApiError::unknown_parameter(&format!(
                        "stream_options.{other}"
                    ))));
                }
            };
            let param = || format!("stream_options.{name}");
            once(state, &mut seen, name, param)?;
            let value: Option<bool> = state.at(param, map.next_value())?;
            if name == "include_usage" {
                include_usage = value;
            }
        }
        Ok(Some(include_usage.unwrap_or(false)))
    }
}

pub(super) struct StopSeed<'s>(pub(super) &'s State);

impl<'de> DeserializeSeed<'de> for StopSeed<'_> {
    type Value = Vec<String>;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Vec<String>, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for StopSeed<'_> {
    type Value = Vec<String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string or an array of strings")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Vec<String>, E> {
        Ok(vec![text.to_owned()])
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
        let state = self.0;
        let mut stop = Vec::new();
        loop {
            let index = stop.len();
            let Some(entry) =
                state.at(|| format!("stop.[{index}]"), seq.next_element::<String>())?
            else {
                return Ok(stop);
            };
            if index == MAX_STOP {
                return Err(state.refuse(ApiError::invalid_value(
                    "stop",
                    format!("`stop` has more than {MAX_STOP} entries"),
                )));
            }
            stop.push(entry);
        }
    }
}

pub(super) struct MetadataSeed<'s>(pub(super) &'s State);

impl<'de> DeserializeSeed<'de> for MetadataSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for MetadataSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object of strings")
    }

    /// OpenAI's metadata is a flat map of strings: reading it as such keeps it shallow.
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let state = self.0;
        let mut count = 0;
        while let Some(key) = next_key(&mut map)? {
            count += 1;
            if count > MAX_METADATA {
                return Err(state.refuse(ApiError::invalid_value(
                    "metadata",
                    format!("`metadata` has more than {MAX_METADATA} entries"),
                )));
            }
            state.at(
                || format!("metadata.{key}"),
                map.next_value::<Cow<'de, str>>(),
            )?;
        }
        Ok(())
    }
}

pub(super) struct ResponseFormatSeed<'s>(pub(super) &'s State);

impl<'de> DeserializeSeed<'de> for ResponseFormatSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ResponseFormatSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(r#"{"type": "text"}"#)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let state = self.0;
        let mut kind = None;
        let mut seen = Vec::new();
        while let Some(key) = next_key(&mut map)? {
            if key != "type" {
                // `json_schema` and the like: refused as a format, not walked.
                return Err(state.refuse(ApiError::unsupported(
                    "response_format",
                    "only `response_format` {\"type\": \"text\"} is supported",
                )));
            }
            once(state, &mut seen, "type", || {
                "response_format.type".to_owned()
            })?;
            kind = Some(state.at(
                || "response_format.type".to_owned(),
                map.next_value::<Cow<'de, str>>(),
            )?);
        }
        match kind.as_deref() {
            Some("text") => Ok(()),
            Some(other) => Err(state.refuse(ApiError::unsupported(
                "response_format",
                format!("`response_format` type `{other}` is not supported; only `text`"),
            ))),
            None => Err(state.refuse(ApiError::invalid_request(
                "response_format.type",
                "`response_format.type` is required",
            ))),
        }
    }
}

pub(super) struct ModalitiesSeed<'s>(pub(super) &'s State);

impl<'de> DeserializeSeed<'de> for ModalitiesSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for ModalitiesSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(r#"["text"]"#)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let state = self.0;
        let mut index = 0;
        while let Some(modality) = state.at(
            || format!("modalities.[{index}]"),
            seq.next_element::<Cow<'de, str>>(),
        )? {
            if modality != "text" {
                return Err(state.refuse(ApiError::unsupported(
                    "modalities",
                    format!("modality `{modality}` is not supported; only `text`"),
                )));
            }
            index += 1;
        }
        Ok(())
    }
}
