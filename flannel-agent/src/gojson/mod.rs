//! JSON the way Go's `encoding/json` reads and writes it, where serde's derive behaves
//! differently: flannel's network config ([`crate::config`]) and the CNI plugin's configs,
//! results and error JSON ([`crate::cni`]) must mean to this crate exactly what they mean to
//! flannel's Go code.
//!
//! Reading (`decode.rs`): a document is parsed into [`Json`], which keeps object entries in
//! document order (repeated keys included) so that callers can decode Go structs the way Go
//! does: keys match fields case-insensitively with Go's folding ([`key_matches`]), a repeated key
//! overwrites the earlier one, `null` leaves most fields untouched, and numbers follow Go's rules
//! for its integer types (`decode_*`). Strings remember whether the document spelled them with
//! escapes, for types that see the raw JSON bytes (flannel's addresses). Values that Go keeps as
//! `interface{}` become [`Value`]s: numbers turn into float64, objects into maps where the last
//! repeated key wins.
//!
//! Writing (`encode.rs`): [`marshal`] produces `json.Marshal`'s bytes: map keys sorted, struct
//! fields in declaration order, float64 in Go's shortest form (`1e+21`, `1e-7`), and Go's string
//! escaping (`<`, `>`, `&`, U+2028 and U+2029 escaped). [`go_quote`] is Go's `%q`.

mod decode;
mod encode;
#[cfg(test)]
mod tests;

pub use decode::{
    decode_bool, decode_int, decode_string, decode_uint, key_matches, parse, parse_skipping_arrays, Json, JsonStr, Num,
    TypeError,
};
pub use encode::{format_float, go_quote, marshal, marshal_indent, Value};
