//! Lease values: flannel's `LeaseAttrs` JSON, byte-compatible in what we write and as
//! lenient as Go's decoder in what we read (field names match case-insensitively, unknown
//! fields are ignored).

use std::{
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
};

use ipnet::{Ipv4Net, Ipv6Net};
use serde_json::{Map, Value};
use thiserror::Error;

/// One node's lease: the key's subnet(s), the value's attributes and the etcd lease that
/// expires it (`None` for a reservation: a key written without a TTL).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub subnet: Ipv4Net,
    pub ipv6_subnet: Option<Ipv6Net>,
    pub attrs: LeaseAttrs,
    pub etcd_lease: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseAttrs {
    pub public_ip: Ipv4Addr,
    pub public_ipv6: Option<Ipv6Addr>,
    /// "vxlan", "host-gw", …; empty for udp leases (flannel's udp backend writes none).
    pub backend_type: String,
    pub backend_data: BackendData,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendData {
    /// No BackendData field (host-gw, udp).
    None,
    Vxlan(VxlanBackendData),
    /// Another backend's data, kept verbatim.
    Other(Value),
}

/// flannel's `vxlanLeaseAttrs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VxlanBackendData {
    pub vni: u32,
    pub vtep_mac: Mac,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for Mac {
    type Err = ();
    /// Accepts `aa:bb:cc:dd:ee:ff` or `aa-bb-…` (Go's net.ParseMAC for 48-bit addresses).
    fn from_str(s: &str) -> Result<Mac, ()> {
        let parts: Vec<&str> = s.split([':', '-']).collect();
        if parts.len() != 6 {
            return Err(());
        }
        let mut mac = [0u8; 6];
        for (byte, part) in mac.iter_mut().zip(parts) {
            if part.len() != 2 {
                return Err(());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| ())?;
        }
        Ok(Mac(mac))
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum LeaseValueError {
    #[error("lease value is not a JSON object: {0}")]
    NotAnObject(String),
    #[error("lease value has no PublicIP")]
    MissingPublicIp,
    #[error("lease field {field} has invalid value {value}")]
    BadField { field: &'static str, value: String },
}

impl LeaseAttrs {
    /// The JSON flannel's Go code writes for these attributes, field for field:
    /// `{"PublicIP":"…","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"…"}}`.
    /// PublicIPv6 is always present; BackendType and BackendData only when set.
    pub fn to_json(&self) -> String {
        let mut out = String::with_capacity(128);
        out.push_str("{\"PublicIP\":\"");
        out.push_str(&self.public_ip.to_string());
        out.push_str("\",\"PublicIPv6\":");
        match self.public_ipv6 {
            Some(v6) => {
                out.push('"');
                out.push_str(&v6.to_string());
                out.push('"');
            }
            None => out.push_str("null"),
        }
        if !self.backend_type.is_empty() {
            out.push_str(",\"BackendType\":");
            out.push_str(&Value::String(self.backend_type.clone()).to_string());
        }
        match &self.backend_data {
            BackendData::None => {}
            BackendData::Vxlan(v) => {
                out.push_str(&format!(",\"BackendData\":{{\"VNI\":{},\"VtepMAC\":\"{}\"}}", v.vni, v.vtep_mac));
            }
            BackendData::Other(value) => {
                out.push_str(",\"BackendData\":");
                out.push_str(&value.to_string());
            }
        }
        out.push('}');
        out
    }

    /// Parses a lease value as flannel's Go decoder would.
    pub fn from_json(text: &str) -> Result<LeaseAttrs, LeaseValueError> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| LeaseValueError::NotAnObject(format!("{e}: {}", truncate(text))))?;
        let Value::Object(map) = value else {
            return Err(LeaseValueError::NotAnObject(truncate(text)));
        };
        let public_ip = match field(&map, "PublicIP") {
            None | Some(Value::Null) => return Err(LeaseValueError::MissingPublicIp),
            Some(v) => parse_string_field(v, "PublicIP")?,
        };
        let public_ipv6 = match field(&map, "PublicIPv6") {
            None | Some(Value::Null) => None,
            Some(v) => Some(parse_string_field(v, "PublicIPv6")?),
        };
        let backend_type = match field(&map, "BackendType") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => return Err(bad("BackendType", other)),
        };
        let backend_data = match field(&map, "BackendData") {
            None | Some(Value::Null) => BackendData::None,
            Some(data) if backend_type == "vxlan" => BackendData::Vxlan(parse_vxlan(data)?),
            Some(data) => BackendData::Other(data.clone()),
        };
        Ok(LeaseAttrs { public_ip, public_ipv6, backend_type, backend_data })
    }

    pub fn vxlan(&self) -> Option<&VxlanBackendData> {
        match &self.backend_data {
            BackendData::Vxlan(v) => Some(v),
            _ => None,
        }
    }
}

fn parse_vxlan(data: &Value) -> Result<VxlanBackendData, LeaseValueError> {
    let Value::Object(map) = data else { return Err(bad("BackendData", data)) };
    let vni = match field(map, "VNI") {
        None | Some(Value::Null) => 0,
        // Go decodes VNI into a uint16.
        Some(v) => v.as_u64().filter(|n| *n <= u64::from(u16::MAX)).ok_or_else(|| bad("BackendData.VNI", v))? as u32,
    };
    let vtep_mac = match field(map, "VtepMAC") {
        Some(v @ Value::String(s)) => s.parse().map_err(|_| bad("BackendData.VtepMAC", v))?,
        Some(v) => return Err(bad("BackendData.VtepMAC", v)),
        None => return Err(LeaseValueError::BadField { field: "BackendData.VtepMAC", value: "(missing)".into() }),
    };
    Ok(VxlanBackendData { vni, vtep_mac })
}

/// Go's encoding/json: an exact key match wins, else the first case-insensitive match.
fn field<'a>(map: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    map.get(name).or_else(|| map.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v))
}

fn parse_string_field<T: std::str::FromStr>(value: &Value, name: &'static str) -> Result<T, LeaseValueError> {
    value.as_str().and_then(|s| s.parse().ok()).ok_or_else(|| bad(name, value))
}

fn bad(field: &'static str, value: &Value) -> LeaseValueError {
    LeaseValueError::BadField { field, value: truncate(&value.to_string()) }
}

fn truncate(text: &str) -> String {
    const MAX: usize = 200;
    match text.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLANNEL_VXLAN: &str = r#"{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}"#;

    fn vxlan_attrs() -> LeaseAttrs {
        LeaseAttrs {
            public_ip: Ipv4Addr::new(192, 168, 64, 3),
            public_ipv6: None,
            backend_type: "vxlan".into(),
            backend_data: BackendData::Vxlan(VxlanBackendData {
                vni: 1,
                vtep_mac: "c6:d2:32:6f:8f:44".parse().unwrap(),
            }),
        }
    }

    #[test]
    fn vxlan_lease_is_byte_identical_to_flannels() {
        // flannel pkg/lease LeaseAttrs + pkg/backend/vxlan vxlanLeaseAttrs, as json.Marshal writes them.
        assert_eq!(vxlan_attrs().to_json(), FLANNEL_VXLAN);
        assert_eq!(LeaseAttrs::from_json(FLANNEL_VXLAN).unwrap(), vxlan_attrs());
    }

    #[test]
    fn host_gw_and_udp_leases_omit_empty_fields() {
        let mut attrs = vxlan_attrs();
        attrs.backend_type = "host-gw".into();
        attrs.backend_data = BackendData::None;
        assert_eq!(attrs.to_json(), r#"{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"host-gw"}"#);
        attrs.backend_type.clear();
        assert_eq!(attrs.to_json(), r#"{"PublicIP":"192.168.64.3","PublicIPv6":null}"#);
        assert_eq!(LeaseAttrs::from_json(&attrs.to_json()).unwrap(), attrs);
    }

    #[test]
    fn reads_like_gos_decoder() {
        let lenient = r#"{"publicip":"10.0.0.7","BACKENDTYPE":"vxlan","backenddata":{"vni":4,"vtepmac":"02:00:00:00:00:07"},"Extra":true}"#;
        let attrs = LeaseAttrs::from_json(lenient).unwrap();
        assert_eq!(attrs.public_ip, Ipv4Addr::new(10, 0, 0, 7));
        assert_eq!(attrs.vxlan().unwrap().vni, 4);
        let dual = r#"{"PublicIP":"10.0.0.7","PublicIPv6":"fc00::7","BackendType":"wireguard","BackendData":{"PublicKey":"abc=","Port":51820}}"#;
        let attrs = LeaseAttrs::from_json(dual).unwrap();
        assert_eq!(attrs.public_ipv6, Some("fc00::7".parse().unwrap()));
        // Other backends' data is kept (as data: its key order is not preserved).
        assert_eq!(LeaseAttrs::from_json(&attrs.to_json()).unwrap(), attrs);
    }

    #[test]
    fn malformed_values_name_the_field() {
        for (text, needle) in [
            ("not json", "not a JSON object"),
            ("[1]", "not a JSON object"),
            ("{}", "PublicIP"),
            (r#"{"PublicIP":"10.0.0.300"}"#, "PublicIP"),
            (r#"{"PublicIP":"10.0.0.1","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"zz"}}"#, "VtepMAC"),
            (
                r#"{"PublicIP":"10.0.0.1","BackendType":"vxlan","BackendData":{"VNI":70000,"VtepMAC":"02:00:00:00:00:01"}}"#,
                "VNI",
            ),
        ] {
            let error = LeaseAttrs::from_json(text).unwrap_err().to_string();
            assert!(error.contains(needle), "{text}: {error}");
        }
    }
}
