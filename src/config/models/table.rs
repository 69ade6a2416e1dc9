//! Reading `[providers.NAME]` and `[models.ALIAS]` tables: the `Deserialize` of
//! `ProviderConfig` and `ModelConfig`, written by hand so that both go through one visitor.
//!
//! Why not derived: serde's derive gives each struct its own visitor, and toml's
//! `ValueDeserializer::deserialize_any` is then compiled once per visitor, with the struct's
//! whole map-reading body inlined three times over (for tables, arrays in field order and
//! datetimes): about 12 KiB of machine code per struct in the release binary. Here both
//! structs share one visitor ([`TableVisitor`]), one key seed ([`FieldSeed`]) and one value
//! seed ([`SlotSeed`]) that picks the field's type at run time, so that code exists once.
//!
//! What is accepted, refused and said is exactly what the derive did (the characterisation
//! test in `models_tests.rs` pins each message, line and column): unknown keys are refused
//! while the key is read, so the error points at the key; a value of the wrong type is
//! refused while it is read, so the error points at the value; a missing `kind` or
//! `provider` is refused for the whole table; and an array in field order is still read as
//! the table, as every other derived section of the file is.

use std::{fmt, path::PathBuf};

use serde::de::{self, Deserialize, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use toml::Spanned;

use super::{ModelConfig, ProviderConfig, ProviderKind};

/// `[providers.NAME]` keys, in the order an array in field order gives them (and the order
/// the "unknown field" error lists them in).
const PROVIDER_FIELDS: &[&str] = &[
    "kind",
    "base_url",
    "api_key_file",
    "api_key_env",
    "ca_file",
    "timeout_secs",
];

/// `[models.ALIAS]` keys, in the same sense.
const MODEL_FIELDS: &[&str] = &["provider", "model", "fallback", "max_tokens", "system"];

/// Which of the two tables is read.
#[derive(Clone, Copy)]
enum Table {
    Provider,
    Model,
}

impl Table {
    fn name(self) -> &'static str {
        match self {
            Table::Provider => "ProviderConfig",
            Table::Model => "ModelConfig",
        }
    }

    /// The keys' names, for the "unknown field" error.
    fn fields(self) -> &'static [&'static str] {
        match self {
            Table::Provider => PROVIDER_FIELDS,
            Table::Model => MODEL_FIELDS,
        }
    }

    /// The keys, in the order of [`Table::fields`].
    fn slots(self) -> &'static [Slot] {
        match self {
            Table::Provider => &[
                Slot::Kind,
                Slot::BaseUrl,
                Slot::ApiKeyFile,
                Slot::ApiKeyEnv,
                Slot::CaFile,
                Slot::TimeoutSecs,
            ],
            Table::Model => &[
                Slot::Provider,
                Slot::Model,
                Slot::Fallback,
                Slot::MaxTokens,
                Slot::System,
            ],
        }
    }
}

/// Every key of both tables; [`Values`] has a place for each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Kind,
    BaseUrl,
    ApiKeyFile,
    ApiKeyEnv,
    CaFile,
    TimeoutSecs,
    Provider,
    Model,
    Fallback,
    MaxTokens,
    System,
}

impl Slot {
    fn name(self) -> &'static str {
        match self {
            Slot::Kind => "kind",
            Slot::BaseUrl => "base_url",
            Slot::ApiKeyFile => "api_key_file",
            Slot::ApiKeyEnv => "api_key_env",
            Slot::CaFile => "ca_file",
            Slot::TimeoutSecs => "timeout_secs",
            Slot::Provider => "provider",
            Slot::Model => "model",
            Slot::Fallback => "fallback",
            Slot::MaxTokens => "max_tokens",
            Slot::System => "system",
        }
    }
}

/// What one table gave, before it becomes a `ProviderConfig` or a `ModelConfig`.
#[derive(Default)]
struct Values {
    /// One bit per [`Slot`]: which keys were given, to refuse one given twice.
    seen: u32,
    kind: Option<ProviderKind>,
    base_url: Option<String>,
    api_key_file: Option<PathBuf>,
    api_key_env: Option<String>,
    ca_file: Option<PathBuf>,
    timeout_secs: Option<u64>,
    provider: Option<Spanned<String>>,
    model: Option<String>,
    fallback: Vec<Spanned<String>>,
    max_tokens: Option<u32>,
    system: Option<String>,
}

impl<'de> Deserialize<'de> for ProviderConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let values = read(deserializer, Table::Provider)?;
        Ok(ProviderConfig {
            kind: values
                .kind
                .ok_or_else(|| de::Error::missing_field("kind"))?,
            base_url: values.base_url,
            api_key_file: values.api_key_file,
            api_key_env: values.api_key_env,
            ca_file: values.ca_file,
            timeout_secs: values.timeout_secs,
            api_key: None,
        })
    }
}

impl<'de> Deserialize<'de> for ModelConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let values = read(deserializer, Table::Model)?;
        Ok(ModelConfig {
            provider: values
                .provider
                .ok_or_else(|| de::Error::missing_field("provider"))?,
            model: values.model,
            fallback: values.fallback,
            max_tokens: values.max_tokens,
            system: values.system,
        })
    }
}

fn read<'de, D: Deserializer<'de>>(deserializer: D, table: Table) -> Result<Values, D::Error> {
    deserializer.deserialize_struct(table.name(), table.fields(), TableVisitor(table))
}

/// Reads either table, as a table or as an array in field order.
struct TableVisitor(Table);

impl<'de> Visitor<'de> for TableVisitor {
    type Value = Values;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "struct {}", self.0.name())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Values, A::Error> {
        let mut values = Values::default();
        while let Some(slot) = map.next_key_seed(FieldSeed(self.0))? {
            // TOML refuses a key given twice before serde sees it; the derive checked too.
            let bit = 1 << slot as u32;
            if values.seen & bit != 0 {
                return Err(de::Error::duplicate_field(slot.name()));
            }
            values.seen |= bit;
            map.next_value_seed(SlotSeed {
                values: &mut values,
                slot,
            })?;
        }
        Ok(values)
    }

    /// As the derive does: the first field is required, the others default when the array
    /// ends early, and elements past the last field are not read.
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Values, A::Error> {
        let mut values = Values::default();
        for (index, &slot) in self.0.slots().iter().enumerate() {
            let seed = SlotSeed {
                values: &mut values,
                slot,
            };
            if seq.next_element_seed(seed)?.is_none() {
                if index == 0 {
                    return Err(de::Error::invalid_length(0, &ArrayLength(self.0)));
                }
                break;
            }
        }
        Ok(values)
    }
}

/// What an array in field order is expected to be, in the derive's words.
struct ArrayLength(Table);

impl de::Expected for ArrayLength {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "struct {} with {} elements",
            self.0.name(),
            self.0.fields().len()
        )
    }
}

/// Reads a key as its [`Slot`] in the table, refusing any other with serde's "unknown
/// field" error while the key is read, so the error points at the key.
struct FieldSeed(Table);

impl<'de> DeserializeSeed<'de> for FieldSeed {
    type Value = Slot;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Slot, D::Error> {
        deserializer.deserialize_identifier(self)
    }
}

impl<'de> Visitor<'de> for FieldSeed {
    type Value = Slot;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("field identifier")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Slot, E> {
        let table = self.0;
        table
            .slots()
            .iter()
            .copied()
            .find(|slot| slot.name() == key)
            .ok_or_else(|| E::unknown_field(key, table.fields()))
    }
}

/// Reads one value into its place in [`Values`], with the type of that place.
struct SlotSeed<'v> {
    values: &'v mut Values,
    slot: Slot,
}

impl<'de> DeserializeSeed<'de> for SlotSeed<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        let values = self.values;
        match self.slot {
            Slot::Kind => values.kind = Some(ProviderKind::deserialize(deserializer)?),
            Slot::BaseUrl => values.base_url = Option::deserialize(deserializer)?,
            Slot::ApiKeyFile => values.api_key_file = Option::deserialize(deserializer)?,
            Slot::ApiKeyEnv => values.api_key_env = Option::deserialize(deserializer)?,
            Slot::CaFile => values.ca_file = Option::deserialize(deserializer)?,
            Slot::TimeoutSecs => values.timeout_secs = Option::deserialize(deserializer)?,
            Slot::Provider => values.provider = Some(Spanned::deserialize(deserializer)?),
            Slot::Model => values.model = Option::deserialize(deserializer)?,
            Slot::Fallback => values.fallback = Vec::deserialize(deserializer)?,
            Slot::MaxTokens => values.max_tokens = Option::deserialize(deserializer)?,
            Slot::System => values.system = Option::deserialize(deserializer)?,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{Slot, Table};

    #[test]
    fn each_table_lists_its_keys_in_the_order_of_its_slots() {
        for table in [Table::Provider, Table::Model] {
            let names: Vec<&str> = table.slots().iter().map(|slot| slot.name()).collect();
            assert_eq!(names, table.fields(), "{}", table.name());
        }
        let all = [Table::Provider, Table::Model].map(|table| table.slots().len());
        assert_eq!(all.iter().sum::<usize>(), Slot::System as usize + 1);
    }
}
