//! Reading the few fields of an upstream's reply that blufio uses straight into typed values,
//! with the leniency of indexing a `serde_json::Value` (`value["usage"]["prompt_tokens"]
//! .as_u64()`): a field of another type than expected reads as absent instead of failing the
//! reply, and everything else in the reply is skipped without being stored.
//!
//! A `Value` tree allocated every object and array of the reply and hashed each key into its
//! map, which cost more than the rest of reading a small reply. An object is read entry by
//! entry ([`Fields`]) rather than by serde's derive, which refuses a repeated key: here, as
//! in a `Value`, the last one counts.

use std::{fmt, marker::PhantomData};

use serde::{
    Deserialize, Deserializer,
    de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor},
};

/// An object of which a few keys are read; the others are skipped.
pub(crate) trait Fields<'de>: Default {
    /// The keys read, in the order `take` numbers them.
    const NAMES: &'static [&'static str];

    /// Reads the value of `NAMES[index]` from `map`.
    fn take<A: MapAccess<'de>>(&mut self, index: usize, map: &mut A) -> Result<(), A::Error>;
}

/// Reads a key as its index in `NAMES`, or `None` for a key not read.
struct KeySeed(&'static [&'static str]);

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Option<usize>;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Option<usize>, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Option<usize>;
    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("an object key")
    }
    fn visit_str<E>(self, key: &str) -> Result<Option<usize>, E> {
        Ok(self.0.iter().position(|name| *name == key))
    }
}

/// An object read as `T`, or `None` when the JSON there is not an object.
#[derive(Debug)]
pub(crate) struct Object<T>(pub(crate) Option<T>);

impl<T> Default for Object<T> {
    fn default() -> Self {
        Object(None)
    }
}

/// The first element of an array, when the JSON there is an array and that element an object.
#[derive(Debug)]
pub(crate) struct First<T>(pub(crate) Option<T>);

impl<T> Default for First<T> {
    fn default() -> Self {
        First(None)
    }
}

/// A string, or `None` for any other JSON (`Value::as_str`).
#[derive(Debug, Default)]
pub(crate) struct Str(pub(crate) Option<String>);

/// A non-negative integer, or `None` for any other JSON (`Value::as_u64`).
#[derive(Debug, Default)]
pub(crate) struct U64(pub(crate) Option<u64>);

/// What a field holds when only a string or `null` is acceptable: absence reads as `null`.
#[derive(Debug, Default)]
pub(crate) enum Text {
    String(String),
    #[default]
    Null,
    Other,
}

/// A visitor that accepts any JSON, skips it and gives `Default`, except for the one kind of
/// value each type below overrides.
macro_rules! skip_the_rest {
    ($value:ty) => {
        fn visit_bool<E>(self, _: bool) -> Result<$value, E> {
            Ok(Self::Value::default())
        }
        fn visit_i64<E>(self, _: i64) -> Result<$value, E> {
            Ok(Self::Value::default())
        }
        fn visit_f64<E>(self, _: f64) -> Result<$value, E> {
            Ok(Self::Value::default())
        }
        fn visit_unit<E>(self) -> Result<$value, E> {
            Ok(Self::Value::default())
        }
    };
}

/// Skips the rest of an array.
fn drain_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<IgnoredAny>()?.is_some() {}
    Ok(())
}

/// Skips the rest of an object.
fn drain_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
}

struct ObjectVisitor<T>(PhantomData<T>);

impl<'de, T: Fields<'de>> Visitor<'de> for ObjectVisitor<T> {
    type Value = Object<T>;
    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("any JSON value")
    }
    skip_the_rest!(Object<T>);
    fn visit_u64<E>(self, _: u64) -> Result<Object<T>, E> {
        Ok(Object(None))
    }
    fn visit_str<E>(self, _: &str) -> Result<Object<T>, E> {
        Ok(Object(None))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Object<T>, A::Error> {
        drain_seq(seq).map(|()| Object(None))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Object<T>, A::Error> {
        let mut object = T::default();
        while let Some(key) = map.next_key_seed(KeySeed(T::NAMES))? {
            match key {
                Some(index) => object.take(index, &mut map)?,
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Object(Some(object)))
    }
}

impl<'de, T: Fields<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ObjectVisitor(PhantomData))
    }
}

struct FirstVisitor<T>(PhantomData<T>);

impl<'de, T: Fields<'de>> Visitor<'de> for FirstVisitor<T> {
    type Value = First<T>;
    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("any JSON value")
    }
    skip_the_rest!(First<T>);
    fn visit_u64<E>(self, _: u64) -> Result<First<T>, E> {
        Ok(First(None))
    }
    fn visit_str<E>(self, _: &str) -> Result<First<T>, E> {
        Ok(First(None))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<First<T>, A::Error> {
        let first = seq.next_element::<Object<T>>()?;
        drain_seq(seq)?;
        Ok(First(first.and_then(|object| object.0)))
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<First<T>, A::Error> {
        drain_map(map).map(|()| First(None))
    }
}

impl<'de, T: Fields<'de>> Deserialize<'de> for First<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(FirstVisitor(PhantomData))
    }
}

struct StrVisitor;

impl<'de> Visitor<'de> for StrVisitor {
    type Value = Str;
    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("any JSON value")
    }
    skip_the_rest!(Str);
    fn visit_u64<E>(self, _: u64) -> Result<Str, E> {
        Ok(Str(None))
    }
    fn visit_str<E>(self, text: &str) -> Result<Str, E> {
        Ok(Str(Some(text.to_owned())))
    }
    fn visit_string<E>(self, text: String) -> Result<Str, E> {
        Ok(Str(Some(text)))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Str, A::Error> {
        drain_seq(seq).map(|()| Str(None))
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Str, A::Error> {
        drain_map(map).map(|()| Str(None))
    }
}

impl<'de> Deserialize<'de> for Str {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrVisitor)
    }
}

struct U64Visitor;

impl<'de> Visitor<'de> for U64Visitor {
    type Value = U64;
    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("any JSON value")
    }
    skip_the_rest!(U64);
    fn visit_u64<E>(self, number: u64) -> Result<U64, E> {
        Ok(U64(Some(number)))
    }
    fn visit_str<E>(self, _: &str) -> Result<U64, E> {
        Ok(U64(None))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<U64, A::Error> {
        drain_seq(seq).map(|()| U64(None))
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<U64, A::Error> {
        drain_map(map).map(|()| U64(None))
    }
}

impl<'de> Deserialize<'de> for U64 {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(U64Visitor)
    }
}

struct TextVisitor;

impl<'de> Visitor<'de> for TextVisitor {
    type Value = Text;
    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Text, E> {
        Ok(Text::Other)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Text, E> {
        Ok(Text::Other)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Text, E> {
        Ok(Text::Other)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Text, E> {
        Ok(Text::Other)
    }
    fn visit_unit<E>(self) -> Result<Text, E> {
        Ok(Text::Null)
    }
    fn visit_str<E>(self, text: &str) -> Result<Text, E> {
        Ok(Text::String(text.to_owned()))
    }
    fn visit_string<E>(self, text: String) -> Result<Text, E> {
        Ok(Text::String(text))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Text, A::Error> {
        drain_seq(seq).map(|()| Text::Other)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Text, A::Error> {
        drain_map(map).map(|()| Text::Other)
    }
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(TextVisitor)
    }
}
