//! flannel's network config: the JSON value of etcd key `<prefix>/config`, read as flannel
//! v0.28 reads it (pkg/subnet/config.go ParseConfig then CheckNetworkConfig) so that a cluster
//! configured for flannel means the same thing to this agent.
//!
//! Go's decoder has habits serde's derive does not share, and hand-written configs rely on
//! them: keys match case-insensitively, unknown keys are ignored, `null` usually leaves the
//! default, and a repeated key wins over the earlier one. Those are reproduced by
//! [`crate::gojson`]; `fields` reads subnet.Config's field types with them.
//!
//! [`parse`] also refuses what flannel accepts only to fail at startup (no address family, an
//! unknown backend type, bad backend options) or to misbehave later (SubnetMin above
//! SubnetMax, out-of-range ports), so that a config this returns can actually be run.

mod check;
mod fields;
#[cfg(test)]
mod tests;

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

use crate::gojson::{self, Json};

/// A validated network config with flannel's defaults applied.
///
/// Fields of a disabled address family are empty (`None`, 0, 0.0.0.0) whatever the JSON said:
/// flannel does not validate them, so they carry no meaning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    pub enable_ipv4: bool,
    pub enable_ipv6: bool,
    pub enable_nftables: bool,
    /// Always `Some` while `enable_ipv4`; host bits in the JSON are masked off, as Go does.
    pub network: Option<Ipv4Net>,
    pub subnet_len: u8,
    /// The base address of the first leasable subnet. By default the network's first subnet
    /// is skipped, so that no node's subnet starts at the network address.
    pub subnet_min: Ipv4Addr,
    /// The base address of the last leasable subnet.
    pub subnet_max: Ipv4Addr,
    pub ipv6_network: Option<Ipv6Net>,
    pub ipv6_subnet_len: u8,
    pub ipv6_subnet_min: Option<Ipv6Addr>,
    pub ipv6_subnet_max: Option<Ipv6Addr>,
    pub backend: Backend,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    Vxlan(VxlanConfig),
    HostGw,
    /// flannel's default when the config has no `Backend` at all (its docs say vxlan).
    Udp {
        port: u16,
    },
    /// Any other flannel backend type (ipip, wireguard, ...): kept by name so the agent can refuse it clearly.
    /// The name is in lower case, as flannel matches it.
    Other {
        backend_type: String,
    },
}

impl Backend {
    /// The name flannel registers the backend under; vxlan and host-gw leases carry it as
    /// `BackendType` (udp leases carry none).
    pub fn type_name(&self) -> &str {
        match self {
            Backend::Vxlan(_) => "vxlan",
            Backend::HostGw => "host-gw",
            Backend::Udp { .. } => "udp",
            Backend::Other { backend_type } => backend_type,
        }
    }
}

/// `{"Type":"vxlan","VNI":1,"Port":0,"MTU":0,"GBP":false,"Learning":false,"DirectRouting":false}`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanConfig {
    /// 0..=16777215. flannel names its device `flannel.<VNI>` (and `flannel-v6.<VNI>`), and
    /// Linux caps interface names at 15 bytes, so flannel itself cannot start with a VNI of
    /// 10000000 or more (10000 or more with IPv6).
    pub vni: u32,
    /// UDP destination port; 0 means the kernel default, 8472.
    pub port: u16,
    /// flannel's reading: the MTU of the link underneath. The VXLAN device and FLANNEL_MTU get
    /// `mtu - 50`. 0 = auto: use the external interface's MTU (flannel's default; flannel
    /// mishandles an explicit 0 and writes FLANNEL_MTU=-50).
    pub mtu: u32,
    pub gbp: bool,
    pub learning: bool,
    pub direct_routing: bool,
}

impl Default for VxlanConfig {
    /// pkg/backend/vxlan/vxlan.go: `defaultVNI = 1`, everything else zero.
    fn default() -> VxlanConfig {
        VxlanConfig { vni: 1, port: 0, mtu: 0, gbp: false, learning: false, direct_routing: false }
    }
}

/// Why a config was refused. Every message names the offending field and value.
#[derive(thiserror::Error, Debug)]
pub enum ConfigError {
    #[error("network config is not valid JSON: {0}")]
    Syntax(#[source] serde_json::Error),
    #[error("network config must be a JSON object, not {found}")]
    NotAnObject { found: &'static str },
    #[error("{field} {value} is invalid: {reason}")]
    Invalid { field: &'static str, value: String, reason: String },
    #[error("{field} is missing: {reason}")]
    Missing { field: &'static str, reason: &'static str },
    #[error("EnableIPv4 and EnableIPv6 are both false: at least one address family must be enabled")]
    NoAddressFamily,
}

/// Parses, defaults and validates a network config, like flannel's ParseConfig followed by
/// CheckNetworkConfig plus the checks flannel makes when it starts the backend.
pub fn parse(json: &str) -> Result<NetworkConfig, ConfigError> {
    let entries = match gojson::parse_skipping_arrays(json).map_err(ConfigError::Syntax)? {
        // Go decodes a top-level `null` into the defaults without complaint.
        Json::Null => Vec::new(),
        Json::Object(entries) => entries,
        other => return Err(ConfigError::NotAnObject { found: fields::kind_phrase(&other) }),
    };
    check::build(entries)
}

impl NetworkConfig {
    /// Iterator over all IPv4 subnets from subnet_min to subnet_max inclusive, in order.
    pub fn ipv4_subnets(&self) -> impl Iterator<Item = Ipv4Net> + '_ {
        let len = self.subnet_len;
        let (first, last) = (u64::from(u32::from(self.subnet_min)), u64::from(u32::from(self.subnet_max)));
        let start = (self.network.is_some() && len <= 32 && first <= last).then_some(first);
        let step = 1u64 << (32 - u32::from(len.min(32)));
        // u64 so that stepping past 255.255.255.0 ends the walk instead of wrapping to 0.0.0.0.
        std::iter::successors(start, move |a| Some(a + step).filter(|next| *next <= last))
            .filter_map(move |a| Ipv4Net::new(Ipv4Addr::from(a as u32), len).ok())
    }

    /// True when `subnet` is inside `network`, has prefix `subnet_len` and lies within [subnet_min, subnet_max].
    ///
    /// A subnet with host bits set (10.5.1.7/24) is never contained: flannel only hands out
    /// aligned subnets, so such a lease key is not one of its subnets.
    pub fn contains_subnet(&self, subnet: Ipv4Net) -> bool {
        self.network.is_some_and(|n| n.contains(&subnet))
            && subnet.prefix_len() == self.subnet_len
            && subnet.addr() == subnet.network()
            && (self.subnet_min..=self.subnet_max).contains(&subnet.addr())
    }
}
