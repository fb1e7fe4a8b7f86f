//! Masquerade on the external interface, replacing flannel's iptables MASQUERADE rule
//! (`-s <Network> ! -d 224.0.0.0/4 -j MASQUERADE`, reached after its RETURN rules for
//! cluster-internal traffic):
//!
//! - `fl_snat_egress` (TC egress): a TCP, UDP or ICMP-echo packet from the cluster network to
//!   a destination outside it (and not multicast) gets the node's address and a port from the
//!   configured range. A new connection reserves its port by inserting the reply-side entry
//!   with `BPF_NOEXIST` (the original port first when it is in range, then random candidates),
//!   then the forward entry; both halves live in the LRU map `fl_snat_v1`.
//! - `fl_snat_ingress` (TC ingress): a reply to one of those ports is translated back to the
//!   pod before the stack routes it.
//!
//! Like MASQUERADE, which only ever translates a connection's first packet, replies of
//! connections that outside hosts open to pods (host-gw, NodePorts) must keep the pod's
//! address: TCP mappings are only created by a SYN, and a UDP flow that arrives for a local
//! pod from outside the cluster is recorded as an identity entry that egress leaves alone.
//!
//! Both rewrite L3 and L4 checksums incrementally (pseudo-header included; a zero UDP
//! checksum stays zero). A half the LRU evicted is restored from the other one and counted.
//! Non-first IP fragments carry no ports and pass untranslated, as do ICMP errors.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_NOEXIST, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    macros::classifier,
    programs::TcContext,
};
use flannel_common::{
    node::NodeConfig,
    snat::{SnatEntry, SnatKey, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, SNAT_EGRESS, SNAT_FLAG_CLOSING, SNAT_INGRESS},
    stats::Stat,
};

use crate::{
    maps::{count, NODE, SNAT},
    parse::{in_network, ipv4_flow, Flow, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF},
};

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
/// Candidate ports tried for a new connection before giving up.
const PORT_ATTEMPTS: u32 = 16;
/// `last_seen_ns` is refreshed at most this often, to keep the hot path read-mostly.
const REFRESH_NS: u64 = 1_000_000_000;

/// What masquerade needs of a [`Flow`] beyond the shared parser.
trait Masquerade {
    /// The flow's own tuple as a masquerade map key.
    fn snat_key(&self, direction: u8) -> SnatKey;
    /// Where the port this side of the translation owns lives: the source port on egress,
    /// the destination port on ingress (ICMP: the identifier either way).
    fn port_offset(&self, source_side: bool) -> usize;
    /// The L4 checksum and whether the IP addresses are part of it (pseudo-header).
    fn l4_checksum(&self) -> (usize, u64);
}

impl Masquerade for Flow {
    fn snat_key(&self, direction: u8) -> SnatKey {
        SnatKey {
            src_ip: self.src,
            dst_ip: self.dst,
            src_port: self.src_port,
            dst_port: self.dst_port,
            proto: self.proto,
            direction,
            _pad: [0; 2],
        }
    }

    fn port_offset(&self, source_side: bool) -> usize {
        match self.proto {
            IPPROTO_ICMP => self.l4 + 4,
            _ if source_side => self.l4,
            _ => self.l4 + 2,
        }
    }

    fn l4_checksum(&self) -> (usize, u64) {
        match self.proto {
            IPPROTO_TCP => (self.l4 + 16, BPF_F_PSEUDO_HDR as u64),
            IPPROTO_UDP => (self.l4 + 6, (BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0) as u64),
            _ => (self.l4 + 2, 0),
        }
    }
}

/// The flow of an IPv4 TCP/UDP/ICMP-echo packet; None for anything masquerade leaves alone.
/// `icmp_type` is the echo type expected in this direction.
#[inline(always)]
fn parse(ctx: &TcContext, icmp_type: u8) -> Option<Flow> {
    let flow = ipv4_flow(ctx)?;
    if flow.later_fragment {
        return None; // no ports to translate
    }
    match flow.proto {
        IPPROTO_TCP | IPPROTO_UDP => Some(flow),
        IPPROTO_ICMP if flow.icmp_type == icmp_type => Some(flow),
        _ => None,
    }
}

#[classifier]
pub fn fl_snat_egress(ctx: TcContext) -> i32 {
    match snat_egress(&ctx) {
        Ok(()) => TC_ACT_UNSPEC,
        Err(reason) => {
            count(reason);
            TC_ACT_SHOT
        }
    }
}

#[classifier]
pub fn fl_snat_ingress(ctx: TcContext) -> i32 {
    match snat_ingress(&ctx) {
        Ok(()) => TC_ACT_UNSPEC,
        Err(reason) => {
            count(reason);
            TC_ACT_SHOT
        }
    }
}

/// This node's settings when masquerade is on.
#[inline(always)]
fn masquerading_node() -> Option<NodeConfig> {
    NODE.get(0).copied().filter(|node| node.snat != 0)
}

#[inline(always)]
fn snat_egress(ctx: &TcContext) -> Result<(), Stat> {
    let Some(node) = masquerading_node() else { return Ok(()) };
    let Some(flow) = parse(ctx, ICMP_ECHO_REQUEST) else { return Ok(()) };
    // flannel's FLANNEL-POSTRTG: only cluster → outside, never to multicast.
    if !in_network(flow.src, &node) || in_network(flow.dst, &node) || flow.dst[0] & 0xf0 == 0xe0 {
        return Ok(());
    }
    let key = flow.snat_key(SNAT_EGRESS);
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let (nat_ip, nat_port) = match SNAT.get_ptr_mut(&key) {
        Some(entry) => {
            // SAFETY: a map value pointer valid for this program run; racing writers only
            // ever store a newer timestamp.
            let entry = unsafe { &mut *entry };
            if entry.to_ip == flow.src {
                // A reply of a connection from outside to the pod (see fl_snat_ingress).
                if now.wrapping_sub(entry.last_seen_ns) > REFRESH_NS {
                    entry.last_seen_ns = now;
                }
                return Ok(());
            }
            if now.wrapping_sub(entry.last_seen_ns) > REFRESH_NS {
                entry.last_seen_ns = now;
                restore_reply_half(&flow, entry, now);
            }
            note_closing(&flow, entry);
            (entry.to_ip, entry.to_port)
        }
        None if !opens_connection(&flow) => return Ok(()),
        None => new_mapping(&flow, &key, &node, now)?,
    };
    rewrite(ctx, &flow, true, nat_ip, nat_port)?;
    count(Stat::SnatTranslated);
    Ok(())
}

/// Marks a TCP translation whose FIN or RST passes, so the agent expires it soon after.
#[inline(always)]
fn note_closing(flow: &Flow, entry: &mut SnatEntry) {
    if flow.tcp_flags & (TCP_FIN | TCP_RST) != 0 && entry.flags & SNAT_FLAG_CLOSING == 0 {
        entry.flags |= SNAT_FLAG_CLOSING;
    }
}

/// Whether a packet without a mapping may start one: a TCP SYN (anything else is a reply or
/// the middle of a connection MASQUERADE never translated); any UDP datagram or echo request.
#[inline(always)]
fn opens_connection(flow: &Flow) -> bool {
    flow.proto != IPPROTO_TCP || flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// The reply-side key for `flow` translated to `nat_ip:nat_port`.
#[inline(always)]
fn reply_key(flow: &Flow, nat_ip: [u8; 4], nat_port: u16) -> SnatKey {
    Flow { dst: nat_ip, dst_port: nat_port, ..flow.reversed() }.snat_key(SNAT_INGRESS)
}

/// If the LRU evicted the reply half of a live mapping, puts it back.
#[inline(always)]
fn restore_reply_half(flow: &Flow, forward: &SnatEntry, now: u64) {
    let key = reply_key(flow, forward.to_ip, forward.to_port);
    if SNAT.get_ptr(&key).is_none() {
        let back = SnatEntry { to_ip: flow.src, to_port: flow.src_port, flags: 0, last_seen_ns: now };
        if SNAT.insert(&key, &back, BPF_NOEXIST as u64).is_ok() {
            count(Stat::SnatRestored);
        }
    }
}

/// Reserves a port for a new connection (the reply half with BPF_NOEXIST), then records the
/// forward half. Returns the translated source.
#[inline(always)]
fn new_mapping(flow: &Flow, key: &SnatKey, node: &NodeConfig, now: u64) -> Result<([u8; 4], u16), Stat> {
    let (min, max) = (u32::from(node.snat_port_min), u32::from(node.snat_port_max));
    let span = max.saturating_sub(min) + 1;
    let back = SnatEntry { to_ip: flow.src, to_port: flow.src_port, flags: 0, last_seen_ns: now };
    let mut attempt = 0;
    while attempt < PORT_ATTEMPTS {
        let port = if attempt == 0 && (min..=max).contains(&u32::from(flow.src_port)) {
            // Keep the pod's own port when it is free, as MASQUERADE without --random does.
            flow.src_port
        } else {
            // SAFETY: helper without arguments.
            (min + unsafe { bpf_get_prandom_u32() } % span) as u16
        };
        attempt += 1;
        if SNAT.insert(&reply_key(flow, node.snat_ip, port), &back, BPF_NOEXIST as u64).is_err() {
            continue;
        }
        let forward = SnatEntry { to_ip: node.snat_ip, to_port: port, flags: 0, last_seen_ns: now };
        if SNAT.insert(key, &forward, 0).is_err() {
            let _ = SNAT.remove(&reply_key(flow, node.snat_ip, port));
            return Err(Stat::DropSnatNoPort);
        }
        count(Stat::SnatNewMapping);
        return Ok((node.snat_ip, port));
    }
    Err(Stat::DropSnatNoPort)
}

#[inline(always)]
fn snat_ingress(ctx: &TcContext) -> Result<(), Stat> {
    let Some(node) = masquerading_node() else { return Ok(()) };
    let Some(flow) = parse(ctx, ICMP_ECHO_REPLY) else { return Ok(()) };
    if flow.dst != node.snat_ip {
        note_inbound_udp(&flow, &node);
        return Ok(());
    }
    let Some(entry) = SNAT.get_ptr_mut(&flow.snat_key(SNAT_INGRESS)) else { return Ok(()) };
    // SAFETY: as in snat_egress.
    let entry = unsafe { &mut *entry };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if now.wrapping_sub(entry.last_seen_ns) > REFRESH_NS {
        entry.last_seen_ns = now;
        // The forward half, as the pod's next packet will look it up.
        let forward_key = Flow { src: entry.to_ip, src_port: entry.to_port, ..flow.reversed() }.snat_key(SNAT_EGRESS);
        if SNAT.get_ptr(&forward_key).is_none() {
            let forward = SnatEntry { to_ip: flow.dst, to_port: flow.dst_port, flags: 0, last_seen_ns: now };
            if SNAT.insert(&forward_key, &forward, BPF_NOEXIST as u64).is_ok() {
                count(Stat::SnatRestored);
            }
        }
    }
    note_closing(&flow, entry);
    let (pod_ip, pod_port) = (entry.to_ip, entry.to_port);
    rewrite(ctx, &flow, false, pod_ip, pod_port)?;
    count(Stat::SnatReplyTranslated);
    Ok(())
}

/// A UDP flow from outside the cluster to a local pod: its replies must leave with the pod's
/// address, so an identity entry is recorded under the reply's egress key.
#[inline(always)]
fn note_inbound_udp(flow: &Flow, node: &NodeConfig) {
    if flow.proto != IPPROTO_UDP || in_network(flow.src, node) || !in_network(flow.dst, node) {
        return;
    }
    let reply = flow.reversed().snat_key(SNAT_EGRESS);
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    match SNAT.get_ptr_mut(&reply) {
        // SAFETY: as in snat_egress.
        Some(entry) => unsafe {
            if now.wrapping_sub((*entry).last_seen_ns) > REFRESH_NS {
                (*entry).last_seen_ns = now;
            }
        },
        None => {
            let identity = SnatEntry { to_ip: flow.dst, to_port: flow.dst_port, flags: 0, last_seen_ns: now };
            let _ = SNAT.insert(&reply, &identity, BPF_NOEXIST as u64);
        }
    }
}

/// Rewrites the source (egress) or destination (ingress) address and port, fixing the IPv4
/// header checksum and the L4 checksum incrementally.
#[inline(always)]
fn rewrite(ctx: &TcContext, flow: &Flow, source_side: bool, ip: [u8; 4], port: u16) -> Result<(), Stat> {
    let (ip_off, old_ip) = if source_side { (IP_SRC_OFF, flow.src) } else { (IP_DST_OFF, flow.dst) };
    // ICMP echo: the identifier sits in src_port on egress and dst_port on ingress too.
    let old_port = if source_side { flow.src_port } else { flow.dst_port };
    let (csum_off, pseudo) = flow.l4_checksum();
    let (old_ip32, new_ip32) = (u32::from_ne_bytes(old_ip) as u64, u32::from_ne_bytes(ip) as u64);
    let (old_port16, new_port16) = (u64::from(old_port.to_be()), u64::from(port.to_be()));
    let fail = |_| Stat::DropRewriteFailed;
    if pseudo != 0 {
        ctx.l4_csum_replace(csum_off, old_ip32, new_ip32, pseudo | 4).map_err(fail)?;
    }
    let port_flags = if flow.proto == IPPROTO_UDP { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };
    ctx.l4_csum_replace(csum_off, old_port16, new_port16, port_flags | 2).map_err(fail)?;
    ctx.l3_csum_replace(IP_CSUM_OFF, old_ip32, new_ip32, 4).map_err(fail)?;
    ctx.store(ip_off, &ip, 0).map_err(fail)?;
    ctx.store(flow.port_offset(source_side), &port.to_be_bytes(), 0).map_err(fail)
}
