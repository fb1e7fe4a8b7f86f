//! Subnet keys under `<prefix>/subnets/`: `10.5.52.0-24`, or dual stack
//! `10.5.52.0-24&fc00:0:0:1::-64` (flannel's regex
//! `(\d+\.\d+.\d+.\d+)-(\d+)(?:&([a-f\d:]+)-(\d+))?$`).

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
#[error("subnet key {key:?} is malformed: {why}")]
pub struct KeyError {
    pub key: String,
    pub why: &'static str,
}

/// The subnets a key names. The IPv6 part is kept so a dual-stack lease written by flannel is
/// understood, even though this agent routes IPv4 only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubnetKey {
    pub ipv4: Ipv4Net,
    pub ipv6: Option<Ipv6Net>,
}

/// Parses the last path element of a lease key (anything before the last `/` is ignored).
pub fn parse_key(key: &str) -> Result<SubnetKey, KeyError> {
    let err = |why| KeyError { key: key.to_string(), why };
    let name = key.rsplit('/').next().unwrap_or(key);
    let (v4, v6) = match name.split_once('&') {
        Some((v4, v6)) => (v4, Some(v6)),
        None => (name, None),
    };
    let (addr, len) = v4.rsplit_once('-').ok_or(err("no '-' between address and prefix length"))?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| err("not an IPv4 address"))?;
    let len = parse_prefix_len(len, 32).ok_or(err("IPv4 prefix length is not a number from 0 to 32"))?;
    let ipv4 = Ipv4Net::new(addr, len).map_err(|_| err("invalid IPv4 prefix"))?;
    if ipv4.network() != addr {
        return Err(err("IPv4 address is not the subnet's base address"));
    }
    let ipv6 = match v6 {
        None => None,
        Some(v6) => {
            let (addr, len) = v6.rsplit_once('-').ok_or(err("no '-' in the IPv6 part"))?;
            let addr: Ipv6Addr = addr.parse().map_err(|_| err("not an IPv6 address"))?;
            let len = parse_prefix_len(len, 128).ok_or(err("IPv6 prefix length is not a number from 0 to 128"))?;
            Some(Ipv6Net::new(addr, len).map_err(|_| err("invalid IPv6 prefix"))?)
        }
    };
    Ok(SubnetKey { ipv4, ipv6 })
}

fn parse_prefix_len(text: &str, max: u8) -> Option<u8> {
    if text.is_empty() || text.len() > 3 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse::<u8>().ok().filter(|len| *len <= max)
}

/// The key name flannel uses for an IPv4 subnet: `10.5.52.0-24`.
pub fn format_key(subnet: Ipv4Net) -> String {
    format!("{}-{}", subnet.network(), subnet.prefix_len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ipv4_key() {
        let key = parse_key("/coreos.com/network/subnets/10.5.52.0-24").unwrap();
        assert_eq!(key.ipv4, "10.5.52.0/24".parse().unwrap());
        assert_eq!(key.ipv6, None);
        assert_eq!(format_key(key.ipv4), "10.5.52.0-24");
    }

    #[test]
    fn parses_dual_stack_key() {
        let key = parse_key("10.5.52.0-24&fc00:0:0:1::-64").unwrap();
        assert_eq!(key.ipv6, Some("fc00:0:0:1::/64".parse().unwrap()));
    }

    #[test]
    fn rejects_malformed_keys_naming_them() {
        for bad in
            ["10.5.52.0", "10.5.52.0-33", "10.5.52.1-24", "x-24", "10.5.52.0-", "10.5.52.0-24&zz-64", "10.5.52.0--1"]
        {
            let error = parse_key(bad).unwrap_err();
            assert_eq!(error.key, bad);
            assert!(error.to_string().contains(bad));
        }
    }
}
