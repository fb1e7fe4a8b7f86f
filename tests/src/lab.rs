//! The lab: a small flannel cluster in network namespaces, used by `cargo xtask demo`, the
//! end-to-end tests and the benchmarks.
//!
//! ```text
//!   underlay ns: bridge br0 ─┬─ etcd ns      192.0.2.2     (etcd for the cluster)
//!                            ├─ external ns  192.0.2.254   (default gateway of the nodes;
//!                            │                + 203.0.113.10/32, the "internet" host)
//!                            ├─ node 0 ns    192.0.2.10  eth0 ── agent, cni0 ── pods
//!                            ├─ node 1 ns    192.0.2.11  …
//! ```
//! Pods are made by the real CNI chain: our `flannel` plugin delegating to Debian's `bridge`
//! and `host-local`. Every name is unique per run; everything goes when the Lab drops.

use std::{
    fs::File,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::{Duration, SystemTime},
};

use anyhow::{bail, ensure, Context, Result};

use crate::{
    agent,
    etcd::{EtcdServer, Etcdctl},
    names::unique,
    netns::run,
    readiness::NotifySocket,
    NetNs, PrivateBpffs,
};

pub const NETWORK: &str = "10.244.0.0/16";
pub const ETCD_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
pub const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 254);
/// The host outside the cluster that pods talk to (masqueraded).
pub const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
pub const CONFIG_KEY: &str = "/coreos.com/network/config";
pub const SUBNETS_PREFIX: &str = "/coreos.com/network/subnets/";
const CNI_PLUGINS: &str = "/usr/lib/cni";

#[derive(Clone, Debug)]
pub struct LabConfig {
    pub nodes: usize,
    pub pods_per_node: usize,
    /// "vxlan" or "host-gw".
    pub backend: String,
    /// The agents' `--datapath`.
    pub datapath: String,
    pub ip_masq: bool,
    /// More agent arguments (e.g. `--netfilter-bypass`).
    pub agent_args: Vec<String>,
}

impl Default for LabConfig {
    fn default() -> Self {
        LabConfig {
            nodes: 3,
            pods_per_node: 2,
            backend: "vxlan".into(),
            datapath: "netlink".into(),
            ip_masq: true,
            agent_args: Vec::new(),
        }
    }
}

pub struct Pod {
    pub ns: NetNs,
    pub ip: Ipv4Addr,
    pub container_id: String,
}

/// A node's agent process and when it was started.
struct RunningAgent {
    child: Child,
    started: SystemTime,
}

pub struct LabNode {
    pub index: usize,
    pub ip: Ipv4Addr,
    pub dir: PathBuf,
    agent: Mutex<Option<RunningAgent>>,
    /// The agent's `NOTIFY_SOCKET`: readiness is its `READY=1` (see [`crate::readiness`]).
    notify: NotifySocket,
    pub pods: Vec<Pod>,
    // Declared last: the namespace outlives the agent and pods that live in it.
    pub ns: NetNs,
}

impl LabNode {
    pub fn subnet_file(&self) -> PathBuf {
        self.dir.join("subnet.env")
    }
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("agent.log")
    }
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }
    /// The subnet from subnet.env (e.g. 10.244.7.0/24).
    pub fn subnet(&self) -> Result<ipnet::Ipv4Net> {
        let text = std::fs::read_to_string(self.subnet_file())?;
        let value = text.lines().find_map(|l| l.strip_prefix("FLANNEL_SUBNET=")).context("no FLANNEL_SUBNET")?;
        Ok(value.parse::<ipnet::Ipv4Net>()?.trunc())
    }
}

pub struct Lab {
    pub config: LabConfig,
    // Drop order: nodes (agents, pods), etcd, then the namespaces and mounts they live in.
    pub nodes: Vec<LabNode>,
    pub etcd: EtcdServer,
    pub external: NetNs,
    etcd_ns: NetNs,
    underlay: NetNs,
    bpffs: PrivateBpffs,
    pub dir: tempfile::TempDir,
    cni_bin_dir: PathBuf,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut agent) = node.agent.lock().unwrap().take() {
                let _ = agent.child.kill();
                let _ = agent.child.wait();
            }
        }
    }
}

impl Lab {
    /// Builds the topology, writes the network config, starts every agent, waits until each
    /// is ready, then creates the pods.
    pub fn start(config: LabConfig) -> Result<Lab> {
        crate::require_root()?;
        let underlay = NetNs::create("underlay")?;
        underlay.ip(&["link", "add", "br0", "type", "bridge"])?;
        underlay.ip(&["link", "set", "br0", "up"])?;
        let etcd_ns = attach(&underlay, "etcd", "192.0.2.2/24")?;
        let external = attach(&underlay, "ext", "192.0.2.254/24")?;
        external.ip(&["addr", "add", &format!("{EXTERNAL_IP}/32"), "dev", "lo"])?;
        let etcd = EtcdServer::start_in(&etcd_ns, ETCD_IP)?;
        let dir = tempfile::tempdir()?;
        let cni_bin_dir = dir.path().join("cni-bin");
        std::fs::create_dir_all(&cni_bin_dir)?;
        std::os::unix::fs::symlink(agent::cni_plugin_binary()?, cni_bin_dir.join("flannel"))?;
        let mut lab = Lab {
            config: config.clone(),
            nodes: Vec::new(),
            etcd,
            external,
            etcd_ns,
            underlay,
            bpffs: PrivateBpffs::mount()?,
            dir,
            cni_bin_dir,
        };
        let backend = match config.backend.as_str() {
            "vxlan" => r#"{"Type":"vxlan","VNI":1}"#,
            "host-gw" => r#"{"Type":"host-gw"}"#,
            other => bail!("unknown lab backend {other}"),
        };
        lab.etcdctl().put(CONFIG_KEY, &format!(r#"{{"Network":"{NETWORK}","Backend":{backend}}}"#))?;
        for i in 0..config.nodes {
            lab.add_node(i)?;
        }
        for i in 0..config.nodes {
            lab.start_agent(i)?;
        }
        for i in 0..config.nodes {
            lab.wait_ready(i, Duration::from_secs(30))?;
        }
        for i in 0..config.nodes {
            for _ in 0..config.pods_per_node {
                lab.add_pod(i)?;
            }
        }
        Ok(lab)
    }

    pub fn etcdctl(&self) -> Etcdctl {
        Etcdctl::in_netns(&[self.etcd.client_url()], &self.etcd_ns)
    }

    pub fn underlay(&self) -> &NetNs {
        &self.underlay
    }

    fn add_node(&mut self, index: usize) -> Result<()> {
        let ip = Ipv4Addr::new(192, 0, 2, 10 + index as u8);
        let ns = attach(&self.underlay, &format!("node{index}"), &format!("{ip}/24"))?;
        ns.ip(&["route", "add", "default", "via", &GATEWAY_IP.to_string()])?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        let dir = self.dir.path().join(format!("node{index}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let notify = NotifySocket::bind(dir.join("notify.sock"))?;
        self.nodes.push(LabNode { index, ip, dir, agent: Mutex::new(None), notify, pods: Vec::new(), ns });
        Ok(())
    }

    /// Node `index`'s `--bpf-pin-path`.
    pub fn pin_root(&self, index: usize) -> PathBuf {
        self.bpffs.path().join(format!("node{index}"))
    }

    /// `flannel-agent inspect --json` for node `index`, run in its namespace.
    pub fn inspect(&self, index: usize) -> Result<serde_json::Value> {
        let out = output(
            self.nodes[index]
                .ns
                .command(agent::binary()?)
                .arg("--bpf-pin-path")
                .arg(self.pin_root(index))
                .args(["inspect", "--json"]),
        )?;
        serde_json::from_str(&out).with_context(|| format!("inspect output {out}"))
    }

    /// Starts node `index`'s agent (in its namespace, with its own subnet file and pins).
    pub fn start_agent(&self, index: usize) -> Result<()> {
        self.start_agent_with_datapath(index, &self.config.datapath)
    }

    /// As [`Lab::start_agent`] with another `--datapath` than the lab's: a node switching.
    pub fn start_agent_with_datapath(&self, index: usize, datapath: &str) -> Result<()> {
        let endpoint = self.etcd.client_url();
        let pins = self.pin_root(index);
        let node = &self.nodes[index];
        let mut agent = node.agent.lock().unwrap();
        anyhow::ensure!(agent.is_none(), "agent of node {index} already running");
        let log = File::options()
            .create(true)
            .append(true)
            .open(node.log_path())
            .with_context(|| format!("opening node {index}'s agent log {}", node.log_path().display()))?;
        node.notify.reset()?;
        let mut command = node.ns.command(agent::binary()?);
        command
            .args(["--etcd-endpoints", &endpoint, "--iface", "eth0", "--datapath", datapath])
            .arg("--subnet-file")
            .arg(node.subnet_file())
            .arg("--bpf-pin-path")
            .arg(pins)
            .arg(format!("--ip-masq={}", self.config.ip_masq))
            .args(&self.config.agent_args)
            .env("NOTIFY_SOCKET", node.notify.path())
            .stdout(Stdio::null())
            .stderr(log);
        let started = SystemTime::now();
        let child = command.spawn().with_context(|| format!("starting node {index}'s flannel-agent"))?;
        *agent = Some(RunningAgent { child, started });
        Ok(())
    }

    /// Waits until node `index`'s running agent has sent `READY=1` (see [`crate::readiness`]:
    /// subnet.env is written and the datapath programmed by then); fails with its log if it
    /// exits first or `timeout` passes.
    pub fn wait_ready(&self, index: usize, timeout: Duration) -> Result<()> {
        self.wait_ready_since(index, timeout, None)
    }

    /// [`Self::wait_ready`] for an agent started at or after `since` (e.g. just before a
    /// restart): an agent started earlier was ready before that time, not since, so that is
    /// an error at once rather than success or a wait for a READY=1 it will not send again.
    pub fn wait_ready_since(&self, index: usize, timeout: Duration, since: Option<SystemTime>) -> Result<()> {
        let node = &self.nodes[index];
        let started = node.agent.lock().unwrap().as_ref().map(|a| a.started);
        let started = started.with_context(|| format!("node {index} has no agent to wait for"))?;
        if let Some(since) = since {
            ensure!(started >= since, "node {index}'s agent was started before the time it should be ready since");
        }
        let exited = || node.agent.lock().unwrap().as_mut().and_then(|a| a.child.try_wait().ok().flatten());
        node.notify
            .wait_ready(timeout, &node.log_path(), exited)
            .with_context(|| format!("waiting for node {index}'s agent to be ready"))
    }

    /// Stops node `index`'s agent with `signal` (SIGTERM or SIGKILL) and waits for it.
    pub fn stop_agent(&self, index: usize, signal: i32) -> Result<std::process::ExitStatus> {
        let RunningAgent { mut child, .. } = self.nodes[index]
            .agent
            .lock()
            .unwrap()
            .take()
            .with_context(|| format!("node {index}'s agent not running"))?;
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, signal) };
        child.wait().with_context(|| format!("waiting for node {index}'s agent to exit"))
    }

    fn cni_config(&self, node: &LabNode) -> String {
        format!(
            r#"{{"cniVersion":"0.3.1","name":"cbr0","type":"flannel","subnetFile":"{}","dataDir":"{}",
               "delegate":{{"hairpinMode":true,"isDefaultGateway":true}},"ipam":{{"dataDir":"{}"}}}}"#,
            node.subnet_file().display(),
            node.dir.join("cni-flannel").display(),
            node.dir.join("ipam").display()
        )
    }

    fn cni(&self, node: &LabNode, command: &str, pod_ns: &NetNs, container_id: &str) -> Result<String> {
        let mut child = node
            .ns
            .command(self.cni_bin_dir.join("flannel"))
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container_id)
            .env("CNI_NETNS", pod_ns.path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", format!("{}:{CNI_PLUGINS}", self.cni_bin_dir.display()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running the flannel CNI plugin")?;
        use std::io::Write;
        child.stdin.take().context("stdin")?.write_all(self.cni_config(node).as_bytes())?;
        let output = child.wait_with_output()?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if !output.status.success() {
            bail!("CNI {command} failed: {stdout} {}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(stdout)
    }

    /// Creates a pod on node `index` through the CNI chain; returns its address.
    pub fn add_pod(&mut self, index: usize) -> Result<Ipv4Addr> {
        let pod_ns = NetNs::create(&format!("pod{index}"))?;
        let container_id = unique("ctr");
        let result = self.cni(&self.nodes[index], "ADD", &pod_ns, &container_id)?;
        let json: serde_json::Value = serde_json::from_str(&result).with_context(|| format!("CNI result {result}"))?;
        let address = json["ips"][0]["address"].as_str().with_context(|| format!("no IP in CNI result {result}"))?;
        let ip: Ipv4Addr = address.split('/').next().unwrap_or_default().parse()?;
        self.nodes[index].pods.push(Pod { ns: pod_ns, ip, container_id });
        Ok(ip)
    }

    /// Deletes the last pod created on node `index` through the CNI chain (DEL), then its
    /// namespace; returns its address.
    pub fn remove_last_pod(&mut self, index: usize) -> Result<Ipv4Addr> {
        let pod = self.nodes[index].pods.pop().with_context(|| format!("node {index} has no pod"))?;
        self.cni(&self.nodes[index], "DEL", &pod.ns, &pod.container_id)
            .with_context(|| format!("deleting pod {} on node {index}", pod.ip))?;
        Ok(pod.ip)
    }

    /// Every pod with its node index.
    pub fn pods(&self) -> Vec<(usize, &Pod)> {
        self.nodes.iter().flat_map(|n| n.pods.iter().map(move |p| (n.index, p))).collect()
    }

    pub fn node_dir(&self, index: usize) -> &Path {
        &self.nodes[index].dir
    }

    /// A namespace on the underlay with `address` and a default route, and nothing else:
    /// for a node configured by hand (interop tests).
    pub fn hand_node(&self, address: &str) -> Result<NetNs> {
        let ns = attach(&self.underlay, "hand", address)?;
        ns.ip(&["route", "add", "default", "via", &GATEWAY_IP.to_string()])?;
        Ok(ns)
    }
}

/// A new namespace attached to the underlay bridge with `address` on its "eth0".
fn attach(underlay: &NetNs, tag: &str, address: &str) -> Result<NetNs> {
    let ns = NetNs::create(tag)?;
    let port = unique("ul");
    underlay.ip(&["link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", ns.name()])?;
    underlay.ip(&["link", "set", &port, "master", "br0", "up"])?;
    ns.ip(&["addr", "add", address, "dev", "eth0"])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    Ok(ns)
}

/// `ping -c <count>` from `from` to `to`; Ok when every reply came back.
pub fn ping(from: &NetNs, to: Ipv4Addr, count: u32) -> Result<()> {
    run(from.command("ping").args(["-c", &count.to_string(), "-i", "0.05", "-W", "1", "-q", &to.to_string()]))?;
    Ok(())
}

/// Runs a command and returns stdout as text.
pub fn output(command: &mut Command) -> Result<String> {
    Ok(String::from_utf8_lossy(&run(command)?.stdout).into_owned())
}
