//! End to end: the agent binary attaches the counter programs to a veth in a namespace this
//! test creates, real pings cross it, and the counters read back from the pinned map (by the
//! agent and by bpftool, by field name) are exact. Root only; fails loudly otherwise.

use std::process::Command;

use flannel_tests::{agent, netns::run, require_root, veth_pair, NetNs, PrivateBpffs};
use serde_json::Value;

const CLIENT_MAC: &str = "02:00:00:00:00:01";
const NODE_MAC: &str = "02:00:00:00:00:02";
/// An ICMP echo with ping's default 56 data bytes: 14 Ethernet + 20 IPv4 + 8 ICMP + 56.
const ECHO_FRAME_BYTES: u64 = 98;

struct Lab {
    // Field order is drop order: namespaces (and their veths) go before the bpffs.
    client: NetNs,
    node: NetNs,
    bpffs: PrivateBpffs,
}

impl Lab {
    /// Two namespaces joined by a veth, with permanent neighbour entries so that no ARP
    /// (and, IPv6 being off, nothing else) crosses the link but the test's own pings.
    fn new() -> Lab {
        require_root().unwrap();
        let client = NetNs::create("cnt-client").unwrap();
        let node = NetNs::create("cnt-node").unwrap();
        let bpffs = PrivateBpffs::mount().unwrap();
        veth_pair(&client, "eth0", &node, "eth0").unwrap();
        for (ns, mac, addr, peer, peer_mac) in [
            (&client, CLIENT_MAC, "192.0.2.1/24", "192.0.2.2", NODE_MAC),
            (&node, NODE_MAC, "192.0.2.2/24", "192.0.2.1", CLIENT_MAC),
        ] {
            ns.ip(&["link", "set", "eth0", "address", mac]).unwrap();
            ns.ip(&["addr", "add", addr, "dev", "eth0"]).unwrap();
            ns.ip(&["neigh", "replace", peer, "lladdr", peer_mac, "dev", "eth0", "nud", "permanent"]).unwrap();
        }
        Lab { client, node, bpffs }
    }

    fn agent(&self, args: &[&str]) -> String {
        let mut command = self.node.command(agent::binary().unwrap());
        command.arg("--bpf-pin-path").arg(self.bpffs.path().join("flannel")).args(args);
        String::from_utf8(run(&mut command).unwrap().stdout).unwrap()
    }

    fn ping(&self, count: u32) {
        run(self.client.command("ping").args(["-c", &count.to_string(), "-i", "0.02", "-W", "1", "-q", "192.0.2.2"]))
            .unwrap();
    }

    fn node_ifindex(&self) -> u64 {
        let out = self.node.ip(&["-j", "link", "show", "eth0"]).unwrap();
        let links: Value = serde_json::from_slice(&out.stdout).unwrap();
        links[0]["ifindex"].as_u64().unwrap()
    }

    /// (packets, bytes) per direction from `flannel-agent counters show --json`.
    fn agent_counters(&self) -> Vec<(u64, String, u64, u64)> {
        let rows: Value = serde_json::from_str(&self.agent(&["counters", "show", "--json"])).unwrap();
        rows.as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["ifindex"].as_u64().unwrap(),
                    r["direction"].as_str().unwrap().to_string(),
                    r["packets"].as_u64().unwrap(),
                    r["bytes"].as_u64().unwrap(),
                )
            })
            .collect()
    }

    /// The same, summed over CPUs from `bpftool -j map dump pinned`, addressed by the BTF
    /// field names (`ifindex`, `direction`, `packets`, `bytes`).
    fn bpftool_counters(&self) -> Vec<(u64, u64, u64, u64)> {
        let pin = self.bpffs.path().join("flannel/maps/fl_counters_v1");
        let out = Command::new("bpftool").args(["-j", "map", "dump", "pinned"]).arg(&pin).output().unwrap();
        assert!(out.status.success(), "bpftool: {}", String::from_utf8_lossy(&out.stderr));
        let entries: Value = serde_json::from_slice(&out.stdout).unwrap();
        let mut rows: Vec<_> = entries
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let f = &e["formatted"];
                let (p, b) = f["values"].as_array().unwrap().iter().fold((0, 0), |(p, b), v| {
                    (p + v["value"]["packets"].as_u64().unwrap(), b + v["value"]["bytes"].as_u64().unwrap())
                });
                (f["key"]["ifindex"].as_u64().unwrap(), f["key"]["direction"].as_u64().unwrap(), p, b)
            })
            .collect();
        rows.sort();
        rows
    }
}

#[test]
fn pings_are_counted_exactly_and_survive_program_replacement() {
    let lab = Lab::new();
    let ifindex = lab.node_ifindex();
    lab.agent(&["counters", "attach", "--iface", "eth0"]);

    lab.ping(5);
    let expect = |n: u64| {
        vec![
            (ifindex, "xdp-ingress".to_string(), n, n * ECHO_FRAME_BYTES),
            (ifindex, "tc-egress".to_string(), n, n * ECHO_FRAME_BYTES),
        ]
    };
    assert_eq!(lab.agent_counters(), expect(5), "5 echo requests in (XDP), 5 replies out (TC)");
    assert_eq!(
        lab.bpftool_counters(),
        vec![(ifindex, 0, 5, 5 * ECHO_FRAME_BYTES), (ifindex, 1, 5, 5 * ECHO_FRAME_BYTES)]
    );

    // Attaching again swaps the programs inside the pinned links and reuses the pinned map:
    // counting continues from where it was.
    lab.agent(&["counters", "attach", "--iface", "eth0"]);
    lab.ping(3);
    assert_eq!(lab.agent_counters(), expect(8));

    // Detaching removes the links and, with the last interface, the map and directories.
    lab.agent(&["counters", "detach", "--iface", "eth0"]);
    assert!(!lab.bpffs.path().join("flannel").exists(), "pin root left behind after detach");
    lab.ping(1); // traffic still flows with nothing attached
}

#[test]
fn attach_to_missing_interface_fails_naming_it() {
    let lab = Lab::new();
    let mut command = lab.node.command(agent::binary().unwrap());
    command
        .arg("--bpf-pin-path")
        .arg(lab.bpffs.path().join("flannel"))
        .args(["counters", "attach", "--iface", "nosuch0"]);
    let out = command.output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("nosuch0"), "error should name the interface: {stderr}");
    assert!(!lab.bpffs.path().join("flannel").exists(), "a failed attach left pins behind");
}
