//! The control plane: holds this node's lease (acquire, renew, repair) and keeps a datapath
//! in step with everybody else's leases (list, then watch; reconnect with backoff; after a
//! compaction, re-list and diff once).

pub mod acquire;
pub mod table;

use std::{future::Future, time::Duration};

use anyhow::Result;
use etcd_client::{EventType, WatchResponse, WatchStream};
use tokio::time::Instant;

use crate::{
    config::NetworkConfig,
    datapath::{Datapath, LeaseEvent, LocalNode},
    etcd::Registry,
    subnet::{parse_key, Lease, LeaseAttrs},
};
pub use acquire::{OwnLease, DEFAULT_LEASE_TTL_SECS};
use table::{parse_lease, LeaseTable};

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// flannel retries a failed renewal every minute.
const RENEW_RETRY: Duration = Duration::from_secs(60);
/// After a datapath error, the whole table is reconciled again this much later.
const DATAPATH_RETRY: Duration = Duration::from_secs(5);
/// Every this often the datapath is checked against the table and repaired (a deleted vxlan
/// device or route comes back), as flanneld re-adds its routes every 10 s.
const DATAPATH_RESYNC: Duration = Duration::from_secs(10);

/// Fixed inputs of the control plane.
pub struct Settings {
    pub config: NetworkConfig,
    /// What we publish in our lease.
    pub attrs: LeaseAttrs,
    pub ttl_secs: i64,
    /// Renew this long before expiry (`--subnet-lease-renew-margin`).
    pub renew_margin: Duration,
}

/// Counters for logs, tests and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Full re-lists after the initial one (one per compaction the watch fell behind).
    pub relists: u64,
    /// Times the watch had to be re-established.
    pub watch_reconnects: u64,
    /// Lease events handed to the datapath.
    pub events_applied: u64,
    /// Malformed lease keys or values skipped.
    pub malformed_skipped: u64,
    /// Times our own lease had to be re-acquired.
    pub reacquired: u64,
    /// Keep-alives that refreshed our etcd lease.
    pub renewals: u64,
}

/// Called when our subnet changes after a repair, to rewrite subnet.env.
pub type LocalChanged = Box<dyn FnMut(&LocalNode) -> Result<()> + Send>;

pub struct ControlPlane<D: Datapath> {
    registry: Registry,
    settings: Settings,
    own: OwnLease,
    local: LocalNode,
    table: LeaseTable,
    datapath: D,
    /// The newest revision whose lease events have all been applied.
    revision: i64,
    datapath_dirty: bool,
    on_local_changed: Option<LocalChanged>,
    stats: Stats,
}

impl<D: Datapath> ControlPlane<D> {
    /// Acquires our lease, sets up the datapath's local part, lists every other lease and
    /// reconciles the datapath with them. On return the datapath is ready.
    pub async fn start(
        registry: Registry,
        settings: Settings,
        mut local: LocalNode,
        previous: Option<ipnet::Ipv4Net>,
        mut datapath: D,
    ) -> Result<ControlPlane<D>> {
        let request = acquire::AcquireRequest {
            config: &settings.config,
            attrs: &settings.attrs,
            previous,
            ttl_secs: settings.ttl_secs,
            reuse_etcd_lease: None,
        };
        let own = acquire::acquire(&registry, &request).await?;
        local.subnet = own.subnet;
        datapath.set_local(&local).await?;
        let mut plane = ControlPlane {
            registry,
            settings,
            table: LeaseTable::new(own.subnet),
            own,
            local,
            datapath,
            revision: 0,
            datapath_dirty: false,
            on_local_changed: None,
            stats: Stats::default(),
        };
        plane.relist().await?;
        let leases: Vec<Lease> = plane.table.leases().cloned().collect();
        plane.datapath.reconcile(&leases).await?;
        tracing::info!(
            subnet = %plane.own.subnet,
            peers = leases.len(),
            revision = plane.revision,
            datapath = plane.datapath.name(),
            "datapath programmed with every lease"
        );
        Ok(plane)
    }

    pub fn own(&self) -> &OwnLease {
        &self.own
    }

    pub fn local(&self) -> &LocalNode {
        &self.local
    }

    pub fn datapath(&self) -> &D {
        &self.datapath
    }

    pub fn peers(&self) -> impl Iterator<Item = &Lease> {
        self.table.leases()
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    pub fn on_local_changed(&mut self, callback: LocalChanged) {
        self.on_local_changed = Some(callback);
    }

    /// Lists every lease and replaces the table, returning the differences.
    async fn relist(&mut self) -> Result<Vec<LeaseEvent>> {
        let listing = self.registry.list_leases().await?;
        let mut leases = Vec::with_capacity(listing.kvs.len());
        for kv in &listing.kvs {
            match parse_lease(kv) {
                Ok(lease) => leases.push(lease),
                Err(error) => {
                    self.stats.malformed_skipped += 1;
                    tracing::warn!(key = kv.key, "skipping malformed lease: {error}");
                }
            }
        }
        self.revision = listing.revision;
        Ok(self.table.replace_all(leases))
    }

    /// Runs until `shutdown` resolves. Leaves the lease and the datapath in place.
    pub async fn run(&mut self, shutdown: impl Future<Output = ()>) -> Result<()> {
        tokio::pin!(shutdown);
        let mut watch: Option<WatchStream> = None;
        let mut backoff = BACKOFF_MIN;
        let mut outage_since: Option<Instant> = None;
        let mut renew_at = self.schedule_renewal().await;
        let far = || Instant::now() + Duration::from_secs(365 * 24 * 3600);
        let mut datapath_retry_at = far();
        let mut resync = tokio::time::interval_at(Instant::now() + DATAPATH_RESYNC, DATAPATH_RESYNC);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if watch.is_none() {
                match self.registry.watch_leases(self.revision + 1).await {
                    Ok(stream) => {
                        if let Some(since) = outage_since.take() {
                            self.stats.watch_reconnects += 1;
                            tracing::info!(after = ?since.elapsed(), revision = self.revision, "lease watch re-established");
                        }
                        watch = Some(stream);
                        backoff = BACKOFF_MIN;
                    }
                    Err(error) => {
                        if outage_since.is_none() {
                            outage_since = Some(Instant::now());
                            tracing::warn!("cannot watch leases, retrying with backoff: {error:#}");
                        } else {
                            tracing::debug!("still cannot watch leases: {error:#}");
                        }
                    }
                }
            }
            let backoff_sleep = tokio::time::sleep(if watch.is_some() { far() - Instant::now() } else { backoff });
            tokio::select! {
                biased;
                _ = &mut shutdown => return Ok(()),
                _ = tokio::time::sleep_until(renew_at) => renew_at = self.renew().await,
                _ = tokio::time::sleep_until(datapath_retry_at) => {
                    datapath_retry_at = far();
                    self.retry_datapath().await;
                }
                _ = resync.tick() => self.retry_datapath().await,
                _ = self.datapath.kernel_changed() => {
                    if let Err(error) = self.datapath.refresh().await {
                        tracing::warn!("datapath refresh after a kernel change failed: {error:#}");
                    }
                }
                _ = backoff_sleep => backoff = (backoff * 2).min(BACKOFF_MAX),
                message = next_message(&mut watch) => match message {
                    Ok(Some(response)) => {
                        if !self.on_watch_response(response).await {
                            watch = None;
                        }
                    }
                    Ok(None) | Err(_) => {
                        let why = match &message { Err(e) => format!("{e}"), _ => "stream closed".into() };
                        outage_since.get_or_insert_with(|| {
                            tracing::warn!("lease watch lost ({why}); reconnecting from revision {}", self.revision + 1);
                            Instant::now()
                        });
                        watch = None;
                    }
                },
            }
            if self.datapath_dirty && datapath_retry_at > Instant::now() + DATAPATH_RETRY {
                datapath_retry_at = Instant::now() + DATAPATH_RETRY;
            }
        }
    }

    /// Handles one watch response; false when the watch must be recreated.
    async fn on_watch_response(&mut self, response: WatchResponse) -> bool {
        if response.compact_revision() > 0 {
            let requested = self.revision + 1;
            match self.relist().await {
                Ok(events) => {
                    self.stats.relists += 1;
                    tracing::warn!(
                        requested,
                        compacted = response.compact_revision(),
                        leases = self.table.len(),
                        changes = events.len(),
                        "lease watch fell behind a compaction: re-listed once and applied the difference"
                    );
                    for event in &events {
                        self.apply(event).await;
                    }
                    self.check_own_lease().await;
                }
                Err(error) => tracing::warn!("re-list after compaction failed, will retry: {error:#}"),
            }
            return false;
        }
        if response.canceled() {
            tracing::warn!(reason = response.cancel_reason(), "etcd canceled the lease watch; recreating it");
            return false;
        }
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            if key == self.own.key {
                self.on_own_key_event(event.event_type(), kv).await;
            } else {
                match event.event_type() {
                    EventType::Put => {
                        let raw = crate::etcd::RawKv {
                            key: key.clone(),
                            value: kv.value().to_vec(),
                            lease: kv.lease(),
                            mod_revision: kv.mod_revision(),
                        };
                        match parse_lease(&raw) {
                            Ok(lease) => {
                                if let Some(event) = self.table.put(lease) {
                                    self.apply(&event).await;
                                }
                            }
                            Err(error) => {
                                self.stats.malformed_skipped += 1;
                                tracing::warn!(key, "skipping malformed lease: {error}");
                            }
                        }
                    }
                    EventType::Delete => match parse_key(&key) {
                        Ok(subnet_key) => {
                            if let Some(event) = self.table.delete(subnet_key.ipv4) {
                                self.apply(&event).await;
                            }
                        }
                        Err(error) => tracing::debug!(key, "delete of a malformed key: {error}"),
                    },
                }
            }
            self.revision = self.revision.max(kv.mod_revision());
        }
        true
    }

    async fn on_own_key_event(&mut self, event_type: EventType, kv: &etcd_client::KeyValue) {
        let still_ours = event_type == EventType::Put
            && LeaseAttrs::from_json(&String::from_utf8_lossy(kv.value()))
                .is_ok_and(|attrs| attrs.public_ip == self.settings.attrs.public_ip);
        if !still_ours {
            self.reacquire("our lease was deleted or taken over by another party").await;
        }
    }

    /// After a re-list: makes sure our key still exists and is ours.
    async fn check_own_lease(&mut self) {
        let ours = match self.registry.get(&self.own.key).await {
            Ok(Some(kv)) => LeaseAttrs::from_json(&String::from_utf8_lossy(&kv.value))
                .is_ok_and(|a| a.public_ip == self.settings.attrs.public_ip),
            Ok(None) => false,
            Err(_) => true, // unknown; the next watch event or renewal will tell
        };
        if !ours {
            self.reacquire("our lease disappeared while the watch was behind").await;
        }
    }

    async fn apply(&mut self, event: &LeaseEvent) {
        self.stats.events_applied += 1;
        if let Err(error) = self.datapath.apply(event).await {
            tracing::error!(subnet = %event.subnet(), "datapath failed to apply a lease change; will reconcile: {error:#}");
            self.datapath_dirty = true;
        } else {
            tracing::debug!(?event, "applied");
        }
    }

    /// Re-applies our local part and reconciles every lease (after an error, and
    /// periodically, so that state removed behind our back comes back).
    async fn retry_datapath(&mut self) {
        let leases: Vec<Lease> = self.table.leases().cloned().collect();
        let result = match self.datapath.set_local(&self.local).await {
            Ok(()) => self.datapath.reconcile(&leases).await,
            Err(error) => Err(error),
        };
        match result {
            Ok(()) => {
                if std::mem::take(&mut self.datapath_dirty) {
                    tracing::info!(peers = leases.len(), "datapath reconciled after an earlier error");
                }
            }
            Err(error) => {
                self.datapath_dirty = true;
                tracing::error!("datapath reconcile failed, will retry: {error:#}");
            }
        }
    }

    /// Re-acquires a lease (same subnet if still free) after ours was lost; flannel exits here.
    async fn reacquire(&mut self, why: &str) {
        tracing::warn!(key = self.own.key, "{why}; re-acquiring");
        self.stats.reacquired += 1;
        let request = acquire::AcquireRequest {
            config: &self.settings.config,
            attrs: &self.settings.attrs,
            previous: Some(self.own.subnet),
            ttl_secs: self.settings.ttl_secs,
            reuse_etcd_lease: self.own.etcd_lease,
        };
        let own = match acquire::acquire(&self.registry, &request).await {
            Ok(own) => own,
            Err(error) => {
                // Try again on the next renewal tick or watch event.
                tracing::error!("re-acquiring our lease failed: {error:#}");
                return;
            }
        };
        if own.subnet != self.own.subnet {
            tracing::error!(
                old = %self.own.subnet,
                new = %own.subnet,
                "our subnet was taken by another node; moved to a new one: pods on this node must be recreated"
            );
            self.local.subnet = own.subnet;
            if let Some(event) = self.table.set_own(own.subnet) {
                self.apply(&event).await;
            }
            if let Err(error) = self.datapath.set_local(&self.local).await {
                tracing::error!("datapath failed to take the new local subnet: {error:#}");
            }
            if let Some(callback) = self.on_local_changed.as_mut() {
                if let Err(error) = callback(&self.local) {
                    tracing::error!("updating local state for the new subnet failed: {error:#}");
                }
            }
        } else {
            tracing::info!(key = own.key, "lease repaired");
        }
        self.own = own;
    }

    /// When to renew: at expiry minus the margin. Reservations never expire.
    async fn schedule_renewal(&mut self) -> Instant {
        let Some(id) = self.own.etcd_lease else {
            return Instant::now() + Duration::from_secs(365 * 24 * 3600);
        };
        match self.registry.time_to_live(id).await {
            Ok(Some(ttl)) => {
                let remaining = Duration::from_secs(ttl.max(0) as u64);
                Instant::now() + remaining.saturating_sub(self.settings.renew_margin)
            }
            Ok(None) => Instant::now(), // gone: renew() notices and re-acquires
            Err(error) => {
                tracing::warn!("reading our lease's TTL failed; retrying in {RENEW_RETRY:?}: {error:#}");
                Instant::now() + RENEW_RETRY
            }
        }
    }

    /// Refreshes our etcd lease to its full TTL (the same lease: nothing is leaked, unlike
    /// flanneld, which grants a new one per renewal).
    async fn renew(&mut self) -> Instant {
        let Some(id) = self.own.etcd_lease else { return self.schedule_renewal().await };
        let remaining = match self.registry.time_to_live(id).await {
            Ok(ttl) => ttl,
            Err(error) => {
                tracing::warn!("renewal: reading the TTL failed; retrying in {RENEW_RETRY:?}: {error:#}");
                return Instant::now() + RENEW_RETRY;
            }
        };
        if remaining.is_some_and(|ttl| Duration::from_secs(ttl.max(0) as u64) > self.settings.renew_margin) {
            return self.schedule_renewal().await;
        }
        match self.registry.keep_alive_once(id).await {
            Ok(Some(ttl)) => {
                self.stats.renewals += 1;
                tracing::info!(key = self.own.key, ttl, "lease renewed");
            }
            Ok(None) => self.reacquire("our etcd lease expired").await,
            Err(error) => {
                tracing::warn!("renewing our lease failed; retrying in {RENEW_RETRY:?}: {error:#}");
                return Instant::now() + RENEW_RETRY;
            }
        }
        self.schedule_renewal().await
    }
}

async fn next_message(watch: &mut Option<WatchStream>) -> Result<Option<WatchResponse>, etcd_client::Error> {
    match watch {
        Some(stream) => stream.message().await,
        None => std::future::pending().await,
    }
}

/// The network config, re-read until it exists (flannel waits for it too).
pub async fn wait_for_config(registry: &Registry) -> Result<NetworkConfig> {
    let key = registry.config_key();
    let mut logged = false;
    loop {
        match registry.get_config().await {
            Ok(Some(text)) => {
                return crate::config::parse(&text).map_err(|e| anyhow::anyhow!("network config at {key}: {e}"))
            }
            Ok(None) if !logged => {
                tracing::warn!(key, "network config not found in etcd; waiting for it to be written");
                logged = true;
            }
            Ok(None) => {}
            Err(error) if !logged => {
                tracing::warn!("cannot read the network config yet, retrying: {error:#}");
                logged = true;
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
