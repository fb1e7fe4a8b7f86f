//! flannel's masquerade (`--ip-masq`) and forward (`--iptables-forward-rules`) rules, IPv4,
//! with iptables or, when the network config says `EnableNFTables`, nftables
//! (pkg/trafficmngr in flannel).
//!
//! - [`rules`]: the exact rule text for cluster network C and node subnet P (pure).
//! - `iptables`: one `iptables-restore --noflush` batch on stdin, checked against
//!   `iptables-save -t nat` / `-t filter`.
//! - `nftables`: one `nft -f -` transaction building table `ip flannel-ipv4`, checked against
//!   `nft list table`.
//!
//! The commands run in the calling thread's network namespace. The daemon calls
//! [`TrafficRules::ensure`] once at start, spawns [`TrafficRules::resync_loop`] on a clone
//! (clones share their state) and calls [`TrafficRules::set_subnet`] on its own copy when the
//! lease is re-acquired with another subnet; the loop then keeps the new rules.
//!
//! Behaviour compared with flannel:
//! - flannel's chains (FLANNEL-POSTRTG, FLANNEL-FWD, and the nft chains) are owned: every
//!   repair rewrites the whole chain in the same commit, so a previous subnet's or network's
//!   rules cannot survive (flannel deletes the previous subnet's rules one by one, from what
//!   subnet.env remembered). The jump in POSTROUTING/FORWARD stays where it is when present
//!   (flannel deletes and re-appends it); duplicates of it, and rules an older flanneld put
//!   straight into POSTROUTING with the "flanneld masq" comment, are deleted.
//! - Nothing is written when everything is already as wanted, so counters survive a restart.
//! - The resync loop re-checks exactly (content and order), and warns naming the differences.
//! - nftables: kube-proxy's mark is tested under its mask (`meta mark & 0x4000 == 0x4000`,
//!   as iptables' `--mark 0x4000/0x4000`; flannel's nft rule compares the whole mark), and the
//!   external-to-local-pod rule is `ip saddr != C ip daddr P return` as in the iptables
//!   chain (flannel's nft rule reads `ip saddr != P ip daddr C return`, which also exempts
//!   host-to-remote-pod traffic that its iptables rules masquerade). flannel's nft mode does
//!   not resync; here both backends do.
//! - `--random-fully` is used when iptables is 1.6.2 or newer (flannel's test); flannel's
//!   `--ip-masq-random-fully-disable` is not offered. nft always uses `fully-random`.

mod iptables;
mod nftables;
pub mod rules;

use std::{
    io::Write,
    process::{Command, Stdio},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use ipnet::Ipv4Net;

/// Which kernel interface holds the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Iptables,
    Nftables,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasqConfig {
    /// The cluster network C (the config's Network).
    pub network: Ipv4Net,
    /// This node's subnet P (our lease).
    pub subnet: Ipv4Net,
    /// `--ip-masq`: the masquerade chain.
    pub ip_masq: bool,
    /// `--iptables-forward-rules`: the forward chain.
    pub forward_rules: bool,
    /// The eBPF datapath masquerades pod → outside traffic itself: that one rule is left out.
    pub ebpf_snat: bool,
    pub backend: Backend,
}

/// flannel's masquerade and forward rules for one node. Cheap to clone; clones share state.
#[derive(Debug, Clone)]
pub struct TrafficRules {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug)]
struct Inner {
    config: MasqConfig,
    /// Probed on first use (iptables backend only).
    iptables: Option<iptables::Features>,
}

impl TrafficRules {
    pub fn new(config: MasqConfig) -> TrafficRules {
        TrafficRules { inner: Arc::new(Mutex::new(Inner { config, iptables: None })) }
    }

    /// The configuration in force (with the current subnet).
    pub fn config(&self) -> MasqConfig {
        self.lock().config.clone()
    }

    /// Installs (or repairs) all rules in one batch; idempotent. Writes nothing when every
    /// rule is already in place.
    pub fn ensure(&mut self) -> Result<()> {
        let mut inner = self.lock();
        let repaired = inner.ensure(|_| {})?;
        if !repaired.is_empty() {
            tracing::info!(backend = ?inner.config.backend, network = %inner.config.network, subnet = %inner.config.subnet,
                changes = repaired.len(), "masquerade/forward rules installed");
        }
        Ok(())
    }

    /// True when every rule is present as installed (content and order, no leftovers).
    pub fn check(&self) -> Result<bool> {
        Ok(self.missing()?.is_empty())
    }

    /// What differs from the installed state, one readable line each (empty when none).
    pub fn missing(&self) -> Result<Vec<String>> {
        self.lock().problems()
    }

    /// New subnet (lease re-acquired): replace the rules that mention the old one.
    pub fn set_subnet(&mut self, subnet: Ipv4Net) -> Result<()> {
        let mut inner = self.lock();
        let old = std::mem::replace(&mut inner.config.subnet, subnet);
        if old != subnet {
            tracing::info!(%old, new = %subnet, "subnet changed; replacing the masquerade rules");
        }
        inner.ensure(|_| {})?;
        Ok(())
    }

    /// Runs forever: every `every`, check and re-apply when something is missing (with a
    /// warning naming what was missing). Errors are logged and retried at the next tick.
    /// The first check is one period after the call (call [`TrafficRules::ensure`] first).
    pub async fn resync_loop(self, every: Duration) {
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            if let Err(error) = crate::blocking::blocking(|| self.resync_once()) {
                tracing::warn!(error = format!("{error:#}"), "checking masquerade/forward rules failed");
            }
        }
    }

    /// One resync step; returns what it found missing and re-applied.
    fn resync_once(&self) -> Result<Vec<String>> {
        self.lock().ensure(|problems| {
            tracing::warn!(missing = problems.join("; "), "masquerade/forward rules missing or changed; re-applying");
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Inner {
    fn nothing_to_install(&self) -> bool {
        !self.config.ip_masq && !self.config.forward_rules
    }

    fn iptables_features(&mut self) -> Result<iptables::Features> {
        if let Some(features) = self.iptables {
            return Ok(features);
        }
        let features = iptables::Features::probe()?;
        if !features.random_fully {
            tracing::warn!("iptables older than 1.6.2: masquerading without --random-fully");
        }
        self.iptables = Some(features);
        Ok(features)
    }

    fn problems(&mut self) -> Result<Vec<String>> {
        if self.nothing_to_install() {
            return Ok(Vec::new());
        }
        match self.config.backend {
            Backend::Iptables => {
                let features = self.iptables_features()?;
                iptables::check(&rules::iptables_chains(&self.config, features.random_fully))
            }
            Backend::Nftables => nftables::check(&rules::nft_chains(&self.config)),
        }
    }

    /// Repairs what differs; `report` sees the differences before anything is written.
    fn ensure(&mut self, report: impl FnOnce(&[String])) -> Result<Vec<String>> {
        if self.nothing_to_install() {
            return Ok(Vec::new());
        }
        match self.config.backend {
            Backend::Iptables => {
                let features = self.iptables_features()?;
                iptables::ensure(&rules::iptables_chains(&self.config, features.random_fully), features, report)
            }
            Backend::Nftables => nftables::ensure(&rules::nft_chains(&self.config), report),
        }
    }
}

/// Runs `program args` with `stdin`, returns its stdout; a failure carries its stderr.
fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {program} (is it installed?)"))?;
    if let Some(input) = stdin {
        // The batches are a few KiB, below the pipe's capacity: writing before reading the
        // output cannot deadlock. Dropping the handle closes the child's stdin.
        let mut pipe = child.stdin.take().context("stdin pipe")?;
        pipe.write_all(input.as_bytes()).with_context(|| format!("writing to {program}"))?;
    }
    let output = child.wait_with_output().with_context(|| format!("waiting for {program}"))?;
    if !output.status.success() {
        bail!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    String::from_utf8(output.stdout).with_context(|| format!("{program} printed non-UTF-8"))
}
