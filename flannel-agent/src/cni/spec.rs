//! The CNI protocol as the Go plugin's library (containernetworking/cni v1.3.0, `pkg/skel`,
//! `pkg/version`, `pkg/utils`) implements it: the `CNI_*` environment variables and their
//! validation, the checks on the network config every command makes, spec versions, and the
//! JSON printed on stdout for errors and for VERSION.

use std::fmt;

use crate::gojson::{self, Json, Value};

/// The CNI spec version this plugin's library implements (reported by VERSION).
pub const CURRENT_VERSION: &str = "1.1.0";

/// The spec versions the plugin accepts in a network config (`version.All`).
pub const SUPPORTED_VERSIONS: &[&str] = &["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// Well-known error codes of the CNI spec.
pub mod code {
    pub const INCOMPATIBLE_CNI_VERSION: u64 = 1;
    pub const UNKNOWN_CONTAINER: u64 = 3;
    pub const INVALID_ENVIRONMENT_VARIABLES: u64 = 4;
    pub const IO_FAILURE: u64 = 5;
    pub const DECODING_FAILURE: u64 = 6;
    pub const INVALID_NETWORK_CONFIG: u64 = 7;
    pub const INVALID_NETNS: u64 = 8;
    pub const INTERNAL: u64 = 999;
}

/// A CNI error (`types.Error`): printed on stdout as JSON, with a non-zero exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u64,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u64, msg: impl Into<String>, details: impl Into<String>) -> CniError {
        CniError { code, msg: msg.into(), details: details.into() }
    }

    /// The error JSON: `{"cniVersion", "code", "msg", "details"}` indented like the Go
    /// library's `Print` (details left out when empty). `cni_version` is the config's version.
    pub fn to_json(&self, cni_version: &str) -> String {
        let mut fields = vec![
            ("cniVersion", Value::Str(cni_version.to_string())),
            ("code", Value::Int(i64::try_from(self.code).unwrap_or(i64::MAX))),
            ("msg", Value::Str(self.msg.clone())),
        ];
        if !self.details.is_empty() {
            fields.push(("details", Value::Str(self.details.clone())));
        }
        gojson::marshal_indent(&Value::Struct(fields), "    ")
    }
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.details.is_empty() {
            f.write_str(&self.msg)
        } else {
            write!(f, "{}; {}", self.msg, self.details)
        }
    }
}

/// What a command failed with: a CNI error from a delegate plugin (passed on unchanged, as
/// the Go plugin unwraps it with `errors.As`) or a plain message (reported with code 999).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    Cni(CniError),
    Plain(String),
}

impl Failure {
    /// `fmt.Errorf("<prefix>: %w", err)`: only a plain message shows the prefix.
    pub fn context(self, prefix: &str) -> Failure {
        match self {
            Failure::Cni(e) => Failure::Cni(e),
            Failure::Plain(msg) => Failure::Plain(format!("{prefix}: {msg}")),
        }
    }

    pub fn into_cni(self) -> CniError {
        match self {
            Failure::Cni(e) => e,
            Failure::Plain(msg) => CniError::new(code::INTERNAL, msg, ""),
        }
    }
}

impl From<String> for Failure {
    fn from(msg: String) -> Failure {
        Failure::Plain(msg)
    }
}

impl From<CniError> for Failure {
    fn from(e: CniError) -> Failure {
        Failure::Cni(e)
    }
}

/// The VERSION output (`pluginInfo.Encode`: compact JSON and a newline).
pub fn version_json() -> String {
    let versions = SUPPORTED_VERSIONS.iter().map(|v| Value::Str((*v).to_string())).collect();
    let info = Value::Struct(vec![
        ("cniVersion", Value::Str(CURRENT_VERSION.into())),
        ("supportedVersions", Value::Array(versions)),
    ]);
    format!("{}\n", gojson::marshal(&info))
}

/// The command and the arguments the runtime passed in the environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CmdArgs {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub args: String,
    pub path: String,
    pub netns_override: String,
}

/// Reads the `CNI_*` variables in skel's order: a present value that the command requires is
/// validated on the spot (the first invalid one is the error), then all missing required ones
/// are reported together. An unset and an empty variable are the same, as with Go's Getenv.
pub fn args_from_env(getenv: impl Fn(&str) -> String) -> Result<CmdArgs, CniError> {
    type Validate = fn(&str) -> Result<(), CniError>;
    let command = getenv("CNI_COMMAND");
    let required = |var: &str| -> bool {
        let cmd = command.as_str();
        match var {
            "CNI_COMMAND" => true,
            "CNI_CONTAINERID" | "CNI_IFNAME" => matches!(cmd, "ADD" | "CHECK" | "DEL"),
            "CNI_NETNS" => matches!(cmd, "ADD" | "CHECK"),
            "CNI_PATH" => matches!(cmd, "ADD" | "CHECK" | "DEL" | "GC" | "STATUS"),
            _ => false,
        }
    };
    let vars: [(&str, Option<Validate>); 7] = [
        ("CNI_COMMAND", None),
        ("CNI_CONTAINERID", Some(validate_container_id)),
        ("CNI_NETNS", None),
        ("CNI_IFNAME", Some(validate_interface_name)),
        ("CNI_ARGS", None),
        ("CNI_PATH", None),
        ("CNI_NETNS_OVERRIDE", None),
    ];
    let mut values = Vec::with_capacity(vars.len());
    let mut missing = Vec::new();
    for (name, validate) in vars {
        let value = getenv(name);
        if value.is_empty() {
            if required(name) {
                missing.push(name);
            }
        } else if let (true, Some(validate)) = (required(name), validate) {
            validate(&value)?;
        }
        values.push(value);
    }
    if !missing.is_empty() {
        return Err(CniError::new(
            code::INVALID_ENVIRONMENT_VARIABLES,
            format!("required env variables [{}] missing", missing.join(",")),
            "",
        ));
    }
    let mut values = values.into_iter();
    let mut next = || values.next().unwrap_or_default();
    Ok(CmdArgs {
        command: next(),
        container_id: next(),
        netns: next(),
        ifname: next(),
        args: next(),
        path: next(),
        netns_override: next(),
    })
}

/// `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`, the rule for container IDs and network names.
fn valid_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphanumeric())
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

pub fn validate_container_id(id: &str) -> Result<(), CniError> {
    if id.is_empty() {
        return Err(CniError::new(code::UNKNOWN_CONTAINER, "missing containerID", ""));
    }
    if !valid_name(id) {
        return Err(CniError::new(code::INVALID_ENVIRONMENT_VARIABLES, "invalid characters in containerID", id));
    }
    Ok(())
}

pub fn validate_network_name(name: &str) -> Result<(), CniError> {
    if name.is_empty() {
        return Err(CniError::new(code::INVALID_NETWORK_CONFIG, "missing network name:", ""));
    }
    if !valid_name(name) {
        return Err(CniError::new(code::INVALID_NETWORK_CONFIG, "invalid characters found in network name", name));
    }
    Ok(())
}

/// The kernel's rules for interface names (dev_valid_name).
pub fn validate_interface_name(name: &str) -> Result<(), CniError> {
    let invalid = |msg: &str, details: &str| Err(CniError::new(code::INVALID_ENVIRONMENT_VARIABLES, msg, details));
    if name.is_empty() {
        return invalid("interface name is empty", "");
    }
    if name.len() > 15 {
        return invalid("interface name is too long", "interface name should be less than 16 characters");
    }
    if name == "." || name == ".." {
        return invalid("interface name is . or ..", "");
    }
    if name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace()) {
        return invalid("interface name contains / or : or whitespace characters", "");
    }
    Ok(())
}

/// A Go `string` field of a struct being decoded: `null` leaves it alone, anything else but
/// a string is Go's type error.
pub fn decode_string(value: &Json, field: &str, slot: &mut String) -> Result<(), String> {
    gojson::decode_string(value, slot)
        .map_err(|e| format!("json: cannot unmarshal {e} into Go struct field {field} of type string"))
}

/// Reads one string field (matched like Go matches struct fields) out of a document that
/// must be an object: the anonymous structs skel and the version decoder use.
fn string_field(doc: &Json, field: &str, go_type: &str) -> Result<String, String> {
    let mut out = String::new();
    match doc {
        Json::Null => {}
        Json::Object(entries) => {
            let mut first_error = None;
            for (_, value) in entries.iter().filter(|(key, _)| gojson::key_matches(key, field)) {
                if let Err(e) = decode_string(value, &format!(".{field}"), &mut out) {
                    first_error.get_or_insert(e);
                }
            }
            if let Some(e) = first_error {
                return Err(e);
            }
        }
        other => return Err(format!("json: cannot unmarshal {} into Go value of type {go_type}", other.kind())),
    }
    Ok(out)
}

/// skel's validateConfig: the config must decode and carry a valid network name.
pub fn validate_config(stdin: &[u8]) -> Result<(), CniError> {
    let decoding =
        |e: String| CniError::new(code::DECODING_FAILURE, format!("error unmarshall network config: {e}"), "");
    let doc = gojson::parse(stdin).map_err(decoding)?;
    let name = string_field(&doc, "name", "struct { Name string \"json:\\\"name\\\"\" }").map_err(decoding)?;
    if name.is_empty() {
        return Err(CniError::new(code::INVALID_NETWORK_CONFIG, "missing network name", ""));
    }
    validate_network_name(&name)
}

/// The config's `cniVersion` (`create.DecodeVersion`): an absent or empty one means 0.1.0.
pub fn decode_version(stdin: &[u8]) -> Result<String, String> {
    let doc = gojson::parse(stdin).map_err(|e| format!("decoding version from network config: {e}"))?;
    let version = string_field(&doc, "cniVersion", "struct { CNIVersion string \"json:\\\"cniVersion\\\"\" }")
        .map_err(|e| format!("decoding version from network config: {e}"))?;
    Ok(if version.is_empty() { "0.1.0".to_string() } else { version })
}

/// The version check every command makes before running (`checkVersionAndCall`).
pub fn check_version(stdin: &[u8]) -> Result<String, CniError> {
    let version = decode_version(stdin).map_err(|e| CniError::new(code::DECODING_FAILURE, e, ""))?;
    if !SUPPORTED_VERSIONS.contains(&version.as_str()) {
        return Err(CniError::new(
            code::INCOMPATIBLE_CNI_VERSION,
            "incompatible CNI versions",
            format!(
                "config is {}, plugin supports [{}]",
                gojson::go_quote(&version),
                SUPPORTED_VERSIONS.iter().map(|v| gojson::go_quote(v)).collect::<Vec<_>>().join(" ")
            ),
        ));
    }
    Ok(version)
}

/// CHECK, GC and STATUS first make sure the config's version is at least `minimum` and no
/// newer than the newest supported one, then do the usual version check.
pub fn check_version_at_least(stdin: &[u8], minimum: &str, verb: &str) -> Result<String, CniError> {
    let decoding = |e: String| CniError::new(code::DECODING_FAILURE, e, "");
    let version = decode_version(stdin).map_err(decoding)?;
    if !greater_or_equal(&version, minimum).map_err(decoding)? {
        return Err(CniError::new(code::INCOMPATIBLE_CNI_VERSION, format!("config version does not allow {verb}"), ""));
    }
    for supported in SUPPORTED_VERSIONS {
        if greater_or_equal(supported, &version).map_err(decoding)? {
            return check_version(stdin);
        }
    }
    Err(CniError::new(code::INCOMPATIBLE_CNI_VERSION, format!("plugin version does not allow {verb}"), ""))
}

/// `version.ParseVersion`: up to three dot-separated parts, each a Go `strconv.Atoi`.
pub fn parse_version(version: &str) -> Result<(i64, i64, i64), String> {
    if version.is_empty() {
        return Ok((0, 1, 0));
    }
    let parts: Vec<&str> = version.split('.').collect();
    if parts.len() >= 4 {
        return Err(format!("invalid version {}: too many parts", gojson::go_quote(version)));
    }
    let mut numbers = [0i64; 3];
    for (i, (part, name)) in parts.iter().zip(["major", "minor", "micro"]).enumerate() {
        numbers[i] =
            atoi(part).map_err(|e| format!("failed to convert {name} version part {}: {e}", gojson::go_quote(part)))?;
    }
    Ok((numbers[0], numbers[1], numbers[2]))
}

/// Go's `strconv.Atoi` (base 10, optional sign, 64-bit).
fn atoi(s: &str) -> Result<i64, String> {
    let digits = s.strip_prefix(['+', '-']).unwrap_or(s);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("strconv.Atoi: parsing {}: invalid syntax", gojson::go_quote(s)));
    }
    let unsigned = s.strip_prefix('+').unwrap_or(s);
    unsigned.parse::<i64>().map_err(|_| format!("strconv.Atoi: parsing {}: value out of range", gojson::go_quote(s)))
}

/// `version.GreaterThanOrEqualTo`.
pub fn greater_or_equal(version: &str, other: &str) -> Result<bool, String> {
    Ok(parse_version(version)? >= parse_version(other)?)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> String {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned().unwrap_or_default()
    }

    #[test]
    fn version_output() {
        assert_eq!(
            version_json(),
            "{\"cniVersion\":\"1.1.0\",\"supportedVersions\":[\"0.1.0\",\"0.2.0\",\"0.3.0\",\"0.3.1\",\"0.4.0\",\"1.0.0\",\"1.1.0\"]}\n"
        );
    }

    #[test]
    fn error_json_format() {
        let e = CniError::new(7, "invalid <config>", "");
        assert_eq!(
            e.to_json("0.3.1"),
            "{\n    \"cniVersion\": \"0.3.1\",\n    \"code\": 7,\n    \"msg\": \"invalid \\u003cconfig\\u003e\"\n}"
        );
        let e = CniError::new(4, "invalid characters in containerID", "a/b");
        let v: serde_json::Value = serde_json::from_str(&e.to_json("1.0.0")).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"cniVersion": "1.0.0", "code": 4, "msg": "invalid characters in containerID", "details": "a/b"})
        );
    }

    #[test]
    fn missing_env_variables_are_listed_together() {
        let e = args_from_env(env(&[("CNI_COMMAND", "ADD"), ("CNI_IFNAME", "eth0")])).unwrap_err();
        assert_eq!(e, CniError::new(4, "required env variables [CNI_CONTAINERID,CNI_NETNS,CNI_PATH] missing", ""));
        // DEL does not need a netns.
        let e = args_from_env(env(&[("CNI_COMMAND", "DEL")])).unwrap_err();
        assert_eq!(e.msg, "required env variables [CNI_CONTAINERID,CNI_IFNAME,CNI_PATH] missing");
        let e = args_from_env(env(&[])).unwrap_err();
        assert_eq!(e.msg, "required env variables [CNI_COMMAND] missing");
        // VERSION needs nothing else.
        assert_eq!(args_from_env(env(&[("CNI_COMMAND", "VERSION")])).unwrap().command, "VERSION");
    }

    #[test]
    fn invalid_values_are_reported_before_missing_ones() {
        let e = args_from_env(env(&[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "a/b")])).unwrap_err();
        assert_eq!(e, CniError::new(4, "invalid characters in containerID", "a/b"));
        let e = args_from_env(env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "averylonginterface"),
        ]))
        .unwrap_err();
        assert_eq!(
            e,
            CniError::new(4, "interface name is too long", "interface name should be less than 16 characters")
        );
        for bad in ["eth 0", "a/b", "a:b", ".", ".."] {
            assert!(validate_interface_name(bad).is_err(), "{bad}");
        }
        // Not validated when the command does not need it.
        assert!(args_from_env(env(&[("CNI_COMMAND", "VERSION"), ("CNI_CONTAINERID", "a/b")])).is_ok());
    }

    #[test]
    fn config_checks() {
        assert_eq!(
            validate_config(br#"{"cniVersion":"0.3.1"}"#).unwrap_err(),
            CniError::new(7, "missing network name", "")
        );
        assert_eq!(validate_config(br#"{"NAME":"cbr0"}"#), Ok(()));
        assert_eq!(
            validate_config(br#"{"name":"cbr 0"}"#).unwrap_err(),
            CniError::new(7, "invalid characters found in network name", "cbr 0")
        );
        let e = validate_config(br#"{"name":1}"#).unwrap_err();
        assert_eq!(e.code, 6);
        assert!(e.msg.contains("cannot unmarshal number"), "{}", e.msg);
        assert_eq!(
            validate_config(b"").unwrap_err().msg,
            "error unmarshall network config: unexpected end of JSON input"
        );
    }

    #[test]
    fn versions() {
        assert_eq!(decode_version(br#"{"name":"x"}"#).unwrap(), "0.1.0");
        assert_eq!(check_version(br#"{"cniVersion":"0.3.1"}"#).unwrap(), "0.3.1");
        let e = check_version(br#"{"cniVersion":"0.3.2"}"#).unwrap_err();
        assert_eq!(e.code, 1);
        assert_eq!(
            e.details,
            r#"config is "0.3.2", plugin supports ["0.1.0" "0.2.0" "0.3.0" "0.3.1" "0.4.0" "1.0.0" "1.1.0"]"#
        );
        assert_eq!(
            check_version_at_least(br#"{"cniVersion":"0.3.1"}"#, "0.4.0", "CHECK").unwrap_err(),
            CniError::new(1, "config version does not allow CHECK", "")
        );
        assert_eq!(
            check_version_at_least(br#"{"cniVersion":"2.0.0"}"#, "0.4.0", "CHECK").unwrap_err(),
            CniError::new(1, "plugin version does not allow CHECK", "")
        );
        assert_eq!(check_version_at_least(br#"{"cniVersion":"1.0.0"}"#, "0.4.0", "CHECK").unwrap(), "1.0.0");
        assert_eq!(check_version_at_least(br#"{"cniVersion":"1.0.0"}"#, "1.1.0", "GC").unwrap_err().code, 1);
        assert_eq!(
            parse_version("1.x").unwrap_err(),
            r#"failed to convert minor version part "x": strconv.Atoi: parsing "x": invalid syntax"#
        );
        assert_eq!(parse_version("+1.02").unwrap(), (1, 2, 0));
        assert!(parse_version("1.2.3.4").is_err());
    }
}
