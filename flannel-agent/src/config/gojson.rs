//! Reading JSON the way flannel's Go `encoding/json` does, which serde's derive cannot:
//! keys match struct fields case-insensitively (with Go's Unicode folding), a repeated key
//! overwrites the earlier one, `null` leaves most fields untouched, and flannel's address types
//! see the raw JSON bytes (so `null`, numbers and strings with escapes fail to parse).
//!
//! Every value is first read into [`Raw`], keeping object entries in document order, then
//! decoded field by field with the setters below.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::ConfigError;

/// A JSON value with object entries in document order and, for strings, whether the source
/// text used escapes (flannel's address types would see the backslashes).
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Raw {
    Null,
    Bool(bool),
    Num(Num),
    Str {
        text: String,
        escaped: bool,
    },
    /// Contents are never needed: no flannel field takes an array.
    Array,
    Object(Vec<(String, Raw)>),
}

/// serde_json without `arbitrary_precision` hands numbers over in one of these forms; an
/// integer too large for u64/i64, a fraction, an exponent or `-0` arrives as `F64`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Num {
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Raw {
    pub(super) fn kind(&self) -> &'static str {
        match self {
            Raw::Null => "null",
            Raw::Bool(_) => "a boolean",
            Raw::Num(_) => "a number",
            Raw::Str { .. } => "a string",
            Raw::Array => "an array",
            Raw::Object(_) => "an object",
        }
    }
}

/// Renders the value as the user wrote it (roughly), for error messages.
impl fmt::Display for Raw {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Raw::Null => f.write_str("null"),
            Raw::Bool(b) => write!(f, "{b}"),
            Raw::Num(Num::U64(n)) => write!(f, "{n}"),
            Raw::Num(Num::I64(n)) => write!(f, "{n}"),
            // Debug keeps the fraction ("24.0"), so the message shows why it is not an integer.
            Raw::Num(Num::F64(n)) => write!(f, "{n:?}"),
            Raw::Str { text, .. } => f.write_str(&serde_json::to_string(text).map_err(|_| fmt::Error)?),
            Raw::Array => f.write_str("[…]"),
            Raw::Object(_) => f.write_str("{…}"),
        }
    }
}

impl<'de> Deserialize<'de> for Raw {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Raw, D::Error> {
        deserializer.deserialize_any(RawVisitor)
    }
}

struct RawVisitor;

impl<'de> Visitor<'de> for RawVisitor {
    type Value = Raw;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_unit<E>(self) -> Result<Raw, E> {
        Ok(Raw::Null)
    }
    fn visit_none<E>(self) -> Result<Raw, E> {
        Ok(Raw::Null)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Raw, E> {
        Ok(Raw::Bool(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Raw, E> {
        Ok(Raw::Num(Num::U64(v)))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Raw, E> {
        Ok(Raw::Num(Num::I64(v)))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Raw, E> {
        Ok(Raw::Num(Num::F64(v)))
    }
    // serde_json borrows a string straight from the input only when it has no escapes.
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Raw, E> {
        Ok(Raw::Str { text: v.to_owned(), escaped: false })
    }
    fn visit_str<E>(self, v: &str) -> Result<Raw, E> {
        Ok(Raw::Str { text: v.to_owned(), escaped: true })
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Raw, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Raw::Array)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Raw, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            entries.push((key, map.next_value::<Raw>()?));
        }
        Ok(Raw::Object(entries))
    }
}

/// Whether a JSON key selects the Go struct field `field` (an ASCII name). Go folds both with
/// Unicode simple case folding; the only non-ASCII letters that fold onto ASCII ones are
/// 'ſ' (long s) and 'K' (Kelvin sign), so `"ſubnetLen"` really is SubnetLen to flannel.
pub(super) fn key_matches(key: &str, field: &str) -> bool {
    fn fold(c: char) -> char {
        match c {
            'ſ' => 's',
            '\u{212A}' => 'k',
            c => c.to_ascii_lowercase(),
        }
    }
    key.chars().map(fold).eq(field.chars().map(fold))
}

fn invalid(field: &'static str, value: &Raw, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field, value: value.to_string(), reason: reason.into() }
}

/// A Go `bool` field: `null` leaves it as it was.
pub(super) fn set_bool(field: &'static str, raw: &Raw, slot: &mut bool) -> Result<(), ConfigError> {
    match raw {
        Raw::Null => Ok(()),
        Raw::Bool(b) => {
            *slot = *b;
            Ok(())
        }
        other => Err(invalid(field, other, "it must be true or false")),
    }
}

/// A Go `uint` field (flannel's SubnetLen): a non-negative integer literal up to 2^64-1.
pub(super) fn set_uint(field: &'static str, raw: &Raw, slot: &mut u64) -> Result<(), ConfigError> {
    match raw {
        Raw::Null => Ok(()),
        Raw::Num(Num::U64(n)) => {
            *slot = *n;
            Ok(())
        }
        other => Err(invalid(field, other, "it must be a non-negative integer")),
    }
}

/// A Go `int` field (the backends' VNI, Port, MTU). Go would also take `-0`; serde_json only
/// shows it to us as a float, so it is refused here.
pub(super) fn set_int(field: &'static str, raw: &Raw, slot: &mut i64) -> Result<(), ConfigError> {
    let value = match raw {
        Raw::Null => return Ok(()),
        Raw::Num(Num::I64(n)) => *n,
        Raw::Num(Num::U64(n)) => i64::try_from(*n).map_err(|_| invalid(field, raw, "it is out of range"))?,
        other => return Err(invalid(field, other, "it must be an integer")),
    };
    *slot = value;
    Ok(())
}

/// A Go `string` field (Backend.Type); escapes are decoded as usual.
pub(super) fn set_string(field: &'static str, raw: &Raw, slot: &mut String) -> Result<(), ConfigError> {
    match raw {
        Raw::Null => Ok(()),
        Raw::Str { text, .. } => {
            slot.clone_from(text);
            Ok(())
        }
        other => Err(invalid(field, other, "it must be a string")),
    }
}

/// The text flannel's address types parse: they get the raw JSON bytes with the quotes
/// trimmed, so only an escape-free JSON string can ever hold a valid address.
fn address_text<'a>(field: &'static str, raw: &'a Raw, example: &str) -> Result<&'a str, ConfigError> {
    match raw {
        Raw::Str { text, escaped: false } => Ok(text),
        Raw::Str { escaped: true, .. } => {
            Err(invalid(field, raw, "it contains a JSON escape sequence, which flannel does not decode in addresses"))
        }
        other => Err(invalid(field, other, format!("it must be a string such as \"{example}\""))),
    }
}

/// A CIDR as Go's `net.ParseCIDR` returns it: the address masked to the prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum GoCidr {
    V4(Ipv4Net),
    V6(Ipv6Net),
}

/// `net.ParseIP`: dotted IPv4 (no leading zeros) or IPv6 text, without a zone.
fn go_parse_ip(s: &str) -> Option<IpAddr> {
    s.parse::<Ipv4Addr>().map(IpAddr::V4).or_else(|_| s.parse::<Ipv6Addr>().map(IpAddr::V6)).ok()
}

/// `net.ParseCIDR`. Its prefix is read with Go's `dtoi`: ASCII digits only, leading zeros
/// allowed ("/016" is /16), no sign.
fn go_parse_cidr(s: &str) -> Option<GoCidr> {
    let (addr, digits) = s.split_once('/')?;
    if digits.is_empty() {
        return None;
    }
    let mut prefix: u32 = 0;
    for b in digits.bytes() {
        if !b.is_ascii_digit() {
            return None;
        }
        prefix = prefix * 10 + u32::from(b - b'0');
        if prefix > 128 {
            return None;
        }
    }
    let prefix = u8::try_from(prefix).ok()?;
    match go_parse_ip(addr)? {
        IpAddr::V4(a) => Ipv4Net::new(a, prefix).ok().map(|n| GoCidr::V4(n.trunc())),
        IpAddr::V6(a) => Ipv6Net::new(a, prefix).ok().map(|n| GoCidr::V6(n.trunc())),
    }
}

/// flannel's `IP4Net` (the Network field) as read from JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ip4NetValue {
    Net(Ipv4Net),
    /// An IPv4-mapped IPv6 CIDR such as "::ffff:10.0.0.0/104": flannel takes the IPv4 part
    /// with the IPv6 prefix length, a network its checks then always refuse.
    Mapped(Ipv6Net),
}

/// Network: `ip.IP4Net` (pkg/ip/ipnet.go, UnmarshalJSON). `null` is an error, not "unset".
pub(super) fn set_ip4net(raw: &Raw, slot: &mut Option<Ip4NetValue>) -> Result<(), ConfigError> {
    const FIELD: &str = "Network";
    let text = address_text(FIELD, raw, "10.5.0.0/16")?;
    *slot = Some(match go_parse_cidr(text) {
        Some(GoCidr::V4(net)) => Ip4NetValue::Net(net),
        Some(GoCidr::V6(net)) if net.addr().to_ipv4_mapped().is_some() => Ip4NetValue::Mapped(net),
        Some(GoCidr::V6(_)) => return Err(invalid(FIELD, raw, "it is not an IPv4 CIDR")),
        None => return Err(invalid(FIELD, raw, "it is not a CIDR such as \"10.5.0.0/16\"")),
    });
    Ok(())
}

/// IPv6Network: `ip.IP6Net` (pkg/ip/ip6net.go). Go parses any CIDR family here; whether it is
/// IPv6 only matters once EnableIPv6 is set, so the family is judged later.
pub(super) fn set_ip6net(raw: &Raw, slot: &mut Option<GoCidr>) -> Result<(), ConfigError> {
    const FIELD: &str = "IPv6Network";
    let text = address_text(FIELD, raw, "fc00::/48")?;
    *slot = Some(go_parse_cidr(text).ok_or_else(|| invalid(FIELD, raw, "it is not a CIDR such as \"fc00::/48\""))?);
    Ok(())
}

/// SubnetMin/SubnetMax: `ip.IP4` (pkg/ip/ipnet.go). IPv4-mapped IPv6 text is accepted as its
/// IPv4 address, like Go's `To4()`; `null` is an error.
pub(super) fn set_ip4(field: &'static str, raw: &Raw, slot: &mut Ipv4Addr) -> Result<(), ConfigError> {
    let text = address_text(field, raw, "10.5.1.0")?;
    *slot = match go_parse_ip(text) {
        Some(IpAddr::V4(a)) => a,
        Some(IpAddr::V6(a)) => a.to_ipv4_mapped().ok_or_else(|| invalid(field, raw, "it is not an IPv4 address"))?,
        None => return Err(invalid(field, raw, "it is not an IP address")),
    };
    Ok(())
}

/// IPv6SubnetMin/IPv6SubnetMax: `*ip.IP6` (pkg/ip/ip6net.go). Being a pointer, `null` resets it
/// to unset; IPv4 text becomes its IPv4-mapped IPv6 address, as Go's `To16()` does.
pub(super) fn set_ip6(field: &'static str, raw: &Raw, slot: &mut Option<Ipv6Addr>) -> Result<(), ConfigError> {
    if *raw == Raw::Null {
        *slot = None;
        return Ok(());
    }
    let text = address_text(field, raw, "fc00:0:0:1::")?;
    *slot = match go_parse_ip(text) {
        Some(IpAddr::V4(a)) => Some(a.to_ipv6_mapped()),
        Some(IpAddr::V6(a)) => Some(a),
        None => return Err(invalid(field, raw, "it is not an IP address")),
    };
    Ok(())
}
