//! The exact rule text, pure: flannel's masquerade and forward rules for a cluster network C
//! and a node subnet P, as `iptables-save` prints them and as `nft list` prints them, so that
//! what is installed can be compared line by line with what is wanted.
//!
//! iptables (pkg/trafficmngr/iptables), nat table, comment "flanneld masq":
//! `POSTROUTING -j FLANNEL-POSTRTG`, then in FLANNEL-POSTRTG: kube-proxy's mark RETURN,
//! `-s P -d C` RETURN, `-s C -d P` RETURN, `! -s C -d P` RETURN,
//! `-s C ! -d 224.0.0.0/4` MASQUERADE, `! -s C -d C` MASQUERADE (both `--random-fully` when
//! iptables supports it). Filter table, comment "flanneld forward": `FORWARD -j FLANNEL-FWD`,
//! FLANNEL-FWD: `-s C` ACCEPT, `-d C` ACCEPT.

use ipnet::Ipv4Net;

use super::MasqConfig;

/// flannel's nat chain, entered from POSTROUTING.
pub const MASQ_CHAIN: &str = "FLANNEL-POSTRTG";
/// flannel's filter chain, entered from FORWARD.
pub const FORWARD_CHAIN: &str = "FLANNEL-FWD";
pub const MASQ_COMMENT: &str = "flanneld masq";
pub const FORWARD_COMMENT: &str = "flanneld forward";
/// kube-proxy's masquerade mark: packets it marked are masqueraded by kube-proxy, not twice.
pub const KUBE_PROXY_MARK: &str = "0x4000/0x4000";
/// Multicast is never masqueraded.
pub const IPV4_MULTICAST: &str = "224.0.0.0/4";

/// One of flannel's iptables chains with the single jump into it from a built-in chain.
/// Every line is in `iptables-save` form (`-A CHAIN …`, comments in double quotes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IptChain {
    /// `nat` or `filter`.
    pub table: &'static str,
    /// The built-in chain holding the jump: `POSTROUTING` or `FORWARD`.
    pub hook: &'static str,
    /// flannel's own chain: `FLANNEL-POSTRTG` or `FLANNEL-FWD`.
    pub chain: &'static str,
    pub comment: &'static str,
    /// `-A <hook> -m comment --comment "<comment>" -j <chain>`.
    pub jump: String,
    /// The whole content of `chain`, in order.
    pub rules: Vec<String>,
}

impl IptChain {
    fn new(table: &'static str, hook: &'static str, chain: &'static str, comment: &'static str) -> IptChain {
        let jump = format!("-A {hook} -m comment --comment \"{comment}\" -j {chain}");
        IptChain { table, hook, chain, comment, jump, rules: Vec::new() }
    }

    /// Appends `-A <chain> <matches> -m comment --comment "<comment>" -j <target>`.
    fn push(&mut self, matches: &str, target: &str) {
        let matches = if matches.is_empty() { String::new() } else { format!("{matches} ") };
        self.rules.push(format!("-A {} {matches}-m comment --comment \"{}\" -j {target}", self.chain, self.comment));
    }
}

/// The nat chain FLANNEL-POSTRTG for cluster network `network` and node subnet `subnet`.
/// Without `pod_masquerade` the pod → outside rule is left out: the eBPF datapath
/// translates that traffic itself (and would otherwise find it already masqueraded).
pub fn masq_chain(network: Ipv4Net, subnet: Ipv4Net, random_fully: bool, pod_masquerade: bool) -> IptChain {
    let (c, p) = (network.trunc(), subnet.trunc());
    let masquerade = if random_fully { "MASQUERADE --random-fully" } else { "MASQUERADE" };
    let mut chain = IptChain::new("nat", "POSTROUTING", MASQ_CHAIN, MASQ_COMMENT);
    chain.push(&format!("-m mark --mark {KUBE_PROXY_MARK}"), "RETURN");
    chain.push(&format!("-s {p} -d {c}"), "RETURN");
    chain.push(&format!("-s {c} -d {p}"), "RETURN");
    chain.push(&format!("! -s {c} -d {p}"), "RETURN");
    if pod_masquerade {
        chain.push(&format!("-s {c} ! -d {IPV4_MULTICAST}"), masquerade);
    }
    chain.push(&format!("! -s {c} -d {c}"), masquerade);
    chain
}

/// The filter chain FLANNEL-FWD for cluster network `network`.
pub fn forward_chain(network: Ipv4Net) -> IptChain {
    let c = network.trunc();
    let mut chain = IptChain::new("filter", "FORWARD", FORWARD_CHAIN, FORWARD_COMMENT);
    chain.push(&format!("-s {c}"), "ACCEPT");
    chain.push(&format!("-d {c}"), "ACCEPT");
    chain
}

/// Every iptables chain `config` asks for (none when both masquerade and forward are off).
pub fn iptables_chains(config: &MasqConfig, random_fully: bool) -> Vec<IptChain> {
    let mut chains = Vec::new();
    if config.ip_masq {
        chains.push(masq_chain(config.network, config.subnet, random_fully, !config.ebpf_snat));
    }
    if config.forward_rules {
        chains.push(forward_chain(config.network));
    }
    chains
}

/// flannel's nftables table (family `ip`).
pub const NFT_TABLE: &str = "flannel-ipv4";
pub const NFT_TABLE_COMMENT: &str = "rules for flannel-ipv4";
pub const NFT_MASQ_CHAIN: &str = "postrtg";
pub const NFT_FORWARD_CHAIN: &str = "forward";

/// One base chain of the `flannel-ipv4` table; `rules` are in `nft list` form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftChain {
    pub name: &'static str,
    /// `type … hook … priority …;`
    pub base: &'static str,
    pub comment: &'static str,
    pub rules: Vec<String>,
}

/// The `postrtg` chain: the same decisions as FLANNEL-POSTRTG, in the same order.
pub fn nft_masq_chain(network: Ipv4Net, subnet: Ipv4Net, pod_masquerade: bool) -> NftChain {
    let (c, p) = (network.trunc(), subnet.trunc());
    let mut chain = NftChain {
        name: NFT_MASQ_CHAIN,
        base: "type nat hook postrouting priority srcnat;",
        comment: "chain to manage traffic masquerading by flannel",
        rules: vec![
            // kube-proxy's mark, tested under its mask like iptables' --mark 0x4000/0x4000.
            "meta mark & 0x00004000 == 0x00004000 return".to_string(),
            format!("ip saddr {p} ip daddr {c} return"),
            format!("ip saddr {c} ip daddr {p} return"),
            format!("ip saddr != {c} ip daddr {p} return"),
            format!("ip saddr {c} ip daddr != {IPV4_MULTICAST} masquerade fully-random"),
            format!("ip saddr != {c} ip daddr {c} masquerade fully-random"),
        ],
    };
    if !pod_masquerade {
        chain.rules.remove(4);
    }
    chain
}

/// The `forward` chain accepting traffic from and to the cluster network.
pub fn nft_forward_chain(network: Ipv4Net) -> NftChain {
    let c = network.trunc();
    NftChain {
        name: NFT_FORWARD_CHAIN,
        base: "type filter hook forward priority filter;",
        comment: "chain to accept flannel traffic",
        rules: vec![format!("ip saddr {c} accept"), format!("ip daddr {c} accept")],
    }
}

/// Every nftables chain `config` asks for (none when both masquerade and forward are off).
pub fn nft_chains(config: &MasqConfig) -> Vec<NftChain> {
    let mut chains = Vec::new();
    if config.ip_masq {
        chains.push(nft_masq_chain(config.network, config.subnet, !config.ebpf_snat));
    }
    if config.forward_rules {
        chains.push(nft_forward_chain(config.network));
    }
    chains
}

/// The `nft -f -` script that makes `chains` exactly as wanted in one transaction: the table
/// and chains are added if absent, each chain is flushed and refilled (so a previous subnet's
/// rules cannot survive), and applying it twice leaves the same ruleset.
pub fn nft_script(chains: &[NftChain]) -> String {
    let mut script = format!("add table ip {NFT_TABLE} {{ comment \"{NFT_TABLE_COMMENT}\"; }}\n");
    for chain in chains {
        let name = chain.name;
        script += &format!("add chain ip {NFT_TABLE} {name} {{ {} comment \"{}\"; }}\n", chain.base, chain.comment);
        script += &format!("flush chain ip {NFT_TABLE} {name}\n");
        for rule in &chain.rules {
            script += &format!("add rule ip {NFT_TABLE} {name} {rule}\n");
        }
    }
    script
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::masq::{Backend, MasqConfig};

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn config(ip_masq: bool, forward_rules: bool) -> MasqConfig {
        MasqConfig {
            network: net("10.244.0.0/16"),
            subnet: net("10.244.1.0/24"),
            ip_masq,
            forward_rules,
            ebpf_snat: false,
            backend: Backend::Iptables,
        }
    }

    /// Golden: flannel's masqRules for C=10.244.0.0/16, P=10.244.1.0/24, as iptables-save
    /// prints them.
    #[test]
    fn masq_chain_is_flannels() {
        let chain = masq_chain(net("10.244.0.0/16"), net("10.244.1.0/24"), true, true);
        assert_eq!((chain.table, chain.hook, chain.chain), ("nat", "POSTROUTING", "FLANNEL-POSTRTG"));
        assert_eq!(chain.jump, r#"-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG"#);
        assert_eq!(
            chain.rules,
            [
                r#"-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN"#,
                r#"-A FLANNEL-POSTRTG -s 10.244.1.0/24 -d 10.244.0.0/16 -m comment --comment "flanneld masq" -j RETURN"#,
                r#"-A FLANNEL-POSTRTG -s 10.244.0.0/16 -d 10.244.1.0/24 -m comment --comment "flanneld masq" -j RETURN"#,
                r#"-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.1.0/24 -m comment --comment "flanneld masq" -j RETURN"#,
                r#"-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully"#,
                r#"-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully"#,
            ]
        );
    }

    /// flannel drops --random-fully when iptables cannot do it (older than 1.6.2).
    #[test]
    fn masq_chain_without_random_fully() {
        let chain = masq_chain(net("10.244.0.0/16"), net("10.244.1.0/24"), false, true);
        assert_eq!(
            chain.rules[4],
            r#"-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" -j MASQUERADE"#
        );
        assert_eq!(
            chain.rules[5],
            r#"-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment "flanneld masq" -j MASQUERADE"#
        );
        assert!(chain.rules.iter().all(|r| !r.contains("random")));
    }

    /// Golden: flannel's forwardRules.
    #[test]
    fn forward_chain_is_flannels() {
        let chain = forward_chain(net("10.244.0.0/16"));
        assert_eq!((chain.table, chain.hook, chain.chain), ("filter", "FORWARD", "FLANNEL-FWD"));
        assert_eq!(chain.jump, r#"-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD"#);
        assert_eq!(
            chain.rules,
            [
                r#"-A FLANNEL-FWD -s 10.244.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT"#,
                r#"-A FLANNEL-FWD -d 10.244.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT"#,
            ]
        );
    }

    /// Addresses are printed as networks, as iptables-save and nft print them.
    #[test]
    fn host_bits_are_dropped() {
        let chain = masq_chain(net("10.244.3.7/16"), net("10.244.1.9/24"), true, true);
        assert!(chain.rules[1].contains("-s 10.244.1.0/24 -d 10.244.0.0/16 "), "{}", chain.rules[1]);
        assert_eq!(nft_forward_chain(net("10.244.3.7/16")).rules[0], "ip saddr 10.244.0.0/16 accept");
    }

    #[test]
    fn config_selects_chains() {
        assert!(iptables_chains(&config(false, false), true).is_empty());
        assert!(nft_chains(&config(false, false)).is_empty());
        let chains = iptables_chains(&config(true, false), true);
        assert_eq!(chains.iter().map(|c| c.chain).collect::<Vec<_>>(), ["FLANNEL-POSTRTG"]);
        let chains = iptables_chains(&config(false, true), true);
        assert_eq!(chains.iter().map(|c| c.chain).collect::<Vec<_>>(), ["FLANNEL-FWD"]);
        let chains = iptables_chains(&config(true, true), true);
        assert_eq!(chains.iter().map(|c| c.chain).collect::<Vec<_>>(), ["FLANNEL-POSTRTG", "FLANNEL-FWD"]);
        let chains = nft_chains(&config(true, true));
        assert_eq!(chains.iter().map(|c| c.name).collect::<Vec<_>>(), ["postrtg", "forward"]);
    }

    /// Golden: the whole nft script for both chains.
    #[test]
    fn nft_script_golden() {
        let script = nft_script(&nft_chains(&config(true, true)));
        let expected = r#"add table ip flannel-ipv4 { comment "rules for flannel-ipv4"; }
add chain ip flannel-ipv4 postrtg { type nat hook postrouting priority srcnat; comment "chain to manage traffic masquerading by flannel"; }
flush chain ip flannel-ipv4 postrtg
add rule ip flannel-ipv4 postrtg meta mark & 0x00004000 == 0x00004000 return
add rule ip flannel-ipv4 postrtg ip saddr 10.244.1.0/24 ip daddr 10.244.0.0/16 return
add rule ip flannel-ipv4 postrtg ip saddr 10.244.0.0/16 ip daddr 10.244.1.0/24 return
add rule ip flannel-ipv4 postrtg ip saddr != 10.244.0.0/16 ip daddr 10.244.1.0/24 return
add rule ip flannel-ipv4 postrtg ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random
add rule ip flannel-ipv4 postrtg ip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/16 masquerade fully-random
add chain ip flannel-ipv4 forward { type filter hook forward priority filter; comment "chain to accept flannel traffic"; }
flush chain ip flannel-ipv4 forward
add rule ip flannel-ipv4 forward ip saddr 10.244.0.0/16 accept
add rule ip flannel-ipv4 forward ip daddr 10.244.0.0/16 accept
"#;
        assert_eq!(script, expected);
    }

    #[test]
    fn nft_script_masq_only() {
        let script = nft_script(&nft_chains(&config(true, false)));
        assert!(script.contains("add chain ip flannel-ipv4 postrtg"));
        assert!(!script.contains("forward"));
    }
}
