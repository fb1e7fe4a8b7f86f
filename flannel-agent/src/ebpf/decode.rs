//! Reading what the programs write, shared downward by the datapath and `inspect`: lease map
//! keys as subnets, and the clock the programs timestamp with.

use std::net::Ipv4Addr;

use anyhow::{Context, Result};
use aya::maps::lpm_trie::Key;
use ipnet::Ipv4Net;

/// The subnet a lease map key stands for.
pub fn subnet_of(key: &Key<[u8; 4]>) -> Result<Ipv4Net> {
    Ipv4Net::new(Ipv4Addr::from(key.data()), key.prefix_len() as u8)
        .with_context(|| format!("lease map key with prefix length {}", key.prefix_len()))
}

/// CLOCK_MONOTONIC in nanoseconds: the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
