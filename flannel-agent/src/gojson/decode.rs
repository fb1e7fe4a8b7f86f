//! Reading JSON as Go's decoder does: [`Json`] and the rules for storing its values in Go
//! fields.

use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::encode::{format_float, Value};

/// A parsed JSON document, objects in document order.
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    Num(Num),
    Str(JsonStr),
    /// Empty when read with [`parse_skipping_arrays`].
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

/// A JSON string: its text (escapes decoded) and whether the document used escapes, which
/// types that see the raw JSON bytes (flannel's addresses) would find there as backslashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonStr {
    pub text: String,
    pub escaped: bool,
}

/// A string the document spelled without escapes.
impl From<&str> for JsonStr {
    fn from(text: &str) -> JsonStr {
        JsonStr { text: text.to_owned(), escaped: false }
    }
}

/// A JSON number as serde_json (without `arbitrary_precision`) reports it: integers that fit
/// u64/i64; anything else (an integer too large for them, a fraction, an exponent, `-0`) as f64.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Num {
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Num {
    pub fn as_f64(self) -> f64 {
        match self {
            Num::U64(n) => n as f64,
            Num::I64(n) => n as f64,
            Num::F64(n) => n,
        }
    }
}

/// The number as Go prints it (float64 in its shortest form).
impl fmt::Display for Num {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Num::U64(n) => write!(f, "{n}"),
            Num::I64(n) => write!(f, "{n}"),
            Num::F64(n) => f.write_str(&format_float(*n)),
        }
    }
}

impl Json {
    /// The word Go's `UnmarshalTypeError` uses for this kind of value.
    pub fn kind(&self) -> &'static str {
        match self {
            Json::Null => "null",
            Json::Bool(_) => "bool",
            Json::Num(_) => "number",
            Json::Str(_) => "string",
            Json::Array(_) => "array",
            Json::Object(_) => "object",
        }
    }

    /// The value decoded into a Go `interface{}`.
    pub fn into_value(self) -> Value {
        match self {
            Json::Null => Value::Null,
            Json::Bool(b) => Value::Bool(b),
            Json::Num(n) => Value::Float(n.as_f64()),
            Json::Str(s) => Value::Str(s.text),
            Json::Array(items) => Value::Array(items.into_iter().map(Json::into_value).collect()),
            Json::Object(entries) => Value::Map(entries.into_iter().map(|(k, v)| (k, v.into_value())).collect()),
        }
    }
}

/// Parses a document. Invalid UTF-8 is replaced by U+FFFD first, as Go's decoder does inside
/// strings, and syntax errors read like Go's where the cause is the same.
pub fn parse(bytes: &[u8]) -> Result<Json, String> {
    let text = String::from_utf8_lossy(bytes);
    let parsed = read(&text, Reader { keep_arrays: true });
    parsed.map_err(|e| if e.is_eof() { "unexpected end of JSON input".to_string() } else { e.to_string() })
}

/// Parses a document none of whose arrays matter to the caller (no field of flannel's network
/// config takes one): array contents are only checked for syntax, like the values Go's decoder
/// skips, and left out. So no nesting limit applies inside arrays, and a number or `\u` escape
/// there that serde_json could not represent is no error. Errors are serde_json's.
pub fn parse_skipping_arrays(text: &str) -> Result<Json, serde_json::Error> {
    read(text, Reader { keep_arrays: false })
}

/// What `serde_json::from_str` does, with [`Reader`] in place of a `Deserialize` impl.
fn read(text: &str, reader: Reader) -> Result<Json, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(text);
    let json = reader.deserialize(&mut de)?;
    de.end()?;
    Ok(json)
}

/// Reads any JSON value into [`Json`].
#[derive(Clone, Copy)]
struct Reader {
    /// false: array contents are skipped unread.
    keep_arrays: bool,
}

impl<'de> DeserializeSeed<'de> for Reader {
    type Value = Json;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Json, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Reader {
    type Value = Json;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_unit<E>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }
    fn visit_none<E>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Json, E> {
        Ok(Json::Bool(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Json, E> {
        Ok(Json::Num(Num::U64(v)))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Json, E> {
        Ok(Json::Num(Num::I64(v)))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Json, E> {
        Ok(Json::Num(Num::F64(v)))
    }
    // serde_json borrows a string straight from the input only when it has no escapes.
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Json, E> {
        Ok(Json::Str(JsonStr { text: v.to_owned(), escaped: false }))
    }
    fn visit_str<E>(self, v: &str) -> Result<Json, E> {
        Ok(Json::Str(JsonStr { text: v.to_owned(), escaped: true }))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
        let mut items = Vec::new();
        if self.keep_arrays {
            while let Some(item) = seq.next_element_seed(self)? {
                items.push(item);
            }
        } else {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
        }
        Ok(Json::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            entries.push((key, map.next_value_seed(self)?));
        }
        Ok(Json::Object(entries))
    }
}

/// Whether a JSON key selects the Go struct field whose JSON name is `field` (ASCII). Go folds
/// both sides with Unicode simple case folding (ToUpper(ToLower(r))); the only non-ASCII runes
/// folding onto ASCII letters are 'ſ' (long s) and 'K' (Kelvin sign), so `"ſubnetLen"` really is
/// SubnetLen to flannel.
pub fn key_matches(key: &str, field: &str) -> bool {
    fn fold(c: char) -> char {
        match c {
            'ſ' => 's',
            '\u{212A}' => 'k',
            c => c.to_ascii_lowercase(),
        }
    }
    key.chars().map(fold).eq(field.chars().map(fold))
}

/// A value that a Go field's type cannot take: Go's `UnmarshalTypeError` before it names the
/// field. Displays as Go's message names the value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TypeError {
    /// The wrong kind of value: "string", "number", "bool", "array" or "object".
    Kind(&'static str),
    /// A number the integer field cannot hold (Go: `number <literal>`).
    Number(Num),
}

impl TypeError {
    fn kind(value: &Json) -> TypeError {
        TypeError::Kind(value.kind())
    }
}

impl fmt::Display for TypeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TypeError::Kind(kind) => f.write_str(kind),
            TypeError::Number(n) => write!(f, "number {n}"),
        }
    }
}

/// A Go `bool` field: `null` leaves it as it was.
pub fn decode_bool(value: &Json, slot: &mut bool) -> Result<(), TypeError> {
    match value {
        Json::Null => Ok(()),
        Json::Bool(b) => {
            *slot = *b;
            Ok(())
        }
        other => Err(TypeError::kind(other)),
    }
}

/// A Go `string` field: `null` leaves it as it was; escapes are decoded as usual.
pub fn decode_string(value: &Json, slot: &mut String) -> Result<(), TypeError> {
    match value {
        Json::Null => Ok(()),
        Json::Str(s) => {
            slot.clone_from(&s.text);
            Ok(())
        }
        other => Err(TypeError::kind(other)),
    }
}

/// A Go `uint` field (uint64): a non-negative integer literal up to 2^64-1; `null` leaves it as
/// it was.
pub fn decode_uint(value: &Json, slot: &mut u64) -> Result<(), TypeError> {
    match value {
        Json::Null => Ok(()),
        Json::Num(Num::U64(n)) => {
            *slot = *n;
            Ok(())
        }
        Json::Num(n) => Err(TypeError::Number(*n)),
        other => Err(TypeError::kind(other)),
    }
}

/// A Go `int` field (int64): an integer literal in range; `null` leaves it as it was. Go would
/// also take `-0`; serde_json only shows it to us as a float, so it is refused here.
pub fn decode_int(value: &Json, slot: &mut i64) -> Result<(), TypeError> {
    *slot = match value {
        Json::Null => return Ok(()),
        Json::Num(Num::I64(n)) => *n,
        Json::Num(n @ Num::U64(u)) => i64::try_from(*u).map_err(|_| TypeError::Number(*n))?,
        Json::Num(n) => return Err(TypeError::Number(*n)),
        other => return Err(TypeError::kind(other)),
    };
    Ok(())
}
