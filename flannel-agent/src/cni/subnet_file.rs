//! Reading flanneld's subnet.env as the Go plugin does (`loadFlannelSubnetEnv`), and the Go
//! address parsing and printing it relies on (`net.ParseCIDR`, `net.ParseIP`,
//! `IPNet.String`).

use std::{
    io::Read,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// What subnet.env says. Every field is optional while reading; [`load`] insists on the
/// required ones (either address family may stand in for the other).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubnetEnv {
    /// FLANNEL_NETWORK: comma-separated CIDRs, duplicates dropped.
    pub networks: Vec<IpNet>,
    /// FLANNEL_SUBNET, masked to its network (10.244.1.1/24 → 10.244.1.0/24).
    pub subnet: Option<IpNet>,
    pub ip6_networks: Vec<IpNet>,
    pub ip6_subnet: Option<IpNet>,
    pub mtu: Option<u32>,
    /// FLANNEL_IPMASQ: true only when the value is exactly "true".
    pub ipmasq: Option<bool>,
}

impl SubnetEnv {
    /// The required keys that are absent, in flannel's wording and order.
    pub fn missing(&self) -> String {
        let mut missing = Vec::new();
        if self.networks.is_empty() && self.ip6_networks.is_empty() {
            missing.extend(["FLANNEL_NETWORK", "FLANNEL_IPV6_NETWORK"]);
        }
        if self.subnet.is_none() && self.ip6_subnet.is_none() {
            missing.extend(["FLANNEL_SUBNET", "FLANNEL_IPV6_SUBNET"]);
        }
        if self.mtu.is_none() {
            missing.push("FLANNEL_MTU");
        }
        if self.ipmasq.is_none() {
            missing.push("FLANNEL_IPMASQ");
        }
        missing.join(", ")
    }

    /// Parses the file's contents (later lines override earlier ones; unknown keys are
    /// ignored). Does not check for missing keys.
    pub fn parse(contents: &[u8]) -> Result<SubnetEnv, String> {
        let mut env = SubnetEnv::default();
        for line in scan_lines(contents)? {
            let (key, value) = match line.iter().position(|&b| b == b'=') {
                Some(eq) => (&line[..eq], Some(String::from_utf8_lossy(&line[eq + 1..]))),
                None => (line, None),
            };
            let known = matches!(
                key,
                b"FLANNEL_NETWORK"
                    | b"FLANNEL_SUBNET"
                    | b"FLANNEL_IPV6_NETWORK"
                    | b"FLANNEL_IPV6_SUBNET"
                    | b"FLANNEL_MTU"
                    | b"FLANNEL_IPMASQ"
            );
            if !known {
                continue;
            }
            // flannel indexes the missing value and panics; this is an error instead.
            let value = value.ok_or_else(|| format!("line {} has no value", String::from_utf8_lossy(key)))?;
            match key {
                b"FLANNEL_NETWORK" => env.networks = parse_networks(&value)?,
                b"FLANNEL_IPV6_NETWORK" => env.ip6_networks = parse_networks(&value)?,
                b"FLANNEL_SUBNET" => env.subnet = Some(parse_cidr_network(&value)?),
                b"FLANNEL_IPV6_SUBNET" => env.ip6_subnet = Some(parse_cidr_network(&value)?),
                b"FLANNEL_MTU" => env.mtu = Some(parse_uint32(&value)?),
                _ => env.ipmasq = Some(value == "true"),
            }
        }
        Ok(env)
    }
}

/// Reads `path` and insists on the required keys: `<path> is missing FLANNEL_MTU, ...`.
pub fn load(path: &str) -> Result<SubnetEnv, String> {
    let mut file = std::fs::File::open(Path::new(path)).map_err(|e| format!("open {path}: {}", go_errno(&e)))?;
    let mut contents = Vec::new();
    file.read_to_end(&mut contents).map_err(|e| format!("read {path}: {}", go_errno(&e)))?;
    let env = SubnetEnv::parse(&contents)?;
    let missing = env.missing();
    if !missing.is_empty() {
        return Err(format!("{path} is missing {missing}"));
    }
    Ok(env)
}

/// bufio.Scanner with ScanLines: lines split at '\n' with one trailing '\r' dropped, no empty
/// last line after a final newline, and the scanner's 64 KiB line limit.
fn scan_lines(contents: &[u8]) -> Result<Vec<&[u8]>, String> {
    if contents.is_empty() {
        return Ok(Vec::new());
    }
    let body = contents.strip_suffix(b"\n").unwrap_or(contents);
    body.split(|&b| b == b'\n')
        .map(|line| {
            if line.len() >= 64 * 1024 {
                return Err("bufio.Scanner: token too long".to_string());
            }
            Ok(line.strip_suffix(b"\r").unwrap_or(line))
        })
        .collect()
}

fn parse_networks(value: &str) -> Result<Vec<IpNet>, String> {
    let mut networks: Vec<IpNet> = Vec::new();
    for cidr in value.split(',') {
        let net = parse_cidr_network(cidr)?;
        if !networks.contains(&net) {
            networks.push(net);
        }
    }
    Ok(networks)
}

/// `strconv.ParseUint(s, 10, 32)`.
fn parse_uint32(s: &str) -> Result<u32, String> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("strconv.ParseUint: parsing {}: invalid syntax", crate::gojson::go_quote(s)));
    }
    s.parse::<u32>()
        .map_err(|_| format!("strconv.ParseUint: parsing {}: value out of range", crate::gojson::go_quote(s)))
}

/// `net.ParseCIDR(s)`: the address as written and the prefix length, both checked. The error
/// is Go's `invalid CIDR address: <s>`.
pub fn parse_cidr(s: &str) -> Result<(IpAddr, u8), String> {
    let invalid = || format!("invalid CIDR address: {s}");
    let (addr, digits) = s.split_once('/').ok_or_else(invalid)?;
    let ip = parse_ip(addr).ok_or_else(invalid)?;
    let bits: u32 = if ip.is_ipv4() { 32 } else { 128 };
    // Go's dtoi: ASCII digits only, leading zeros allowed.
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    let prefix = digits.bytes().fold(0u32, |n, b| n.saturating_mul(10).saturating_add(u32::from(b - b'0')));
    if prefix > bits {
        return Err(invalid());
    }
    Ok((ip, prefix as u8))
}

/// The network `net.ParseCIDR` returns (address masked), as it prints.
pub fn parse_cidr_network(s: &str) -> Result<IpNet, String> {
    let (ip, prefix) = parse_cidr(s)?;
    Ok(go_ipnet(ip, prefix, true))
}

/// An `IPNet` as Go prints it: an IPv4-mapped IPv6 address counts as IPv4 (with the last 32
/// bits of the mask); `mask` applies the mask first, as `ParseCIDR` does for the network.
pub fn go_ipnet(ip: IpAddr, prefix: u8, mask: bool) -> IpNet {
    match ip {
        IpAddr::V4(a) => {
            let net = Ipv4Net::new(a, prefix).expect("prefix checked");
            IpNet::V4(if mask { net.trunc() } else { net })
        }
        IpAddr::V6(a) => {
            let net = Ipv6Net::new(a, prefix).expect("prefix checked");
            let net = if mask { net.trunc() } else { net };
            match net.addr().to_ipv4_mapped() {
                Some(v4) => IpNet::V4(Ipv4Net::new(v4, prefix.saturating_sub(96)).expect("at most 32")),
                None => IpNet::V6(net),
            }
        }
    }
}

/// `net.ParseIP` (no zones; IPv4 without leading zeros).
pub fn parse_ip(s: &str) -> Option<IpAddr> {
    s.parse::<Ipv4Addr>().map(IpAddr::V4).or_else(|_| s.parse::<Ipv6Addr>().map(IpAddr::V6)).ok()
}

/// An IP as Go prints it: IPv4-mapped IPv6 addresses in dotted form.
pub fn go_ip_string(ip: IpAddr) -> String {
    match ip {
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => a.to_string(),
        },
        IpAddr::V4(a) => a.to_string(),
    }
}

/// An OS error the way Go prints a syscall.Errno ("no such file or directory").
pub fn go_errno(e: &std::io::Error) -> String {
    let text = e.to_string();
    let text = match text.rfind(" (os error ") {
        Some(i) if e.raw_os_error().is_some() => text[..i].to_string(),
        _ => text,
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IPV4: &str =
        "\nFLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n";

    #[test]
    fn reads_flannels_ipv4_file() {
        let env = SubnetEnv::parse(IPV4.as_bytes()).unwrap();
        assert_eq!(env.networks, vec!["10.1.0.0/16".parse::<IpNet>().unwrap()]);
        assert_eq!(env.subnet, Some("10.1.17.0/24".parse().unwrap()));
        assert_eq!(env.mtu, Some(1472));
        assert_eq!(env.ipmasq, Some(true));
        assert_eq!(env.missing(), "");
    }

    #[test]
    fn reads_ipv6_dual_stack_and_multiple_networks() {
        let env = SubnetEnv::parse(
            b"FLANNEL_NETWORK=10.1.0.0/16,192.168.0.0/16,10.1.0.0/16\r\nFLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=fc00::1/64\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false",
        )
        .unwrap();
        assert_eq!(env.networks, vec!["10.1.0.0/16".parse::<IpNet>().unwrap(), "192.168.0.0/16".parse().unwrap()]);
        assert_eq!(env.ip6_networks, vec!["fc00::/48".parse::<IpNet>().unwrap()]);
        assert_eq!(env.ip6_subnet, Some("fc00::/64".parse().unwrap()));
        assert_eq!(env.subnet, None);
        assert_eq!(env.ipmasq, Some(false));
        assert_eq!(env.missing(), "");
    }

    #[test]
    fn missing_keys_are_named() {
        let env = SubnetEnv::parse(b"foo=bar").unwrap();
        assert_eq!(
            env.missing(),
            "FLANNEL_NETWORK, FLANNEL_IPV6_NETWORK, FLANNEL_SUBNET, FLANNEL_IPV6_SUBNET, FLANNEL_MTU, FLANNEL_IPMASQ"
        );
        for (drop, name) in [
            ("FLANNEL_NETWORK", "FLANNEL_NETWORK, FLANNEL_IPV6_NETWORK"),
            ("FLANNEL_SUBNET", "FLANNEL_SUBNET, FLANNEL_IPV6_SUBNET"),
            ("FLANNEL_MTU", "FLANNEL_MTU"),
            ("FLANNEL_IPMASQ", "FLANNEL_IPMASQ"),
        ] {
            let text: String = IPV4.lines().filter(|l| !l.starts_with(drop)).map(|l| format!("{l}\n")).collect();
            assert_eq!(SubnetEnv::parse(text.as_bytes()).unwrap().missing(), name);
        }
    }

    #[test]
    fn load_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("subnet.env");
        let path = path.to_str().unwrap();
        assert_eq!(load(path).unwrap_err(), format!("open {path}: no such file or directory"));
        std::fs::write(path, "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\n").unwrap();
        assert_eq!(load(path).unwrap_err(), format!("{path} is missing FLANNEL_MTU, FLANNEL_IPMASQ"));
        std::fs::write(path, IPV4).unwrap();
        assert_eq!(load(path).unwrap().mtu, Some(1472));
    }

    #[test]
    fn bad_values() {
        assert_eq!(SubnetEnv::parse(b"FLANNEL_SUBNET=10.1.17.1").unwrap_err(), "invalid CIDR address: 10.1.17.1");
        assert_eq!(SubnetEnv::parse(b"FLANNEL_NETWORK=10.1.0.0/16,").unwrap_err(), "invalid CIDR address: ");
        assert_eq!(
            SubnetEnv::parse(b"FLANNEL_MTU=-1").unwrap_err(),
            r#"strconv.ParseUint: parsing "-1": invalid syntax"#
        );
        assert_eq!(
            SubnetEnv::parse(b"FLANNEL_MTU=4294967296").unwrap_err(),
            r#"strconv.ParseUint: parsing "4294967296": value out of range"#
        );
        assert!(SubnetEnv::parse(b"FLANNEL_MTU").is_err());
        // Unknown keys and keys with leading spaces are ignored.
        assert_eq!(SubnetEnv::parse(b" FLANNEL_MTU=x\nOTHER").unwrap(), SubnetEnv::default());
    }

    #[test]
    fn go_cidr_rules() {
        assert_eq!(parse_cidr_network("10.1.17.1/024").unwrap().to_string(), "10.1.17.0/24");
        assert_eq!(parse_cidr_network("::ffff:10.1.2.3/112").unwrap().to_string(), "10.1.0.0/16");
        assert_eq!(parse_cidr_network("FC00:0:0::1/64").unwrap().to_string(), "fc00::/64");
        for bad in ["10.1.0.0/33", "10.1.0.0/", "10.1.0.0/+8", "010.1.0.0/8", "fe80::1%eth0/64", "x/8"] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
        let (ip, prefix) = parse_cidr("10.96.0.5/12").unwrap();
        assert_eq!(go_ipnet(ip, prefix, false).to_string(), "10.96.0.5/12");
    }
}
