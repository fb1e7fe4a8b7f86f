//! The agent binary as a daemon, in a namespace of its own with etcd on its "underlay"
//! address: waits for the config, writes subnet.env in flannel's format once the datapath is
//! programmed, reports readiness (/readyz, sd_notify), programs the pinned lease map, exits
//! promptly on SIGTERM leaving lease and datapath in place, and reuses its lease on restart.
//! Root only; fails loudly otherwise.

use std::{
    io::{Read, Write},
    net::TcpStream,
    process::Command,
    time::{Duration, Instant},
};

use flannel_tests::{
    agent,
    agent_node::{AgentNode, CONFIG_KEY, NODE_IP},
    netns::run,
};
use serde_json::Value;

const HEALTH_PORT: u16 = 10256;
const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const READY_TIMEOUT: Duration = Duration::from_secs(15);

fn start(node: &mut AgentNode) {
    node.start_agent(&["--healthz-ip", "127.0.0.1", "--healthz-port", &HEALTH_PORT.to_string()]).unwrap();
}

/// GET `path` from the agent's health endpoint. A failed exchange (not a wrong answer) is
/// retried for up to 10 s and then reported with its error: a functional bound, not a timing
/// assertion — on 2 loaded cores an answer can be slow.
fn http_get(node: &AgentNode, path: &str) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match http_exchange(node, path) {
            Ok(response) => return Ok(response),
            Err(error) if Instant::now() < deadline => {
                eprintln!("GET {path}: {error:#}; retrying");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(error) => return Err(error),
        }
    }
}

fn http_exchange(node: &AgentNode, path: &str) -> anyhow::Result<String> {
    use anyhow::Context;
    let path = path.to_string();
    node.ns
        .run_in(move || -> anyhow::Result<String> {
            let address = ("127.0.0.1", HEALTH_PORT);
            let mut stream = TcpStream::connect(address).with_context(|| format!("connecting to {address:?}"))?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")?;
            let mut response = String::new();
            stream.read_to_string(&mut response).with_context(|| format!("reading the answer to GET {path}"))?;
            anyhow::ensure!(!response.is_empty(), "empty answer to GET {path}");
            Ok(response)
        })
        .unwrap()
}

fn lease_map(node: &AgentNode) -> Vec<Value> {
    let pin = node.pin_root().join("maps/fl_leases_v1");
    let out = Command::new("bpftool").args(["-j", "map", "dump", "pinned"]).arg(&pin).output().unwrap();
    assert!(out.status.success(), "bpftool: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice::<Value>(&out.stdout).unwrap().as_array().unwrap().clone()
}

fn wait_for(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn expected_lease_value() -> String {
    let mac = flannel_agent::daemon::derived_vtep_mac(NODE_IP, 1);
    format!(
        r#"{{"PublicIP":"192.0.2.1","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
    )
}

#[test]
fn daemon_lifecycle_matches_flanneld() {
    let mut node = AgentNode::new().unwrap();
    start(&mut node);

    // No config yet: the agent says what it waits for, is alive but not ready, writes nothing.
    wait_for("the waiting log line", Duration::from_secs(10), || node.log_text().contains("network config not found"));
    assert!(node.log_text().contains(CONFIG_KEY), "the log names the key: {}", node.log_text());
    assert!(http_get(&node, "/healthz").unwrap().starts_with("HTTP/1.1 200"));
    assert!(http_get(&node, "/readyz").unwrap().starts_with("HTTP/1.1 503"));
    assert!(!node.subnet_file().exists());

    // A peer already in etcd, then the config.
    let peer_key = "/coreos.com/network/subnets/10.244.250.0-24";
    let peer = r#"{"PublicIP":"192.0.2.99","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:99"}}"#;
    node.ctl().put(peer_key, peer).unwrap();
    node.ctl().put(CONFIG_KEY, CONFIG).unwrap();
    node.wait_ready(READY_TIMEOUT).unwrap();
    assert!(http_get(&node, "/readyz").unwrap().starts_with("HTTP/1.1 200"));

    // subnet.env in flannel's exact format; the lease in etcd byte-compatible.
    let env = std::fs::read_to_string(node.subnet_file()).unwrap();
    let leases = node.ctl().get_prefix("/coreos.com/network/subnets/").unwrap();
    let own: Vec<_> = leases.iter().filter(|(k, _)| k != peer_key).collect();
    assert_eq!(own.len(), 1);
    let (own_key, own_value) = own[0];
    assert_eq!(own_value, &expected_lease_value());
    let base = own_key.rsplit('/').next().unwrap().trim_end_matches("-24").trim_end_matches(".0");
    assert_eq!(
        env,
        format!("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET={base}.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n")
    );
    assert!(node.ctl().key_lease(own_key).unwrap().is_some(), "lease has a TTL");

    // The datapath holds our subnet (local) and the peer; a new peer arrives by watch.
    assert_eq!(lease_map(&node).len(), 2, "local + peer in fl_leases_v1");
    node.ctl().put("/coreos.com/network/subnets/10.244.251.0-24", &peer.replace("99", "98")).unwrap();
    wait_for("the new peer in the lease map", Duration::from_secs(5), || lease_map(&node).len() == 3);
    let entry = lease_map(&node).into_iter().find(|e| e["formatted"]["value"]["public_ip"][3] == 98).unwrap();
    assert_eq!(entry["formatted"]["value"]["kind"], 2, "vxlan kind, readable by field name");

    // SIGTERM: exits promptly and leaves lease, subnet.env and datapath in place.
    let (status, took) = node.stop_agent().unwrap();
    assert!(took < Duration::from_secs(3), "exit took {took:?}");
    assert!(status.success(), "{status}");
    assert_eq!(node.ctl().get(own_key).unwrap().as_deref(), Some(expected_lease_value().as_str()));
    assert_eq!(lease_map(&node).len(), 3, "datapath left in place");
    assert!(node.log_text().contains("the lease and the datapath stay in place"));

    // Restart: same lease, same subnet.env, map adopted (nothing swept, nothing rewritten).
    start(&mut node);
    node.wait_ready(READY_TIMEOUT).unwrap();
    assert_eq!(std::fs::read_to_string(node.subnet_file()).unwrap(), env);
    assert_eq!(node.ctl().get_prefix("/coreos.com/network/subnets/").unwrap().len(), 3);
    // The first start wrote the map; the restart found it as it should be and wrote nothing.
    assert_eq!(
        node.log_text().matches("lease maps reconciled").count(),
        1,
        "restart adopted the pinned map: {}",
        node.log_text()
    );

    // flannel-agent docker-opts, as mk-docker-opts.sh.
    let docker = node.dir.path().join("docker");
    run(Command::new(agent::binary().unwrap())
        .arg("docker-opts")
        .arg("-f")
        .arg(node.subnet_file())
        .arg("-d")
        .arg(&docker))
    .unwrap();
    let subnet = format!("{base}.1/24");
    assert_eq!(
        std::fs::read_to_string(&docker).unwrap(),
        format!(
            "DOCKER_OPT_BIP=\"--bip={subnet}\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=true\"\nDOCKER_OPT_MTU=\"--mtu=1450\"\n\
             DOCKER_NETWORK_OPTIONS=\"--bip={subnet} --ip-masq=true --mtu=1450\"\n"
        )
    );
}

/// Where eBPF cannot be used (here: the pin path is not on a BPF filesystem), `--datapath
/// auto` says why and runs the classic datapath, and `--datapath ebpf` refuses to start.
#[test]
fn auto_falls_back_to_netlink_and_ebpf_fails_clearly_where_ebpf_cannot_load() {
    let mut node = AgentNode::new().unwrap();
    node.pin_path_override = Some(node.dir.path().join("not-bpffs"));
    node.ctl().put(CONFIG_KEY, CONFIG).unwrap();

    node.datapath = "ebpf";
    start(&mut node);
    let status = node.wait_agent_exit().unwrap();
    assert!(!status.success());
    let log = node.log_text();
    assert!(log.contains("--datapath ebpf: the eBPF datapath cannot be loaded") && log.contains("not-bpffs"), "{log}");
    assert!(!node.subnet_file().exists(), "nothing written when the datapath cannot load");

    node.datapath = "auto";
    start(&mut node);
    node.wait_ready(READY_TIMEOUT).unwrap();
    let log = node.log_text();
    assert!(
        log.contains("falling back to the netlink (flannel-classic) datapath") && log.contains("not-bpffs"),
        "{log}"
    );
    let links = String::from_utf8(node.ns.ip(&["-o", "link"]).unwrap().stdout).unwrap();
    assert!(links.contains("flannel.1"), "the classic vxlan device is there: {links}");
    node.stop_agent().unwrap();
}

#[test]
fn bad_config_is_an_error_naming_field_and_value() {
    let mut node = AgentNode::new().unwrap();
    node.ctl().put(CONFIG_KEY, r#"{"Network":"10.244.0.0/16","SubnetLen":31,"Backend":{"Type":"vxlan"}}"#).unwrap();
    start(&mut node);
    let status = node.wait_agent_exit().unwrap();
    assert!(!status.success());
    let log = node.log_text();
    assert!(log.contains("SubnetLen") && log.contains("31"), "{log}");
    assert!(!node.subnet_file().exists(), "nothing written on a bad config");
}

#[test]
fn help_lists_every_flanneld_flag_and_version_prints() {
    let help = run(Command::new(agent::binary().unwrap()).arg("--help")).unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    for flag in [
        "--etcd-endpoints",
        "--etcd-prefix",
        "--etcd-keyfile",
        "--etcd-certfile",
        "--etcd-cafile",
        "--etcd-username",
        "--etcd-password",
        "--iface",
        "--iface-regex",
        "--iface-can-reach",
        "--public-ip",
        "--subnet-file",
        "--subnet-lease-renew-margin",
        "--ip-masq",
        "--healthz-ip",
        "--healthz-port",
        "--datapath",
        "--bpf-pin-path",
        "FLANNELD_ETCD_ENDPOINTS",
        "docker-opts",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
    let version = run(Command::new(agent::binary().unwrap()).arg("--version")).unwrap();
    assert!(String::from_utf8(version.stdout).unwrap().starts_with("flannel-agent "));
}
