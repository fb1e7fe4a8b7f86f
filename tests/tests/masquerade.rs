//! flannel's masquerade and forward rules (`flannel_agent::masq`) applied for real, with
//! iptables (iptables-restore/iptables-save) and nftables (nft), each test in network
//! namespaces of its own: the `TrafficRules` calls run on a thread that entered the test's
//! namespace (`NetNs::run_in`), so the commands they spawn act there and never on the host.
//! Then real UDP packets through a node namespace prove who is masqueraded and who is not.
//! Root only; fails loudly otherwise.

use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    time::{Duration, Instant},
};

use flannel_agent::masq::{Backend, MasqConfig, TrafficRules};
use flannel_tests::{netns::run, require_root, veth_pair, NetNs};
use ipnet::Ipv4Net;

const NETWORK: &str = "10.244.0.0/16";
const SUBNET: &str = "10.244.1.0/24";
const NEW_SUBNET: &str = "10.244.7.0/24";

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

fn config(backend: Backend, ip_masq: bool, forward_rules: bool) -> MasqConfig {
    MasqConfig { network: net(NETWORK), subnet: net(SUBNET), ip_masq, forward_rules, ebpf_snat: false, backend }
}

fn namespace(tag: &str) -> NetNs {
    require_root().unwrap();
    NetNs::create(tag).unwrap()
}

/// flannel's nat rules for C=10.244.0.0/16 and subnet `p`, as iptables-save prints them.
fn flannel_nat(p: &str) -> Vec<String> {
    [
        ":FLANNEL-POSTRTG - [0:0]".to_string(),
        r#"-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG"#.to_string(),
        r#"-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN"#.to_string(),
        format!(r#"-A FLANNEL-POSTRTG -s {p} -d 10.244.0.0/16 -m comment --comment "flanneld masq" -j RETURN"#),
        format!(r#"-A FLANNEL-POSTRTG -s 10.244.0.0/16 -d {p} -m comment --comment "flanneld masq" -j RETURN"#),
        format!(r#"-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d {p} -m comment --comment "flanneld masq" -j RETURN"#),
        r#"-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully"#.to_string(),
        r#"-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully"#.to_string(),
    ]
    .into()
}

/// flannel's filter rules for C=10.244.0.0/16.
fn flannel_filter() -> Vec<String> {
    [
        ":FLANNEL-FWD - [0:0]",
        r#"-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD"#,
        r#"-A FLANNEL-FWD -s 10.244.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT"#,
        r#"-A FLANNEL-FWD -d 10.244.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT"#,
    ]
    .map(String::from)
    .into()
}

/// The lines of `iptables-save -t <table>` in `ns` that are flannel's or mention it.
fn saved(ns: &NetNs, table: &str) -> Vec<String> {
    let out = run(ns.command("iptables-save").args(["-t", table])).unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|line| line.contains("FLANNEL") || line.contains("flanneld") || line.contains("10.244."))
        .map(String::from)
        .collect()
}

fn iptables(ns: &NetNs, args: &[&str]) {
    run(ns.command("iptables").args(args)).unwrap();
}

/// `iptables-restore --noflush` in `ns`, for seeding state by hand.
fn restore(ns: &NetNs, payload: &str) {
    use std::{io::Write, process::Stdio};
    let mut child = ns.command("iptables-restore").arg("--noflush").stdin(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(payload.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success(), "iptables-restore of\n{payload}");
}

fn ensure(ns: &NetNs, rules: &mut TrafficRules) {
    ns.run_in(|| rules.ensure()).unwrap().unwrap();
}

fn check(ns: &NetNs, rules: &TrafficRules) -> bool {
    ns.run_in(|| rules.check()).unwrap().unwrap()
}

fn missing(ns: &NetNs, rules: &TrafficRules) -> Vec<String> {
    ns.run_in(|| rules.missing()).unwrap().unwrap()
}

#[test]
fn iptables_rules_exactly_once_and_idempotent() {
    let ns = namespace("masq-once");
    let mut rules = TrafficRules::new(config(Backend::Iptables, true, true));
    assert!(!check(&ns, &rules));
    ensure(&ns, &mut rules);
    assert_eq!(saved(&ns, "nat"), flannel_nat(SUBNET));
    assert_eq!(saved(&ns, "filter"), flannel_filter());
    assert!(check(&ns, &rules));

    ensure(&ns, &mut rules);
    ensure(&ns, &mut rules);
    assert_eq!(saved(&ns, "nat"), flannel_nat(SUBNET));
    assert_eq!(saved(&ns, "filter"), flannel_filter());

    // A second agent object (a restart) finds everything in place and changes nothing.
    let mut again = TrafficRules::new(config(Backend::Iptables, true, true));
    assert!(check(&ns, &again));
    ensure(&ns, &mut again);
    assert_eq!(saved(&ns, "nat"), flannel_nat(SUBNET));
    assert_eq!(saved(&ns, "filter"), flannel_filter());
}

/// Someone else's rules in POSTROUTING stay where they are.
#[test]
fn iptables_leaves_other_rules_alone() {
    let ns = namespace("masq-other");
    iptables(&ns, &["-t", "nat", "-N", "KUBE-POSTROUTING"]);
    iptables(&ns, &["-t", "nat", "-A", "POSTROUTING", "-m", "comment", "--comment", "kube", "-j", "KUBE-POSTROUTING"]);
    iptables(&ns, &["-t", "nat", "-A", "POSTROUTING", "-s", "172.17.0.0/16", "-j", "MASQUERADE"]);
    let mut rules = TrafficRules::new(config(Backend::Iptables, true, false));
    ensure(&ns, &mut rules);
    let out = String::from_utf8(run(ns.command("iptables-save").args(["-t", "nat"])).unwrap().stdout).unwrap();
    let postrouting: Vec<&str> = out.lines().filter(|l| l.starts_with("-A POSTROUTING")).collect();
    assert_eq!(
        postrouting,
        [
            "-A POSTROUTING -m comment --comment kube -j KUBE-POSTROUTING",
            "-A POSTROUTING -s 172.17.0.0/16 -j MASQUERADE",
            r#"-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG"#,
        ]
    );
    assert!(saved(&ns, "filter").is_empty(), "forward rules were not asked for");
}

#[test]
fn iptables_repairs_deleted_and_duplicated_rules() {
    let ns = namespace("masq-repair");
    let mut rules = TrafficRules::new(config(Backend::Iptables, true, true));
    ensure(&ns, &mut rules);

    // One masquerade rule deleted by hand.
    let deleted =
        r#"-s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully"#;
    iptables(
        &ns,
        &[
            "-t",
            "nat",
            "-D",
            "FLANNEL-POSTRTG",
            "-s",
            "10.244.0.0/16",
            "!",
            "-d",
            "224.0.0.0/4",
            "-m",
            "comment",
            "--comment",
            "flanneld masq",
            "-j",
            "MASQUERADE",
            "--random-fully",
        ],
    );
    assert_eq!(saved(&ns, "nat").len(), flannel_nat(SUBNET).len() - 1);
    assert!(!check(&ns, &rules));
    assert_eq!(missing(&ns, &rules), [format!("nat: missing `-A FLANNEL-POSTRTG {deleted}`")]);
    ensure(&ns, &mut rules);
    assert_eq!(saved(&ns, "nat"), flannel_nat(SUBNET));
    assert!(check(&ns, &rules));

    // The FORWARD jump deleted, and a second POSTROUTING jump added.
    iptables(&ns, &["-D", "FORWARD", "-m", "comment", "--comment", "flanneld forward", "-j", "FLANNEL-FWD"]);
    iptables(
        &ns,
        &["-t", "nat", "-A", "POSTROUTING", "-m", "comment", "--comment", "flanneld masq", "-j", "FLANNEL-POSTRTG"],
    );
    let found = missing(&ns, &rules);
    assert_eq!(found.len(), 2, "{found:#?}");
    assert!(found.iter().any(|p| p.starts_with("nat: stale `-A POSTROUTING")), "{found:#?}");
    assert!(found.iter().any(|p| p.starts_with("filter: missing `-A FORWARD")), "{found:#?}");
    ensure(&ns, &mut rules);
    assert_eq!(saved(&ns, "nat"), flannel_nat(SUBNET));
    assert_eq!(saved(&ns, "filter"), flannel_filter());

    // A foreign rule appended to flannel's chain, and the chain flushed entirely.
    iptables(&ns, &["-t", "nat", "-A", "FLANNEL-POSTRTG", "-d", "10.244.9.0/24", "-j", "RETURN"]);
    iptables(&ns, &["-F", "FLANNEL-FWD"]);
    assert!(!check(&ns, &rules));
    ensure(&ns, &mut rules);
    assert_eq!(saved(&ns, "nat"), flannel_nat(SUBNET));
    assert_eq!(saved(&ns, "filter"), flannel_filter());
    assert!(check(&ns, &rules));
}

#[test]
fn iptables_set_subnet_replaces_old_subnet() {
    let ns = namespace("masq-subnet");
    let mut rules = TrafficRules::new(config(Backend::Iptables, true, true));
    ensure(&ns, &mut rules);
    assert_eq!(saved(&ns, "nat"), flannel_nat(SUBNET));

    ns.run_in(|| rules.set_subnet(net(NEW_SUBNET))).unwrap().unwrap();
    let nat = saved(&ns, "nat");
    assert_eq!(nat, flannel_nat(NEW_SUBNET));
    assert!(nat.iter().all(|line| !line.contains("10.244.1.0")), "{nat:#?}");
    assert_eq!(saved(&ns, "filter"), flannel_filter());
    assert!(check(&ns, &rules));
    assert_eq!(rules.config().subnet, net(NEW_SUBNET));
}

/// Taking over from flanneld: its chain holding a previous lease's subnet, and an older
/// flanneld's rules straight in POSTROUTING, end up as exactly flannel's current rules.
#[test]
fn iptables_replaces_rules_left_by_flanneld() {
    let ns = namespace("masq-takeover");
    let mut previous = String::from("*nat\n");
    for line in flannel_nat("10.244.3.0/24") {
        previous += &line;
        previous.push('\n');
    }
    previous += "-A POSTROUTING -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment \"flanneld masq\" -j RETURN\n";
    previous +=
        "-A POSTROUTING ! -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment \"flanneld masq\" -j MASQUERADE\n";
    previous += "COMMIT\n";
    restore(&ns, &previous);
    assert_eq!(saved(&ns, "nat").len(), 10);

    let mut rules = TrafficRules::new(config(Backend::Iptables, true, false));
    assert!(!check(&ns, &rules));
    ensure(&ns, &mut rules);
    assert_eq!(saved(&ns, "nat"), flannel_nat(SUBNET));
}

#[test]
fn iptables_installs_only_what_is_enabled() {
    let ns = namespace("masq-off");
    let mut nothing = TrafficRules::new(config(Backend::Iptables, false, false));
    ensure(&ns, &mut nothing);
    assert!(check(&ns, &nothing));
    assert!(saved(&ns, "nat").is_empty());
    assert!(saved(&ns, "filter").is_empty());
    let mut nothing = TrafficRules::new(config(Backend::Nftables, false, false));
    ensure(&ns, &mut nothing);
    assert!(!nft_list(&ns).contains("flannel"));

    let mut forward_only = TrafficRules::new(config(Backend::Iptables, false, true));
    ensure(&ns, &mut forward_only);
    assert!(saved(&ns, "nat").is_empty());
    assert_eq!(saved(&ns, "filter"), flannel_filter());
    assert!(check(&ns, &forward_only));
}

/// The whole nft ruleset of `ns`.
fn nft_list(ns: &NetNs) -> String {
    String::from_utf8(run(ns.command("nft").args(["list", "ruleset"])).unwrap().stdout).unwrap()
}

/// The rule lines of one chain of table ip flannel-ipv4.
fn nft_chain(ns: &NetNs, chain: &str) -> Vec<String> {
    let out = run(ns.command("nft").args(["list", "chain", "ip", "flannel-ipv4", chain])).unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("ip ") || l.starts_with("meta "))
        .map(String::from)
        .collect()
}

fn nft_postrtg(p: &str) -> Vec<String> {
    vec![
        "meta mark & 0x00004000 == 0x00004000 return".to_string(),
        format!("ip saddr {p} ip daddr 10.244.0.0/16 return"),
        format!("ip saddr 10.244.0.0/16 ip daddr {p} return"),
        format!("ip saddr != 10.244.0.0/16 ip daddr {p} return"),
        "ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random".to_string(),
        "ip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/16 masquerade fully-random".to_string(),
    ]
}

#[test]
fn nftables_table_idempotent_repaired_and_resubnetted() {
    let ns = namespace("masq-nft");
    let mut rules = TrafficRules::new(config(Backend::Nftables, true, true));
    assert!(!check(&ns, &rules));
    ensure(&ns, &mut rules);
    let listing = nft_list(&ns);
    assert!(listing.contains("table ip flannel-ipv4 {"), "{listing}");
    assert!(listing.contains("chain postrtg {"), "{listing}");
    assert!(listing.contains("type nat hook postrouting priority srcnat; policy accept;"), "{listing}");
    assert!(listing.contains("type filter hook forward priority filter; policy accept;"), "{listing}");
    assert_eq!(nft_chain(&ns, "postrtg"), nft_postrtg(SUBNET));
    assert_eq!(nft_chain(&ns, "forward"), ["ip saddr 10.244.0.0/16 accept", "ip daddr 10.244.0.0/16 accept"]);
    assert!(check(&ns, &rules));
    assert!(saved(&ns, "nat").is_empty(), "the nft backend leaves iptables alone");

    ensure(&ns, &mut rules);
    ensure(&ns, &mut rules);
    assert_eq!(nft_list(&ns), listing);
    let mut again = TrafficRules::new(config(Backend::Nftables, true, true));
    ensure(&ns, &mut again);
    assert_eq!(nft_list(&ns), listing);

    // One rule deleted by handle.
    let out = run(ns.command("nft").args(["-a", "list", "chain", "ip", "flannel-ipv4", "postrtg"])).unwrap();
    let out = String::from_utf8(out.stdout).unwrap();
    let line = out.lines().find(|l| l.contains("ip daddr != 224.0.0.0/4 masquerade fully-random")).unwrap();
    let handle = line.rsplit(' ').next().unwrap();
    run(ns.command("nft").args(["delete", "rule", "ip", "flannel-ipv4", "postrtg", "handle", handle])).unwrap();
    assert_eq!(nft_chain(&ns, "postrtg").len(), 5);
    assert!(!check(&ns, &rules));
    assert_eq!(
        missing(&ns, &rules),
        ["postrtg: missing `ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random`"]
    );
    ensure(&ns, &mut rules);
    assert_eq!(nft_chain(&ns, "postrtg"), nft_postrtg(SUBNET));

    // The whole table deleted.
    run(ns.command("nft").args(["delete", "table", "ip", "flannel-ipv4"])).unwrap();
    assert_eq!(missing(&ns, &rules), ["table ip flannel-ipv4 missing"]);
    ensure(&ns, &mut rules);
    assert_eq!(nft_list(&ns), listing);

    // New subnet.
    ns.run_in(|| rules.set_subnet(net(NEW_SUBNET))).unwrap().unwrap();
    assert_eq!(nft_chain(&ns, "postrtg"), nft_postrtg(NEW_SUBNET));
    assert!(!nft_list(&ns).contains("10.244.1.0"));
    assert!(check(&ns, &rules));
}

/// The loop, on a runtime inside the namespace, repairs a deleted rule; a subnet change made
/// through a clone is what it keeps from then on.
#[test]
fn resync_loop_repairs_and_follows_subnet_changes() {
    let ns = namespace("masq-resync");
    let mut rules = TrafficRules::new(config(Backend::Iptables, true, true));
    ensure(&ns, &mut rules);
    ns.run_in(|| {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        runtime.spawn(rules.clone().resync_loop(Duration::from_millis(100)));
        // A current-thread runtime makes progress only inside block_on, on this (namespaced)
        // thread: wait by sleeping on it.
        let wait_for = |want: Vec<String>| -> bool {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if saved(&ns, "nat") == want {
                    return true;
                }
                runtime.block_on(async { tokio::time::sleep(Duration::from_millis(50)).await });
            }
            false
        };

        iptables(
            &ns,
            &["-t", "nat", "-D", "POSTROUTING", "-m", "comment", "--comment", "flanneld masq", "-j", "FLANNEL-POSTRTG"],
        );
        iptables(&ns, &["-t", "nat", "-D", "FLANNEL-POSTRTG", "1"]);
        assert_eq!(saved(&ns, "nat").len(), flannel_nat(SUBNET).len() - 2);
        assert!(wait_for(flannel_nat(SUBNET)), "{:#?}", saved(&ns, "nat"));

        rules.set_subnet(net(NEW_SUBNET)).unwrap();
        assert_eq!(saved(&ns, "nat"), flannel_nat(NEW_SUBNET));
        iptables(&ns, &["-t", "nat", "-F", "FLANNEL-POSTRTG"]);
        assert!(wait_for(flannel_nat(NEW_SUBNET)), "{:#?}", saved(&ns, "nat"));
        runtime.shutdown_background();
    })
    .unwrap();
}

const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const NODE_POD_SIDE: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
const PEER: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 2);
const NODE_PEER_SIDE: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 1);
const EXTERNAL: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
const NODE_EXTERNAL_SIDE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);

/// A node namespace routing between a local pod (10.244.1.2, in the node's subnet P), a pod
/// of another node (10.244.2.2, elsewhere in C, reached directly as host-gw would) and an
/// external host (203.0.113.2, which routes C back through the node).
struct Lab {
    node: NetNs,
    pod: NetNs,
    peer: NetNs,
    external: NetNs,
}

impl Lab {
    fn new() -> Lab {
        let lab = Lab {
            node: namespace("masq-node"),
            pod: namespace("masq-pod"),
            peer: namespace("masq-peer"),
            external: namespace("masq-ext"),
        };
        for (ns, node_if, node_addr, addr, gateway) in [
            (&lab.pod, "to-pod", "10.244.1.1/24", "10.244.1.2/24", "10.244.1.1"),
            (&lab.peer, "to-peer", "10.244.2.1/24", "10.244.2.2/24", "10.244.2.1"),
            (&lab.external, "to-ext", "203.0.113.1/24", "203.0.113.2/24", "203.0.113.1"),
        ] {
            veth_pair(&lab.node, node_if, ns, "eth0").unwrap();
            lab.node.ip(&["addr", "add", node_addr, "dev", node_if]).unwrap();
            ns.ip(&["addr", "add", addr, "dev", "eth0"]).unwrap();
            if ns.name() == lab.external.name() {
                ns.ip(&["route", "add", NETWORK, "via", gateway]).unwrap();
            } else {
                ns.ip(&["route", "add", "default", "via", gateway]).unwrap();
            }
        }
        lab.node.sysctl("net.ipv4.ip_forward", "1").unwrap();
        lab
    }

    /// Sends UDP from namespace `from` to `to_addr` in namespace `to`; returns the source
    /// address the receiver sees. Each call is a new flow (new sockets, new conntrack entry).
    fn udp_source(&self, from: &NetNs, to: &NetNs, to_addr: Ipv4Addr) -> Ipv4Addr {
        // A socket belongs to the namespace it was created in, whichever thread uses it later.
        let receiver = to.run_in(|| UdpSocket::bind((to_addr, 0))).unwrap().unwrap();
        receiver.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        let destination = receiver.local_addr().unwrap();
        let sender = from.run_in(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))).unwrap().unwrap();
        let mut buffer = [0u8; 64];
        for _ in 0..20 {
            sender.send_to(b"flannel-rs masquerade test", destination).unwrap();
            if let Ok((len, peer)) = receiver.recv_from(&mut buffer) {
                assert_eq!(&buffer[..len], b"flannel-rs masquerade test");
                let std::net::SocketAddr::V4(peer) = peer else { panic!("IPv6 peer {peer}") };
                return *SocketAddrV4::ip(&peer);
            }
        }
        panic!("no datagram from {} reached {destination} in {}", from.name(), to.name());
    }

    fn assert_sources(&self, masquerading: bool) {
        let to_external = self.udp_source(&self.pod, &self.external, EXTERNAL);
        let external_to_remote_pod = self.udp_source(&self.external, &self.peer, PEER);
        if masquerading {
            // Pod to outside: SNAT to the node's address on the way out.
            assert_eq!(to_external, NODE_EXTERNAL_SIDE, "pod -> external");
            // Outside (not from C) to a pod of another node: masqueraded (! -s C -d C).
            assert_eq!(external_to_remote_pod, NODE_PEER_SIDE, "external -> remote pod");
        } else {
            assert_eq!(to_external, POD, "pod -> external without masquerade");
            assert_eq!(external_to_remote_pod, EXTERNAL, "external -> remote pod without masquerade");
        }
        // Pod to pod keeps the pod's address (-s P -d C RETURN), and so does outside to a pod
        // of this node (! -s C -d P RETURN), masquerading or not.
        assert_eq!(self.udp_source(&self.pod, &self.peer, PEER), POD, "pod -> other pod");
        assert_eq!(self.udp_source(&self.external, &self.pod, POD), EXTERNAL, "external -> local pod");
        // The node's own address on the pod side is in C: it reaches pods unchanged.
        assert_eq!(self.udp_source(&self.node, &self.pod, POD), NODE_POD_SIDE, "node -> local pod");
    }
}

fn traffic(backend: Backend) {
    let lab = Lab::new();
    let mut off = TrafficRules::new(config(backend, false, false));
    ensure(&lab.node, &mut off);
    lab.assert_sources(false);

    let mut on = TrafficRules::new(config(backend, true, true));
    ensure(&lab.node, &mut on);
    lab.assert_sources(true);
}

#[test]
fn traffic_masquerade_iptables() {
    traffic(Backend::Iptables);
}

#[test]
fn traffic_masquerade_nftables() {
    traffic(Backend::Nftables);
}
