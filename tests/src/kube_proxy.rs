//! kube-proxy's iptables mode in a node's namespace: the ClusterIP rules it programs, for the
//! tests and benches that must show our datapath carries Service traffic as a Kubernetes
//! node needs it.
//!
//! A pod connecting to a ClusterIP is DNATed to a backend pod in nat PREROUTING (OUTPUT for
//! the node's own connections), and the replies are translated back by conntrack. That works
//! only if the node's conntrack sees both directions of the connection: a datapath that
//! forwards one direction around netfilter leaves the replies untranslated, and kube-proxy's
//! `--ctstate INVALID -j DROP` in FORWARD drops what conntrack could not match. Measuring pod
//! → ClusterIP through each datapath therefore proves conntrack-symmetric forwarding and
//! reverse DNAT through it, and what that costs.
//!
//! The rules are the ones kube-proxy writes (pkg/proxy/iptables, one endpoint per Service):
//! ```text
//! *nat
//! -I PREROUTING 1 -j KUBE-SERVICES              (and OUTPUT)
//! -I POSTROUTING 1 -j KUBE-POSTROUTING
//! -A KUBE-SERVICES -d <vip>/32 -p tcp --dport <port> -j KUBE-SVC-<X>
//! -A KUBE-SVC-<X> ! -s <cluster cidr> -d <vip>/32 -p tcp --dport <port> -j KUBE-MARK-MASQ
//! -A KUBE-SVC-<X> -j KUBE-SEP-<X>
//! -A KUBE-SEP-<X> -s <backend>/32 -j KUBE-MARK-MASQ     (hairpin: a pod reaching itself)
//! -A KUBE-SEP-<X> -p tcp -j DNAT --to-destination <backend>:<backend port>
//! -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
//! -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
//! -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
//! -A KUBE-POSTROUTING -j MASQUERADE --random-fully
//! *filter
//! -I FORWARD 1 -j KUBE-FORWARD
//! -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
//! ```
//! kube-proxy names its chains by a hash of the Service; here `<X>` is the VIP and port in
//! hex, which is as unique and readable in `iptables-save`. Virtual IPs must lie in
//! Kubernetes' default service range, 10.96.0.0/12, which exists only inside the lab's
//! namespaces.

use std::{io::Write, net::Ipv4Addr, process::Stdio};

use anyhow::{bail, ensure, Context, Result};
use ipnet::Ipv4Net;

use crate::NetNs;

/// kube-proxy's masquerade mark (`--iptables-masquerade-bit` 14).
const MASQ_MARK: &str = "0x4000";

/// One TCP ClusterIP Service port with a single endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClusterIp {
    /// The Service's virtual IP, in 10.96.0.0/12.
    pub vip: Ipv4Addr,
    pub port: u16,
    /// The endpoint (a pod) and its port (the Service's targetPort).
    pub backend: Ipv4Addr,
    pub backend_port: u16,
}

impl ClusterIp {
    /// `KUBE-SVC-…` or `KUBE-SEP-…` for this Service port (at most 21 characters; iptables
    /// allows 28).
    fn chain(&self, kind: &str) -> String {
        format!("KUBE-{kind}-{:08X}{:04X}", u32::from(self.vip), self.port)
    }
}

/// Installs kube-proxy's rules for `services` in `ns`, where `cluster_cidr` is the pod
/// network (kube-proxy's `--cluster-cidr`, e.g. `10.244.0.0/16`), together with its INVALID
/// drop in FORWARD: one `iptables-restore --noflush` batch, so nothing else in the namespace
/// (the agent's FLANNEL-* chains) is touched. Call it once per namespace, as kube-proxy's
/// first sync: a second call rewrites the KUBE-* chains but adds a second jump to each.
pub fn install(ns: &NetNs, cluster_cidr: &str, services: &[ClusterIp]) -> Result<()> {
    let cluster: Ipv4Net = cluster_cidr.parse().with_context(|| format!("cluster CIDR {cluster_cidr}"))?;
    let service_range = Ipv4Net::new(Ipv4Addr::new(10, 96, 0, 0), 12).expect("valid prefix length");
    for service in services {
        ensure!(
            service_range.contains(&service.vip),
            "ClusterIP {} is outside Kubernetes' service range {service_range}",
            service.vip
        );
    }
    restore(ns, &(nat_table(cluster, services) + &filter_table()))
}

/// Installs only kube-proxy's `-m conntrack --ctstate INVALID -j DROP` in FORWARD of `ns`:
/// for a node that needs no Service but, like every kube-proxy node, has that rule.
/// [`install`] already includes it. Once per namespace.
pub fn install_invalid_drop(ns: &NetNs) -> Result<()> {
    restore(ns, &filter_table())
}

fn nat_table(cluster: Ipv4Net, services: &[ClusterIp]) -> String {
    let mut chains = vec!["KUBE-SERVICES".to_string(), "KUBE-POSTROUTING".into(), "KUBE-MARK-MASQ".into()];
    let mut rules = vec![
        // Prepended, as kube-proxy does, so that nothing earlier in the hooks can bypass them.
        r#"-I PREROUTING 1 -m comment --comment "kubernetes service portals" -j KUBE-SERVICES"#.to_string(),
        r#"-I OUTPUT 1 -m comment --comment "kubernetes service portals" -j KUBE-SERVICES"#.into(),
        r#"-I POSTROUTING 1 -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING"#.into(),
        format!("-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}"),
        format!("-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN"),
        // Cleared so that a packet re-traversing the hooks (e.g. through a tunnel) is not
        // masqueraded twice.
        format!("-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}"),
        r#"-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully"#.into(),
    ];
    for s in services {
        let (svc, sep) = (s.chain("SVC"), s.chain("SEP"));
        let matches = format!("-d {}/32 -p tcp -m tcp --dport {}", s.vip, s.port);
        rules.extend([
            format!("-A KUBE-SERVICES {matches} -j {svc}"),
            // Traffic from outside the pod network must come back through this node.
            format!("-A {svc} ! -s {cluster} {matches} -j KUBE-MARK-MASQ"),
            format!("-A {svc} -j {sep}"),
            format!("-A {sep} -s {}/32 -j KUBE-MARK-MASQ", s.backend),
            format!("-A {sep} -p tcp -m tcp -j DNAT --to-destination {}:{}", s.backend, s.backend_port),
        ]);
        chains.extend([svc, sep]);
    }
    table("nat", &chains, &rules)
}

fn filter_table() -> String {
    let rules = [
        r#"-I FORWARD 1 -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD"#.to_string(),
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP".into(),
    ];
    table("filter", &["KUBE-FORWARD".to_string()], &rules)
}

/// One table of an `iptables-restore` batch: the chain declarations (which, with
/// `--noflush`, create or empty only those chains), the rules, COMMIT.
fn table(name: &str, chains: &[String], rules: &[String]) -> String {
    let mut text = format!("*{name}\n");
    for chain in chains {
        text += &format!(":{chain} - [0:0]\n");
    }
    for rule in rules {
        text += rule;
        text.push('\n');
    }
    text + "COMMIT\n"
}

/// `iptables-restore --noflush --wait` with `batch` on stdin, in `ns`. `--wait`: the agent
/// applies its own rules in the same namespace.
fn restore(ns: &NetNs, batch: &str) -> Result<()> {
    let mut command = ns.command("iptables-restore");
    command.args(["--noflush", "--wait"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let failed = || format!("iptables-restore --noflush in namespace {} with\n{batch}", ns.name());
    let mut child = command.spawn().with_context(failed)?;
    // Dropping stdin closes it, which ends the batch.
    child.stdin.take().context("iptables-restore stdin")?.write_all(batch.as_bytes()).with_context(failed)?;
    let output = child.wait_with_output().with_context(failed)?;
    if !output.status.success() {
        bail!("{} failed ({}): {}", failed(), output.status, String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_is_dnated_to_its_endpoint_and_marked_only_from_outside_the_pod_network() {
        let service = ClusterIp {
            vip: Ipv4Addr::new(10, 96, 0, 10),
            port: 80,
            backend: Ipv4Addr::new(10, 244, 1, 2),
            backend_port: 8080,
        };
        let batch = nat_table("10.244.0.0/16".parse().unwrap(), &[service]);
        for line in [
            ":KUBE-SVC-0A60000A0050 - [0:0]",
            "-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-0A60000A0050",
            "-A KUBE-SVC-0A60000A0050 ! -s 10.244.0.0/16 -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j KUBE-MARK-MASQ",
            "-A KUBE-SVC-0A60000A0050 -j KUBE-SEP-0A60000A0050",
            "-A KUBE-SEP-0A60000A0050 -p tcp -m tcp -j DNAT --to-destination 10.244.1.2:8080",
        ] {
            assert!(batch.lines().any(|l| l == line), "missing `{line}` in\n{batch}");
        }
        assert!(batch.starts_with("*nat\n") && batch.ends_with("COMMIT\n"));
        assert!(filter_table().contains("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n"));
    }
}
