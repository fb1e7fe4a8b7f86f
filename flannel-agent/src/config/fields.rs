//! The fields of flannel's `subnet.Config` as its Go code reads them from JSON, with this
//! module's error messages: Go's bool, uint, int and string (the rules are
//! [`crate::gojson`]'s), and flannel's address types, which see the raw JSON bytes (so `null`,
//! numbers and strings with escapes fail to parse).

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::{Ipv4Net, Ipv6Net};

use super::ConfigError;
use crate::gojson::{self, Json, JsonStr, Num, TypeError};

/// The kind of value, as error messages name it ("a boolean").
pub(super) fn kind_phrase(raw: &Json) -> &'static str {
    match raw {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Num(_) => "a number",
        Json::Str(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

/// Renders the value as the user wrote it (roughly), for error messages.
pub(super) struct Written<'a>(pub(super) &'a Json);

impl fmt::Display for Written<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Json::Null => f.write_str("null"),
            Json::Bool(b) => write!(f, "{b}"),
            Json::Num(Num::U64(n)) => write!(f, "{n}"),
            Json::Num(Num::I64(n)) => write!(f, "{n}"),
            // Debug keeps the fraction ("24.0"), so the message shows why it is not an integer.
            Json::Num(Num::F64(n)) => write!(f, "{n:?}"),
            Json::Str(s) => f.write_str(&serde_json::to_string(&s.text).map_err(|_| fmt::Error)?),
            Json::Array(_) => f.write_str("[…]"),
            Json::Object(_) => f.write_str("{…}"),
        }
    }
}

fn invalid(field: &'static str, value: &Json, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field, value: Written(value).to_string(), reason: reason.into() }
}

/// A Go `bool` field: `null` leaves it as it was.
pub(super) fn set_bool(field: &'static str, raw: &Json, slot: &mut bool) -> Result<(), ConfigError> {
    gojson::decode_bool(raw, slot).map_err(|_| invalid(field, raw, "it must be true or false"))
}

/// A Go `uint` field (flannel's SubnetLen): a non-negative integer literal up to 2^64-1.
pub(super) fn set_uint(field: &'static str, raw: &Json, slot: &mut u64) -> Result<(), ConfigError> {
    gojson::decode_uint(raw, slot).map_err(|_| invalid(field, raw, "it must be a non-negative integer"))
}

/// A Go `int` field (the backends' VNI, Port, MTU).
pub(super) fn set_int(field: &'static str, raw: &Json, slot: &mut i64) -> Result<(), ConfigError> {
    gojson::decode_int(raw, slot).map_err(|e| match e {
        TypeError::Number(Num::U64(_)) => invalid(field, raw, "it is out of range"),
        _ => invalid(field, raw, "it must be an integer"),
    })
}

/// A Go `string` field (Backend.Type); escapes are decoded as usual.
pub(super) fn set_string(field: &'static str, raw: &Json, slot: &mut String) -> Result<(), ConfigError> {
    gojson::decode_string(raw, slot).map_err(|_| invalid(field, raw, "it must be a string"))
}

/// The text flannel's address types parse: they get the raw JSON bytes with the quotes
/// trimmed, so only an escape-free JSON string can ever hold a valid address.
fn address_text<'a>(field: &'static str, raw: &'a Json, example: &str) -> Result<&'a str, ConfigError> {
    match raw {
        Json::Str(JsonStr { text, escaped: false }) => Ok(text),
        Json::Str(JsonStr { escaped: true, .. }) => {
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
pub(super) fn set_ip4net(raw: &Json, slot: &mut Option<Ip4NetValue>) -> Result<(), ConfigError> {
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
pub(super) fn set_ip6net(raw: &Json, slot: &mut Option<GoCidr>) -> Result<(), ConfigError> {
    const FIELD: &str = "IPv6Network";
    let text = address_text(FIELD, raw, "fc00::/48")?;
    *slot = Some(go_parse_cidr(text).ok_or_else(|| invalid(FIELD, raw, "it is not a CIDR such as \"fc00::/48\""))?);
    Ok(())
}

/// SubnetMin/SubnetMax: `ip.IP4` (pkg/ip/ipnet.go). IPv4-mapped IPv6 text is accepted as its
/// IPv4 address, like Go's `To4()`; `null` is an error.
pub(super) fn set_ip4(field: &'static str, raw: &Json, slot: &mut Ipv4Addr) -> Result<(), ConfigError> {
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
pub(super) fn set_ip6(field: &'static str, raw: &Json, slot: &mut Option<Ipv6Addr>) -> Result<(), ConfigError> {
    if *raw == Json::Null {
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
