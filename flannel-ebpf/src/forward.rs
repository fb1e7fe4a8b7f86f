//! The forwarding actions the programs share: one per way a packet can leave a program.
//! - [`set_tunnel`]: inner MACs and the tunnel key for a remote vxlan lease; the
//!   collect-metadata vxlan device (`flannel.<VNI>`) then builds the outer headers, so GSO,
//!   checksum offload and the outer UDP checksum are the kernel's, as with flannel.1.
//! - [`redirect_via`]: out of an interface with a given next hop (host-gw).
//! - [`deliver_to_pod`]: straight into a local pod (`bpf_redirect_peer`), bypass only.
//! - [`bypass_fits`]: whether the bypass may redirect a packet at all (no VLAN tag in the
//!   metadata, an IPv4 length that fits the frame, within the target's MTU); asked before
//!   anything is rewritten, so what it refuses reaches the stack unchanged.
//! - the stack-flow record ([`record_stack_flow`], [`stack_carries_reverse`]) that keeps the
//!   bypass symmetric per flow.

use aya_ebpf::{
    bindings::{
        bpf_check_mtu_flags::BPF_MTU_CHK_SEGS, bpf_redir_neigh, bpf_redir_neigh__bindgen_ty_1, bpf_tunnel_key,
        TC_ACT_UNSPEC,
    },
    helpers::{bpf_check_mtu, bpf_ktime_get_ns, bpf_redirect_neigh, bpf_redirect_peer, bpf_skb_set_tunnel_key},
    programs::TcContext,
};
use flannel_common::{endpoints::EndpointEntry, leases::LeaseEntry, node::NodeConfig, stats::Stat};

use crate::{
    maps::{count, ENDPOINTS, STACK_FLOWS},
    parse::{Flow, IP_CSUM_OFF, IP_TTL_OFF},
};

const AF_INET: u32 = 2;
/// `skb->mark` bit on frames the bypass redirects into the tunnel device or out of the
/// external interface, so that the egress program there does not take them for the stack's;
/// cleared there. A bit kube-proxy (0x4000, 0x8000) and Calico (0xffff0000) leave alone.
pub const BYPASS_MARK: u32 = 0x0000_0200;
/// `struct bpf_tunnel_key` up to `tunnel_label`: the size every kernel since 4.x accepts. The
/// outer source address is left to the route lookup (the external interface's address), as
/// flannel.1's `local` gives it; no `local_ipv4`, which needs 5.19.
pub const TUNNEL_KEY_SIZE: u32 = 24;
/// The first [`TUNNEL_KEY_SIZE`] bytes of `struct bpf_tunnel_key` as six words: `tunnel_id`,
/// `remote_ipv4`, three words of the IPv6 remote, then tos/ttl/ext. Filled in place for
/// `bpf_skb_set_tunnel_key`, left uninitialised for `bpf_skb_get_tunnel_key` (which writes all
/// of it): zeroing the whole 44-byte struct compiled to a byte-wise `memset` subprogram call
/// per packet, visible in the profile.
#[repr(C, align(4))]
pub struct TunnelKey {
    pub words: [u32; 6],
}

impl TunnelKey {
    /// Writes id and remote, the rest zero, into `slot` in place and returns the helper's
    /// pointer to it. Volatile stores in place: LLVM merges plain zero stores, or a copy of a
    /// returned key, into a `memset` call.
    #[inline(always)]
    pub fn fill(slot: &mut core::mem::MaybeUninit<TunnelKey>, id: u32, remote_ipv4: u32) -> *mut bpf_tunnel_key {
        let words = slot.as_mut_ptr().cast::<u32>();
        // SAFETY: six in-bounds, aligned u32 slots of `slot`.
        unsafe {
            core::ptr::write_volatile(words, id);
            core::ptr::write_volatile(words.add(1), remote_ipv4);
            for i in 2..6 {
                core::ptr::write_volatile(words.add(i), 0);
            }
        }
        words.cast()
    }

    /// For the kernel to fill in.
    #[inline(always)]
    pub fn uninit() -> core::mem::MaybeUninit<TunnelKey> {
        core::mem::MaybeUninit::uninit()
    }

    /// `tunnel_id`: the VNI.
    #[inline(always)]
    pub fn id(&self) -> u32 {
        self.words[0]
    }

    /// `remote_ipv4` as octets (the helper gives it in host byte order).
    #[inline(always)]
    pub fn remote_ipv4(&self) -> [u8; 4] {
        self.words[1].to_be_bytes()
    }
}

/// A stack-flow record is refreshed at most this often (the LRU evicts the idle ones).
const REFRESH_NS: u64 = 1_000_000_000;

/// Inner Ethernet: peer's VtepMAC ← our VtepMAC (what flannel.1's neighbour entry gives),
/// then the tunnel key: the peer's PublicIP, our VNI; flags 0 = outer UDP checksum computed,
/// DF clear, TTL and TOS from the route and the inner ECN bits — as flannel.1 sends.
#[inline(always)]
pub fn set_tunnel(ctx: &TcContext, node: &NodeConfig, lease: &LeaseEntry) -> Result<(), Stat> {
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&lease.vtep_mac);
    macs[6..].copy_from_slice(&node.vtep_mac);
    ctx.store(0, &macs, 0).map_err(|_| Stat::DropRewriteFailed)?;
    let mut key = TunnelKey::uninit();
    // The helper takes the remote address in host byte order.
    let key = TunnelKey::fill(&mut key, node.vni, u32::from_be_bytes(lease.public_ip));
    // SAFETY: key lives for the call and holds TUNNEL_KEY_SIZE initialised bytes.
    let ret = unsafe { bpf_skb_set_tunnel_key(ctx.skb.skb, key, TUNNEL_KEY_SIZE, 0) };
    if ret != 0 {
        return Err(Stat::DropRewriteFailed);
    }
    Ok(())
}

/// `bpf_redirect_neigh` out of `ifindex` with `next_hop` (network order) as the neighbour.
#[inline(always)]
pub fn redirect_via(ifindex: u32, next_hop: [u8; 4]) -> i32 {
    let mut nh = bpf_redir_neigh {
        nh_family: AF_INET,
        __bindgen_anon_1: bpf_redir_neigh__bindgen_ty_1 { ipv4_nh: u32::from_ne_bytes(next_hop) },
    };
    let size = core::mem::size_of::<bpf_redir_neigh>() as i32;
    // SAFETY: nh lives for the call; its size is passed along.
    unsafe { bpf_redirect_neigh(ifindex, &mut nh, size, 0) as i32 }
}

/// The bypass's receive side: a packet for a known local pod goes straight into it, unless
/// the stack carried the flow's other direction (then the stack gets it, counted). Anything
/// else continues unchanged.
#[inline(always)]
pub fn bypass_to_pod(ctx: &TcContext, node: &NodeConfig, flow: &Flow) -> Result<i32, Stat> {
    // SAFETY: the value is copied out at once.
    let Some(endpoint) = (unsafe { ENDPOINTS.get(&flow.dst) }).copied() else { return Ok(TC_ACT_UNSPEC) };
    if stack_carries_reverse(flow) {
        count(Stat::BypassToStack);
        return Ok(TC_ACT_UNSPEC);
    }
    // The stack's limit on this hop is the pod's link (the host-side veth; the CNI gives
    // both ends the same MTU).
    if !bypass_fits(ctx, flow, endpoint.ifindex) {
        return Ok(TC_ACT_UNSPEC);
    }
    let verdict = deliver_to_pod(ctx, node, &endpoint)?;
    count(Stat::BypassDeliveredToPod);
    Ok(verdict)
}

/// Whether the bypass may redirect this packet out of (or, with `bpf_redirect_peer`, into the
/// peer of) `ifindex`; false: it must go to the stack unchanged, which then does what IPv4
/// forwarding does with it. Asked before any rewrite.
/// - A VLAN tag the NIC stripped into the skb's metadata (`vlan_present`) would ride along on
///   the redirect and leave tagged: the stack's (counted `BypassUnsupportedToStack`).
/// - An IPv4 total length shorter than its header or longer than the frame (truncated; 0 is
///   BIG TCP's on a packet over 64 KiB; `Flow::sound`, from the shared parser): the
///   stack drops and counts it (`IPSTATS_MIB_INTRUNCATEDPKTS`, `inhdr_error`); not counted
///   here, as a frame `ipv4_flow` cannot read is not.
/// - Larger than `ifindex`'s MTU: the stack fragments it or, with DF, answers ICMP
///   frag-needed, which path-MTU discovery needs (counted `BypassTooBigToStack`). A GSO
///   packet fits when its segments do (`BPF_MTU_CHK_SEGS`: gso_size + headers ≤ MTU).
///   `bpf_check_mtu` needs Linux ≥ 5.12 (the datapath needs 6.6 for TCX anyway); it reads the device's MTU at the time of the
///   packet, so an MTU change needs no map update. A device that does not exist (an ifindex
///   gone stale until the agent rewrites `fl_node_v3`) or any other error: the stack's too,
///   counted `BypassUnsupportedToStack` — a redirect there would drop it silently.
#[inline(always)]
pub fn bypass_fits(ctx: &TcContext, flow: &Flow, ifindex: u32) -> bool {
    // SAFETY: skb is the program's context.
    if unsafe { (*ctx.skb.skb).vlan_present } != 0 {
        count(Stat::BypassUnsupportedToStack);
        return false;
    }
    if !flow.sound {
        return false;
    }
    // In: 0 = measure the skb (skb->len, the Ethernet header included, against MTU + the
    // device's hard_header_len); out: the MTU, unused.
    let mut mtu_len: u32 = 0;
    // SAFETY: mtu_len lives for the call; len_diff 0 as BPF_MTU_CHK_SEGS requires.
    let ret = unsafe { bpf_check_mtu(ctx.skb.skb.cast(), ifindex, &mut mtu_len, 0, u64::from(BPF_MTU_CHK_SEGS)) };
    match ret {
        0 => true,
        r if r > 0 => {
            count(Stat::BypassTooBigToStack);
            false
        }
        _ => {
            count(Stat::BypassUnsupportedToStack);
            false
        }
    }
}

/// Readdresses the frame to the pod (from the pod bridge's MAC, the pod's gateway) and moves
/// it into the pod's namespace: no bridge, no veth transmit, no netfilter.
#[inline(always)]
fn deliver_to_pod(ctx: &TcContext, node: &NodeConfig, endpoint: &EndpointEntry) -> Result<i32, Stat> {
    decrement_ttl(ctx)?;
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&endpoint.mac);
    macs[6..].copy_from_slice(&node.bridge_mac);
    ctx.store(0, &macs, 0).map_err(|_| Stat::DropRewriteFailed)?;
    // SAFETY: plain helper call.
    Ok(unsafe { bpf_redirect_peer(endpoint.ifindex, 0) } as i32)
}

/// As `ip_forward` does: drop at TTL ≤ 1, else decrement with an incremental checksum fix.
#[inline(always)]
pub fn decrement_ttl(ctx: &TcContext) -> Result<(), Stat> {
    let ttl: u8 = ctx.load(IP_TTL_OFF).map_err(|_| Stat::DropRewriteFailed)?;
    if ttl <= 1 {
        return Err(Stat::DropTtlExceeded);
    }
    // TTL is the high byte of the checksummed 16-bit word it shares with the protocol.
    let old = u32::from(u16::from_be_bytes([ttl, 0]).to_be());
    let new = u32::from(u16::from_be_bytes([ttl - 1, 0]).to_be());
    ctx.l3_csum_replace(IP_CSUM_OFF, old as u64, new as u64, 2).map_err(|_| Stat::DropRewriteFailed)?;
    ctx.store(IP_TTL_OFF, &(ttl - 1), 0).map_err(|_| Stat::DropRewriteFailed)
}

/// True (and the mark cleared) for a frame the bypass redirected here.
#[inline(always)]
pub fn take_bypass_mark(ctx: &TcContext) -> bool {
    // SAFETY: skb is the program's context; mark is writable from TC.
    unsafe {
        let mark = (*ctx.skb.skb).mark;
        if mark & BYPASS_MARK == 0 {
            return false;
        }
        (*ctx.skb.skb).mark = mark & !BYPASS_MARK;
    }
    true
}

/// Notes that the stack carried `flow` (bypass mode, at the stack's exits).
#[inline(always)]
pub fn record_stack_flow(flow: &Flow) {
    let key = flow.key();
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(seen) = STACK_FLOWS.get_ptr_mut(&key) {
        // SAFETY: a value slot of the map; a racing writer writes a similar timestamp.
        unsafe {
            if now.wrapping_sub(*seen) > REFRESH_NS {
                *seen = now;
            }
        }
        return;
    }
    let _ = STACK_FLOWS.insert(&key, &now, 0);
}

/// True when the stack carried the other direction of `flow`: it must take the stack too.
#[inline(always)]
pub fn stack_carries_reverse(flow: &Flow) -> bool {
    // SAFETY: the value is not kept past the lookup.
    unsafe { STACK_FLOWS.get(&flow.reversed().key()) }.is_some()
}
