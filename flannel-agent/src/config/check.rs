//! flannel's `subnet.Config` as decoded from JSON, then defaulted and validated the way
//! `CheckNetworkConfig` (pkg/subnet/config.go) does, followed by the checks flannel only makes
//! later, at startup (address family, backend type, backend options).

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

use super::{
    fields::{self, GoCidr, Ip4NetValue, Written},
    Backend, ConfigError, NetworkConfig, VxlanConfig,
};
use crate::gojson::{self, Json};

/// Backend names flannel v0.28 registers on Linux (pkg/backend/*, `backend.Register`).
const FLANNEL_BACKENDS: [&str; 9] =
    ["alloc", "extension", "host-gw", "ipip", "ipsec", "tencent-vpc", "udp", "vxlan", "wireguard"];

/// pkg/backend/udp/udp_amd64.go `defaultPort`.
const UDP_DEFAULT_PORT: i64 = 8285;

/// The VXLAN header carries 24 bits of VNI; Linux refuses larger IDs.
const VNI_MAX: i64 = (1 << 24) - 1;

/// Mirror of Go's `subnet.Config` before CheckNetworkConfig: zero values mean "unset".
struct GoConfig {
    enable_ipv4: bool,
    enable_ipv6: bool,
    enable_nftables: bool,
    network: Option<Ip4NetValue>,
    ipv6_network: Option<GoCidr>,
    subnet_min: Ipv4Addr,
    subnet_max: Ipv4Addr,
    ipv6_subnet_min: Option<Ipv6Addr>,
    ipv6_subnet_max: Option<Ipv6Addr>,
    subnet_len: u64,
    ipv6_subnet_len: u64,
    /// `None` when the key is absent; flannel treats absent and `null` differently.
    backend: Option<Json>,
}

impl GoConfig {
    /// `json.Unmarshal` into `subnet.Config`, with ParseConfig's EnableIPv4 default.
    fn decode(entries: Vec<(String, Json)>) -> Result<GoConfig, ConfigError> {
        let mut c = GoConfig {
            enable_ipv4: true,
            enable_ipv6: false,
            enable_nftables: false,
            network: None,
            ipv6_network: None,
            subnet_min: Ipv4Addr::UNSPECIFIED,
            subnet_max: Ipv4Addr::UNSPECIFIED,
            ipv6_subnet_min: None,
            ipv6_subnet_max: None,
            subnet_len: 0,
            ipv6_subnet_len: 0,
            backend: None,
        };
        for (key, raw) in entries {
            let is = |field: &str| gojson::key_matches(&key, field);
            if is("EnableIPv4") {
                fields::set_bool("EnableIPv4", &raw, &mut c.enable_ipv4)?;
            } else if is("EnableIPv6") {
                fields::set_bool("EnableIPv6", &raw, &mut c.enable_ipv6)?;
            } else if is("EnableNFTables") {
                fields::set_bool("EnableNFTables", &raw, &mut c.enable_nftables)?;
            } else if is("Network") {
                fields::set_ip4net(&raw, &mut c.network)?;
            } else if is("IPv6Network") {
                fields::set_ip6net(&raw, &mut c.ipv6_network)?;
            } else if is("SubnetMin") {
                fields::set_ip4("SubnetMin", &raw, &mut c.subnet_min)?;
            } else if is("SubnetMax") {
                fields::set_ip4("SubnetMax", &raw, &mut c.subnet_max)?;
            } else if is("IPv6SubnetMin") {
                fields::set_ip6("IPv6SubnetMin", &raw, &mut c.ipv6_subnet_min)?;
            } else if is("IPv6SubnetMax") {
                fields::set_ip6("IPv6SubnetMax", &raw, &mut c.ipv6_subnet_max)?;
            } else if is("SubnetLen") {
                fields::set_uint("SubnetLen", &raw, &mut c.subnet_len)?;
            } else if is("IPv6SubnetLen") {
                fields::set_uint("IPv6SubnetLen", &raw, &mut c.ipv6_subnet_len)?;
            } else if is("Backend") {
                // json.RawMessage keeps whatever is there, `null` included.
                c.backend = Some(raw);
            }
            // Anything else (BackendType is `json:"-"` in Go) is ignored, as Go does.
        }
        Ok(c)
    }
}

pub(super) fn build(entries: Vec<(String, Json)>) -> Result<NetworkConfig, ConfigError> {
    let c = GoConfig::decode(entries)?;
    // ParseConfig reads the backend type before CheckNetworkConfig runs.
    let backend_type = backend_type(c.backend.as_ref())?;

    let ipv4 = if c.enable_ipv4 { Some(check_ipv4(&c)?) } else { None };
    let ipv6 = if c.enable_ipv6 { Some(check_ipv6(&c)?) } else { None };
    if ipv4.is_none() && ipv6.is_none() {
        // flannel passes CheckNetworkConfig, then main.go exits via ipmatch.GetIPFamily.
        return Err(ConfigError::NoAddressFamily);
    }
    let backend = backend(backend_type, c.backend.as_ref())?;

    let (network, subnet_len, subnet_min, subnet_max) = match ipv4 {
        Some(v4) => (Some(v4.network), v4.subnet_len, v4.subnet_min, v4.subnet_max),
        None => (None, 0, Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED),
    };
    let (ipv6_network, ipv6_subnet_len, ipv6_subnet_min, ipv6_subnet_max) = match ipv6 {
        Some(v6) => (Some(v6.network), v6.subnet_len, Some(v6.subnet_min), Some(v6.subnet_max)),
        None => (None, 0, None, None),
    };
    Ok(NetworkConfig {
        enable_ipv4: c.enable_ipv4,
        enable_ipv6: c.enable_ipv6,
        enable_nftables: c.enable_nftables,
        network,
        subnet_len,
        subnet_min,
        subnet_max,
        ipv6_network,
        ipv6_subnet_len,
        ipv6_subnet_min,
        ipv6_subnet_max,
        backend,
    })
}

fn invalid(field: &'static str, value: impl ToString, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field, value: value.to_string(), reason: reason.into() }
}

struct Family<N, A> {
    network: N,
    subnet_len: u8,
    subnet_min: A,
    subnet_max: A,
}

/// The IPv4 half of CheckNetworkConfig.
fn check_ipv4(c: &GoConfig) -> Result<Family<Ipv4Net, Ipv4Addr>, ConfigError> {
    let network = match c.network {
        None => {
            return Err(ConfigError::Missing { field: "Network", reason: "it is required while EnableIPv4 is true" })
        }
        Some(Ip4NetValue::Mapped(n)) => {
            return Err(invalid(
                "Network",
                n,
                format!("it is an IPv4-mapped IPv6 CIDR, which flannel reads as a /{} IPv4 network", n.prefix_len()),
            ))
        }
        // Go's IP4Net.Empty(): after masking, any "x/0" is the zero value, i.e. no network.
        Some(Ip4NetValue::Net(n)) if n.prefix_len() == 0 => {
            return Err(invalid("Network", n, "flannel treats a /0 network as no network at all"))
        }
        Some(Ip4NetValue::Net(n)) => n,
    };
    let subnet_len = subnet_len(("SubnetLen", c.subnet_len), ("Network", &network, network.prefix_len()), 32)?;
    let size = 1u32 << (32 - subnet_len);
    let base = u32::from(network.network());
    let last = u32::from(network.broadcast());
    let bounds = Bounds {
        network: &network,
        unset: Ipv4Addr::UNSPECIFIED,
        subnet_len,
        contains: |a: &Ipv4Addr| network.contains(a),
        aligned: |a: &Ipv4Addr| u32::from(*a) % size == 0,
    };
    let subnet_min = bounds.pick("SubnetMin", c.subnet_min, Ipv4Addr::from(base + size))?;
    let subnet_max = bounds.pick("SubnetMax", c.subnet_max, Ipv4Addr::from(last - size + 1))?;
    bounds.check(("SubnetMin", subnet_min), ("SubnetMax", subnet_max))?;
    Ok(Family { network, subnet_len, subnet_min, subnet_max })
}

/// The IPv6 half of CheckNetworkConfig.
fn check_ipv6(c: &GoConfig) -> Result<Family<Ipv6Net, Ipv6Addr>, ConfigError> {
    let network = match c.ipv6_network {
        None => {
            return Err(ConfigError::Missing { field: "IPv6Network", reason: "it is required when EnableIPv6 is true" })
        }
        // flannel would store the IPv4-mapped form and mostly fail the alignment checks.
        Some(GoCidr::V4(n)) => return Err(invalid("IPv6Network", n, "it is not an IPv6 CIDR")),
        Some(GoCidr::V6(n)) if n.prefix_len() == 0 => {
            return Err(invalid("IPv6Network", n, "flannel treats a /0 network as no network at all"))
        }
        Some(GoCidr::V6(n)) => n,
    };
    let subnet_len =
        subnet_len(("IPv6SubnetLen", c.ipv6_subnet_len), ("IPv6Network", &network, network.prefix_len()), 128)?;
    let size = 1u128 << (128 - subnet_len);
    let base = u128::from(network.network());
    let last = u128::from(network.broadcast());
    let bounds = Bounds {
        network: &network,
        unset: Ipv6Addr::UNSPECIFIED,
        subnet_len,
        contains: |a: &Ipv6Addr| network.contains(a),
        aligned: |a: &Ipv6Addr| u128::from(*a) % size == 0,
    };
    // "::" counts as unset, like a nil *ip.IP6 (ip.IsEmpty).
    let given = |a: Option<Ipv6Addr>| a.unwrap_or(Ipv6Addr::UNSPECIFIED);
    let subnet_min = bounds.pick("IPv6SubnetMin", given(c.ipv6_subnet_min), Ipv6Addr::from(base + size))?;
    let subnet_max = bounds.pick("IPv6SubnetMax", given(c.ipv6_subnet_max), Ipv6Addr::from(last - size + 1))?;
    bounds.check(("IPv6SubnetMin", subnet_min), ("IPv6SubnetMax", subnet_max))?;
    Ok(Family { network, subnet_len, subnet_min, subnet_max })
}

/// SubnetLen rules shared by both families (`bits` is 32 or 128): an explicit length must be
/// at most bits-2 and leave room for four subnets; an unset one defaults to /24 (/64) when the
/// network has room for four of those, else to prefix+2, and needs a prefix of at most bits-4.
fn subnet_len(
    (field, given): (&'static str, u64),
    (net_field, network, prefix): (&'static str, &dyn std::fmt::Display, u8),
    bits: u8,
) -> Result<u8, ConfigError> {
    let (max, preferred) = (bits - 2, if bits == 32 { 24 } else { 64 });
    if given == 0 {
        if prefix > bits - 4 {
            return Err(invalid(
                net_field,
                network,
                format!(
                    "its prefix must be /{} or shorter (room for four /{max} subnets) when {field} is not set",
                    bits - 4
                ),
            ));
        }
        return Ok(if prefix <= preferred - 2 { preferred } else { prefix + 2 });
    }
    if given > u64::from(max) {
        return Err(invalid(field, given, format!("it must be at most {max}")));
    }
    if given < u64::from(prefix) + 2 {
        return Err(invalid(
            field,
            given,
            format!("it must be at least {} so that {net_field} {network} holds at least four subnets", prefix + 2),
        ));
    }
    Ok(given as u8)
}

/// SubnetMin/SubnetMax defaulting and checks, for either family.
struct Bounds<'a, N, A, C, L> {
    network: &'a N,
    /// The all-zero address, which flannel reads as "not set".
    unset: A,
    subnet_len: u8,
    contains: C,
    aligned: L,
}

impl<N, A, C, L> Bounds<'_, N, A, C, L>
where
    N: std::fmt::Display,
    A: Copy + Ord + std::fmt::Display,
    C: Fn(&A) -> bool,
    L: Fn(&A) -> bool,
{
    /// An unset (all-zero) bound takes the default; a set one must lie in the network.
    fn pick(&self, field: &'static str, given: A, default: A) -> Result<A, ConfigError> {
        if given == self.unset {
            Ok(default)
        } else if (self.contains)(&given) {
            Ok(given)
        } else {
            Err(invalid(field, given, format!("it is outside the network {}", self.network)))
        }
    }

    /// Alignment as flannel checks it (min first), then min <= max, which flannel never checks:
    /// it accepts such a config but can then neither allocate nor keep any subnet
    /// (allocateSubnet and isSubnetConfigCompat in pkg/subnet/etcd/local_manager.go).
    fn check(
        &self,
        (min_field, min): (&'static str, A),
        (max_field, max): (&'static str, A),
    ) -> Result<(), ConfigError> {
        for (field, value) in [(min_field, min), (max_field, max)] {
            if !(self.aligned)(&value) {
                return Err(invalid(field, value, format!("it is not on a /{} subnet boundary", self.subnet_len)));
            }
        }
        if min > max {
            return Err(invalid(
                min_field,
                min,
                format!("it is above {max_field} {max}, which leaves no subnet to lease"),
            ));
        }
        Ok(())
    }
}

/// pkg/subnet/config.go parseBackendType: an absent Backend means "udp"; a present one must
/// decode as an object whose Type is a string (`null` Backend or Type leaves it empty).
fn backend_type(backend: Option<&Json>) -> Result<String, ConfigError> {
    let mut ty = String::new();
    match backend {
        None => return Ok("udp".to_owned()),
        Some(Json::Null) => {}
        Some(Json::Object(entries)) => {
            for (key, raw) in entries {
                if gojson::key_matches(key, "Type") {
                    fields::set_string("Backend.Type", raw, &mut ty)?;
                }
            }
        }
        Some(other) => {
            return Err(invalid(
                "Backend",
                Written(other),
                format!("it must be an object, not {}", fields::kind_phrase(other)),
            ))
        }
    }
    Ok(ty)
}

/// What flannel does at startup: pkg/backend/manager.go GetBackend (type names compared in
/// lower case) and the chosen backend's config parsing.
fn backend(ty: String, raw: Option<&Json>) -> Result<Backend, ConfigError> {
    let entries: &[(String, Json)] = match raw {
        Some(Json::Object(entries)) => entries,
        _ => &[],
    };
    let name = ty.to_lowercase();
    match name.as_str() {
        "" => Err(ConfigError::Missing {
            field: "Backend.Type",
            reason: "a Backend needs a Type (only a config without any Backend defaults to udp)",
        }),
        "vxlan" => vxlan(entries).map(Backend::Vxlan),
        "host-gw" => Ok(Backend::HostGw),
        "udp" => udp(entries),
        known if FLANNEL_BACKENDS.contains(&known) => Ok(Backend::Other { backend_type: name }),
        _ => Err(invalid(
            "Backend.Type",
            format!("{ty:?}"),
            format!("flannel has no such backend (it knows {})", FLANNEL_BACKENDS.join(", ")),
        )),
    }
}

/// pkg/backend/vxlan/vxlan.go parseVXLANConfig: Go ints and bools, VNI defaulting to 1.
fn vxlan(entries: &[(String, Json)]) -> Result<VxlanConfig, ConfigError> {
    let mut cfg = VxlanConfig::default();
    let (mut vni, mut port, mut mtu) = (i64::from(cfg.vni), i64::from(cfg.port), i64::from(cfg.mtu));
    for (key, raw) in entries {
        let is = |field: &str| gojson::key_matches(key, field);
        if is("VNI") {
            fields::set_int("Backend.VNI", raw, &mut vni)?;
        } else if is("Port") {
            fields::set_int("Backend.Port", raw, &mut port)?;
        } else if is("MTU") {
            fields::set_int("Backend.MTU", raw, &mut mtu)?;
        } else if is("GBP") {
            fields::set_bool("Backend.GBP", raw, &mut cfg.gbp)?;
        } else if is("Learning") {
            fields::set_bool("Backend.Learning", raw, &mut cfg.learning)?;
        } else if is("DirectRouting") {
            fields::set_bool("Backend.DirectRouting", raw, &mut cfg.direct_routing)?;
        }
    }
    // flannel hands these straight to netlink: the kernel refuses VNIs beyond 24 bits, while a
    // negative or >65535 port and a negative MTU are silently turned into something else.
    cfg.vni = u32::try_from(vni)
        .ok()
        .filter(|v| i64::from(*v) <= VNI_MAX)
        .ok_or_else(|| invalid("Backend.VNI", vni, format!("it must be between 0 and {VNI_MAX} (24 bits)")))?;
    cfg.port = u16::try_from(port)
        .map_err(|_| invalid("Backend.Port", port, "it must be between 0 (the kernel default, 8472) and 65535"))?;
    cfg.mtu = u32::try_from(mtu).map_err(|_| {
        invalid("Backend.MTU", mtu, "it must be 0 (use the external interface's MTU) or a byte count up to 4294967295")
    })?;
    Ok(cfg)
}

/// pkg/backend/udp/udp_amd64.go RegisterNetwork: `Port int`, default 8285.
fn udp(entries: &[(String, Json)]) -> Result<Backend, ConfigError> {
    let mut port = UDP_DEFAULT_PORT;
    for (key, raw) in entries {
        if gojson::key_matches(key, "Port") {
            fields::set_int("Backend.Port", raw, &mut port)?;
        }
    }
    // flannel binds this port and tells peers to send to it: 0 would bind a random port that
    // no peer knows, and values outside 1..=65535 make the bind fail.
    match u16::try_from(port) {
        Ok(port) if port != 0 => Ok(Backend::Udp { port }),
        _ => Err(invalid("Backend.Port", port, "it must be between 1 and 65535")),
    }
}
