//! The packet-counter programs: attach `fl_count_xdp` (ingress) and `fl_count_tc` (egress)
//! to an interface with pinned links, and read the pinned counters back.
//!
//! Pin layout under the pin root (`--bpf-pin-path`):
//! `maps/fl_counters_v1` and `links/<interface>/{fl_count_xdp,fl_count_tc}`.
//! Links are pinned so the programs stay attached when the agent exits; attaching again
//! replaces the program inside the existing link atomically (never detach-then-attach).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use aya::maps::{Map, MapData, PerCpuHashMap};
use flannel_common::{Direction, IfaceCounterKey, PacketCounter, COUNTERS_MAP};
use serde::Serialize;

use super::{
    bpffs,
    links::{self, Hook},
    object,
};

pub const XDP_PROGRAM: &str = "fl_count_xdp";
pub const TC_PROGRAM: &str = "fl_count_tc";

pub fn maps_dir(pin_root: &Path) -> PathBuf {
    pin_root.join("maps")
}

pub use super::links::links_dir;

/// Loads the counter programs and attaches them to `interface` (XDP ingress, TC egress),
/// with the counters map and both links pinned under `pin_root`. On failure nothing new is
/// left pinned.
pub fn attach(interface: &str, pin_root: &Path) -> Result<()> {
    let ifindex = crate::iface::if_index(interface)?;
    let links = links_dir(pin_root, interface);
    let had_links = links.exists();
    let result = attach_inner(interface, pin_root, &links);
    if let Err(error) = &result {
        if !had_links {
            tracing::debug!(interface, error = format!("{error:#}"), "rolling back the pins this attach created");
            let _ = std::fs::remove_dir_all(&links);
            remove_unused_pins(pin_root);
        }
    } else {
        tracing::info!(interface, ifindex, "packet counters attached");
    }
    result
}

fn attach_inner(interface: &str, pin_root: &Path, links: &Path) -> Result<()> {
    let maps = maps_dir(pin_root);
    bpffs::ensure_pin_dir(&maps)?;
    bpffs::ensure_pin_dir(links)?;
    let mut ebpf = object::load_pinned(&maps)?;
    links::attach(&mut ebpf, XDP_PROGRAM, interface, Hook::Xdp, pin_root)?;
    links::attach(&mut ebpf, TC_PROGRAM, interface, Hook::TcEgress, pin_root)?;
    Ok(())
}

/// Removes the map pins and directories once no interface has links left.
fn remove_unused_pins(pin_root: &Path) {
    let all_links = pin_root.join("links");
    let in_use = std::fs::read_dir(&all_links).map(|mut d| d.next().is_some()).unwrap_or(false);
    if !in_use {
        let _ = std::fs::remove_dir_all(&all_links);
        let _ = std::fs::remove_dir_all(maps_dir(pin_root));
        // Leave the root if something else lives there.
        let _ = std::fs::remove_dir(pin_root);
    }
}

/// Removes `interface`'s link pins, which detaches the programs. When no interface is left,
/// the counters map pin and the pin directories go too.
pub fn detach(interface: &str, pin_root: &Path) -> Result<()> {
    let links = links_dir(pin_root, interface);
    if !links.exists() {
        bail!("no counters are attached to {interface} under {}", pin_root.display());
    }
    std::fs::remove_dir_all(&links).with_context(|| format!("removing link pins {}", links.display()))?;
    remove_unused_pins(pin_root);
    tracing::info!(interface, "packet counters detached");
    Ok(())
}

/// One counter summed over all CPUs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CounterRow {
    pub ifindex: u32,
    pub direction: &'static str,
    pub packets: u64,
    pub bytes: u64,
}

/// Reads the pinned counters map under `pin_root` and sums each entry over the CPUs.
pub fn read(pin_root: &Path) -> Result<Vec<CounterRow>> {
    let pin = maps_dir(pin_root).join(COUNTERS_MAP);
    let data = MapData::from_pin(&pin).with_context(|| format!("opening pinned map {}", pin.display()))?;
    let map: PerCpuHashMap<_, IfaceCounterKey, PacketCounter> = PerCpuHashMap::try_from(Map::from_map_data(data)?)
        .with_context(|| format!("{} is not a per-CPU hash map", pin.display()))?;
    let mut rows = BTreeMap::new();
    for entry in map.iter() {
        let (key, per_cpu) = entry.with_context(|| format!("iterating {}", pin.display()))?;
        let direction = Direction::from_u32(key.direction).map_or("unknown", Direction::name);
        let (packets, bytes) = per_cpu.iter().fold((0, 0), |(p, b), c| (p + c.packets, b + c.bytes));
        rows.insert((key.ifindex, key.direction), CounterRow { ifindex: key.ifindex, direction, packets, bytes });
    }
    Ok(rows.into_values().collect())
}

/// The name of `ifindex` in the caller's network namespace, if it has one there.
pub fn interface_name(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes as if_indextoname requires.
    let name = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if name.is_null() {
        return None;
    }
    // SAFETY: on success buf holds a NUL-terminated name.
    Some(unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned())
}
