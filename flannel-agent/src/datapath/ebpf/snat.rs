//! The agent's side of masquerade: the programs expire nothing themselves, so the agent
//! sweeps `fl_snat_v1` and removes translations whose both halves have been idle longer than
//! their protocol's timeout (the LRU only evicts under memory pressure).

use std::{collections::HashMap as StdHashMap, time::Duration};

use anyhow::{Context, Result};
use aya::{
    maps::{HashMap, MapData},
    Ebpf,
};
use flannel_common::{
    snat::{IPPROTO_TCP, SNAT_EGRESS, SNAT_FLAG_CLOSING, SNAT_INGRESS},
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
    /// `--snat-idle-timeout`: UDP and ICMP.
    pub other_idle: Duration,
}

pub struct SnatTable {
    map: HashMap<MapData, SnatKey, SnatEntry>,
}

/// What one sweep did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    pub kept: usize,
    pub removed: usize,
}

impl SnatTable {
    pub fn take(ebpf: &mut Ebpf) -> Result<SnatTable> {
        let map = ebpf.take_map(SNAT_MAP).with_context(|| format!("map {SNAT_MAP} is not in the eBPF object"))?;
        let map = HashMap::try_from(map).with_context(|| format!("{SNAT_MAP} is not a hash map"))?;
        Ok(SnatTable { map })
    }

    /// Every entry (both halves of every translation).
    pub fn entries(&self) -> Result<Vec<(SnatKey, SnatEntry)>> {
        self.map.iter().collect::<Result<_, _>>().with_context(|| format!("iterating {SNAT_MAP}"))
    }

    /// Removes every translation idle for longer than its timeout at monotonic time `now_ns`.
    /// A pair goes together; a half whose partner is gone goes once it is idle itself.
    pub fn sweep(&mut self, options: &SnatOptions, now_ns: u64) -> Result<Sweep> {
        let entries: StdHashMap<SnatKey, SnatEntry> =
            self.map.iter().collect::<Result<_, _>>().with_context(|| format!("iterating {SNAT_MAP}"))?;
        let idle = |key: &SnatKey, entry: &SnatEntry, closing: bool| {
            let limit = match key.proto {
                IPPROTO_TCP if closing => TCP_CLOSING_IDLE.min(options.tcp_idle),
                IPPROTO_TCP => options.tcp_idle,
                _ => options.other_idle,
            };
            now_ns.saturating_sub(entry.last_seen_ns) > limit.as_nanos() as u64
        };
        let mut doomed = Vec::new();
        for (key, entry) in &entries {
            let partner_key = partner_key(key, entry);
            let partner = entries.get(&partner_key);
            // Either half having seen the FIN/RST closes the pair.
            let closing = (entry.flags | partner.map_or(0, |p| p.flags)) & SNAT_FLAG_CLOSING != 0;
            let partner_idle = partner.is_none_or(|p| idle(&partner_key, p, closing));
            if idle(key, entry, closing) && partner_idle {
                doomed.push(*key);
            }
        }
        for key in &doomed {
            match self.map.remove(key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(error) => return Err(error).with_context(|| format!("removing an idle entry from {SNAT_MAP}")),
            }
        }
        Ok(Sweep { kept: entries.len() - doomed.len(), removed: doomed.len() })
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
}
