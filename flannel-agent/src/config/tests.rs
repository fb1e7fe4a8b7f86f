//! Golden tests. Every expectation was checked against flannel v0.28.9's own ParseConfig and
//! CheckNetworkConfig (pkg/subnet/config.go with pkg/ip) plus its backend config parsing; each
//! test names the flannel file its values come from.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

use super::*;

fn ok(json: &str) -> NetworkConfig {
    parse(json).unwrap_or_else(|e| panic!("{json}: {e}"))
}

fn err(json: &str) -> String {
    match parse(json) {
        Ok(c) => panic!("{json} was accepted: {c:?}"),
        Err(e) => e.to_string(),
    }
}

fn v4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn v6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

fn net4(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

fn net6(s: &str) -> Ipv6Net {
    s.parse().unwrap()
}

/// (network, subnet_len, subnet_min, subnet_max) for compact golden comparisons.
fn ipv4(c: &NetworkConfig) -> (Ipv4Net, u8, Ipv4Addr, Ipv4Addr) {
    (c.network.expect("IPv4 network"), c.subnet_len, c.subnet_min, c.subnet_max)
}

fn ipv6(c: &NetworkConfig) -> (Ipv6Net, u8, Ipv6Addr, Ipv6Addr) {
    (c.ipv6_network.expect("IPv6 network"), c.ipv6_subnet_len, c.ipv6_subnet_min.unwrap(), c.ipv6_subnet_max.unwrap())
}

// ---- defaults -------------------------------------------------------------------------------

/// pkg/subnet/config.go CheckNetworkConfig (SubnetLen 24, first subnet skipped, last subnet),
/// pkg/backend/vxlan/vxlan.go parseVXLANConfig (defaultVNI 1, Port 0).
#[test]
fn vxlan_defaults() {
    let c = ok(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#);
    assert_eq!(
        c,
        NetworkConfig {
            enable_ipv4: true,
            enable_ipv6: false,
            enable_nftables: false,
            network: Some(net4("10.5.0.0/16")),
            subnet_len: 24,
            subnet_min: v4("10.5.1.0"),
            subnet_max: v4("10.5.255.0"),
            ipv6_network: None,
            ipv6_subnet_len: 0,
            ipv6_subnet_min: None,
            ipv6_subnet_max: None,
            backend: Backend::Vxlan(VxlanConfig {
                vni: 1,
                port: 0,
                mtu: 0,
                gbp: false,
                learning: false,
                direct_routing: false
            }),
        }
    );
    assert_eq!(c.backend.type_name(), "vxlan");
    assert_eq!(Backend::Vxlan(VxlanConfig::default()), c.backend);
}

/// pkg/subnet/config_test.go TestConfigDefaults (lower-case "network"), pkg/subnet/config.go
/// ParseConfig (Backend absent → "udp"), pkg/backend/udp/udp_amd64.go (defaultPort 8285).
#[test]
fn backend_absent_is_udp_on_8285() {
    let c = ok(r#"{ "network": "10.3.0.0/16" }"#);
    assert_eq!(ipv4(&c), (net4("10.3.0.0/16"), 24, v4("10.3.1.0"), v4("10.3.255.0")));
    assert_eq!(c.backend, Backend::Udp { port: 8285 });
    assert_eq!(c.backend.type_name(), "udp");
}

/// Go encoding/json matches keys case-insensitively (pkg/subnet/config.go decodes with it);
/// pkg/backend/hostgw/hostgw.go registers "host-gw" and reads no options.
#[test]
fn lower_case_keys_host_gw() {
    let c = ok(r#"{"network":"10.1.0.0/16","subnetlen":20,"backend":{"type":"host-gw"}}"#);
    assert_eq!(ipv4(&c), (net4("10.1.0.0/16"), 20, v4("10.1.16.0"), v4("10.1.240.0")));
    assert_eq!(c.backend, Backend::HostGw);
    assert_eq!(c.backend.type_name(), "host-gw");
}

/// Go encoding/json ignores unknown keys, at the top (pkg/subnet/config.go Config) and inside
/// Backend (pkg/backend/vxlan/vxlan.go VXLANConfig).
#[test]
fn unknown_keys_are_ignored() {
    let c = ok(r#"{"Network":"10.1.0.0/16","Foo":1,"BackendType":"udp","Backend":{"Type":"vxlan","Bar":[1,{"x":2}]}}"#);
    assert_eq!(ipv4(&c), (net4("10.1.0.0/16"), 24, v4("10.1.1.0"), v4("10.1.255.0")));
    assert_eq!(c.backend, Backend::Vxlan(VxlanConfig::default()));
}

/// pkg/subnet/config.go CheckNetworkConfig: unset SubnetLen is 24 up to a /22 network, else
/// prefix + 2; a /25 gets /27 subnets.
#[test]
fn default_subnet_len_follows_network_size() {
    let cases = [
        ("10.1.0.0/25", 27, "10.1.0.32", "10.1.0.96"),
        ("10.1.0.0/22", 24, "10.1.1.0", "10.1.3.0"),
        ("10.1.0.0/23", 25, "10.1.0.128", "10.1.1.128"),
        ("10.1.0.0/28", 30, "10.1.0.4", "10.1.0.12"),
        ("0.0.0.0/1", 24, "0.0.1.0", "127.255.255.0"),
        ("255.255.0.0/16", 24, "255.255.1.0", "255.255.255.0"),
    ];
    for (network, len, min, max) in cases {
        let c = ok(&format!(r#"{{"Network":"{network}"}}"#));
        assert_eq!(ipv4(&c), (net4(network), len, v4(min), v4(max)), "{network}");
    }
}

/// pkg/subnet/config.go CheckNetworkConfig: an explicit SubnetLen of prefix + 2 is the smallest
/// allowed.
#[test]
fn explicit_subnet_len_of_prefix_plus_two() {
    let c = ok(r#"{"Network":"10.1.0.0/16","SubnetLen":18}"#);
    assert_eq!(ipv4(&c), (net4("10.1.0.0/16"), 18, v4("10.1.64.0"), v4("10.1.192.0")));
}

/// pkg/subnet/config.go CheckNetworkConfig: 0.0.0.0 SubnetMin/SubnetMax count as unset, and an
/// explicit SubnetMin may be the network address itself.
#[test]
fn subnet_min_max_overrides() {
    let c = ok(r#"{"Network":"10.1.0.0/16","SubnetMin":"0.0.0.0","SubnetMax":"0.0.0.0"}"#);
    assert_eq!(ipv4(&c), (net4("10.1.0.0/16"), 24, v4("10.1.1.0"), v4("10.1.255.0")));
    let c = ok(r#"{"Network":"10.1.0.0/16","SubnetMin":"10.1.0.0"}"#);
    assert_eq!((c.subnet_min, c.subnet_max), (v4("10.1.0.0"), v4("10.1.255.0")));
    // pkg/subnet/config_test.go TestConfigOverrides
    let c = ok(r#"{ "Network": "10.3.0.0/16", "SubnetMin": "10.3.5.0", "SubnetMax": "10.3.8.0", "SubnetLen": 28 }"#);
    assert_eq!(ipv4(&c), (net4("10.3.0.0/16"), 28, v4("10.3.5.0"), v4("10.3.8.0")));
}

/// pkg/subnet/config.go: EnableNFTables is a plain bool, default false.
#[test]
fn enable_nftables() {
    assert!(ok(r#"{"EnableNFTables":true,"Network":"10.0.0.0/8"}"#).enable_nftables);
    assert!(!ok(r#"{"Network":"10.0.0.0/8"}"#).enable_nftables);
}

// ---- seeds ----------------------------------------------------------------------------------

/// Seed 003 (etcd key /kube-centos/network/config); pkg/subnet/config.go CheckNetworkConfig.
#[test]
fn seed_003_host_gw() {
    let c = ok(r#"{"Network":"172.33.0.0/16","SubnetLen":24,"Backend":{"Type":"host-gw"}}"#);
    assert_eq!(ipv4(&c), (net4("172.33.0.0/16"), 24, v4("172.33.1.0"), v4("172.33.255.0")));
    assert_eq!(c.backend, Backend::HostGw);
    // The seed's leases are all valid subnets of this config.
    for s in ["172.33.68.0/24", "172.33.31.0/24", "172.33.96.0/24"] {
        assert!(c.contains_subnet(net4(s)), "{s}");
    }
}

/// Seed 004 (udp, Port 7890, SubnetMin/SubnetMax); pkg/subnet/config.go CheckNetworkConfig,
/// pkg/backend/udp/udp_amd64.go (`Port int`).
#[test]
fn seed_004_udp_with_bounds() {
    let c = ok(r#"{
        "Network": "10.0.0.0/8",
        "SubnetLen": 20,
        "SubnetMin": "10.10.0.0",
        "SubnetMax": "10.99.0.0",
        "Backend": {
            "Type": "udp",
            "Port": 7890
        }
    }"#);
    assert_eq!(ipv4(&c), (net4("10.0.0.0/8"), 20, v4("10.10.0.0"), v4("10.99.0.0")));
    assert_eq!(c.backend, Backend::Udp { port: 7890 });
    let all: Vec<Ipv4Net> = c.ipv4_subnets().collect();
    assert_eq!(all.len(), (99 - 10) * 16 + 1);
    assert_eq!(
        (all[0], all[1], all[all.len() - 1]),
        (net4("10.10.0.0/20"), net4("10.10.16.0/20"), net4("10.99.0.0/20"))
    );
}

// ---- IPv4 validation errors -----------------------------------------------------------------

/// pkg/subnet/config.go CheckNetworkConfig: "SubnetLen must be less than /31" and "network must
/// be able to accommodate at least four subnets".
#[test]
fn subnet_len_errors() {
    assert_eq!(err(r#"{"Network":"10.1.0.0/16","SubnetLen":31}"#), "SubnetLen 31 is invalid: it must be at most 30");
    assert_eq!(
        err(r#"{"Network":"10.1.0.0/16","SubnetLen":17}"#),
        "SubnetLen 17 is invalid: it must be at least 18 so that Network 10.1.0.0/16 holds at least four subnets"
    );
    // A uint in Go: 2^64-1 still decodes, then fails the range check.
    assert_eq!(
        err(r#"{"Network":"10.0.0.0/8","SubnetLen":18446744073709551615}"#),
        "SubnetLen 18446744073709551615 is invalid: it must be at most 30"
    );
}

/// pkg/subnet/config.go CheckNetworkConfig: "network is too small. Minimum useful network
/// prefix is /28" (only when SubnetLen is unset; an explicit one fails the four-subnet rule).
#[test]
fn network_prefix_above_28() {
    assert_eq!(
        err(r#"{"Network":"10.1.0.0/29"}"#),
        "Network 10.1.0.0/29 is invalid: its prefix must be /28 or shorter (room for four /30 subnets) when \
         SubnetLen is not set"
    );
    assert!(err(r#"{"Network":"10.1.0.0/29","SubnetLen":30}"#)
        .starts_with("SubnetLen 30 is invalid: it must be at least 31"));
}

/// pkg/subnet/config.go CheckNetworkConfig: "SubnetMin/SubnetMax is not in the range of the
/// Network", "... is not on a SubnetLen boundary".
#[test]
fn subnet_min_max_errors() {
    assert_eq!(
        err(r#"{"Network":"10.1.0.0/16","SubnetMin":"10.2.0.0"}"#),
        "SubnetMin 10.2.0.0 is invalid: it is outside the network 10.1.0.0/16"
    );
    assert_eq!(
        err(r#"{"Network":"10.1.0.0/16","SubnetMax":"10.2.0.0"}"#),
        "SubnetMax 10.2.0.0 is invalid: it is outside the network 10.1.0.0/16"
    );
    assert_eq!(
        err(r#"{"Network":"10.1.0.0/16","SubnetMin":"10.1.0.7"}"#),
        "SubnetMin 10.1.0.7 is invalid: it is not on a /24 subnet boundary"
    );
    assert_eq!(
        err(r#"{"Network":"10.1.0.0/16","SubnetMax":"10.1.0.7"}"#),
        "SubnetMax 10.1.0.7 is invalid: it is not on a /24 subnet boundary"
    );
}

/// flannel's CheckNetworkConfig accepts SubnetMin > SubnetMax, but then allocateSubnet finds no
/// candidate and isSubnetConfigCompat rejects every lease (pkg/subnet/etcd/local_manager.go).
#[test]
fn subnet_min_above_max() {
    assert_eq!(
        err(r#"{"Network":"10.1.0.0/16","SubnetMin":"10.1.9.0","SubnetMax":"10.1.3.0"}"#),
        "SubnetMin 10.1.9.0 is invalid: it is above SubnetMax 10.1.3.0, which leaves no subnet to lease"
    );
}

/// pkg/subnet/config.go CheckNetworkConfig: "please define a correct Network parameter";
/// ip.IP4Net.Empty() makes any masked /0 count as missing; Go decodes a top-level null too.
#[test]
fn missing_network() {
    let missing = "Network is missing: it is required while EnableIPv4 is true";
    assert_eq!(err("{}"), missing);
    assert_eq!(err("null"), missing);
    assert_eq!(err(r#"{"Backend":{"Type":"vxlan"}}"#), missing);
    assert_eq!(
        err(r#"{"Network":"0.0.0.0/0"}"#),
        "Network 0.0.0.0/0 is invalid: flannel treats a /0 network as no network at all"
    );
    assert!(err(r#"{"Network":"10.0.0.0/0"}"#).starts_with("Network 0.0.0.0/0 is invalid"));
}

/// pkg/ip/ipnet.go IP4Net.UnmarshalJSON: net.ParseCIDR on the raw JSON bytes with quotes
/// trimmed, so null, numbers, escapes and stray spaces all fail, and IPv6 is refused.
#[test]
fn malformed_network() {
    let not_cidr = "is invalid: it is not a CIDR such as \"10.5.0.0/16\"";
    for (json, shown) in [
        (r#""10.1.0.0""#, r#""10.1.0.0""#),
        (r#""10.1.0.0/33""#, r#""10.1.0.0/33""#),
        (r#""""#, r#""""#),
        (r#""010.1.0.0/16""#, r#""010.1.0.0/16""#),
        (r#""10.0.0.0/8 ""#, r#""10.0.0.0/8 ""#),
        (r#"" 10.0.0.0/8""#, r#"" 10.0.0.0/8""#),
        (r#""10.0.0.0/+8""#, r#""10.0.0.0/+8""#),
        (r#""10.0.0.0/-8""#, r#""10.0.0.0/-8""#),
        (r#""fe80::/64%eth0""#, r#""fe80::/64%eth0""#),
    ] {
        assert_eq!(err(&format!(r#"{{"Network":{json}}}"#)), format!("Network {shown} {not_cidr}"));
    }
    assert_eq!(err(r#"{"Network":null}"#), "Network null is invalid: it must be a string such as \"10.5.0.0/16\"");
    assert_eq!(err(r#"{"Network":5}"#), "Network 5 is invalid: it must be a string such as \"10.5.0.0/16\"");
    assert_eq!(
        err(r#"{"Network":"10.0.0.0\/8"}"#),
        "Network \"10.0.0.0/8\" is invalid: it contains a JSON escape sequence, which flannel does not decode in addresses"
    );
    assert_eq!(err(r#"{"Network":"fc00::/48"}"#), "Network \"fc00::/48\" is invalid: it is not an IPv4 CIDR");
    assert_eq!(
        err(r#"{"Network":"::ffff:10.0.0.0/8"}"#),
        "Network \"::ffff:10.0.0.0/8\" is invalid: it is not an IPv4 CIDR"
    );
}

/// Go's net.ParseCIDR (used by pkg/ip/ipnet.go) masks host bits and reads the prefix with
/// dtoi, which allows leading zeros; net.ParseIP + To4 accepts IPv4-mapped IPv6 text.
#[test]
fn lenient_address_forms_flannel_accepts() {
    assert_eq!(ok(r#"{"Network":"10.1.7.9/16"}"#).network, Some(net4("10.1.0.0/16")));
    assert_eq!(ok(r#"{"Network":"10.1.0.0/016"}"#).network, Some(net4("10.1.0.0/16")));
    assert_eq!(ok(r#"{"Network":"10.1.0.0/0000000016"}"#).network, Some(net4("10.1.0.0/16")));
    assert_eq!(ok(r#"{"Network":"10.0.0.0/8","SubnetMin":"::ffff:10.10.0.0"}"#).subnet_min, v4("10.10.0.0"));
}

/// pkg/ip/ipnet.go: "::ffff:10.0.0.0/104" passes To4(), so flannel keeps 10.0.0.0 with prefix
/// 104, which CheckNetworkConfig then always rejects ("network is too small").
#[test]
fn ipv4_mapped_network() {
    assert_eq!(
        err(r#"{"Network":"::ffff:10.0.0.0/104"}"#),
        "Network ::ffff:10.0.0.0/104 is invalid: it is an IPv4-mapped IPv6 CIDR, which flannel reads as a /104 IPv4 network"
    );
    // Unchecked while IPv4 is off, as in flannel.
    let c = ok(r#"{"EnableIPv4":false,"EnableIPv6":true,"Network":"::ffff:10.0.0.0/104","IPv6Network":"fc00::/48"}"#);
    assert_eq!(c.network, None);
}

/// pkg/ip/ipnet.go IP4.UnmarshalJSON: SubnetMin/SubnetMax are not pointers, so null reaches
/// ParseIP4 and fails ("invalid IP address format").
#[test]
fn malformed_subnet_min_max() {
    assert_eq!(
        err(r#"{"Network":"10.0.0.0/8","SubnetMin":null}"#),
        "SubnetMin null is invalid: it must be a string such as \"10.5.1.0\""
    );
    assert_eq!(
        err(r#"{"Network":"10.0.0.0/8","SubnetMax":"10.0.0"}"#),
        "SubnetMax \"10.0.0\" is invalid: it is not an IP address"
    );
    assert_eq!(
        err(r#"{"Network":"10.0.0.0/8","SubnetMax":"fc00::"}"#),
        "SubnetMax \"fc00::\" is invalid: it is not an IPv4 address"
    );
}

// ---- Go decoding rules ----------------------------------------------------------------------

/// Go encoding/json: null into a bool, uint or int leaves the default (pkg/subnet/config.go
/// Config, pkg/backend/vxlan/vxlan.go VXLANConfig, pkg/backend/udp/udp_amd64.go).
#[test]
fn null_leaves_defaults() {
    let c = ok(r#"{"Network":"10.0.0.0/8","SubnetLen":null,"EnableIPv4":null,"EnableIPv6":null,
                   "Backend":{"Type":"vxlan","VNI":null,"Port":null,"GBP":null}}"#);
    assert_eq!(ipv4(&c), (net4("10.0.0.0/8"), 24, v4("10.0.1.0"), v4("10.255.255.0")));
    assert!(c.enable_ipv4 && !c.enable_ipv6);
    assert_eq!(c.backend, Backend::Vxlan(VxlanConfig::default()));
    assert_eq!(
        ok(r#"{"Network":"10.0.0.0/8","Backend":{"Type":"udp","Port":null}}"#).backend,
        Backend::Udp { port: 8285 }
    );
}

/// Go encoding/json into `uint` (SubnetLen) and `bool`: only bare integer / boolean literals.
#[test]
fn type_errors() {
    for (json, shown) in [(r#""24""#, r#""24""#), ("24.0", "24.0"), ("-1", "-1"), ("-0", "-0.0"), ("1e1", "10.0")] {
        assert_eq!(
            err(&format!(r#"{{"Network":"10.0.0.0/8","SubnetLen":{json}}}"#)),
            format!("SubnetLen {shown} is invalid: it must be a non-negative integer")
        );
    }
    // 2^64 overflows Go's uint.
    assert!(err(r#"{"Network":"10.0.0.0/8","SubnetLen":18446744073709551616}"#)
        .starts_with("SubnetLen 1.8446744073709552e19 is invalid"));
    assert_eq!(
        err(r#"{"Network":"10.0.0.0/8","EnableIPv4":"true"}"#),
        "EnableIPv4 \"true\" is invalid: it must be true or false"
    );
}

/// Go encoding/json folds keys with Unicode simple folding: 'ſ' is an 's'. A repeated key
/// (in any spelling) overwrites the earlier value; every occurrence must still decode.
#[test]
fn key_folding_and_repeated_keys() {
    assert_eq!(ok(r#"{"Network":"10.0.0.0/8","ſubnetLen":20}"#).subnet_len, 20);
    // 'K' (U+212A, Kelvin sign) folds to 'k'; 'ı' (dotless i) folds to nothing ASCII.
    assert_eq!(ok(r#"{"Network":"10.0.0.0/8","Bac\u212Aend":{"Type":"host-gw"}}"#).backend, Backend::HostGw);
    assert_eq!(
        ok(r#"{"Network":"10.0.0.0/8","Backend":{"Type":"vxlan","vnı":7}}"#).backend,
        Backend::Vxlan(VxlanConfig::default())
    );
    assert_eq!(ok(r#"{"Network":"10.0.0.0/8","SUBNETLEN":20,"subnetlen":22}"#).subnet_len, 22);
    assert_eq!(ok(r#"{"Network":"10.0.0.0/8","subnetlen":22,"SUBNETLEN":20}"#).subnet_len, 20);
    assert_eq!(ok(r#"{"Network":"10.0.0.0/8","Network":"10.1.0.0/16"}"#).network, Some(net4("10.1.0.0/16")));
    assert!(err(r#"{"Network":"10.0.0.0/8","network":"bad"}"#).starts_with("Network \"bad\" is invalid"));
    assert!(err(r#"{"Network":"10.0.0.0/8","BACKEND":{"Type":"host-gw"},"backend":null}"#)
        .starts_with("Backend.Type is missing"));
    assert_eq!(
        ok(r#"{"Network":"10.0.0.0/8","Backend":{"Type":"vxlan","Type":"udp"}}"#).backend,
        Backend::Udp { port: 8285 }
    );
    // Keys are unescaped before matching; only address values see raw bytes.
    assert_eq!(ok(r#"{"\u004eetwork":"10.0.0.0/8","Backend":{"T\u0079pe":"host-gw"}}"#).backend, Backend::HostGw);
}

/// Go encoding/json: the top level must be an object (or null); syntax errors are errors.
#[test]
fn json_syntax_and_shape() {
    assert_eq!(err("[]"), "network config must be a JSON object, not an array");
    assert_eq!(err(r#""x""#), "network config must be a JSON object, not a string");
    assert!(err(r#"{"Network":"10.0.0.0/8"} x"#).starts_with("network config is not valid JSON: trailing characters"));
    assert!(err(r#"{"Network":"10.0.0.0/8",}"#).starts_with("network config is not valid JSON"));
    assert!(err("").starts_with("network config is not valid JSON"));
}

// ---- backends -------------------------------------------------------------------------------

/// pkg/subnet/config.go parseBackendType: a present Backend must be an object with a string
/// Type; null (or a missing/null Type) gives type "", which pkg/backend/manager.go GetBackend
/// refuses ("unknown backend type: ").
#[test]
fn backend_shape_errors() {
    let no_type = "Backend.Type is missing: a Backend needs a Type (only a config without any Backend defaults to udp)";
    assert_eq!(err(r#"{"Network":"10.0.0.0/8","Backend":null}"#), no_type);
    assert_eq!(err(r#"{"Network":"10.0.0.0/8","Backend":{}}"#), no_type);
    assert_eq!(err(r#"{"Network":"10.0.0.0/8","Backend":{"Type":null}}"#), no_type);
    assert_eq!(
        err(r#"{"Network":"10.0.0.0/8","Backend":[]}"#),
        "Backend […] is invalid: it must be an object, not an array"
    );
    assert_eq!(
        err(r#"{"Network":"10.0.0.0/8","Backend":"vxlan"}"#),
        "Backend \"vxlan\" is invalid: it must be an object, not a string"
    );
    assert_eq!(
        err(r#"{"Network":"10.0.0.0/8","Backend":{"Type":5}}"#),
        "Backend.Type 5 is invalid: it must be a string"
    );
}

/// pkg/backend/manager.go GetBackend lower-cases the type; main.go registers alloc, extension,
/// host-gw, ipip, ipsec, tencent-vpc, udp, vxlan and wireguard, nothing else.
#[test]
fn backend_type_names() {
    let c = ok(r#"{"Network":"10.0.0.0/8","Backend":{"Type":"WireGuard","PersistentKeepaliveInterval":25}}"#);
    assert_eq!(c.backend, Backend::Other { backend_type: "wireguard".into() });
    assert_eq!(c.backend.type_name(), "wireguard");
    assert_eq!(ok(r#"{"Network":"10.0.0.0/8","Backend":{"Type":"Host-GW"}}"#).backend, Backend::HostGw);
    assert_eq!(ok(r#"{"Network":"10.0.0.0/8","Backend":{"Type":"ipip"}}"#).backend.type_name(), "ipip");
    for gone in ["foo", "aws-vpc", "gce", "ali-vpc"] {
        assert_eq!(
            err(&format!(r#"{{"Network":"10.0.0.0/8","Backend":{{"Type":"{gone}"}}}}"#)),
            format!(
                "Backend.Type \"{gone}\" is invalid: flannel has no such backend (it knows alloc, extension, host-gw, \
                 ipip, ipsec, tencent-vpc, udp, vxlan, wireguard)"
            )
        );
    }
}

/// pkg/backend/vxlan/vxlan.go VXLANConfig json tags (vni, port, mtu, gbp, learning,
/// directRouting) matched case-insensitively; host-gw never reads its options.
#[test]
fn vxlan_options() {
    let c = ok(r#"{"Network":"10.0.0.0/8","Backend":{"Type":"VXLAN","vni":4096,"PORT":4789,"mtu":1400,
                   "GBP":true,"learning":true,"directrouting":true}}"#);
    assert_eq!(
        c.backend,
        Backend::Vxlan(VxlanConfig {
            vni: 4096,
            port: 4789,
            mtu: 1400,
            gbp: true,
            learning: true,
            direct_routing: true
        })
    );
    let c = ok(r#"{"Network":"10.0.0.0/8","Backend":{"Type":"vxlan","VNI":0,"Port":65535,"MTU":0}}"#);
    assert_eq!(c.backend, Backend::Vxlan(VxlanConfig { vni: 0, port: 65535, ..VxlanConfig::default() }));
    let c = ok(r#"{"Network":"10.0.0.0/8","Backend":{"Type":"vxlan","VNI":16777215}}"#);
    assert_eq!(c.backend, Backend::Vxlan(VxlanConfig { vni: 16777215, ..VxlanConfig::default() }));
    assert_eq!(ok(r#"{"Network":"10.0.0.0/8","Backend":{"Type":"host-gw","Port":"junk"}}"#).backend, Backend::HostGw);
}

/// pkg/backend/vxlan/vxlan.go parseVXLANConfig (Go `int`/`bool` decoding), then what netlink and
/// the kernel do with the values (pkg/backend/vxlan/device.go newVXLANDevice).
#[test]
fn vxlan_option_errors() {
    let cases = [
        (r#""VNI":"1""#, "Backend.VNI \"1\" is invalid: it must be an integer"),
        (r#""VNI":1.5"#, "Backend.VNI 1.5 is invalid: it must be an integer"),
        (r#""VNI":-1"#, "Backend.VNI -1 is invalid: it must be between 0 and 16777215 (24 bits)"),
        (r#""VNI":16777216"#, "Backend.VNI 16777216 is invalid: it must be between 0 and 16777215 (24 bits)"),
        (r#""VNI":9223372036854775808"#, "Backend.VNI 9223372036854775808 is invalid: it is out of range"),
        (r#""GBP":"true""#, "Backend.GBP \"true\" is invalid: it must be true or false"),
        (r#""Port":70000"#, "Backend.Port 70000 is invalid: it must be between 0 (the kernel default, 8472) and 65535"),
        (r#""Port":-1"#, "Backend.Port -1 is invalid: it must be between 0 (the kernel default, 8472) and 65535"),
        (
            r#""MTU":-1"#,
            "Backend.MTU -1 is invalid: it must be 0 (use the external interface's MTU) or a byte count up to 4294967295",
        ),
    ];
    for (opt, msg) in cases {
        assert_eq!(err(&format!(r#"{{"Network":"10.0.0.0/8","Backend":{{"Type":"vxlan",{opt}}}}}"#)), msg, "{opt}");
    }
}

/// pkg/backend/udp/udp_amd64.go: `Port int`, default 8285, bound with net.ListenUDP.
#[test]
fn udp_port() {
    assert_eq!(ok(r#"{"Network":"10.0.0.0/8","Backend":{"Type":"udp"}}"#).backend, Backend::Udp { port: 8285 });
    assert_eq!(ok(r#"{"Network":"10.0.0.0/8","Backend":{"Type":"UDP","port":1}}"#).backend, Backend::Udp { port: 1 });
    for port in ["0", "70000", "-5"] {
        assert_eq!(
            err(&format!(r#"{{"Network":"10.0.0.0/8","Backend":{{"Type":"udp","Port":{port}}}}}"#)),
            format!("Backend.Port {port} is invalid: it must be between 1 and 65535")
        );
    }
}

// ---- address families -----------------------------------------------------------------------

/// pkg/subnet/config_test.go TestIPv6ConfigDefaults; pkg/subnet/config.go CheckNetworkConfig
/// (IPv6 half: /64 by default, first subnet skipped).
#[test]
fn ipv6_only_defaults() {
    let c = ok(r#"{ "enableIPv6": true, "ipv6Network": "fc00::/48", "enableIPv4": false }"#);
    assert_eq!(ipv6(&c), (net6("fc00::/48"), 64, v6("fc00:0:0:1::"), v6("fc00:0:0:ffff::")));
    assert!(!c.enable_ipv4 && c.enable_ipv6);
    assert_eq!((c.network, c.subnet_len, c.subnet_min, c.subnet_max), (None, 0, v4("0.0.0.0"), v4("0.0.0.0")));
    assert_eq!(c.ipv4_subnets().count(), 0);
    assert!(!c.contains_subnet(net4("10.0.1.0/24")));
}

/// pkg/subnet/config_test.go TestIPv6ConfigOverrides.
#[test]
fn ipv6_overrides() {
    let c = ok(r#"{ "EnableIPv6": true, "IPv6Network": "fc00::/48", "IPv6SubnetMin": "fc00:0:0:1::",
                    "IPv6SubnetMax": "fc00:0:0:f::", "IPv6SubnetLen": 124, "enableIPv4": false }"#);
    assert_eq!(ipv6(&c), (net6("fc00::/48"), 124, v6("fc00:0:0:1::"), v6("fc00:0:0:f::")));
}

/// pkg/subnet/config.go CheckNetworkConfig: IPv6SubnetLen defaults to 64 up to a /62 network,
/// else prefix + 2; host bits are masked (net.ParseCIDR); the last subnet of ffff::/16 does not
/// wrap (big.Int arithmetic in pkg/ip/ip6net.go).
#[test]
fn dual_stack_defaults() {
    let cases = [
        ("fc00::/48", 64, "fc00:0:0:1::", "fc00:0:0:ffff::"),
        ("fc00::/62", 64, "fc00:0:0:1::", "fc00:0:0:3::"),
        ("fc00::/63", 65, "fc00::8000:0:0:0", "fc00:0:0:1:8000::"),
        ("fc00::/124", 126, "fc00::4", "fc00::c"),
        ("ffff::/16", 64, "ffff:0:0:1::", "ffff:ffff:ffff:ffff::"),
        ("fc00::7/48", 64, "fc00:0:0:1::", "fc00:0:0:ffff::"),
    ];
    for (network, len, min, max) in cases {
        let c = ok(&format!(r#"{{"EnableIPv6":true,"Network":"10.0.0.0/8","IPv6Network":"{network}"}}"#));
        assert_eq!(ipv6(&c), (net6(network).trunc(), len, v6(min), v6(max)), "{network}");
        assert_eq!(ipv4(&c), (net4("10.0.0.0/8"), 24, v4("10.0.1.0"), v4("10.255.255.0")));
    }
}

/// pkg/subnet/config.go CheckNetworkConfig (IPv6 half): every error it can return. The pointer
/// fields IPv6SubnetMin/Max accept null and "::" as unset (ip.IsEmpty).
#[test]
fn ipv6_errors() {
    let with =
        |extra: &str| format!(r#"{{"EnableIPv6":true,"Network":"10.0.0.0/8","IPv6Network":"fc00::/48"{extra}}}"#);
    assert_eq!(
        err(r#"{"EnableIPv6":true,"Network":"10.0.0.0/8"}"#),
        "IPv6Network is missing: it is required when EnableIPv6 is true"
    );
    assert_eq!(
        err(r#"{"EnableIPv6":true,"Network":"10.0.0.0/8","IPv6Network":"::/0"}"#),
        "IPv6Network ::/0 is invalid: flannel treats a /0 network as no network at all"
    );
    assert_eq!(
        err(r#"{"EnableIPv6":true,"Network":"10.0.0.0/8","IPv6Network":"fc00::/125"}"#),
        "IPv6Network fc00::/125 is invalid: its prefix must be /124 or shorter (room for four /126 subnets) when \
         IPv6SubnetLen is not set"
    );
    assert_eq!(err(&with(r#","IPv6SubnetLen":127"#)), "IPv6SubnetLen 127 is invalid: it must be at most 126");
    assert_eq!(
        err(&with(r#","IPv6SubnetLen":49"#)),
        "IPv6SubnetLen 49 is invalid: it must be at least 50 so that IPv6Network fc00::/48 holds at least four subnets"
    );
    assert_eq!(
        err(&with(r#","IPv6SubnetMin":"fd00::""#)),
        "IPv6SubnetMin fd00:: is invalid: it is outside the network fc00::/48"
    );
    assert_eq!(
        err(&with(r#","IPv6SubnetMax":"fd00::""#)),
        "IPv6SubnetMax fd00:: is invalid: it is outside the network fc00::/48"
    );
    assert_eq!(
        err(&with(r#","IPv6SubnetMin":"fc00::1""#)),
        "IPv6SubnetMin fc00::1 is invalid: it is not on a /64 subnet boundary"
    );
    assert_eq!(
        err(&with(r#","IPv6SubnetMax":"fc00::1""#)),
        "IPv6SubnetMax fc00::1 is invalid: it is not on a /64 subnet boundary"
    );
    assert_eq!(
        err(&with(r#","IPv6SubnetMin":"fc00:0:0:9::","IPv6SubnetMax":"fc00:0:0:3::""#)),
        "IPv6SubnetMin fc00:0:0:9:: is invalid: it is above IPv6SubnetMax fc00:0:0:3::, which leaves no subnet to lease"
    );
    // IPv4 text becomes its IPv4-mapped IPv6 address (net.ParseIP), outside any ULA network.
    assert_eq!(
        err(&with(r#","IPv6SubnetMin":"10.0.0.1""#)),
        "IPv6SubnetMin ::ffff:10.0.0.1 is invalid: it is outside the network fc00::/48"
    );
    assert_eq!(
        err(&with(r#","IPv6SubnetMin":"fe80::1%eth0""#)),
        "IPv6SubnetMin \"fe80::1%eth0\" is invalid: it is not an IP address"
    );
    let c = ok(&with(r#","IPv6SubnetMin":null,"IPv6SubnetMax":"::""#));
    assert_eq!(ipv6(&c), (net6("fc00::/48"), 64, v6("fc00:0:0:1::"), v6("fc00:0:0:ffff::")));
    assert_eq!(
        err(r#"{"EnableIPv6":true,"Network":"10.0.0.0/8","IPv6Network":null}"#),
        "IPv6Network null is invalid: it must be a string such as \"fc00::/48\""
    );
    assert_eq!(
        err(r#"{"EnableIPv6":true,"Network":"10.0.0.0/8","IPv6Network":"10.0.0.0/8"}"#),
        "IPv6Network 10.0.0.0/8 is invalid: it is not an IPv6 CIDR"
    );
}

/// pkg/subnet/config.go: ParseConfig decodes every field (so malformed addresses fail even for
/// a disabled family) but CheckNetworkConfig only looks at enabled families; main.go exits
/// when neither is enabled (pkg/ipmatch/match.go GetIPFamily: "none defined stack").
#[test]
fn disabled_families() {
    let c = ok(r#"{"Network":"10.0.0.0/8","IPv6Network":"10.0.0.0/8","IPv6SubnetLen":900,"IPv6SubnetMin":"fc00::1"}"#);
    assert_eq!((c.ipv6_network, c.ipv6_subnet_len, c.ipv6_subnet_min, c.ipv6_subnet_max), (None, 0, None, None));
    assert_eq!(
        err(r#"{"Network":"10.0.0.0/8","IPv6Network":"bad"}"#),
        "IPv6Network \"bad\" is invalid: it is not a CIDR such as \"fc00::/48\""
    );
    assert!(err(r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/48","Network":"bad"}"#)
        .starts_with("Network \"bad\" is invalid"));
    let c =
        ok(r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/48","Network":"10.0.0.0/8","SubnetLen":99}"#);
    assert_eq!((c.network, c.subnet_len), (None, 0));
    let none = "EnableIPv4 and EnableIPv6 are both false: at least one address family must be enabled";
    assert_eq!(err(r#"{"EnableIPv4":false}"#), none);
    assert_eq!(err(r#"{"EnableIPv4":false,"EnableIPv6":false,"Network":"10.0.0.0/8"}"#), none);
}

// ---- subnet helpers -------------------------------------------------------------------------

/// The candidates flannel's allocateSubnet walks: SubnetMin to SubnetMax in SubnetLen steps
/// (pkg/subnet/etcd/local_manager.go).
#[test]
fn ipv4_subnets_walks_min_to_max() {
    let c = ok(r#"{"Network":"10.1.0.0/25"}"#);
    let all: Vec<Ipv4Net> = c.ipv4_subnets().collect();
    assert_eq!(all, vec![net4("10.1.0.32/27"), net4("10.1.0.64/27"), net4("10.1.0.96/27")]);
    // The last subnet of the address space ends the walk without wrapping.
    let c = ok(r#"{"Network":"255.255.0.0/16"}"#);
    assert_eq!(c.ipv4_subnets().count(), 255);
    assert_eq!(c.ipv4_subnets().last(), Some(net4("255.255.255.0/24")));
    let c = ok(r#"{"Network":"10.1.0.0/16","SubnetMin":"10.1.7.0","SubnetMax":"10.1.7.0"}"#);
    assert_eq!(c.ipv4_subnets().collect::<Vec<_>>(), vec![net4("10.1.7.0/24")]);
}

/// pkg/subnet/etcd/local_manager.go isSubnetConfigCompat: in [SubnetMin, SubnetMax] with
/// SubnetLen; we also require the subnet to be aligned.
#[test]
fn contains_subnet() {
    let c = ok(r#"{"Network":"10.5.0.0/16","SubnetMin":"10.5.10.0","SubnetMax":"10.5.20.0"}"#);
    assert!(c.contains_subnet(net4("10.5.10.0/24")));
    assert!(c.contains_subnet(net4("10.5.15.0/24")));
    assert!(c.contains_subnet(net4("10.5.20.0/24")));
    assert!(!c.contains_subnet(net4("10.5.9.0/24")), "below SubnetMin");
    assert!(!c.contains_subnet(net4("10.5.21.0/24")), "above SubnetMax");
    assert!(!c.contains_subnet(net4("10.5.15.0/25")), "wrong length");
    assert!(!c.contains_subnet(net4("10.5.15.7/24")), "host bits");
    assert!(!c.contains_subnet(net4("10.6.15.0/24")), "other network");
    assert!(c.ipv4_subnets().all(|s| c.contains_subnet(s)));
}
