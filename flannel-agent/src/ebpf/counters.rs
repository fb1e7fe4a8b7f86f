//! The packet-counter programs: attach `fl_count_xdp` (ingress) and `fl_count_tc` (egress)
//! to an interface with pinned links, and read the pinned counters back.
//!
//! Pin layout under the pin root (`--bpf-pin-path`):
//! `maps/fl_counters_v1` and `links/<interface>/{fl_count_xdp,fl_count_tc}`.
//! Links are pinned so the programs stay attached when the agent exits; attaching again
//! replaces the program inside the existing link atomically (never detach-then-attach).

use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{Map, MapData, PerCpuHashMap},
    programs::{
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
        xdp::XdpLink,
        SchedClassifier, TcAttachType, Xdp, XdpMode,
    },
    Ebpf,
};
use flannel_common::{Direction, IfaceCounterKey, PacketCounter, COUNTERS_MAP};
use serde::Serialize;

use super::{bpffs, object};

pub const XDP_PROGRAM: &str = "fl_count_xdp";
pub const TC_PROGRAM: &str = "fl_count_tc";

pub fn maps_dir(pin_root: &Path) -> PathBuf {
    pin_root.join("maps")
}

pub fn links_dir(pin_root: &Path, interface: &str) -> PathBuf {
    pin_root.join("links").join(interface)
}

/// A program that can be attached to an interface through a bpf_link, and swapped inside an
/// existing link.
trait LinkAttach {
    type Link: TryFrom<FdLink, Error = aya::programs::links::LinkError>;
    fn attach_new(&mut self, interface: &str) -> Result<FdLink>;
    fn replace_in(&mut self, link: Self::Link) -> Result<()>;
}

impl LinkAttach for Xdp {
    type Link = XdpLink;
    fn attach_new(&mut self, interface: &str) -> Result<FdLink> {
        let id = self.attach(interface, XdpMode::default()).with_context(|| format!("attaching XDP to {interface}"))?;
        let link = self.take_link(id)?;
        FdLink::try_from(link)
            .with_context(|| format!("XDP on {interface} was attached without a bpf_link (kernel too old?)"))
    }
    fn replace_in(&mut self, link: XdpLink) -> Result<()> {
        let id = self.attach_to_link(link)?;
        // The pin keeps the link alive; our handle can go.
        drop(self.take_link(id)?);
        Ok(())
    }
}

impl LinkAttach for SchedClassifier {
    type Link = SchedClassifierLink;
    fn attach_new(&mut self, interface: &str) -> Result<FdLink> {
        // On kernels >= 6.6 aya attaches through TCX, which gives a pinnable bpf_link.
        let id = self
            .attach(interface, TcAttachType::Egress)
            .with_context(|| format!("attaching TC egress to {interface}"))?;
        let link = self.take_link(id)?;
        FdLink::try_from(link)
            .with_context(|| format!("TC on {interface} was attached without a TCX link (needs Linux >= 6.6)"))
    }
    fn replace_in(&mut self, link: SchedClassifierLink) -> Result<()> {
        let id = self.attach_to_link(link)?;
        drop(self.take_link(id)?);
        Ok(())
    }
}

/// Attaches `program` to `interface` under the link pin `pin`: if the pin holds a live link,
/// the program is replaced inside it atomically; otherwise a new link is made and pinned.
fn attach_pinned<P: LinkAttach>(program: &mut P, interface: &str, pin: &Path) -> Result<()> {
    match PinnedLink::from_pin(pin) {
        Ok(pinned) => {
            let replaced = P::Link::try_from(FdLink::from(pinned))
                .map_err(anyhow::Error::from)
                .and_then(|link| program.replace_in(link));
            match replaced {
                Ok(()) => {
                    tracing::info!(interface, pin = %pin.display(), "replaced the program in the existing link");
                    return Ok(());
                }
                Err(error) => {
                    // Typically ENOLINK: the interface was deleted (or recreated) since.
                    tracing::warn!(interface, pin = %pin.display(), error = format!("{error:#}"), "pinned link is unusable; attaching anew");
                    std::fs::remove_file(pin).with_context(|| format!("removing stale link pin {}", pin.display()))?;
                }
            }
        }
        Err(aya::programs::links::LinkError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(error).with_context(|| format!("opening link pin {}", pin.display())),
    }
    let link = program.attach_new(interface)?;
    link.pin(pin).with_context(|| format!("pinning link at {}", pin.display()))?;
    tracing::info!(interface, pin = %pin.display(), "attached and pinned");
    Ok(())
}

fn program_mut<'a, P>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut P>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program =
        ebpf.program_mut(name).with_context(|| format!("program {name} is not in the embedded eBPF object"))?;
    program.try_into().with_context(|| format!("program {name} has an unexpected type"))
}

/// Loads the counter programs and attaches them to `interface` (XDP ingress, TC egress),
/// with the counters map and both links pinned under `pin_root`. On failure nothing new is
/// left pinned.
pub fn attach(interface: &str, pin_root: &Path) -> Result<()> {
    let ifindex = interface_index(interface)?;
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

    let xdp: &mut Xdp = program_mut(&mut ebpf, XDP_PROGRAM)?;
    xdp.load().context("loading fl_count_xdp into the kernel (verifier)")?;
    attach_pinned(xdp, interface, &links.join(XDP_PROGRAM))?;

    let tc: &mut SchedClassifier = program_mut(&mut ebpf, TC_PROGRAM)?;
    tc.load().context("loading fl_count_tc into the kernel (verifier)")?;
    attach_pinned(tc, interface, &links.join(TC_PROGRAM))?;
    Ok(())
}

/// The index of `interface` in the caller's network namespace.
pub fn interface_index(interface: &str) -> Result<u32> {
    if interface.is_empty() || interface.len() >= libc::IF_NAMESIZE || interface.contains(['/', '\0']) {
        bail!("invalid interface name {interface:?}");
    }
    let c_name = std::ffi::CString::new(interface)?;
    // SAFETY: c_name is NUL-terminated.
    match unsafe { libc::if_nametoindex(c_name.as_ptr()) } {
        0 => bail!("interface {interface:?} does not exist in this network namespace"),
        index => Ok(index),
    }
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
