//! The agent's side of masquerade: the programs expire nothing themselves, so the agent
//! sweeps `fl_snat_v1` and removes translations whose both halves have been idle longer than
//! their protocol's timeout (the LRU only evicts under memory pressure), and the identity
//! entries of `fl_snat_inbound_v1` likewise. It also checks `--snat-port-range` against the
//! node's ephemeral ports.

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    time::Duration,
};

use anyhow::{Context, Result};
use aya::{
    maps::{HashMap, MapData},
    Ebpf,
};
use flannel_common::{
    snat::{IPPROTO_TCP, SNAT_EGRESS, SNAT_FLAG_CLOSING, SNAT_INBOUND_MAP, SNAT_INGRESS},
    SnatEntry, SnatKey, SNAT_MAP,
};

/// How long a TCP translation lives after its FIN or RST: conntrack's TIME_WAIT.
pub const TCP_CLOSING_IDLE: Duration = Duration::from_secs(120);

/// Masquerade settings (`--ip-masq` on).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnatOptions {
    /// `--snat-port-range`, inclusive.
    pub port_min: u16,
    pub port_max: u16,
    /// `--snat-tcp-idle-timeout`.
    pub tcp_idle: Duration,
    /// `--snat-idle-timeout`: UDP, ICMP, and the address-only translations of every other
    /// protocol (GRE, ESP, SCTP, …; conntrack's generic timeout plays this part for them).
    pub other_idle: Duration,
}

pub struct SnatTable {
    map: HashMap<MapData, SnatKey, SnatEntry>,
    /// Identity entries of flows outside hosts opened to local pods.
    inbound: HashMap<MapData, SnatKey, SnatEntry>,
}

/// What one sweep did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    pub kept: usize,
    pub removed: usize,
}

impl SnatTable {
    pub fn take(ebpf: &mut Ebpf) -> Result<SnatTable> {
        Ok(SnatTable { map: take_hash(ebpf, SNAT_MAP)?, inbound: take_hash(ebpf, SNAT_INBOUND_MAP)? })
    }

    /// Every entry (both halves of every translation).
    pub fn entries(&self) -> Result<Vec<(SnatKey, SnatEntry)>> {
        self.map.iter().collect::<Result<_, _>>().with_context(|| format!("iterating {SNAT_MAP}"))
    }

    /// Every identity entry (flows from outside to local pods).
    pub fn inbound_entries(&self) -> Result<Vec<(SnatKey, SnatEntry)>> {
        self.inbound.iter().collect::<Result<_, _>>().with_context(|| format!("iterating {SNAT_INBOUND_MAP}"))
    }

    /// Removes every translation idle for longer than its timeout at monotonic time `now_ns`,
    /// and every identity entry likewise. A pair goes together; a half whose partner is gone
    /// goes once it is idle itself.
    ///
    /// Race-free against the programs: the decision is taken on a snapshot, but right before
    /// deleting, each half is read again, and the pair is kept if either half's
    /// `last_seen_ns` moved since the snapshot (the flow resumed). What is left is the
    /// window of one lookup and one delete (microseconds) against the programs' refresh
    /// interval of a second. aya 0.14 has no batch map operations (no
    /// `BPF_MAP_*_BATCH`), so this costs a get-next-key and a lookup per entry, plus a lookup
    /// and a delete per removed half.
    ///
    /// Blocking (syscalls per entry, up to 131k entries): from async code, run it off the
    /// runtime's worker (`block_in_place` on a multi-thread runtime; a current-thread
    /// runtime, as some tests drive the datapath with, cannot hand its tasks off and simply
    /// runs it).
    pub fn sweep(&mut self, options: &SnatOptions, now_ns: u64) -> Result<Sweep> {
        self.sweep_observed(options, now_ns, || {})
    }

    /// [`Self::sweep`], running `after_snapshot` between the snapshot and the deletions: where
    /// packets of a resuming flow can arrive (tests use it to put one there).
    pub fn sweep_observed(
        &mut self,
        options: &SnatOptions,
        now_ns: u64,
        after_snapshot: impl FnOnce(),
    ) -> Result<Sweep> {
        let entries: StdHashMap<SnatKey, SnatEntry> =
            self.map.iter().collect::<Result<_, _>>().with_context(|| format!("iterating {SNAT_MAP}"))?;
        after_snapshot();
        let idle = |key: &SnatKey, entry: &SnatEntry, closing: bool| {
            let limit = match key.proto {
                IPPROTO_TCP if closing => TCP_CLOSING_IDLE.min(options.tcp_idle),
                IPPROTO_TCP => options.tcp_idle,
                _ => options.other_idle,
            };
            now_ns.saturating_sub(entry.last_seen_ns) > limit.as_nanos() as u64
        };
        let mut sweep = Sweep::default();
        let mut done = HashSet::new();
        for (key, entry) in &entries {
            if done.contains(key) {
                continue; // the partner of a pair already decided
            }
            let partner_key = partner_key(key, entry);
            let partner = entries.get(&partner_key).filter(|p| partner_key_matches(&partner_key, p, key));
            done.insert(*key);
            let halves = 1 + usize::from(partner.is_some());
            if partner.is_some() {
                done.insert(partner_key);
            }
            // Either half having seen the FIN/RST closes the pair.
            let closing = (entry.flags | partner.map_or(0, |p| p.flags)) & SNAT_FLAG_CLOSING != 0;
            let partner_idle = partner.is_none_or(|p| idle(&partner_key, p, closing));
            let doomed = idle(key, entry, closing)
                && partner_idle
                && unchanged(&self.map, key, entry)?
                && match partner {
                    Some(p) => unchanged(&self.map, &partner_key, p)?,
                    None => true,
                };
            if !doomed {
                sweep.kept += halves;
                continue;
            }
            remove(&mut self.map, key, SNAT_MAP)?;
            if partner.is_some() {
                remove(&mut self.map, &partner_key, SNAT_MAP)?;
            }
            sweep.removed += halves;
        }
        let inbound: Vec<(SnatKey, SnatEntry)> = self.inbound_entries()?;
        for (key, entry) in &inbound {
            if idle(key, entry, false) && unchanged(&self.inbound, key, entry)? {
                remove(&mut self.inbound, key, SNAT_INBOUND_MAP)?;
                sweep.removed += 1;
            } else {
                sweep.kept += 1;
            }
        }
        Ok(sweep)
    }
}

fn take_hash(ebpf: &mut Ebpf, name: &str) -> Result<HashMap<MapData, SnatKey, SnatEntry>> {
    let map = ebpf.take_map(name).with_context(|| format!("map {name} is not in the eBPF object"))?;
    HashMap::try_from(map).with_context(|| format!("{name} is not a hash map"))
}

/// Whether `partner`, found under the key `partner_key` computed from `key`'s entry, points
/// back at `key`: only then are the two one translation's halves (an entry that outlived its
/// pair may share a key with a newer translation's half).
fn partner_key_matches(at: &SnatKey, partner: &SnatEntry, key: &SnatKey) -> bool {
    partner_key(at, partner) == *key
}

/// Re-reads `key` right before its deletion: true if it is still there with the snapshot's
/// `last_seen_ns` (no packet refreshed it since), false if it moved or is gone.
fn unchanged(map: &HashMap<MapData, SnatKey, SnatEntry>, key: &SnatKey, seen: &SnatEntry) -> Result<bool> {
    match map.get(key, 0) {
        Ok(now) => Ok(now.last_seen_ns == seen.last_seen_ns),
        Err(aya::maps::MapError::KeyNotFound) => Ok(false),
        Err(error) => Err(error).context("re-reading a masquerade entry before removing it"),
    }
}

fn remove(map: &mut HashMap<MapData, SnatKey, SnatEntry>, key: &SnatKey, name: &str) -> Result<()> {
    match map.remove(key) {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(error) => Err(error).with_context(|| format!("removing an idle entry from {name}")),
    }
}

/// The node's ephemeral ports (in the agent's network namespace, the host's).
pub const LOCAL_PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";

/// `ip_local_port_range`'s content ("32768\t60999\n"): MIN and MAX.
pub fn parse_local_port_range(text: &str) -> Option<(u16, u16)> {
    let mut ports = text.split_whitespace().map(str::parse::<u16>);
    match (ports.next(), ports.next(), ports.next()) {
        (Some(Ok(min)), Some(Ok(max)), None) if min <= max => Some((min, max)),
        _ => None,
    }
}

/// The ports two inclusive ranges share, if any.
pub fn overlap(a: (u16, u16), b: (u16, u16)) -> Option<(u16, u16)> {
    let (min, max) = (a.0.max(b.0), a.1.min(b.1));
    (min <= max).then_some((min, max))
}

/// The warning for `--snat-port-range` `snat` given `ip_local_port_range`'s content; None
/// when they are apart.
pub fn local_port_overlap_warning(snat: (u16, u16), local_port_range: &str) -> Option<String> {
    let local = parse_local_port_range(local_port_range)?;
    let (min, max) = overlap(snat, local)?;
    Some(format!(
        "--snat-port-range {}-{} overlaps the node's ephemeral ports (net.ipv4.ip_local_port_range {}-{}) in \
         {min}-{max}: the eBPF masquerade does not know the node's own connections, so a pod's translated \
         connection and a node connection to the same server can get the same source port and disturb each \
         other; choose a --snat-port-range outside {}-{} or narrow ip_local_port_range",
        snat.0, snat.1, local.0, local.1, local.0, local.1
    ))
}

/// At start: warns (not refuses: nodes whose admins widened the ephemeral range must keep
/// working) when `--snat-port-range` overlaps this namespace's `ip_local_port_range`.
pub fn warn_if_local_ports_overlap(options: &SnatOptions) {
    let snat = (options.port_min, options.port_max);
    match std::fs::read_to_string(LOCAL_PORT_RANGE) {
        Ok(text) => match local_port_overlap_warning(snat, &text) {
            Some(warning) => tracing::warn!("{warning}"),
            None if parse_local_port_range(&text).is_none() => {
                tracing::warn!("cannot read {LOCAL_PORT_RANGE} ({text:?}): not checking --snat-port-range against it")
            }
            None => {}
        },
        Err(error) => tracing::warn!("reading {LOCAL_PORT_RANGE}: {error}; not checking --snat-port-range against it"),
    }
}

/// The other half of a translation: the reply key of a forward entry, or the forward key of
/// a reply entry.
pub fn partner_key(key: &SnatKey, entry: &SnatEntry) -> SnatKey {
    match key.direction {
        SNAT_EGRESS => SnatKey {
            src_ip: key.dst_ip,
            dst_ip: entry.to_ip,
            src_port: key.dst_port,
            dst_port: entry.to_port,
            proto: key.proto,
            direction: SNAT_INGRESS,
            _pad: [0; 2],
        },
        _ => SnatKey {
            src_ip: entry.to_ip,
            dst_ip: key.src_ip,
            src_port: entry.to_port,
            dst_port: key.src_port,
            proto: key.proto,
            direction: SNAT_EGRESS,
            _pad: [0; 2],
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_overlap_when_they_share_a_port() {
        assert_eq!(overlap((1024, 32767), (32768, 60999)), None, "the defaults are apart");
        assert_eq!(overlap((1024, 32768), (32768, 60999)), Some((32768, 32768)), "one shared port");
        assert_eq!(overlap((1024, 65535), (32768, 60999)), Some((32768, 60999)), "containing");
        assert_eq!(overlap((40000, 41000), (32768, 60999)), Some((40000, 41000)), "contained");
        assert_eq!(overlap((50000, 65535), (1024, 55000)), Some((50000, 55000)), "from above");
        assert_eq!(overlap((61000, 65535), (32768, 60999)), None, "above");
    }

    #[test]
    fn the_warning_names_both_ranges_and_only_appears_on_overlap() {
        assert_eq!(parse_local_port_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(parse_local_port_range("garbage"), None);
        assert_eq!(parse_local_port_range("60999 32768"), None);
        assert_eq!(local_port_overlap_warning((1024, 32767), "32768\t60999\n"), None);
        let warning = local_port_overlap_warning((1024, 40000), "32768\t60999\n").expect("overlap");
        assert!(warning.contains("--snat-port-range 1024-40000"), "{warning}");
        assert!(warning.contains("ip_local_port_range 32768-60999"), "{warning}");
        assert!(warning.contains("32768-40000"), "the shared ports: {warning}");
        assert!(warning.contains("same source port"), "the consequence: {warning}");
    }

    #[test]
    fn partners_are_each_others() {
        let forward = SnatKey {
            src_ip: [10, 244, 1, 2],
            dst_ip: [203, 0, 113, 10],
            src_port: 40000,
            dst_port: 443,
            proto: IPPROTO_TCP,
            direction: SNAT_EGRESS,
            _pad: [0; 2],
        };
        let to = SnatEntry { to_ip: [192, 0, 2, 10], to_port: 2000, flags: 0, last_seen_ns: 0 };
        let reply = partner_key(&forward, &to);
        assert_eq!(
            (reply.src_ip, reply.dst_ip, reply.src_port, reply.dst_port, reply.direction),
            ([203, 0, 113, 10], [192, 0, 2, 10], 443, 2000, SNAT_INGRESS)
        );
        let back = SnatEntry { to_ip: [10, 244, 1, 2], to_port: 40000, flags: 0, last_seen_ns: 0 };
        assert_eq!(partner_key(&reply, &back), forward);
    }

    #[test]
    fn address_only_pairs_are_each_others_partners() {
        const IPPROTO_GRE: u8 = 47;
        let forward = SnatKey {
            src_ip: [10, 244, 1, 2],
            dst_ip: [203, 0, 113, 10],
            proto: IPPROTO_GRE,
            direction: SNAT_EGRESS,
            ..SnatKey::default()
        };
        let to = SnatEntry { to_ip: [192, 0, 2, 10], ..SnatEntry::default() };
        let reply = partner_key(&forward, &to);
        assert_eq!(
            reply,
            SnatKey {
                src_ip: [203, 0, 113, 10],
                dst_ip: [192, 0, 2, 10],
                proto: IPPROTO_GRE,
                direction: SNAT_INGRESS,
                ..SnatKey::default()
            }
        );
        let back = SnatEntry { to_ip: [10, 244, 1, 2], ..SnatEntry::default() };
        assert_eq!(partner_key(&reply, &back), forward);
    }
}
