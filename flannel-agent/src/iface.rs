//! Choosing the external interface and public IP the way flanneld does: `--iface` (names or
//! addresses, first match wins), else `--iface-regex` (names or addresses), else
//! `--iface-can-reach` (the interface the kernel would route that address through), else the
//! default route's interface. `--public-ip` overrides the address published in the lease.
//! Everything is read in the caller's network namespace (getifaddrs, /proc/net/route, ioctl).

use std::{
    ffi::CStr,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
};

use anyhow::{bail, Context, Result};
use regex::Regex;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalInterface {
    pub name: String,
    pub index: u32,
    /// The interface's first IPv4 address (outer source of encapsulated packets).
    pub address: Ipv4Addr,
    pub mtu: u32,
}

#[derive(Clone, Debug, Default)]
pub struct IfaceSelection {
    pub iface: Vec<String>,
    pub iface_regex: Vec<String>,
    pub iface_can_reach: Option<Ipv4Addr>,
}

/// One IPv4 address of one interface.
#[derive(Clone, Debug)]
struct IfAddr {
    name: String,
    address: Ipv4Addr,
}

pub fn select(selection: &IfaceSelection) -> Result<ExternalInterface> {
    let addrs = ipv4_addresses()?;
    let (name, address) = if !selection.iface.is_empty() {
        selection
            .iface
            .iter()
            .find_map(|want| match want.parse::<Ipv4Addr>() {
                Ok(ip) => addrs.iter().find(|a| a.address == ip).map(|a| (a.name.clone(), a.address)),
                Err(_) => addrs.iter().find(|a| &a.name == want).map(|a| (a.name.clone(), a.address)),
            })
            .with_context(|| {
                format!("none of --iface {:?} names an interface with an IPv4 address here", selection.iface)
            })?
    } else if !selection.iface_regex.is_empty() {
        let regexes = selection
            .iface_regex
            .iter()
            .map(|r| Regex::new(r).with_context(|| format!("--iface-regex {r:?} is not a valid regular expression")))
            .collect::<Result<Vec<_>>>()?;
        regexes
            .iter()
            .find_map(|re| {
                addrs
                    .iter()
                    .find(|a| re.is_match(&a.address.to_string()) || re.is_match(&a.name))
                    .map(|a| (a.name.clone(), a.address))
            })
            .with_context(|| {
                format!("no interface name or IPv4 address matches --iface-regex {:?}", selection.iface_regex)
            })?
    } else if let Some(target) = selection.iface_can_reach {
        let source = route_source(target)?;
        let found = addrs.iter().find(|a| a.address == source);
        let a = found.with_context(|| format!("source address {source} for {target} is on no interface"))?;
        (a.name.clone(), a.address)
    } else {
        let name = default_route_interface()?;
        let found = addrs.iter().find(|a| a.name == name);
        let a = found.with_context(|| format!("default route interface {name} has no IPv4 address"))?;
        (a.name.clone(), a.address)
    };
    Ok(ExternalInterface { index: if_index(&name)?, mtu: mtu(&name)?, name, address })
}

fn ipv4_addresses() -> Result<Vec<IfAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getifaddrs");
    }
    let mut out = Vec::new();
    let mut cursor = head;
    while !cursor.is_null() {
        // SAFETY: cursor walks the list getifaddrs returned.
        let ifa = unsafe { &*cursor };
        if !ifa.ifa_addr.is_null() && i32::from(unsafe { (*ifa.ifa_addr).sa_family }) == libc::AF_INET {
            // SAFETY: AF_INET addresses are sockaddr_in.
            let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
            let name = unsafe { CStr::from_ptr(ifa.ifa_name) }.to_string_lossy().into_owned();
            out.push(IfAddr { name, address: Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)) });
        }
        cursor = ifa.ifa_next;
    }
    // SAFETY: head came from getifaddrs.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// The source address the kernel picks for `target` (a connected UDP socket sends nothing).
fn route_source(target: Ipv4Addr) -> Result<Ipv4Addr> {
    let socket = UdpSocket::bind("0.0.0.0:0").context("binding a UDP socket for the route lookup")?;
    socket.connect((target, 9)).with_context(|| format!("--iface-can-reach {target}: no route"))?;
    match socket.local_addr()? {
        SocketAddr::V4(v4) => Ok(*v4.ip()),
        SocketAddr::V6(_) => bail!("route lookup for {target} returned an IPv6 source"),
    }
}

/// The interface of the IPv4 default route, from /proc/net/route (per network namespace).
fn default_route_interface() -> Result<String> {
    let table = std::fs::read_to_string("/proc/net/route").context("reading /proc/net/route")?;
    parse_default_route(&table).context("no IPv4 default route: pass --iface, --iface-regex or --iface-can-reach")
}

fn parse_default_route(table: &str) -> Option<String> {
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // Iface Destination Gateway Flags RefCnt Use Metric Mask …; RTF_UP = 1.
        let up = fields.get(3).and_then(|f| u32::from_str_radix(f, 16).ok()).is_some_and(|f| f & 1 == 1);
        (fields.len() > 7 && fields[1] == "00000000" && fields[7] == "00000000" && up).then(|| fields[0].to_string())
    })
}

/// The index of interface `name` in the caller's network namespace.
pub fn if_index(name: &str) -> Result<u32> {
    if name.is_empty() || name.len() >= libc::IF_NAMESIZE || name.contains(['/', '\0']) {
        bail!("invalid interface name {name:?}");
    }
    let c_name = std::ffi::CString::new(name)?;
    // SAFETY: NUL-terminated name.
    match unsafe { libc::if_nametoindex(c_name.as_ptr()) } {
        0 => bail!("interface {name:?} does not exist in this network namespace"),
        index => Ok(index),
    }
}

/// The interface's MTU via SIOCGIFMTU (sysfs would show the host's namespace when the agent
/// only entered a network namespace).
pub fn mtu(name: &str) -> Result<u32> {
    let socket = UdpSocket::bind("0.0.0.0:0").context("opening a socket for SIOCGIFMTU")?;
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    anyhow::ensure!(name.len() < libc::IFNAMSIZ, "interface name {name:?} too long");
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    use std::os::fd::AsRawFd;
    // SAFETY: req is a valid ifreq with a NUL-terminated name.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFMTU, &mut req) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("reading the MTU of {name}"));
    }
    // SAFETY: SIOCGIFMTU fills ifru_mtu.
    Ok(unsafe { req.ifr_ifru.ifru_mtu } as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_default_route_interface() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     eth1\t0002000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                     eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n";
        assert_eq!(parse_default_route(table), Some("eth0".to_string()));
        assert_eq!(parse_default_route("Iface\tDestination\n"), None);
    }

    #[test]
    fn loopback_is_selectable_by_name_and_address() {
        let by_name = select(&IfaceSelection { iface: vec!["lo".into()], ..Default::default() }).unwrap();
        assert_eq!(by_name.address, Ipv4Addr::LOCALHOST);
        assert!(by_name.mtu > 0);
        let by_ip = select(&IfaceSelection { iface: vec!["nosuch".into(), "127.0.0.1".into()], ..Default::default() });
        assert_eq!(by_ip.unwrap().name, "lo");
        let error = select(&IfaceSelection { iface: vec!["nosuch9".into()], ..Default::default() }).unwrap_err();
        assert!(error.to_string().contains("nosuch9"));
        let re = select(&IfaceSelection { iface_regex: vec!["^l.$".into()], ..Default::default() }).unwrap();
        assert_eq!(re.name, "lo");
        let reach = select(&IfaceSelection { iface_can_reach: Some(Ipv4Addr::LOCALHOST), ..Default::default() });
        assert_eq!(reach.unwrap().name, "lo");
    }
}
