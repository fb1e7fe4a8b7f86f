//! End to end: our `flannel` CNI plugin driving Debian's real `bridge` and `host-local`
//! plugins (/usr/lib/cni), run inside a "node" namespace for "pod" namespaces, as a container
//! runtime would. Everything lives in namespaces and a temp dir the test owns (host-local's
//! dataDir included), so nothing touches the host's /var/lib/cni; the bridge's cni0 lives in
//! the node namespace and goes with it. Root only; fails loudly otherwise.

use std::{
    io::Write,
    net::Ipv4Addr,
    path::PathBuf,
    process::{Output, Stdio},
};

use flannel_tests::{agent, names::unique, require_root, NetNs};
use ipnet::Ipv4Net;
use serde_json::Value;

const CNI_PATH: &str = "/usr/lib/cni";
const SUBNET_ENV: &str =
    "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";

struct Lab {
    // Field order is drop order: the node namespace (with cni0) goes before the temp dir.
    node: NetNs,
    dir: tempfile::TempDir,
    plugin: PathBuf,
}

/// What one plugin run printed.
struct Run {
    output: Output,
}

impl Run {
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }

    /// The result JSON of a successful run.
    fn ok(&self) -> Value {
        assert!(
            self.output.status.success(),
            "plugin failed ({}): stdout {} stderr {}",
            self.output.status,
            self.stdout(),
            String::from_utf8_lossy(&self.output.stderr)
        );
        if self.output.stdout.is_empty() {
            return Value::Null;
        }
        serde_json::from_slice(&self.output.stdout).unwrap_or_else(|e| panic!("{e}: {}", self.stdout()))
    }

    /// The CNI error JSON of a failed run.
    fn error(&self) -> Value {
        assert!(!self.output.status.success(), "expected a failure, got {}", self.stdout());
        assert_eq!(self.output.status.code(), Some(1));
        serde_json::from_slice(&self.output.stdout).unwrap_or_else(|e| panic!("{e}: {}", self.stdout()))
    }
}

/// A pod's address from an ADD result (0.3.x and 1.0.0 formats).
fn pod_address(result: &Value) -> (Ipv4Net, Ipv4Addr) {
    let ips = result["ips"].as_array().unwrap_or_else(|| panic!("no ips in {result}"));
    assert_eq!(ips.len(), 1, "{result}");
    let address: Ipv4Net = ips[0]["address"].as_str().unwrap().parse().unwrap();
    let gateway: Ipv4Addr = ips[0]["gateway"].as_str().unwrap().parse().unwrap();
    (address, gateway)
}

fn json_of(output: Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap()
}

impl Lab {
    fn new(subnet_env: &str) -> Lab {
        require_root().unwrap();
        for plugin in ["bridge", "host-local"] {
            let path = PathBuf::from(CNI_PATH).join(plugin);
            assert!(path.is_file(), "{} missing: apt-get install containernetworking-plugins", path.display());
        }
        let lab = Lab {
            node: NetNs::create("cni-node").unwrap(),
            dir: tempfile::tempdir().unwrap(),
            plugin: agent::cni_plugin_binary().unwrap(),
        };
        std::fs::write(lab.subnet_file(), subnet_env).unwrap();
        lab
    }

    fn subnet_file(&self) -> PathBuf {
        self.dir.path().join("subnet.env")
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("flannel")
    }

    fn ipam_dir(&self) -> PathBuf {
        self.dir.path().join("ipam")
    }

    /// kube-flannel's conflist entry, with our files in the temp dir.
    fn config(&self, cni_version: &str) -> String {
        format!(
            r#"{{"cniVersion":"{cni_version}","name":"cbr0","type":"flannel","subnetFile":"{}","dataDir":"{}",
                "delegate":{{"hairpinMode":true,"isDefaultGateway":true}},"ipam":{{"dataDir":"{}"}}}}"#,
            self.subnet_file().display(),
            self.data_dir().display(),
            self.ipam_dir().display()
        )
    }

    /// What flannel saves and hands to the bridge plugin.
    fn expected_delegate(&self, cni_version: &str, subnet: &str) -> String {
        format!(
            r#"{{"cniVersion":"{cni_version}","hairpinMode":true,"ipMasq":false,"ipam":{{"dataDir":"{}","ranges":[[{{"subnet":"{subnet}"}}]],"routes":[{{"dst":"10.244.0.0/16"}}],"type":"host-local"}},"isDefaultGateway":true,"isGateway":true,"mtu":1450,"name":"cbr0","type":"bridge"}}"#,
            self.ipam_dir().display()
        )
    }

    fn saved(&self, container_id: &str) -> Option<String> {
        std::fs::read_to_string(self.data_dir().join(container_id)).ok()
    }

    /// Runs the plugin in the node namespace as a runtime would.
    fn cni(&self, command: &str, container_id: &str, pod: Option<&NetNs>, config: &str) -> Run {
        let mut cmd = self.node.command(&self.plugin);
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container_id)
            .env("CNI_NETNS", pod.map(|p| p.path()).unwrap_or_default())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", CNI_PATH)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        child.stdin.take().unwrap().write_all(config.as_bytes()).unwrap();
        Run { output: child.wait_with_output().unwrap() }
    }

    fn veths_on_node(&self) -> usize {
        json_of(self.node.ip(&["-j", "link", "show", "type", "veth"]).unwrap()).as_array().unwrap().len()
    }

    /// host-local's reservation file for `ip`.
    fn reserved(&self, ip: Ipv4Addr) -> bool {
        self.ipam_dir().join("cbr0").join(ip.to_string()).exists()
    }
}

fn ping(from: &NetNs, to: Ipv4Addr) {
    let out = from.command("ping").args(["-c", "2", "-i", "0.2", "-W", "2", "-q", &to.to_string()]).output().unwrap();
    assert!(out.status.success(), "ping {to} from {}: {}", from.name(), String::from_utf8_lossy(&out.stdout));
}

/// The pod's eth0: its IPv4 address and MTU.
fn pod_eth0(pod: &NetNs) -> (Ipv4Net, u64) {
    let link = json_of(pod.ip(&["-j", "addr", "show", "dev", "eth0"]).unwrap());
    let link = &link[0];
    let addr = link["addr_info"].as_array().unwrap().iter().find(|a| a["family"] == "inet").expect("an IPv4 address");
    let net = format!("{}/{}", addr["local"].as_str().unwrap(), addr["prefixlen"]).parse().unwrap();
    (net, link["mtu"].as_u64().unwrap())
}

/// The pod's IPv4 routes as (dst, gateway).
fn pod_routes(pod: &NetNs) -> Vec<(String, Option<String>)> {
    let routes = json_of(pod.ip(&["-j", "-4", "route", "show"]).unwrap());
    routes
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["dst"].as_str().unwrap().to_string(), r["gateway"].as_str().map(str::to_string)))
        .collect()
}

#[test]
fn two_pods_on_the_bridge_through_add_check_and_del() {
    let lab = Lab::new(SUBNET_ENV);
    let pod_a = NetNs::create("cni-pa").unwrap();
    let pod_b = NetNs::create("cni-pb").unwrap();
    let (id_a, id_b) = (unique("cida"), unique("cidb"));
    let subnet: Ipv4Net = "10.244.1.0/24".parse().unwrap();
    let gateway: Ipv4Addr = "10.244.1.1".parse().unwrap();

    // ADD: pod A with kube-flannel's 0.3.1 config, pod B with 1.0.0 (so it can be CHECKed).
    let result_a = lab.cni("ADD", &id_a, Some(&pod_a), &lab.config("0.3.1")).ok();
    assert_eq!(result_a["cniVersion"], "0.3.1", "{result_a}");
    let result_b = lab.cni("ADD", &id_b, Some(&pod_b), &lab.config("1.0.0")).ok();
    assert_eq!(result_b["cniVersion"], "1.0.0", "{result_b}");
    let (addr_a, gw_a) = pod_address(&result_a);
    let (addr_b, gw_b) = pod_address(&result_b);
    for (addr, gw) in [(addr_a, gw_a), (addr_b, gw_b)] {
        assert!(subnet.contains(&addr.addr()) && addr.prefix_len() == 24, "{addr}");
        assert_eq!(gw, gateway);
    }
    assert_ne!(addr_a, addr_b);

    // The saved delegate configs are flannel's, byte for byte.
    assert_eq!(lab.saved(&id_a), Some(lab.expected_delegate("0.3.1", "10.244.1.0/24")));
    assert_eq!(lab.saved(&id_b), Some(lab.expected_delegate("1.0.0", "10.244.1.0/24")));

    // The pods: eth0 with the address and flannel's MTU, routes to the cluster and by default.
    for (pod, addr) in [(&pod_a, addr_a), (&pod_b, addr_b)] {
        assert_eq!(pod_eth0(pod), (addr, 1450));
        let routes = pod_routes(pod);
        assert!(routes.contains(&("10.244.0.0/16".into(), Some("10.244.1.1".into()))), "{routes:?}");
        assert!(routes.contains(&("default".into(), Some("10.244.1.1".into()))), "{routes:?}");
    }
    // The node: cni0 is the gateway, one veth per pod.
    let cni0 = json_of(lab.node.ip(&["-j", "addr", "show", "dev", "cni0"]).unwrap());
    let cni0_addrs: Vec<String> = cni0[0]["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["family"] == "inet")
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
        .collect();
    assert_eq!(cni0_addrs, ["10.244.1.1/24"]);
    assert_eq!(lab.veths_on_node(), 2);

    ping(&pod_a, addr_b.addr());
    ping(&pod_b, addr_a.addr());
    ping(&pod_a, gateway);

    // CHECK: a 0.3.1 config does not allow it; with 1.0.0 and the previous result it succeeds
    // (flannel's CHECK only checks versions).
    assert_eq!(
        lab.cni("CHECK", &id_a, Some(&pod_a), &lab.config("0.3.1")).error(),
        serde_json::json!({"cniVersion": "0.3.1", "code": 1, "msg": "config version does not allow CHECK"})
    );
    let check_config = lab.config("1.0.0").replacen('{', &format!(r#"{{"prevResult":{result_b},"#), 1);
    lab.cni("CHECK", &id_b, Some(&pod_b), &check_config).ok();

    // DEL pod A: its veth, its address reservation and its saved config go; DEL again is fine.
    assert!(lab.reserved(addr_a.addr()));
    assert_eq!(lab.cni("DEL", &id_a, Some(&pod_a), &lab.config("0.3.1")).ok(), Value::Null);
    assert_eq!(lab.saved(&id_a), None);
    assert!(!lab.reserved(addr_a.addr()), "host-local still holds {addr_a}");
    assert!(pod_a.ip(&["link", "show", "eth0"]).is_err(), "eth0 still in pod A");
    assert_eq!(lab.veths_on_node(), 1);
    assert_eq!(lab.cni("DEL", &id_a, Some(&pod_a), &lab.config("0.3.1")).ok(), Value::Null);
    // A runtime may DEL without a netns once the pod is gone.
    assert_eq!(lab.cni("DEL", &id_a, None, &lab.config("0.3.1")).ok(), Value::Null);

    // Pod B is untouched.
    assert_eq!(pod_eth0(&pod_b), (addr_b, 1450));
    ping(&pod_b, gateway);
    lab.cni("CHECK", &id_b, Some(&pod_b), &check_config).ok();

    lab.cni("DEL", &id_b, Some(&pod_b), &lab.config("1.0.0")).ok();
    assert_eq!(lab.saved(&id_b), None);
    assert!(!lab.reserved(addr_b.addr()));
    assert_eq!(lab.veths_on_node(), 0);
}

#[test]
fn a_released_address_is_handed_out_again() {
    // A /30 leaves host-local exactly one address for pods: 10.244.1.2.
    let lab = Lab::new(&SUBNET_ENV.replace("10.244.1.1/24", "10.244.1.1/30"));
    let pod_a = NetNs::create("cni-ra").unwrap();
    let pod_b = NetNs::create("cni-rb").unwrap();
    let (id_a, id_b) = (unique("cida"), unique("cidb"));
    let only: Ipv4Net = "10.244.1.2/30".parse().unwrap();

    let (addr_a, _) = pod_address(&lab.cni("ADD", &id_a, Some(&pod_a), &lab.config("0.3.1")).ok());
    assert_eq!(addr_a, only);

    // The pool is empty: host-local's error comes back through bridge and flannel unchanged
    // (no "failed to delegate add" in front: flannel passes a delegate's CNI error on as is).
    let full = lab.cni("ADD", &id_b, Some(&pod_b), &lab.config("0.3.1")).error();
    assert_eq!(
        full,
        serde_json::json!({"cniVersion": "0.3.1", "code": 999,
            "msg": "failed to allocate for range 0: no IP addresses available in range set: 10.244.1.1-10.244.1.2"})
    );
    // As in flannel, the failed ADD's config stays for the runtime's DEL, which cleans up.
    assert_eq!(lab.saved(&id_b), Some(lab.expected_delegate("0.3.1", "10.244.1.0/30")));
    lab.cni("DEL", &id_b, Some(&pod_b), &lab.config("0.3.1")).ok();
    assert_eq!(lab.saved(&id_b), None);

    lab.cni("DEL", &id_a, Some(&pod_a), &lab.config("0.3.1")).ok();
    let (addr_b, _) = pod_address(&lab.cni("ADD", &id_b, Some(&pod_b), &lab.config("0.3.1")).ok());
    assert_eq!(addr_b, only);
    assert_eq!(pod_eth0(&pod_b), (only, 1450));
    ping(&pod_b, "10.244.1.1".parse().unwrap());
    lab.cni("DEL", &id_b, Some(&pod_b), &lab.config("0.3.1")).ok();
}

#[test]
fn add_without_subnet_env_is_a_cni_error() {
    let lab = Lab::new(SUBNET_ENV);
    std::fs::remove_file(lab.subnet_file()).unwrap();
    let pod = NetNs::create("cni-nf").unwrap();
    let id = unique("cid");
    let error = lab.cni("ADD", &id, Some(&pod), &lab.config("0.3.1")).error();
    assert_eq!(error["cniVersion"], "0.3.1");
    assert_eq!(error["code"], 999);
    assert_eq!(
        error["msg"],
        format!(
            "failed to load flannel 'subnet.env' file: open {}: no such file or directory. Check the flannel pod log for this node.",
            lab.subnet_file().display()
        )
    );
    assert!(pod.ip(&["link", "show", "eth0"]).is_err());
    assert_eq!(lab.saved(&id), None);
    assert_eq!(lab.veths_on_node(), 0);
}
