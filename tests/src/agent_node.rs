//! One agent node: a network namespace whose "eth0" (a veth end; the kernel has no dummy
//! driver) carries 192.0.2.1/24 and a default route, etcd listening on that address inside
//! the namespace, a private bpffs, a temp dir (subnet.env, logs, notify socket) and the agent
//! binary run there. Used by the daemon tests and the control-plane benchmark.

use std::{
    fs::File,
    net::Ipv4Addr,
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use crate::{
    agent,
    etcd::{EtcdServer, Etcdctl},
    readiness::NotifySocket,
    NetNs, PrivateBpffs,
};

pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const CONFIG_KEY: &str = "/coreos.com/network/config";
pub const SUBNETS_PREFIX: &str = "/coreos.com/network/subnets/";

pub struct AgentNode {
    // Field order is drop order: agent first, etcd before its namespace, bpffs, temp dir.
    agent: Option<Child>,
    /// The agent's `--datapath` (ebpf unless changed).
    pub datapath: &'static str,
    /// The agent's `--bpf-pin-path` when not the private bpffs (to see it fail there).
    pub pin_path_override: Option<PathBuf>,
    pub etcd: EtcdServer,
    pub ns: NetNs,
    pub bpffs: PrivateBpffs,
    pub dir: tempfile::TempDir,
    notify: NotifySocket,
}

impl Drop for AgentNode {
    fn drop(&mut self) {
        self.kill_agent();
    }
}

impl AgentNode {
    pub fn new() -> Result<AgentNode> {
        crate::require_root()?;
        let ns = NetNs::create("node")?;
        ns.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "eth0peer"])?;
        ns.ip(&["link", "set", "eth0peer", "up"])?;
        ns.ip(&["addr", "add", "192.0.2.1/24", "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&["route", "add", "default", "via", "192.0.2.254", "dev", "eth0", "onlink"])?;
        let etcd = EtcdServer::start_in(&ns, NODE_IP)?;
        let dir = tempfile::tempdir().context("creating a temp dir")?;
        let notify = NotifySocket::bind(dir.path().join("notify.sock"))?;
        Ok(AgentNode {
            agent: None,
            datapath: "ebpf",
            pin_path_override: None,
            etcd,
            ns,
            bpffs: PrivateBpffs::mount()?,
            dir,
            notify,
        })
    }

    pub fn ctl(&self) -> Etcdctl {
        self.etcd.etcdctl()
    }

    pub fn subnet_file(&self) -> PathBuf {
        self.dir.path().join("subnet.env")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn pin_root(&self) -> PathBuf {
        if let Some(path) = &self.pin_path_override {
            return path.clone();
        }
        self.bpffs.path().join("flannel")
    }

    /// Starts the agent (`--datapath` [`Self::datapath`], `--iface eth0`) with `extra` arguments; its stderr
    /// goes to [`Self::log_path`], and it notifies readiness on the node's notify socket.
    pub fn start_agent(&mut self, extra: &[&str]) -> Result<u32> {
        anyhow::ensure!(self.agent.is_none(), "agent already running");
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .with_context(|| format!("opening the agent's log {}", self.log_path().display()))?;
        self.notify.reset()?;
        let child = self
            .ns
            .command(agent::binary()?)
            .args(["--etcd-endpoints", &self.etcd.client_url(), "--iface", "eth0", "--datapath", self.datapath])
            .arg("--subnet-file")
            .arg(self.subnet_file())
            .arg("--bpf-pin-path")
            .arg(self.pin_root())
            .args(extra)
            .env("NOTIFY_SOCKET", self.notify.path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting flannel-agent")?;
        let pid = child.id();
        self.agent = Some(child);
        Ok(pid)
    }

    /// Waits for the agent's `READY=1` (see [`crate::readiness`]); fails with its log if it
    /// exits first or `timeout` passes.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let log = self.log_path();
        let agent = self.agent.as_mut().context("no agent running")?;
        self.notify.wait_ready(timeout, &log, || agent.try_wait().ok().flatten())
    }

    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Child::id)
    }

    /// Sends SIGTERM and waits; returns the exit status and how long the exit took.
    pub fn stop_agent(&mut self) -> Result<(std::process::ExitStatus, Duration)> {
        let mut child = self.agent.take().context("no agent running")?;
        let started = Instant::now();
        // SAFETY: kill(2) on our own child process.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait()?;
        Ok((status, started.elapsed()))
    }

    /// Waits for the agent to exit on its own.
    pub fn wait_agent_exit(&mut self) -> Result<std::process::ExitStatus> {
        let mut child = self.agent.take().context("no agent running")?;
        Ok(child.wait()?)
    }

    pub fn kill_agent(&mut self) {
        if let Some(mut child) = self.agent.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Peak resident set size (VmHWM) of a process, in KiB.
pub fn peak_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmHWM in /proc/<pid>/status")
}
