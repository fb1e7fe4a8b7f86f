//! The plugin's network config (flannel's `NetConf`) and the delegate config it saved
//! (`types.NetConf`), decoded the way Go's `json.Unmarshal` decodes those structs: keys match
//! case-insensitively, `null` leaves a field alone (and empties a map), a repeated map key
//! adds to the map, and a value of the wrong type is an error naming the field.

use std::collections::BTreeMap;

use super::spec::decode_string;
use crate::gojson::{self, Json, Value};

pub const DEFAULT_SUBNET_FILE: &str = "/run/flannel/subnet.env";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/flannel";

pub type Map = BTreeMap<String, Value>;

/// `{"cniVersion", "name", "type", "subnetFile", "dataDir", "delegate", "ipam", "runtimeConfig", ...}`.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    pub plugin_type: String,
    pub subnet_file: String,
    pub data_dir: String,
    pub ipam: Option<Map>,
    pub delegate: Option<Map>,
    pub runtime_config: Option<Map>,
}

/// `loadFlannelNetConf`: defaults for subnetFile and dataDir, then the document.
pub fn load(bytes: &[u8]) -> Result<NetConf, String> {
    decode(bytes).map_err(|e| format!("failed to load netconf: {e}"))
}

fn decode(bytes: &[u8]) -> Result<NetConf, String> {
    let mut conf = NetConf {
        cni_version: String::new(),
        name: String::new(),
        plugin_type: String::new(),
        subnet_file: DEFAULT_SUBNET_FILE.to_string(),
        data_dir: DEFAULT_DATA_DIR.to_string(),
        ipam: None,
        delegate: None,
        runtime_config: None,
    };
    let entries = match gojson::parse(bytes)? {
        Json::Null => return Ok(conf),
        Json::Object(entries) => entries,
        other => return Err(format!("json: cannot unmarshal {} into Go value of type main.NetConf", other.kind())),
    };
    let mut first_error = None;
    for (key, value) in &entries {
        let is = |field: &str| gojson::key_matches(key, field);
        let field = |name: &str| format!("NetConf.{name}");
        let result = if is("subnetFile") {
            decode_string(value, &field("subnetFile"), &mut conf.subnet_file)
        } else if is("dataDir") {
            decode_string(value, &field("dataDir"), &mut conf.data_dir)
        } else if is("ipam") {
            // flannel's own map field hides types.NetConf's IPAM struct.
            decode_map(value, &field("ipam"), &mut conf.ipam)
        } else if is("delegate") {
            decode_map(value, &field("delegate"), &mut conf.delegate)
        } else if is("runtimeConfig") {
            decode_map(value, &field("runtimeConfig"), &mut conf.runtime_config)
        } else {
            let mut common =
                Common { cni_version: &mut conf.cni_version, name: &mut conf.name, plugin_type: &mut conf.plugin_type };
            common.decode(key, value, "NetConf").unwrap_or(Ok(()))
        };
        if let Err(e) = result {
            first_error.get_or_insert(e);
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(conf),
    }
}

/// The fields of a saved delegate config that DEL and CHECK need (`types.NetConf`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PluginConf {
    pub cni_version: String,
    pub name: String,
    pub plugin_type: String,
}

/// `json.Unmarshal(bytes, &types.NetConf{})`, with every field's type checked.
pub fn parse_plugin_conf(bytes: &[u8]) -> Result<PluginConf, String> {
    let mut conf = PluginConf::default();
    let entries = match gojson::parse(bytes)? {
        Json::Null => return Ok(conf),
        Json::Object(entries) => entries,
        other => return Err(format!("json: cannot unmarshal {} into Go value of type types.PluginConf", other.kind())),
    };
    let mut first_error = None;
    for (key, value) in &entries {
        let result = if gojson::key_matches(key, "ipam") {
            decode_ipam_struct(value)
        } else {
            let mut common =
                Common { cni_version: &mut conf.cni_version, name: &mut conf.name, plugin_type: &mut conf.plugin_type };
            common.decode(key, value, "PluginConf").unwrap_or(Ok(()))
        };
        if let Err(e) = result {
            first_error.get_or_insert(e);
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(conf),
    }
}

/// The fields of `types.NetConf` (besides ipam) that both structs have.
struct Common<'a> {
    cni_version: &'a mut String,
    name: &'a mut String,
    plugin_type: &'a mut String,
}

impl Common<'_> {
    /// Decodes `key` if it names one of these fields (None: not one of them, ignored).
    fn decode(&mut self, key: &str, value: &Json, owner: &str) -> Option<Result<(), String>> {
        let is = |field: &str| gojson::key_matches(key, field);
        let field = |name: &str| format!("{owner}.{name}");
        Some(if is("cniVersion") {
            decode_string(value, &field("cniVersion"), self.cni_version)
        } else if is("name") {
            decode_string(value, &field("name"), self.name)
        } else if is("type") {
            decode_string(value, &field("type"), self.plugin_type)
        } else if is("capabilities") {
            check_map_of(value, &field("capabilities"), "map[string]bool", |v| match v {
                Json::Null | Json::Bool(_) => Ok(()),
                other => Err(type_error(other, &field("capabilities"), "bool")),
            })
        } else if is("dns") {
            check_dns(value)
        } else if is("prevResult") {
            check_map_of(value, &field("prevResult"), "map[string]interface {}", |_| Ok(()))
        } else if is("cni.dev/valid-attachments") {
            check_attachments(value)
        } else {
            return None;
        })
    }
}

fn type_error(value: &Json, field: &str, go_type: &str) -> String {
    format!("json: cannot unmarshal {} into Go struct field {field} of type {go_type}", value.kind())
}

/// A `map[string]interface{}` field: `null` empties it, an object adds its keys.
fn decode_map(value: &Json, field: &str, slot: &mut Option<Map>) -> Result<(), String> {
    match value {
        Json::Null => {
            *slot = None;
            Ok(())
        }
        Json::Object(entries) => {
            let map = slot.get_or_insert_with(Map::new);
            for (k, v) in entries {
                map.insert(k.clone(), v.clone().into_value());
            }
            Ok(())
        }
        other => Err(type_error(other, field, "map[string]interface {}")),
    }
}

fn check_map_of(
    value: &Json,
    field: &str,
    go_type: &str,
    check: impl Fn(&Json) -> Result<(), String>,
) -> Result<(), String> {
    match value {
        Json::Null => Ok(()),
        Json::Object(entries) => entries.iter().try_for_each(|(_, v)| check(v)),
        other => Err(type_error(other, field, go_type)),
    }
}

/// The check of one struct field's value.
type FieldCheck<'a> = (&'a str, &'a dyn Fn(&Json) -> Result<(), String>);

/// Checks the fields of a struct: `fields` maps a JSON name to its check.
fn check_struct(value: &Json, field: &str, go_type: &str, fields: &[FieldCheck]) -> Result<(), String> {
    match value {
        Json::Null => Ok(()),
        Json::Object(entries) => {
            for (key, v) in entries {
                if let Some((_, check)) = fields.iter().find(|(name, _)| gojson::key_matches(key, name)) {
                    check(v)?;
                }
            }
            Ok(())
        }
        other => Err(type_error(other, field, go_type)),
    }
}

fn check_string(value: &Json, field: &str) -> Result<(), String> {
    decode_string(value, field, &mut String::new())
}

fn check_strings(value: &Json, field: &str) -> Result<(), String> {
    match value {
        Json::Null => Ok(()),
        Json::Array(items) => items.iter().try_for_each(|item| check_string(item, field)),
        other => Err(type_error(other, field, "[]string")),
    }
}

fn check_dns(value: &Json) -> Result<(), String> {
    check_struct(
        value,
        "NetConf.dns",
        "types.DNS",
        &[
            ("nameservers", &|v| check_strings(v, "DNS.dns.nameservers")),
            ("domain", &|v| check_string(v, "DNS.dns.domain")),
            ("search", &|v| check_strings(v, "DNS.dns.search")),
            ("options", &|v| check_strings(v, "DNS.dns.options")),
        ],
    )
}

fn check_attachments(value: &Json) -> Result<(), String> {
    const FIELD: &str = "NetConf.cni.dev/valid-attachments";
    match value {
        Json::Null => Ok(()),
        Json::Array(items) => items.iter().try_for_each(|item| {
            check_struct(
                item,
                FIELD,
                "types.GCAttachment",
                &[
                    ("containerID", &|v| check_string(v, "GCAttachment.cni.dev/valid-attachments.containerID")),
                    ("ifname", &|v| check_string(v, "GCAttachment.cni.dev/valid-attachments.ifname")),
                ],
            )
        }),
        other => Err(type_error(other, FIELD, "[]types.GCAttachment")),
    }
}

/// `types.IPAM`: `{"type": string}`.
fn decode_ipam_struct(value: &Json) -> Result<(), String> {
    check_struct(value, "PluginConf.ipam", "types.IPAM", &[("type", &|v| check_string(v, "IPAM.ipam.type"))])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let conf = load(br#"{"name": "cni-flannel", "type": "flannel"}"#).unwrap();
        assert_eq!(conf.name, "cni-flannel");
        assert_eq!(conf.plugin_type, "flannel");
        assert_eq!(conf.subnet_file, DEFAULT_SUBNET_FILE);
        assert_eq!(conf.data_dir, DEFAULT_DATA_DIR);
        assert_eq!(conf.delegate, None);
        assert_eq!(conf.ipam, None);
    }

    #[test]
    fn fields_match_like_go() {
        let conf = load(
            br#"{"Name": "n", "SUBNETFILE": "/a", "dataDir": "/b", "dataDir": null, "CniVersion": "0.3.1",
                 "delegate": {"hairpinMode": true}, "Delegate": {"isDefaultGateway": true},
                 "ipam": {"type": "host-local"}, "runtimeConfig": {"portMappings": []}}"#,
        )
        .unwrap();
        assert_eq!(conf.name, "n");
        assert_eq!(conf.cni_version, "0.3.1");
        assert_eq!(conf.subnet_file, "/a");
        assert_eq!(conf.data_dir, "/b");
        let delegate = conf.delegate.unwrap();
        assert_eq!(delegate.get("hairpinMode"), Some(&Value::Bool(true)));
        assert_eq!(delegate.get("isDefaultGateway"), Some(&Value::Bool(true)));
        assert_eq!(conf.ipam.unwrap().get("type"), Some(&Value::Str("host-local".into())));
        assert!(conf.runtime_config.is_some());
        assert_eq!(load(br#"{"name":"n","delegate":{"a":1},"delegate":null}"#).unwrap().delegate, None);
    }

    #[test]
    fn wrong_types_are_errors() {
        for (doc, msg) in [
            (
                r#"{"name":"n","subnetFile":1}"#,
                "failed to load netconf: json: cannot unmarshal number into Go struct field NetConf.subnetFile of type string",
            ),
            (
                r#"{"name":"n","delegate":"bridge"}"#,
                "failed to load netconf: json: cannot unmarshal string into Go struct field NetConf.delegate of type map[string]interface {}",
            ),
            (
                r#"{"name":"n","capabilities":{"portMappings":"yes"}}"#,
                "failed to load netconf: json: cannot unmarshal string into Go struct field NetConf.capabilities of type bool",
            ),
            (
                r#"{"name":"n","dns":{"nameservers":"1.1.1.1"}}"#,
                "failed to load netconf: json: cannot unmarshal string into Go struct field DNS.dns.nameservers of type []string",
            ),
            ("[]", "failed to load netconf: json: cannot unmarshal array into Go value of type main.NetConf"),
        ] {
            assert_eq!(load(doc.as_bytes()).unwrap_err(), msg, "{doc}");
        }
    }

    #[test]
    fn saved_delegate_config() {
        let conf = parse_plugin_conf(
            br#"{"cniVersion":"0.3.1","ipam":{"type":"host-local","ranges":[]},"name":"cbr0","type":"bridge"}"#,
        )
        .unwrap();
        assert_eq!(conf, PluginConf { cni_version: "0.3.1".into(), name: "cbr0".into(), plugin_type: "bridge".into() });
        assert!(parse_plugin_conf(br#"{"type":"bridge","ipam":{"type":1}}"#).is_err());
        assert!(parse_plugin_conf(b"not json").is_err());
    }
}
