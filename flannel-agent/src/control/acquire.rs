//! Acquiring this node's lease in etcd: list, let [`allocate::plan`] decide, then write with a
//! transaction so that two agents can never hold one subnet. A lost race just re-lists; every
//! lost race means another agent won a subnet, so the loop ends when we win or none is free.

use std::{collections::HashMap, time::Duration};

use anyhow::{bail, Result};
use ipnet::Ipv4Net;
use rand::Rng;

use crate::{
    config::NetworkConfig,
    etcd::{RawKv, Registry},
    subnet::{
        allocate::{self, Plan, Taken},
        format_key, parse_key, LeaseAttrs,
    },
};

/// flannel's lease TTL: 24 hours.
pub const DEFAULT_LEASE_TTL_SECS: i64 = 24 * 60 * 60;

/// The lease this node holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnLease {
    pub subnet: Ipv4Net,
    pub key: String,
    /// The etcd lease that expires the key; None for a reservation (a key without TTL),
    /// which is never given one.
    pub etcd_lease: Option<i64>,
}

pub struct AcquireRequest<'a> {
    pub config: &'a NetworkConfig,
    pub attrs: &'a LeaseAttrs,
    /// The subnet in the previous subnet.env (or the one we just lost).
    pub previous: Option<Ipv4Net>,
    pub ttl_secs: i64,
    /// An etcd lease we already hold and may attach the key to instead of granting one.
    pub reuse_etcd_lease: Option<i64>,
}

pub async fn acquire(registry: &Registry, request: &AcquireRequest<'_>) -> Result<OwnLease> {
    let value = request.attrs.to_json();
    let mut granted = match request.reuse_etcd_lease {
        Some(id) if registry.time_to_live(id).await?.is_some() => Some(id),
        _ => None,
    };
    let result = acquire_loop(registry, request, &value, &mut granted).await;
    // A lease granted for a create that we did not use must not linger for 24 h.
    if let Some(unused) = granted.filter(|id| result.as_ref().map_or(true, |own| own.etcd_lease != Some(*id))) {
        if let Err(error) = registry.revoke(unused).await {
            tracing::warn!(
                lease = format!("{unused:x}"),
                error = format!("{error:#}"),
                "could not revoke an unused etcd lease"
            );
        }
    }
    result
}

async fn acquire_loop(
    registry: &Registry,
    request: &AcquireRequest<'_>,
    value: &str,
    granted: &mut Option<i64>,
) -> Result<OwnLease> {
    let public_ip = request.attrs.public_ip;
    let mut lost_races = 0u32;
    loop {
        let listing = registry.list_leases().await?;
        let mut taken = Vec::with_capacity(listing.kvs.len());
        let mut by_subnet: HashMap<Ipv4Net, RawKv> = HashMap::with_capacity(listing.kvs.len());
        for kv in listing.kvs {
            match parse_key(&kv.key) {
                Ok(key) => {
                    let owner = LeaseAttrs::from_json(&String::from_utf8_lossy(&kv.value)).ok().map(|a| a.public_ip);
                    taken.push(Taken { subnet: key.ipv4, public_ip: owner });
                    by_subnet.insert(key.ipv4, kv);
                }
                Err(error) => tracing::warn!(key = kv.key, "ignoring malformed lease key: {error}"),
            }
        }
        let mut stale = Vec::new();
        let plan = allocate::plan(request.config, &taken, public_ip, request.previous, &mut rand::rng(), &mut stale);
        for subnet in stale {
            let kv = &by_subnet[&subnet];
            tracing::warn!(key = kv.key, %public_ip, "deleting our old lease: it no longer fits the network config");
            registry.delete_if_unchanged(&kv.key, kv.mod_revision).await?;
        }
        match plan {
            Plan::Reuse(subnet) => {
                let kv = &by_subnet[&subnet];
                let etcd_lease = (kv.lease != 0).then_some(kv.lease);
                if let Some(id) = etcd_lease {
                    if registry.keep_alive_once(id).await?.is_none() {
                        continue; // expired between the list and now: the key is gone
                    }
                }
                // Publish our current attributes (a new VtepMAC, say), keeping the key's etcd
                // lease — or no lease at all for a reservation.
                if kv.value != value.as_bytes() && !registry.update(&kv.key, value, kv.lease, kv.mod_revision).await? {
                    continue;
                }
                let kind = if etcd_lease.is_some() { "lease" } else { "reservation (no TTL)" };
                tracing::info!(key = kv.key, %subnet, "reusing our existing {kind}");
                return Ok(OwnLease { subnet, key: kv.key.clone(), etcd_lease });
            }
            Plan::Create { subnet, from_subnet_env } => {
                let id = match *granted {
                    Some(id) => id,
                    None => *granted.insert(registry.grant(request.ttl_secs).await?),
                };
                let key = registry.lease_key(&format_key(subnet));
                if registry.create(&key, value, id).await? {
                    let source = if from_subnet_env { "the previous subnet.env" } else { "the free subnets" };
                    tracing::info!(key, %subnet, lost_races, "acquired a new lease from {source}");
                    return Ok(OwnLease { subnet, key, etcd_lease: Some(id) });
                }
                lost_races += 1;
                tracing::debug!(key, "subnet was taken concurrently; choosing again");
                // Spread out agents that keep colliding.
                let jitter = Duration::from_millis(rand::rng().random_range(0..20));
                tokio::time::sleep(jitter).await;
            }
            Plan::OutOfSubnets { total } => {
                let c = request.config;
                bail!(
                    "out of subnets: all {total} subnets of /{} between SubnetMin {} and SubnetMax {} are leased",
                    c.subnet_len,
                    c.subnet_min,
                    c.subnet_max
                );
            }
        }
    }
}
