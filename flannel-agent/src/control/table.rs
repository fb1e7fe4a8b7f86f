//! The set of other nodes' leases, turned into add/replace/remove events. Malformed keys
//! and values are reported with their key and skipped; they never stop the others.

use std::collections::BTreeMap;

use ipnet::Ipv4Net;
use thiserror::Error;

use crate::{
    datapath::LeaseEvent,
    etcd::RawKv,
    subnet::{key::KeyError, lease::LeaseValueError, parse_key, Lease, LeaseAttrs},
};

#[derive(Debug, Error)]
pub enum BadLease {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("lease {key}: {error}")]
    Value { key: String, error: LeaseValueError },
}

/// Parses one lease key and value.
pub fn parse_lease(kv: &RawKv) -> Result<Lease, BadLease> {
    let key = parse_key(&kv.key)?;
    let text = String::from_utf8_lossy(&kv.value);
    let attrs = LeaseAttrs::from_json(&text).map_err(|error| BadLease::Value { key: kv.key.clone(), error })?;
    Ok(Lease { subnet: key.ipv4, ipv6_subnet: key.ipv6, attrs, etcd_lease: (kv.lease != 0).then_some(kv.lease) })
}

#[derive(Debug, Default)]
pub struct LeaseTable {
    own: Option<Ipv4Net>,
    leases: BTreeMap<Ipv4Net, Lease>,
}

impl LeaseTable {
    pub fn new(own: Ipv4Net) -> LeaseTable {
        LeaseTable { own: Some(own), leases: BTreeMap::new() }
    }

    pub fn set_own(&mut self, own: Ipv4Net) -> Option<LeaseEvent> {
        self.own = Some(own);
        // Our subnet is never a peer.
        self.leases.remove(&own).map(LeaseEvent::Removed)
    }

    pub fn len(&self) -> usize {
        self.leases.len()
    }

    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }

    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.leases.values()
    }

    /// Records a PUT; None when it is ours or changes nothing that matters (only the etcd
    /// lease ID moved, as on every flanneld renewal).
    pub fn put(&mut self, lease: Lease) -> Option<LeaseEvent> {
        if Some(lease.subnet) == self.own {
            return None;
        }
        match self.leases.insert(lease.subnet, lease.clone()) {
            None => Some(LeaseEvent::Added(lease)),
            Some(old) if old.attrs == lease.attrs && old.ipv6_subnet == lease.ipv6_subnet => None,
            Some(old) => Some(LeaseEvent::Replaced { old, new: lease }),
        }
    }

    pub fn delete(&mut self, subnet: Ipv4Net) -> Option<LeaseEvent> {
        self.leases.remove(&subnet).map(LeaseEvent::Removed)
    }

    /// Replaces the whole table with a fresh listing and returns the difference as events
    /// (used once after a watch fell behind a compaction).
    pub fn replace_all(&mut self, fresh: Vec<Lease>) -> Vec<LeaseEvent> {
        let mut fresh: BTreeMap<Ipv4Net, Lease> =
            fresh.into_iter().filter(|l| Some(l.subnet) != self.own).map(|l| (l.subnet, l)).collect();
        let mut events: Vec<LeaseEvent> = Vec::new();
        let gone: Vec<Ipv4Net> = self.leases.keys().filter(|s| !fresh.contains_key(s)).copied().collect();
        for subnet in gone {
            events.extend(self.delete(subnet));
        }
        for (_, lease) in std::mem::take(&mut fresh) {
            events.extend(self.put(lease));
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::subnet::BackendData;

    fn lease(subnet: &str, ip: u8) -> Lease {
        Lease {
            subnet: subnet.parse().unwrap(),
            ipv6_subnet: None,
            attrs: LeaseAttrs {
                public_ip: Ipv4Addr::new(192, 0, 2, ip),
                public_ipv6: None,
                backend_type: "host-gw".into(),
                backend_data: BackendData::None,
            },
            etcd_lease: Some(1),
        }
    }

    #[test]
    fn put_delete_and_own_subnet() {
        let mut t = LeaseTable::new("10.244.1.0/24".parse().unwrap());
        assert_eq!(t.put(lease("10.244.1.0/24", 1)), None, "own lease is not a peer");
        assert_eq!(t.put(lease("10.244.2.0/24", 2)), Some(LeaseEvent::Added(lease("10.244.2.0/24", 2))));
        let mut renewed = lease("10.244.2.0/24", 2);
        renewed.etcd_lease = Some(99);
        assert_eq!(t.put(renewed), None, "a renewal (new etcd lease, same value) is not a change");
        let moved = lease("10.244.2.0/24", 3);
        assert!(matches!(t.put(moved.clone()), Some(LeaseEvent::Replaced { new, .. }) if new == moved));
        assert!(matches!(t.delete("10.244.2.0/24".parse().unwrap()), Some(LeaseEvent::Removed(_))));
        assert_eq!(t.delete("10.244.2.0/24".parse().unwrap()), None);
    }

    #[test]
    fn replace_all_yields_only_the_difference() {
        let mut t = LeaseTable::new("10.244.1.0/24".parse().unwrap());
        for l in [lease("10.244.2.0/24", 2), lease("10.244.3.0/24", 3), lease("10.244.4.0/24", 4)] {
            t.put(l);
        }
        let events =
            t.replace_all(vec![lease("10.244.2.0/24", 2), lease("10.244.3.0/24", 33), lease("10.244.5.0/24", 5)]);
        let kinds: Vec<(String, Ipv4Net)> = events
            .iter()
            .map(|e| {
                let kind = match e {
                    LeaseEvent::Added(_) => "add",
                    LeaseEvent::Replaced { .. } => "replace",
                    LeaseEvent::Removed(_) => "remove",
                };
                (kind.to_string(), e.subnet())
            })
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("remove".into(), "10.244.4.0/24".parse().unwrap()),
                ("replace".into(), "10.244.3.0/24".parse().unwrap()),
                ("add".into(), "10.244.5.0/24".parse().unwrap()),
            ]
        );
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn bad_leases_name_their_key() {
        let bad_value =
            RawKv { key: "/p/subnets/10.244.9.0-24".into(), value: b"{".to_vec(), lease: 0, mod_revision: 1 };
        assert!(parse_lease(&bad_value).unwrap_err().to_string().contains("/p/subnets/10.244.9.0-24"));
        let bad_key = RawKv { key: "/p/subnets/banana".into(), value: b"{}".to_vec(), lease: 0, mod_revision: 1 };
        assert!(parse_lease(&bad_key).unwrap_err().to_string().contains("banana"));
        let reservation = RawKv {
            key: "/p/subnets/10.244.9.0-24".into(),
            value: br#"{"PublicIP":"192.0.2.9"}"#.to_vec(),
            lease: 0,
            mod_revision: 1,
        };
        assert_eq!(parse_lease(&reservation).unwrap().etcd_lease, None);
    }
}
