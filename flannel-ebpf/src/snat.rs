//! Masquerade on the external interface, replacing flannel's iptables MASQUERADE rule
//! (`-s <Network> ! -d 224.0.0.0/4 -j MASQUERADE`, reached after its RETURN rules for
//! cluster-internal traffic):
//!
//! - `fl_snat_egress` (TC egress): a TCP, UDP or ICMP-echo packet from the cluster network to
//!   a destination outside it (and not multicast) gets the node's address and a port from the
//!   configured range; a packet of any other IP protocol (GRE, ESP, SCTP, …) gets the node's
//!   address only (see "Other protocols" below). A new connection reserves its port by
//!   inserting the reply-side entry with `BPF_NOEXIST` (the original port first when it is in
//!   range, then random candidates), then the forward entry, also with `BPF_NOEXIST`: when
//!   another CPU created the same flow's mapping in between, the reserved reply half is
//!   released and the winner's mapping used, so racing CPUs never leave an orphan port. Both
//!   halves live in the LRU `fl_snat_v1`.
//! - `fl_snat_ingress` (TC ingress): a reply to one of those ports is translated back to the
//!   pod before the stack routes it, and so is an ICMP error (destination unreachable — PMTU
//!   discovery's frag-needed — or time exceeded) about one: outer destination and the quoted
//!   packet's source, with the outer IPv4, the ICMP and the quoted IPv4 header checksums.
//!
//! Fail closed: from the moment a packet is known to go from the cluster network to the
//! outside (decided from the IPv4 addresses alone, before anything else is read — most
//! packets on this interface, VXLAN included, stop there), it leaves translated or not at
//! all. A malformed IPv4 header (IHL < 5, a total length beyond the frame, an L4 header that
//! does not fit) is dropped as `drop-malformed`; a non-first fragment, which carries no
//! ports, as `drop-snat-fragment` (no reassembly: a first fragment has the ports and is
//! translated); mid-connection TCP without a translation (evicted, swept) as
//! `drop-snat-no-mapping`. Everything else the programs do not translate passes unchanged.
//!
//! Like MASQUERADE, which only ever translates a connection's first packet, replies of
//! connections that outside hosts open to pods (host-gw, direct routes) must keep the pod's
//! address: TCP mappings are only created by a SYN, and a UDP flow, TCP SYN or address-only
//! protocol packet that arrives for a local pod from outside the cluster is recorded as an
//! identity entry in `fl_snat_inbound_v1`, which egress leaves alone. That map is separate,
//! so a flood of inbound tuples cannot evict translations, and each CPU may create only
//! `SNAT_INBOUND_BUDGET` identity entries a second (beyond it: not recorded, counted).
//!
//! Both rewrite L3 and L4 checksums incrementally (pseudo-header included; a zero UDP
//! checksum stays zero). A half the LRU evicted is restored from the other one and counted.
//!
//! Other protocols: as conntrack's generic L3 tracking under MASQUERADE, a protocol that is
//! not TCP, UDP or ICMP is translated by address alone. The mapping is the 3-tuple
//! {pod, remote, proto} ↔ {node, remote, proto}, stored in `fl_snat_v1` with both ports 0, and
//! reserved reply half first with `BPF_NOEXIST` like the others: while one pod talks a
//! protocol to a remote, a second pod's packets of that protocol to the same remote are
//! dropped as `drop-snat-no-port` (conntrack, which cannot tell the two apart on the way
//! back either, refuses the clashing entry too) until the first pair has been idle for
//! `--snat-idle-timeout` and swept. Every packet may start such a mapping (there is no
//! connection state), and, as for UDP, a flow from outside to a local pod is recorded as an
//! identity entry so its replies keep the pod's address. Only the IPv4 source (on ingress the
//! destination) and the IPv4 header checksum change: no L4 checksum is touched, since this
//! program cannot know which ones cover a pseudo-header. GRE's optional checksum, ESP's ICV
//! and SCTP's CRC32c do not cover the IP addresses, so they stay valid; a protocol whose
//! checksum covers the IPv4 pseudo-header (DCCP 33, UDP-Lite 136) arrives with a wrong one, as
//! it would through conntrack's generic NAT. The node's own traffic of such a protocol to the
//! same remote (a GRE tunnel of the node's) is not known to the programs: its replies go to
//! the pod while a pod mapping for that remote exists.
//!
//! ICMP that is neither an echo request nor a known error (echo replies, errors a pod
//! generates) passes untranslated on egress: it answers what outside hosts sent the pod.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_NOEXIST, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    macros::classifier,
    programs::TcContext,
};
use flannel_common::{
    node::NodeConfig,
    snat::{
        address_only, SnatEntry, SnatKey, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, SNAT_EGRESS, SNAT_FLAG_CLOSING,
        SNAT_INBOUND_BUDGET, SNAT_INBOUND_WINDOW_NS, SNAT_INGRESS,
    },
    stats::Stat,
};

use crate::{
    maps::{count, NODE, SNAT, SNAT_BUDGET, SNAT_INBOUND},
    parse::{
        header_flow, in_network, ipv4_header_fast, Flow, Ipv4Header, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, IP_CSUM_OFF,
        IP_DST_OFF, IP_SRC_OFF,
    },
};

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
/// Where an ICMP error quotes the packet it is about: after type, code, checksum and the
/// 4 bytes of "unused" / next-hop MTU.
const ICMP_ERROR_QUOTE_OFF: usize = 8;
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

/// Whether masquerade translates this flow: TCP, UDP, ICMP echo of the type expected in
/// this direction (request out, reply in), and every other protocol by address only.
#[inline(always)]
fn translatable(flow: &Flow, icmp_type: u8) -> bool {
    match flow.proto {
        IPPROTO_ICMP => flow.icmp_type == icmp_type,
        _ => true,
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

/// flannel's FLANNEL-POSTRTG decision: from the cluster network to outside it, never to
/// multicast.
#[inline(always)]
fn leaves_the_cluster(header: &Ipv4Header, node: &NodeConfig) -> bool {
    let dst = header.dst();
    in_network(header.src(), node) && !in_network(dst, node) && dst[0] & 0xf0 != 0xe0
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// Stores `now` as the entry's last use, at most once per [`REFRESH_NS`]; true if it did.
#[inline(always)]
fn refresh(entry: *mut SnatEntry, now: u64) -> bool {
    // SAFETY: a map value pointer valid for this program run; racing writers only ever store
    // a newer timestamp.
    let entry = unsafe { &mut *entry };
    if now.wrapping_sub(entry.last_seen_ns) > REFRESH_NS {
        entry.last_seen_ns = now;
        return true;
    }
    false
}

#[inline(always)]
fn snat_egress(ctx: &TcContext) -> Result<(), Stat> {
    let Some(node) = masquerading_node() else { return Ok(()) };
    let Some(header) = ipv4_header_fast(ctx) else { return Ok(()) };
    if !leaves_the_cluster(&header, &node) {
        return Ok(());
    }
    // From here on the packet carries a pod address to the outside: translated or dropped.
    if !header.sound(ctx.len()) {
        return Err(Stat::DropMalformed);
    }
    if header.later_fragment() {
        return Err(Stat::DropSnatFragment); // no ports: which translation is unknowable
    }
    let flow = header_flow(ctx, &header).ok_or(Stat::DropMalformed)?;
    if !translatable(&flow, ICMP_ECHO_REQUEST) {
        // Echo replies and ICMP errors (answers to what outside hosts sent the pod) pass as
        // before: MASQUERADE without conntrack's help cannot do better.
        return Ok(());
    }
    let key = flow.snat_key(SNAT_EGRESS);
    let now = now_ns();
    let (nat_ip, nat_port) = match SNAT.get_ptr_mut(&key) {
        Some(entry) => {
            // SAFETY: as in `refresh`.
            if unsafe { (*entry).to_ip } == flow.src {
                // An identity entry an earlier version recorded in this map (now
                // fl_snat_inbound_v1): a reply of a connection from outside to the pod.
                refresh(entry, now);
                return Ok(());
            }
            if refresh(entry, now) {
                // SAFETY: as in `refresh`.
                restore_reply_half(&flow, unsafe { &*entry }, now);
            }
            // SAFETY: as in `refresh`.
            let entry = unsafe { &mut *entry };
            note_closing(&flow, entry);
            (entry.to_ip, entry.to_port)
        }
        None => match SNAT_INBOUND.get_ptr_mut(&key) {
            // A reply of a connection from outside to the pod: keeps the pod's address.
            Some(identity) => {
                refresh(identity, now);
                return Ok(());
            }
            // Mid-connection TCP whose translation is gone: sending it would leak the pod's
            // address, and the server would reset it anyway.
            None if !opens_connection(&flow) => return Err(Stat::DropSnatNoMapping),
            None => new_mapping(&flow, &key, &node, now)?,
        },
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
    flow.proto != IPPROTO_TCP || flow.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN
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
/// forward half, also with BPF_NOEXIST. Returns the translated source. An address-only
/// protocol has one candidate, port 0: the reply key {remote, node, proto} itself.
#[inline(always)]
fn new_mapping(flow: &Flow, key: &SnatKey, node: &NodeConfig, now: u64) -> Result<([u8; 4], u16), Stat> {
    let (min, max) = (u32::from(node.snat_port_min), u32::from(node.snat_port_max));
    let span = max.saturating_sub(min) + 1;
    let back = SnatEntry { to_ip: flow.src, to_port: flow.src_port, flags: 0, last_seen_ns: now };
    let address_only = address_only(flow.proto);
    let mut attempt = 0;
    while attempt < PORT_ATTEMPTS {
        let port = if address_only {
            0
        } else if attempt == 0 && (min..=max).contains(&u32::from(flow.src_port)) {
            // Keep the pod's own port when it is free, as MASQUERADE without --random does.
            flow.src_port
        } else {
            // SAFETY: helper without arguments.
            (min + unsafe { bpf_get_prandom_u32() } % span) as u16
        };
        attempt += 1;
        let reserved = reply_key(flow, node.snat_ip, port);
        if SNAT.insert(&reserved, &back, BPF_NOEXIST as u64).is_err() {
            if address_only {
                return reclaim_address_only(flow, key, &reserved, node, now);
            }
            continue;
        }
        let forward = SnatEntry { to_ip: node.snat_ip, to_port: port, flags: 0, last_seen_ns: now };
        if SNAT.insert(key, &forward, BPF_NOEXIST as u64).is_ok() {
            count(Stat::SnatNewMapping);
            return Ok((node.snat_ip, port));
        }
        // Another CPU created this flow's mapping since our lookup: release the port we
        // reserved (it would be an orphan nobody's packets use) and follow the winner.
        let _ = SNAT.remove(&reserved);
        // SAFETY: the value is copied out at once.
        return match unsafe { SNAT.get(key) } {
            Some(winner) => Ok((winner.to_ip, winner.to_port)),
            None => Err(Stat::DropSnatNoPort),
        };
    }
    Err(Stat::DropSnatNoPort)
}

/// An address-only protocol's reply key is taken: by this very flow when the LRU evicted
/// only its forward half (restored, and the translation goes on), otherwise by another pod
/// talking the same protocol to the same remote (dropped: its replies could not be told
/// apart).
#[inline(always)]
fn reclaim_address_only(
    flow: &Flow,
    key: &SnatKey,
    reserved: &SnatKey,
    node: &NodeConfig,
    now: u64,
) -> Result<([u8; 4], u16), Stat> {
    // SAFETY: the value is copied out at once.
    match unsafe { SNAT.get(reserved) } {
        Some(holder) if holder.to_ip == flow.src => {
            let forward = SnatEntry { to_ip: node.snat_ip, to_port: 0, flags: 0, last_seen_ns: now };
            if SNAT.insert(key, &forward, BPF_NOEXIST as u64).is_ok() {
                count(Stat::SnatRestored);
            }
            Ok((node.snat_ip, 0))
        }
        _ => Err(Stat::DropSnatNoPort),
    }
}

#[inline(always)]
fn snat_ingress(ctx: &TcContext) -> Result<(), Stat> {
    let Some(node) = masquerading_node() else { return Ok(()) };
    let Some(header) = ipv4_header_fast(ctx) else { return Ok(()) };
    if header.dst() != node.snat_ip {
        // Only connections outside hosts open to local pods concern us here.
        if in_network(header.dst(), &node) && !in_network(header.src(), &node) {
            note_inbound(ctx, &header);
        }
        return Ok(());
    }
    // What masquerade cannot read is the stack's to judge: unchanged.
    if !header.sound(ctx.len()) {
        return Ok(());
    }
    let Some(flow) = header_flow(ctx, &header) else { return Ok(()) };
    if flow.later_fragment {
        return Ok(());
    }
    if flow.proto == IPPROTO_ICMP && matches!(flow.icmp_type, ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED) {
        return icmp_error(ctx, &flow);
    }
    if !translatable(&flow, ICMP_ECHO_REPLY) {
        return Ok(());
    }
    let Some(entry) = SNAT.get_ptr_mut(&flow.snat_key(SNAT_INGRESS)) else { return Ok(()) };
    let now = now_ns();
    if refresh(entry, now) {
        // SAFETY: as in `refresh`.
        let back = unsafe { &*entry };
        // The forward half, as the pod's next packet will look it up.
        let forward_key = Flow { src: back.to_ip, src_port: back.to_port, ..flow.reversed() }.snat_key(SNAT_EGRESS);
        if SNAT.get_ptr(&forward_key).is_none() {
            let forward = SnatEntry { to_ip: flow.dst, to_port: flow.dst_port, flags: 0, last_seen_ns: now };
            if SNAT.insert(&forward_key, &forward, BPF_NOEXIST as u64).is_ok() {
                count(Stat::SnatRestored);
            }
        }
    }
    // SAFETY: as in `refresh`.
    let entry = unsafe { &mut *entry };
    note_closing(&flow, entry);
    let (pod_ip, pod_port) = (entry.to_ip, entry.to_port);
    rewrite(ctx, &flow, false, pod_ip, pod_port)?;
    count(Stat::SnatReplyTranslated);
    Ok(())
}

/// A UDP flow, TCP connection or address-only protocol flow from outside the cluster to a
/// local pod: its replies must leave with the pod's address, so an identity entry is recorded
/// under the reply's egress key — within this CPU's budget for new ones. Later packets only
/// refresh it.
#[inline(always)]
fn note_inbound(ctx: &TcContext, header: &Ipv4Header) {
    if header.proto() == IPPROTO_ICMP || !header.sound(ctx.len()) || header.later_fragment() {
        return;
    }
    let Some(flow) = header_flow(ctx, header) else { return };
    let reply = flow.reversed().snat_key(SNAT_EGRESS);
    let now = now_ns();
    if let Some(identity) = SNAT_INBOUND.get_ptr_mut(&reply) {
        refresh(identity, now);
        return;
    }
    if flow.proto == IPPROTO_TCP && flow.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) != TCP_SYN {
        return; // a TCP connection is recorded by its SYN only
    }
    if !take_inbound_budget(now) {
        count(Stat::SnatInboundOverBudget);
        return;
    }
    let identity = SnatEntry { to_ip: flow.dst, to_port: flow.dst_port, flags: 0, last_seen_ns: now };
    let _ = SNAT_INBOUND.insert(&reply, &identity, BPF_NOEXIST as u64);
}

/// Takes one of this CPU's [`SNAT_INBOUND_BUDGET`] new identity entries of the current
/// window; false when they are used up.
#[inline(always)]
fn take_inbound_budget(now: u64) -> bool {
    let Some(budget) = SNAT_BUDGET.get_ptr_mut(0) else { return false };
    // SAFETY: per-CPU slot, only this CPU writes it, no preemption inside a program.
    let budget = unsafe { &mut *budget };
    if now.wrapping_sub(budget.window_start_ns) >= SNAT_INBOUND_WINDOW_NS {
        budget.window_start_ns = now;
        budget.used = 0;
    }
    if budget.used >= SNAT_INBOUND_BUDGET {
        return false;
    }
    budget.used += 1;
    true
}

/// An ICMP error for our address: if the packet it quotes is one we translated (source our
/// address and a port we gave out), it is the pod's — outer destination and quoted source
/// (address and port / echo identifier) go back to the pod's, with the outer IPv4 checksum,
/// the quoted IPv4 header checksum and the ICMP checksum (which covers the quote) fixed
/// incrementally. The quoted L4 checksum is left as it is, as RFC 5508 NATs do: the quote is
/// usually truncated, so nobody can verify it, and the pod's stack matches errors to sockets
/// by addresses and ports only. Anything else (the node's own traffic) passes unchanged.
#[inline(always)]
fn icmp_error(ctx: &TcContext, outer: &Flow) -> Result<(), Stat> {
    let quote = outer.l4 + ICMP_ERROR_QUOTE_OFF;
    let Ok(inner) = ctx.load::<[u8; 20]>(quote).map(Ipv4Header) else { return Ok(()) };
    if !inner.version_and_ihl_ok() || inner.src() != outer.dst || inner.later_fragment() {
        return Ok(());
    }
    let inner_l4 = quote + usize::from(inner.0[0] & 0x0f) * 4;
    // ICMP errors quote at least 8 bytes of L4: TCP/UDP ports, or the echo header.
    let Ok(l4) = ctx.load::<[u8; 8]>(inner_l4) else { return Ok(()) };
    // The quoted packet's (source port, destination port) as a reply key names them, and where
    // the translated one sits.
    let (port_off, our_port, their_port) = match inner.proto() {
        IPPROTO_TCP | IPPROTO_UDP => (inner_l4, u16::from_be_bytes([l4[0], l4[1]]), u16::from_be_bytes([l4[2], l4[3]])),
        IPPROTO_ICMP if l4[0] == ICMP_ECHO_REQUEST => (inner_l4 + 4, u16::from_be_bytes([l4[4], l4[5]]), 0),
        _ => return Ok(()),
    };
    // The quoted packet went from us to its destination: its reply half holds the pod.
    let reply = SnatKey {
        src_ip: inner.dst(),
        dst_ip: inner.src(),
        src_port: their_port,
        dst_port: our_port,
        proto: inner.proto(),
        direction: SNAT_INGRESS,
        _pad: [0; 2],
    };
    // SAFETY: the value is copied out at once.
    let Some(&SnatEntry { to_ip: pod_ip, to_port: pod_port, .. }) = (unsafe { SNAT.get(&reply) }) else {
        return Ok(());
    };
    let fail = |_| Stat::DropRewriteFailed;
    let (ours32, pod32) = (u32::from_ne_bytes(outer.dst) as u64, u32::from_ne_bytes(pod_ip) as u64);
    // Outer destination: the IPv4 header checksum only (ICMP has no pseudo-header).
    ctx.l3_csum_replace(IP_CSUM_OFF, ours32, pod32, 4).map_err(fail)?;
    ctx.store(IP_DST_OFF, &pod_ip, 0).map_err(fail)?;
    // Quoted source address: its header checksum, then both changes into the ICMP checksum.
    let icmp_csum = outer.l4 + 2;
    let inner_csum = quote + 10;
    let old_inner_sum = ctx.load::<u16>(inner_csum).map_err(fail)?;
    ctx.l3_csum_replace(inner_csum, ours32, pod32, 4).map_err(fail)?;
    let new_inner_sum = ctx.load::<u16>(inner_csum).map_err(fail)?;
    ctx.l4_csum_replace(icmp_csum, ours32, pod32, 4).map_err(fail)?;
    ctx.l4_csum_replace(icmp_csum, u64::from(old_inner_sum), u64::from(new_inner_sum), 2).map_err(fail)?;
    ctx.store(quote + 12, &pod_ip, 0).map_err(fail)?;
    // Quoted source port / echo identifier.
    let (old_port, new_port) = (u64::from(our_port.to_be()), u64::from(pod_port.to_be()));
    ctx.l4_csum_replace(icmp_csum, old_port, new_port, 2).map_err(fail)?;
    ctx.store(port_off, &pod_port.to_be_bytes(), 0).map_err(fail)?;
    count(Stat::SnatIcmpErrorTranslated);
    Ok(())
}

/// Rewrites the source (egress) or destination (ingress) address and port, fixing the IPv4
/// header checksum and the L4 checksum incrementally; for an address-only protocol the
/// address and the IPv4 header checksum alone.
#[inline(always)]
fn rewrite(ctx: &TcContext, flow: &Flow, source_side: bool, ip: [u8; 4], port: u16) -> Result<(), Stat> {
    let (ip_off, old_ip) = if source_side { (IP_SRC_OFF, flow.src) } else { (IP_DST_OFF, flow.dst) };
    let fail = |_| Stat::DropRewriteFailed;
    if address_only(flow.proto) {
        let (old_ip32, new_ip32) = (u32::from_ne_bytes(old_ip) as u64, u32::from_ne_bytes(ip) as u64);
        ctx.l3_csum_replace(IP_CSUM_OFF, old_ip32, new_ip32, 4).map_err(fail)?;
        return ctx.store(ip_off, &ip, 0).map_err(fail);
    }
    // ICMP echo: the identifier sits in src_port on egress and dst_port on ingress too.
    let old_port = if source_side { flow.src_port } else { flow.dst_port };
    let (csum_off, pseudo) = flow.l4_checksum();
    let (old_ip32, new_ip32) = (u32::from_ne_bytes(old_ip) as u64, u32::from_ne_bytes(ip) as u64);
    let (old_port16, new_port16) = (u64::from(old_port.to_be()), u64::from(port.to_be()));
    if pseudo != 0 {
        ctx.l4_csum_replace(csum_off, old_ip32, new_ip32, pseudo | 4).map_err(fail)?;
    }
    let port_flags = if flow.proto == IPPROTO_UDP { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };
    ctx.l4_csum_replace(csum_off, old_port16, new_port16, port_flags | 2).map_err(fail)?;
    ctx.l3_csum_replace(IP_CSUM_OFF, old_ip32, new_ip32, 4).map_err(fail)?;
    ctx.store(ip_off, &ip, 0).map_err(fail)?;
    ctx.store(flow.port_offset(source_side), &port.to_be_bytes(), 0).map_err(fail)
}
