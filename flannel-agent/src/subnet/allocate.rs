//! Choosing this node's subnet, in flannel's order: (1) an existing lease whose PublicIP is
//! ours and that still fits the config; (2) the subnet from the previous subnet.env if it is
//! free and fits; (3) a random one among the first 100 free subnets from SubnetMin upward.
//! Pure: the caller lists etcd, this decides, the caller writes with a transaction.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use rand::Rng;

use crate::config::NetworkConfig;

/// flannel picks randomly among at most this many free subnets, so that agents starting
/// together rarely collide while allocation stays dense.
pub const FREE_CANDIDATES: usize = 100;

/// One existing key under `subnets/`, as far as allocation cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Taken {
    pub subnet: Ipv4Net,
    /// The lease's PublicIP, when its value could be parsed.
    pub public_ip: Option<Ipv4Addr>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Our own lease exists and fits: keep using it.
    Reuse(Ipv4Net),
    /// Create a lease for this subnet (from subnet.env or freshly picked).
    Create { subnet: Ipv4Net, from_subnet_env: bool },
    /// Every subnet in [SubnetMin, SubnetMax] is taken.
    OutOfSubnets { total: usize },
}

/// Decides which subnet to use. `stale_own` receives our leases that no longer fit the
/// config (flannel deletes those).
pub fn plan(
    config: &NetworkConfig,
    taken: &[Taken],
    public_ip: Ipv4Addr,
    previous: Option<Ipv4Net>,
    rng: &mut impl Rng,
    stale_own: &mut Vec<Ipv4Net>,
) -> Plan {
    let mut reuse = None;
    for lease in taken.iter().filter(|t| t.public_ip == Some(public_ip)) {
        if config.contains_subnet(lease.subnet) && reuse.is_none() {
            reuse = Some(lease.subnet);
        } else {
            stale_own.push(lease.subnet);
        }
    }
    if let Some(subnet) = reuse {
        return Plan::Reuse(subnet);
    }
    let occupied = Occupied::new(taken.iter().map(|t| t.subnet).filter(|s| !stale_own.contains(s)));
    if let Some(previous) = previous {
        if config.contains_subnet(previous) && occupied.is_free(previous) {
            return Plan::Create { subnet: previous, from_subnet_env: true };
        }
    }
    let mut free = Vec::with_capacity(FREE_CANDIDATES);
    for candidate in config.ipv4_subnets() {
        if occupied.is_free(candidate) {
            free.push(candidate);
            if free.len() == FREE_CANDIDATES {
                break;
            }
        }
    }
    if free.is_empty() {
        return Plan::OutOfSubnets { total: config.ipv4_subnets().count() };
    }
    Plan::Create { subnet: free[rng.random_range(0..free.len())], from_subnet_env: false }
}

/// The address ranges taken by existing keys, sorted and merged, so that checking a
/// candidate costs a binary search (10,000 leases × 65,536 candidates would otherwise be
/// hundreds of millions of comparisons).
struct Occupied(Vec<(u32, u32)>);

impl Occupied {
    fn new(subnets: impl Iterator<Item = Ipv4Net>) -> Occupied {
        let mut ranges: Vec<(u32, u32)> = subnets.map(|s| (u32::from(s.network()), u32::from(s.broadcast()))).collect();
        ranges.sort_unstable();
        let mut merged: Vec<(u32, u32)> = Vec::with_capacity(ranges.len());
        for (start, end) in ranges {
            match merged.last_mut() {
                Some(last) if start <= last.1.saturating_add(1) => last.1 = last.1.max(end),
                _ => merged.push((start, end)),
            }
        }
        Occupied(merged)
    }

    fn is_free(&self, candidate: Ipv4Net) -> bool {
        let (start, end) = (u32::from(candidate.network()), u32::from(candidate.broadcast()));
        // Only the last range starting at or before `end` can overlap the candidate.
        let i = self.0.partition_point(|r| r.0 <= end);
        i == 0 || self.0[i - 1].1 < start
    }
}

#[cfg(test)]
mod tests {
    use rand::{rngs::StdRng, SeedableRng};

    use super::*;
    use crate::config;

    fn cfg(json: &str) -> NetworkConfig {
        config::parse(json).unwrap()
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn taken(subnet: &str, ip: Option<[u8; 4]>) -> Taken {
        Taken { subnet: net(subnet), public_ip: ip.map(Ipv4Addr::from) }
    }

    const ME: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);

    #[test]
    fn reuses_own_lease_by_public_ip() {
        let c = cfg(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#);
        let t = [taken("10.244.7.0/24", Some([192, 0, 2, 11])), taken("10.244.9.0/24", Some([192, 0, 2, 10]))];
        let mut stale = vec![];
        let p = plan(&c, &t, ME, Some(net("10.244.3.0/24")), &mut StdRng::seed_from_u64(1), &mut stale);
        assert_eq!(p, Plan::Reuse(net("10.244.9.0/24")));
        assert!(stale.is_empty());
    }

    #[test]
    fn own_lease_outside_config_is_stale_and_previous_subnet_is_next() {
        let c = cfg(r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.10.0","Backend":{"Type":"vxlan"}}"#);
        let t = [taken("10.244.2.0/24", Some([192, 0, 2, 10]))];
        let mut stale = vec![];
        let p = plan(&c, &t, ME, Some(net("10.244.20.0/24")), &mut StdRng::seed_from_u64(1), &mut stale);
        assert_eq!(p, Plan::Create { subnet: net("10.244.20.0/24"), from_subnet_env: true });
        assert_eq!(stale, vec![net("10.244.2.0/24")]);
    }

    #[test]
    fn previous_subnet_taken_by_someone_else_is_not_used() {
        let c = cfg(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#);
        let t = [taken("10.244.20.0/24", Some([192, 0, 2, 99]))];
        let p = plan(&c, &t, ME, Some(net("10.244.20.0/24")), &mut StdRng::seed_from_u64(1), &mut vec![]);
        let Plan::Create { subnet, from_subnet_env } = p else { panic!("{p:?}") };
        assert_ne!(subnet, net("10.244.20.0/24"));
        assert!(!from_subnet_env);
    }

    #[test]
    fn picks_among_the_first_100_free_within_min_max() {
        let c = cfg(
            r#"{"Network":"10.0.0.0/8","SubnetLen":24,"SubnetMin":"10.1.0.0","SubnetMax":"10.9.0.0","Backend":{"Type":"vxlan"}}"#,
        );
        // Taken keys (with garbage or foreign values) are never picked.
        let t = [taken("10.1.0.0/24", None), taken("10.1.1.0/24", Some([192, 0, 2, 50]))];
        let first = net("10.1.2.0/24").network();
        let last_candidate = u32::from(first) + 99 * 256;
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..500 {
            let Plan::Create { subnet, .. } = plan(&c, &t, ME, None, &mut rng, &mut vec![]) else { panic!() };
            let base = u32::from(subnet.network());
            assert!(base >= u32::from(first) && base <= last_candidate, "{subnet} outside the first 100 free");
            assert_eq!(subnet.prefix_len(), 24);
        }
    }

    #[test]
    fn occupied_ranges_detect_any_overlap() {
        let o = Occupied::new(["10.0.1.0/24", "10.0.2.0/24", "10.0.8.0/21", "10.1.0.0/16"].iter().map(|s| net(s)));
        for (candidate, free) in [
            ("10.0.0.0/24", true),
            ("10.0.1.0/24", false),
            ("10.0.3.0/24", true),
            ("10.0.9.0/24", false),
            ("10.0.0.0/16", false),
            ("10.0.16.0/24", true),
            ("10.1.255.0/24", false),
            ("10.2.0.0/24", true),
        ] {
            assert_eq!(o.is_free(net(candidate)), free, "{candidate}");
        }
        assert!(Occupied::new(std::iter::empty()).is_free(net("10.0.0.0/24")));
    }

    #[test]
    fn out_of_subnets_when_all_are_taken() {
        // 10.5.0.0/27 with /29 subnets: SubnetMin skips the first, leaving 3.
        let c = cfg(r#"{"Network":"10.5.0.0/27","SubnetLen":29,"Backend":{"Type":"vxlan"}}"#);
        let all: Vec<Ipv4Net> = c.ipv4_subnets().collect();
        assert_eq!(all.len(), 3);
        let t: Vec<Taken> =
            all.iter().map(|s| Taken { subnet: *s, public_ip: Some(Ipv4Addr::new(192, 0, 2, 1)) }).collect();
        assert_eq!(plan(&c, &t, ME, None, &mut StdRng::seed_from_u64(1), &mut vec![]), Plan::OutOfSubnets { total: 3 });
    }
}
