//! The delegate plugin's config, built from the plugin's config and subnet.env exactly as the
//! Go plugin builds it (`cmdAdd`, `doCmdAdd`, `getDelegateIPAM`), and the copy of it saved
//! under dataDir for DEL.
//!
//! ```text
//! delegate = config.delegate (no "name"/"ipam" allowed, "type" must be a string)
//!   + name       = config.name
//!   + type       = "bridge"              unless set
//!   + ipMasq     = !FLANNEL_IPMASQ       unless set
//!   + mtu        = FLANNEL_MTU           unless set
//!   + isGateway  = true                  unless set, for bridge
//!   + cniVersion = config.cniVersion     when the config has one
//!   + runtimeConfig = config.runtimeConfig when present
//!   + ipam = config.ipam (or {}) with type "host-local" unless set,
//!            ranges = [[{subnet: FLANNEL_SUBNET}], [{subnet: FLANNEL_IPV6_SUBNET}]] (those present),
//!            routes = config.ipam.routes ++ [{dst: n} for FLANNEL_NETWORK, FLANNEL_IPV6_NETWORK]
//! ```

use std::{
    io::Write,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use super::{
    netconf::{Map, NetConf},
    subnet_file::{self, go_errno, SubnetEnv},
};
use crate::gojson::{self, Value};

/// The delegate config for ADD. Errors are the Go plugin's messages.
pub fn build(conf: &NetConf, env: &SubnetEnv) -> Result<Map, String> {
    let mut delegate = conf.delegate.clone().unwrap_or_default();
    if conf.delegate.is_some() {
        if delegate.get("type").is_some_and(|t| !matches!(t, Value::Str(_))) {
            return Err("'delegate' dictionary, if present, must have (string) 'type' field".to_string());
        }
        if delegate.contains_key("name") {
            return Err("'delegate' dictionary must not have 'name' field, it'll be set by flannel".to_string());
        }
        if delegate.contains_key("ipam") {
            return Err("'delegate' dictionary must not have 'ipam' field, it'll be set by flannel".to_string());
        }
    }
    if let Some(runtime_config) = &conf.runtime_config {
        delegate.insert("runtimeConfig".into(), Value::Map(runtime_config.clone()));
    }

    delegate.insert("name".into(), Value::Str(conf.name.clone()));
    delegate.entry("type".into()).or_insert_with(|| Value::Str("bridge".into()));
    if let (false, Some(ipmasq)) = (delegate.contains_key("ipMasq"), env.ipmasq) {
        // If flannel is not masquerading, the bridge should.
        delegate.insert("ipMasq".into(), Value::Bool(!ipmasq));
    }
    if let (false, Some(mtu)) = (delegate.contains_key("mtu"), env.mtu) {
        delegate.insert("mtu".into(), Value::Int(i64::from(mtu)));
    }
    if delegate.get("type") == Some(&Value::Str("bridge".into())) {
        delegate.entry("isGateway".into()).or_insert(Value::Bool(true));
    }
    if !conf.cni_version.is_empty() {
        delegate.insert("cniVersion".into(), Value::Str(conf.cni_version.clone()));
    }
    let ipam = delegate_ipam(conf, env).map_err(|e| format!("failed to assemble Delegate IPAM: {e}"))?;
    delegate.insert("ipam".into(), Value::Map(ipam));
    Ok(delegate)
}

/// `getDelegateIPAM`: the config's ipam section completed with flannel's subnet and routes.
pub fn delegate_ipam(conf: &NetConf, env: &SubnetEnv) -> Result<Map, String> {
    let mut ipam = conf.ipam.clone().unwrap_or_default();
    ipam.entry("type".into()).or_insert_with(|| Value::Str("host-local".into()));

    let ranges: Vec<Value> = [env.subnet, env.ip6_subnet]
        .into_iter()
        .flatten()
        .map(|subnet| {
            let range = Map::from([("subnet".to_string(), Value::Str(subnet.to_string()))]);
            Value::Array(vec![Value::Map(range)])
        })
        .collect();
    // Go marshals the nil slice it starts from as null.
    ipam.insert("ranges".into(), if ranges.is_empty() { Value::Null } else { Value::Array(ranges) });

    let mut routes = ipam_routes(ipam.get("routes"))
        .map_err(|e| format!("failed to read IPAM routes: failed to parse ipam.routes: {e}"))?;
    for network in env.networks.iter().chain(&env.ip6_networks) {
        routes.push(Route { dst: Some(network.to_string()), ..Route::default() }.to_value());
    }
    ipam.insert("routes".into(), Value::Array(routes));
    Ok(ipam)
}

/// `types.Route` as it goes through Go's JSON round trip.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Route {
    /// As Go prints the parsed CIDR (address not masked); None prints as "<nil>".
    dst: Option<String>,
    gw: Option<String>,
    mtu: i64,
    advmss: i64,
    priority: i64,
    table: Option<i64>,
    scope: Option<i64>,
}

impl Route {
    fn to_value(&self) -> Value {
        let mut fields = vec![("dst", Value::Str(self.dst.clone().unwrap_or_else(|| "<nil>".into())))];
        if let Some(gw) = &self.gw {
            fields.push(("gw", Value::Str(gw.clone())));
        }
        for (name, n) in [("mtu", self.mtu), ("advmss", self.advmss), ("priority", self.priority)] {
            if n != 0 {
                fields.push((name, Value::Int(n)));
            }
        }
        for (name, n) in [("table", self.table), ("scope", self.scope)] {
            if let Some(n) = n {
                fields.push((name, Value::Int(n)));
            }
        }
        Value::Struct(fields)
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Float(_) | Value::Int(_) => "number",
        Value::Str(_) => "string",
        Value::Array(_) => "array",
        Value::Map(_) | Value::Struct(_) => "object",
    }
}

/// The config's `ipam.routes`, decoded into `[]types.Route` and encoded again.
fn ipam_routes(routes: Option<&Value>) -> Result<Vec<Value>, String> {
    let items = match routes {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(other) => {
            return Err(format!("json: cannot unmarshal {} into Go value of type []types.Route", kind(other)))
        }
    };
    items.iter().map(|item| decode_route(item).map(|route| route.to_value())).collect()
}

fn decode_route(value: &Value) -> Result<Route, String> {
    let mut route = Route::default();
    let fields = match value {
        Value::Null => return Ok(route),
        Value::Map(fields) => fields,
        other => return Err(format!("json: cannot unmarshal {} into Go value of type types.route", kind(other))),
    };
    let int_error = |name: &str, what: String| {
        format!("json: cannot unmarshal {what} into Go struct field route.{name} of type int")
    };
    // A Go int from a float64 that went through json.Marshal: its text must parse as int64.
    let int = |name: &str, v: &Value| -> Result<Option<i64>, String> {
        match v {
            Value::Null => Ok(None),
            Value::Int(n) => Ok(Some(*n)),
            Value::Float(f) => {
                let text = gojson::format_float(*f);
                text.parse::<i64>().map(Some).map_err(|_| int_error(name, format!("number {text}")))
            }
            other => Err(int_error(name, kind(other).to_string())),
        }
    };
    // Keys in the (sorted) order Go marshalled them; the last one matching a field wins.
    for (key, v) in fields {
        let is = |field: &str| gojson::key_matches(key, field);
        if is("dst") {
            let text = match v {
                Value::Str(s) => s.as_str(),
                Value::Null => "",
                other => return Err(format!("json: cannot unmarshal {} into Go value of type string", kind(other))),
            };
            let (ip, prefix) = subnet_file::parse_cidr(text)?;
            route.dst = Some(subnet_file::go_ipnet(ip, prefix, false).to_string());
        } else if is("gw") {
            route.gw = match v {
                Value::Null => None,
                Value::Str(s) if s.is_empty() => None,
                Value::Str(s) => Some(
                    subnet_file::parse_ip(s)
                        .map(subnet_file::go_ip_string)
                        .ok_or_else(|| format!("invalid IP address: {s}"))?,
                ),
                other => {
                    return Err(format!(
                        "json: cannot unmarshal {} into Go struct field route.gw of type net.IP",
                        kind(other)
                    ))
                }
            };
        } else if is("mtu") {
            route.mtu = int("mtu", v)?.unwrap_or(route.mtu);
        } else if is("advmss") {
            route.advmss = int("advmss", v)?.unwrap_or(route.advmss);
        } else if is("priority") {
            route.priority = int("priority", v)?.unwrap_or(route.priority);
        } else if is("table") {
            route.table = int("table", v)?;
        } else if is("scope") {
            route.scope = int("scope", v)?;
        }
    }
    Ok(route)
}

/// `<dataDir>/<containerID>`.
pub fn scratch_path(data_dir: &str, container_id: &str) -> PathBuf {
    Path::new(data_dir).join(container_id)
}

/// `saveScratchNetConf`: creates dataDir (0700) and writes the file (0600) with an fsync.
pub fn save(data_dir: &str, container_id: &str, bytes: &[u8]) -> Result<(), String> {
    if data_dir.is_empty() {
        return Err("mkdir : no such file or directory".to_string());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .map_err(|e| format!("mkdir {data_dir}: {}", go_errno(&e)))?;
    let path = scratch_path(data_dir, container_id);
    let shown = path.display();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("open {shown}: {}", go_errno(&e)))?;
    file.write_all(bytes).map_err(|e| format!("write {shown}: {}", go_errno(&e)))?;
    file.sync_all().map_err(|e| format!("sync {shown}: {}", go_errno(&e)))?;
    Ok(())
}

/// The saved config, or None when there is none (already deleted, or never added).
pub fn read_saved(data_dir: &str, container_id: &str) -> Result<Option<Vec<u8>>, String> {
    let path = scratch_path(data_dir, container_id);
    match std::fs::read(&path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("open {}: {}", path.display(), go_errno(&e))),
    }
}

/// Removes the saved config; errors are ignored (the spec lets DEL carry on).
pub fn remove_saved(data_dir: &str, container_id: &str) {
    let _ = std::fs::remove_file(scratch_path(data_dir, container_id));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cni::netconf;

    const IPV4_ENV: &str =
        "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n";
    const IPV6_ENV: &str =
        "FLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=fc00::1/64\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n";
    const DUAL_ENV: &str = "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=fc00::1/64\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n";
    const MULTI_ENV: &str =
        "FLANNEL_NETWORK=10.1.0.0/16,192.168.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n";
    /// flannel_linux_test.go's input IPAM (type, an unknown parameter, two routes).
    const INPUT_IPAM: &str = r#"{"type": "my-ipam", "unknown-param": "unknown-value",
        "routes": [{ "dst": "10.96.0.0/12" }, { "dst": "192.168.244.0/24", "gw": "10.1.17.20" }]}"#;

    fn delegate_json(config: &str, env: &str) -> Result<String, String> {
        let conf = netconf::load(config.as_bytes())?;
        let env = SubnetEnv::parse(env.as_bytes())?;
        build(&conf, &env).map(|d| gojson::marshal(&Value::Map(d)))
    }

    fn ipam_json(config: &str, env: &str) -> String {
        let conf = netconf::load(config.as_bytes()).unwrap();
        let env = SubnetEnv::parse(env.as_bytes()).unwrap();
        gojson::marshal(&Value::Map(delegate_ipam(&conf, &env).unwrap()))
    }

    fn with_ipam(ipam: &str) -> String {
        format!(r#"{{"name": "cni-flannel", "type": "flannel", "ipam": {ipam}}}"#)
    }

    #[test]
    fn reference_example() {
        // kube-flannel's conflist and the subnet.env of a node with 10.244.1.0/24.
        let config = r#"{"cniVersion":"0.3.1","name":"cbr0","type":"flannel",
            "delegate":{"hairpinMode":true,"isDefaultGateway":true}}"#;
        let env =
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";
        assert_eq!(
            delegate_json(config, env).unwrap(),
            r#"{"cniVersion":"0.3.1","hairpinMode":true,"ipMasq":false,"ipam":{"ranges":[[{"subnet":"10.244.1.0/24"}]],"routes":[{"dst":"10.244.0.0/16"}],"type":"host-local"},"isDefaultGateway":true,"isGateway":true,"mtu":1450,"name":"cbr0","type":"bridge"}"#
        );
    }

    #[test]
    fn flannel_lifecycle_cases() {
        // flannel_linux_test.go "CNI lifecycle": no cniVersion, no delegate, no ipam.
        let config = r#"{"name": "cni-flannel", "type": "flannel", "subnetFile": "/x", "dataDir": "/y"}"#;
        let head = r#"{"ipMasq":false,"ipam":{"ranges":"#;
        let tail = r#"},"isGateway":true,"mtu":1472,"name":"cni-flannel","type":"bridge"}"#;
        for (env, ranges_routes) in [
            (IPV4_ENV, r#"[[{"subnet":"10.1.17.0/24"}]],"routes":[{"dst":"10.1.0.0/16"}],"type":"host-local""#),
            (
                MULTI_ENV,
                r#"[[{"subnet":"10.1.17.0/24"}]],"routes":[{"dst":"10.1.0.0/16"},{"dst":"192.168.0.0/16"}],"type":"host-local""#,
            ),
            (IPV6_ENV, r#"[[{"subnet":"fc00::/64"}]],"routes":[{"dst":"fc00::/48"}],"type":"host-local""#),
            (
                DUAL_ENV,
                r#"[[{"subnet":"10.1.17.0/24"}],[{"subnet":"fc00::/64"}]],"routes":[{"dst":"10.1.0.0/16"},{"dst":"fc00::/48"}],"type":"host-local""#,
            ),
        ] {
            assert_eq!(delegate_json(config, env).unwrap(), format!("{head}{ranges_routes}{tail}"));
        }
    }

    #[test]
    fn flannel_get_delegate_ipam_cases() {
        // "when input IPAM is provided": type and unknown parameters kept, routes appended.
        let routes = r#"{"dst":"10.96.0.0/12"},{"dst":"192.168.244.0/24","gw":"10.1.17.20"}"#;
        assert_eq!(
            ipam_json(&with_ipam(INPUT_IPAM), IPV4_ENV),
            format!(
                r#"{{"ranges":[[{{"subnet":"10.1.17.0/24"}}]],"routes":[{routes},{{"dst":"10.1.0.0/16"}}],"type":"my-ipam","unknown-param":"unknown-value"}}"#
            )
        );
        assert_eq!(
            ipam_json(&with_ipam(INPUT_IPAM), IPV6_ENV),
            format!(
                r#"{{"ranges":[[{{"subnet":"fc00::/64"}}]],"routes":[{routes},{{"dst":"fc00::/48"}}],"type":"my-ipam","unknown-param":"unknown-value"}}"#
            )
        );
        assert_eq!(
            ipam_json(&with_ipam(INPUT_IPAM), DUAL_ENV),
            format!(
                r#"{{"ranges":[[{{"subnet":"10.1.17.0/24"}}],[{{"subnet":"fc00::/64"}}]],"routes":[{routes},{{"dst":"10.1.0.0/16"}},{{"dst":"fc00::/48"}}],"type":"my-ipam","unknown-param":"unknown-value"}}"#
            )
        );
        // "with two networks": host-local, no routes of its own.
        assert_eq!(
            ipam_json(
                &with_ipam(r#"{"type": "host-local", "unknown-param": "unknown-value", "routes": []}"#),
                MULTI_ENV
            ),
            r#"{"ranges":[[{"subnet":"10.1.17.0/24"}]],"routes":[{"dst":"10.1.0.0/16"},{"dst":"192.168.0.0/16"}],"type":"host-local","unknown-param":"unknown-value"}"#
        );
        // "without 'type'": host-local is filled in.
        let untyped = r#"{"unknown-param": "unknown-value", "routes": [{ "dst": "10.96.0.0/12" }, { "dst": "192.168.244.0/24", "gw": "10.1.17.20" }]}"#;
        for (env, tail) in [
            (IPV4_ENV, r#"{"dst":"10.1.0.0/16"}"#),
            (IPV6_ENV, r#"{"dst":"fc00::/48"}"#),
            (DUAL_ENV, r#"{"dst":"10.1.0.0/16"},{"dst":"fc00::/48"}"#),
        ] {
            let json = ipam_json(&with_ipam(untyped), env);
            assert!(json.contains(&format!(r#""routes":[{routes},{tail}]"#)), "{json}");
            assert!(json.ends_with(r#""type":"host-local","unknown-param":"unknown-value"}"#), "{json}");
        }
    }

    #[test]
    fn ipam_overrides_and_route_round_trip() {
        // User ranges are replaced; a route keeps its own (unmasked) dst and Go's field order.
        let ipam = r#"{"ranges": [[{"subnet": "1.2.3.0/24"}]], "dataDir": "/tmp/x",
            "routes": [{"GW": "::ffff:10.0.0.1", "dst": "10.96.0.5/12", "mtu": 1400.0, "table": 0, "extra": 1}, null]}"#;
        assert_eq!(
            ipam_json(&with_ipam(ipam), IPV4_ENV),
            r#"{"dataDir":"/tmp/x","ranges":[[{"subnet":"10.1.17.0/24"}]],"routes":[{"dst":"10.96.0.5/12","gw":"10.0.0.1","mtu":1400,"table":0},{"dst":"\u003cnil\u003e"},{"dst":"10.1.0.0/16"}],"type":"host-local"}"#
        );
        let conf = netconf::load(with_ipam(r#"{"type": null}"#).as_bytes()).unwrap();
        let env = SubnetEnv::parse(IPV4_ENV.as_bytes()).unwrap();
        assert_eq!(delegate_ipam(&conf, &env).unwrap().get("type"), Some(&Value::Null));
    }

    #[test]
    fn bad_routes() {
        for (routes, msg) in [
            (r#""10.0.0.0/8""#, "json: cannot unmarshal string into Go value of type []types.Route"),
            (r#"[{"dst": "10.0.0.0"}]"#, "invalid CIDR address: 10.0.0.0"),
            (r#"[{"dst": "10.0.0.0/8", "gw": "x"}]"#, "invalid IP address: x"),
            (
                r#"[{"dst": "10.0.0.0/8", "mtu": 1.5}]"#,
                "json: cannot unmarshal number 1.5 into Go struct field route.mtu of type int",
            ),
            (r#"[1]"#, "json: cannot unmarshal number into Go value of type types.route"),
        ] {
            let conf = netconf::load(with_ipam(&format!(r#"{{"routes": {routes}}}"#)).as_bytes()).unwrap();
            let env = SubnetEnv::parse(IPV4_ENV.as_bytes()).unwrap();
            assert_eq!(
                build(&conf, &env).unwrap_err(),
                format!(
                    "failed to assemble Delegate IPAM: failed to read IPAM routes: failed to parse ipam.routes: {msg}"
                )
            );
        }
    }

    #[test]
    fn delegate_rules() {
        let env = IPV4_ENV;
        let with_delegate = |d: &str| format!(r#"{{"cniVersion":"1.0.0","name":"n","type":"flannel","delegate":{d}}}"#);
        // Explicit values win; isGateway only for bridge; runtimeConfig is passed on.
        let json = delegate_json(
            r#"{"name":"n","delegate":{"type":"ipvlan","ipMasq":true,"mtu":9000,"runtimeConfig":{"a":1}},"runtimeConfig":{"portMappings":[]}}"#,
            env,
        )
        .unwrap();
        assert_eq!(
            json,
            r#"{"ipMasq":true,"ipam":{"ranges":[[{"subnet":"10.1.17.0/24"}]],"routes":[{"dst":"10.1.0.0/16"}],"type":"host-local"},"mtu":9000,"name":"n","runtimeConfig":{"portMappings":[]},"type":"ipvlan"}"#
        );
        let json = delegate_json(&with_delegate(r#"{"isGateway":false,"cniVersion":"0.3.1"}"#), env).unwrap();
        assert!(json.contains(r#""cniVersion":"1.0.0""#) && json.contains(r#""isGateway":false"#), "{json}");
        let json = delegate_json(
            &with_delegate("null"),
            "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n",
        )
        .unwrap();
        assert!(json.contains(r#""ipMasq":true"#), "{json}");
        for (delegate, msg) in [
            (r#"{"type": 1}"#, "'delegate' dictionary, if present, must have (string) 'type' field"),
            (r#"{"type": null}"#, "'delegate' dictionary, if present, must have (string) 'type' field"),
            (r#"{"name": "x"}"#, "'delegate' dictionary must not have 'name' field, it'll be set by flannel"),
            (r#"{"ipam": {}}"#, "'delegate' dictionary must not have 'ipam' field, it'll be set by flannel"),
        ] {
            assert_eq!(delegate_json(&with_delegate(delegate), env).unwrap_err(), msg);
        }
    }

    #[test]
    fn saved_file_mode_and_removal() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("a/b");
        let data_dir = data_dir.to_str().unwrap();
        assert_eq!(read_saved(data_dir, "c1").unwrap(), None);
        save(data_dir, "c1", b"{}").unwrap();
        assert_eq!(std::fs::metadata(scratch_path(data_dir, "c1")).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(data_dir).unwrap().permissions().mode() & 0o077, 0);
        assert_eq!(read_saved(data_dir, "c1").unwrap(), Some(b"{}".to_vec()));
        remove_saved(data_dir, "c1");
        remove_saved(data_dir, "c1");
        assert_eq!(read_saved(data_dir, "c1").unwrap(), None);
    }
}
