//! Capturing frames on an interface of a namespace without tcpdump, and reading the outer
//! headers of VXLAN frames.
//!
//! [`Capture`] is an AF_PACKET raw socket opened inside the namespace and bound to one
//! interface: it sees every frame the interface receives and every frame it sends, each with
//! its [`Direction`]. [`OuterVxlan`] reads a VXLAN frame's outer IPv4/UDP header fields and the
//! inner addresses, which is what the tests compare between our datapath and a kernel vxlan
//! device.
//!
//! Where a capture sits on the path, and the traps that follow from it:
//! - Checksum offload (CHECKSUM_PARTIAL). veth advertises checksum offload, so a UDP socket or a
//!   vxlan device sending through it leaves the UDP checksum to "the hardware": the frame
//!   carries only the pseudo-header sum in its checksum field. veth hands the same packet to
//!   its peer still marked partial (so does a bridge between two veths), and the receiving
//!   stack accepts it unverified. So the unfinished checksum is what a capture reads on the
//!   sending end, on a bridge port and on the receiving end alike (measured: capturing on the
//!   receiver does not help); no veth ever finishes it. [`Frame::checksum_pending`] says when a
//!   frame is in that state (the kernel's TP_STATUS_CSUMNOTREADY). To read the checksum a real
//!   NIC would put on the wire, switch transmit checksum offload off on the sending interface
//!   ([`disable_tx_checksum_offload`]): the kernel then computes the checksum itself before the
//!   frame reaches the device (and before the sender's own capture sees it), and every capture
//!   downstream reads the finished value.
//! - XDP runs before captures on the receive path: a frame an XDP program drops or redirects is
//!   never seen on that interface (capture where it comes from to prove it was sent). TC
//!   ingress programs run after captures, so a capture does see the frames they drop.
//! - On the transmit path a capture sees the frame after TC egress programs: what they wrote.

use std::{
    ffi::CString,
    io,
    mem::{size_of, size_of_val, zeroed},
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{
    packet::{
        checksum, l4_checksum, Mac, ETH_HLEN, ETH_P_IP, IPPROTO_UDP, IPV4_HLEN, UDP_HLEN, VXLAN_FLAG_VNI, VXLAN_HLEN,
    },
    NetNs,
};

/// The largest frame a capture reads. A tap sees GSO/GRO packets before segmentation, so a
/// frame can be up to 64 KiB of IPv4 plus the link header.
const MAX_FRAME: usize = 65_536 + 256;

/// Socket receive buffer: bursts (a ping flood, a TCP window) must not overflow it while the
/// test thread is busy elsewhere, or frames go missing silently.
const RECEIVE_BUFFER: libc::c_int = 8 << 20;

/// Whether the interface sent or received a frame (`sll_pkttype` of the capture socket).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Sent by this host (PACKET_OUTGOING).
    Outgoing,
    /// Received: addressed to us, broadcast, multicast or to another host.
    Incoming,
}

/// One captured frame, starting with its Ethernet header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub direction: Direction,
    /// The L4 checksum was left to offload (CHECKSUM_PARTIAL): its field holds only the
    /// pseudo-header sum, so it does not verify. See the module documentation.
    pub checksum_pending: bool,
    pub data: Vec<u8>,
}

impl Frame {
    /// The frame's VXLAN headers, if it is a VXLAN frame.
    pub fn vxlan(&self) -> Option<OuterVxlan> {
        OuterVxlan::parse(&self.data)
    }
}

/// A capture on one interface of one namespace. Frames queue in its socket from
/// [`Capture::start`] on (start it before sending), until it is dropped.
pub struct Capture {
    socket: OwnedFd,
    /// "<interface> in <namespace>", for error messages.
    place: String,
    buffer: Vec<u8>,
}

impl Capture {
    /// Starts capturing every frame `interface` of `ns` sends or receives.
    pub fn start(ns: &NetNs, interface: &str) -> Result<Capture> {
        let place = format!("{interface} in {}", ns.name());
        let name = CString::new(interface).with_context(|| format!("interface name {interface:?}"))?;
        // A packet socket belongs to the namespace it was created in and keeps capturing there
        // whichever thread reads it later, so only opening it needs the namespace.
        let socket = ns
            .run_in(|| open(&name))
            .and_then(|opened| opened)
            .with_context(|| format!("starting a capture on {place}"))?;
        Ok(Capture { socket, place, buffer: vec![0; MAX_FRAME] })
    }

    /// The next frame, or None when none arrives before `deadline`.
    pub fn next_frame(&mut self, deadline: Instant) -> Result<Option<Frame>> {
        loop {
            if !self.wait_readable(deadline)? {
                return Ok(None);
            }
            if let Some(frame) = self.receive()? {
                return Ok(Some(frame));
            }
        }
    }

    /// The frames `filter` accepts, until `count` of them arrived or `deadline` passed (then
    /// fewer: the caller decides whether that is a failure).
    pub fn frames_until(
        &mut self,
        deadline: Instant,
        count: usize,
        mut filter: impl FnMut(&Frame) -> bool,
    ) -> Result<Vec<Frame>> {
        let mut frames = Vec::new();
        while frames.len() < count {
            match self.next_frame(deadline)? {
                Some(frame) if filter(&frame) => frames.push(frame),
                Some(_) => {}
                None => break,
            }
        }
        Ok(frames)
    }

    /// Every frame `filter` accepts during the next `duration`.
    pub fn collect_for(&mut self, duration: Duration, filter: impl FnMut(&Frame) -> bool) -> Result<Vec<Frame>> {
        self.frames_until(Instant::now() + duration, usize::MAX, filter)
    }

    /// Waits until a frame is queued or `deadline` passes; true when one is queued.
    fn wait_readable(&self, deadline: Instant) -> Result<bool> {
        loop {
            // Rounded up, so a sub-millisecond remainder waits instead of spinning.
            let remaining = deadline.saturating_duration_since(Instant::now());
            let timeout = remaining.as_micros().div_ceil(1000).min(libc::c_int::MAX as u128) as libc::c_int;
            let mut poll = libc::pollfd { fd: self.socket.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd.
            match unsafe { libc::poll(&mut poll, 1, timeout) } {
                0 => return Ok(false),
                n if n > 0 => return Ok(true),
                _ => {
                    let error = io::Error::last_os_error();
                    if error.kind() != io::ErrorKind::Interrupted {
                        return Err(error).with_context(|| format!("waiting for frames on {}", self.place));
                    }
                }
            }
        }
    }

    /// Reads one queued frame; None if the queue turned out to be empty.
    fn receive(&mut self) -> Result<Option<Frame>> {
        // SAFETY: all-zero is a valid sockaddr_ll and msghdr.
        let mut from: libc::sockaddr_ll = unsafe { zeroed() };
        let mut iov = libc::iovec { iov_base: self.buffer.as_mut_ptr().cast(), iov_len: self.buffer.len() };
        // u64 elements align the control buffer for cmsghdr; room for the auxdata message.
        let mut control = [0u64; 16];
        // SAFETY: as above.
        let mut message: libc::msghdr = unsafe { zeroed() };
        message.msg_name = (&mut from as *mut libc::sockaddr_ll).cast();
        message.msg_namelen = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        message.msg_iov = &mut iov;
        message.msg_iovlen = 1;
        message.msg_control = control.as_mut_ptr().cast();
        message.msg_controllen = size_of_val(&control) as _;
        // MSG_TRUNC: the return value is the frame's real length, so truncation is detected.
        // SAFETY: every pointer in `message` is valid for the length given with it.
        let length =
            unsafe { libc::recvmsg(self.socket.as_raw_fd(), &mut message, libc::MSG_DONTWAIT | libc::MSG_TRUNC) };
        if length < 0 {
            let error = io::Error::last_os_error();
            if matches!(error.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) {
                return Ok(None);
            }
            return Err(error).with_context(|| format!("receiving a frame on {}", self.place));
        }
        let length = length as usize;
        if length > self.buffer.len() {
            bail!("a {length}-byte frame on {} does not fit the {}-byte capture buffer", self.place, self.buffer.len());
        }
        let mut checksum_pending = false;
        // SAFETY: the CMSG_* macros walk the control buffer recvmsg filled, within msg_controllen.
        unsafe {
            let mut header = libc::CMSG_FIRSTHDR(&message);
            while !header.is_null() {
                if (*header).cmsg_level == libc::SOL_PACKET && (*header).cmsg_type == libc::PACKET_AUXDATA {
                    let aux: libc::tpacket_auxdata = std::ptr::read_unaligned(libc::CMSG_DATA(header).cast());
                    checksum_pending = aux.tp_status & libc::TP_STATUS_CSUMNOTREADY != 0;
                }
                header = libc::CMSG_NXTHDR(&message, header);
            }
        }
        let direction =
            if from.sll_pkttype == libc::PACKET_OUTGOING { Direction::Outgoing } else { Direction::Incoming };
        Ok(Some(Frame { direction, checksum_pending, data: self.buffer[..length].to_vec() }))
    }
}

/// Opens the capture socket for `interface` of the calling thread's namespace.
fn open(interface: &CString) -> Result<OwnedFd> {
    // SAFETY: plain C string argument.
    let index = unsafe { libc::if_nametoindex(interface.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error()).context("no such interface");
    }
    // Protocol 0 receives nothing until bind names the protocol and the interface together, so
    // no frame of another interface is ever queued.
    // SAFETY: plain socket(2) call; the result is checked before wrapping it.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error()).context("opening an AF_PACKET socket");
    }
    // SAFETY: `raw` is a new descriptor nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    set_option(&socket, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, RECEIVE_BUFFER).context("setting SO_RCVBUFFORCE")?;
    set_option(&socket, libc::SOL_PACKET, libc::PACKET_AUXDATA, 1).context("enabling PACKET_AUXDATA")?;
    // SAFETY: all-zero is a valid sockaddr_ll.
    let mut address: libc::sockaddr_ll = unsafe { zeroed() };
    address.sll_family = libc::AF_PACKET as u16;
    address.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
    address.sll_ifindex = index as i32;
    // SAFETY: `address` is a valid sockaddr_ll of the size given.
    let bound = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&address as *const libc::sockaddr_ll).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if bound != 0 {
        return Err(io::Error::last_os_error()).context("binding the AF_PACKET socket");
    }
    Ok(socket)
}

fn set_option(socket: &OwnedFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: `value` is a c_int of the size given.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Switches transmit checksum offload off on `interface` of `ns` (`ethtool -K <if> tx off`,
/// which is not installed everywhere), so the kernel finishes every checksum before the frame
/// reaches the device and captures read it as a NIC would send it. See the module
/// documentation for why veth needs this. The kernel then also turns off the segmentation
/// offloads that depend on it and segments in software: fine for tests, slower for benchmarks.
pub fn disable_tx_checksum_offload(ns: &NetNs, interface: &str) -> Result<()> {
    /// The legacy ethtool command, which the kernel maps onto the tx-checksum-* features as
    /// `ethtool -K` does; its ifreq layout is simpler than ETHTOOL_SFEATURES'.
    const ETHTOOL_STXCSUM: u32 = 0x17;
    /// struct ethtool_value.
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    let place = format!("{interface} in {}", ns.name());
    let mut name = [0 as libc::c_char; libc::IFNAMSIZ];
    if interface.len() >= name.len() {
        bail!("interface name {interface:?} is too long");
    }
    for (to, from) in name.iter_mut().zip(interface.bytes()) {
        *to = from as libc::c_char;
    }
    ns.run_in(move || -> io::Result<()> {
        let mut value = EthtoolValue { cmd: ETHTOOL_STXCSUM, data: 0 };
        // SAFETY: all-zero is a valid ifreq.
        let mut request: libc::ifreq = unsafe { zeroed() };
        request.ifr_name = name;
        request.ifr_ifru.ifru_data = (&mut value as *mut EthtoolValue).cast();
        // SAFETY: plain socket(2) call; the result is checked before wrapping it.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new descriptor nothing else owns.
        let socket = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: SIOCETHTOOL reads the ifreq and the ethtool_value it points to, both alive.
        if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCETHTOOL, &mut request) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    })
    .and_then(|done| Ok(done?))
    .with_context(|| format!("switching transmit checksum offload off on {place}"))
}

/// The headers of an Ethernet/IPv4/UDP/VXLAN frame that tell how it was encapsulated.
///
/// Reference: what a kernel vxlan device made as flanneld makes flannel.1 (`ip link add … type
/// vxlan id 1 local <ip> dev <if> nolearning dstport 8472`, no checksum or TTL options) puts on
/// the wire, measured on Linux 6.18 by the test `kernel_vxlan_device_reference` below (pings
/// through it, captured on the receiving veth, transmit checksum offload off on the sending
/// one). `ip -d link` shows the device as `ttl auto … udpcsum`, and on the wire:
/// - UDP checksum non-zero and valid: IPv4 vxlan devices checksum by default. With offload left
///   on, the same frame carries the pseudo-header sum instead ([`Frame::checksum_pending`]).
/// - TTL 64, DF clear, DSCP 0; ECN copied from the inner packet (an inner TOS of 0xb9, DSCP 46 +
///   ECT(1), gave outer DSCP 0, ECN 1).
/// - IP ID non-zero and increasing from packet to packet (DF is clear, so the kernel numbers
///   them).
/// - UDP source port from the flow hash, within the namespace's ip_local_port_range
///   (32768..=60999 by default): one port for every packet of the flow (57421 in one run, and
///   the same for the replies: the hash is symmetric); destination port 8472; VNI 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OuterVxlan {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ttl: u8,
    pub dont_fragment: bool,
    /// The low 2 bits of the TOS byte.
    pub ecn: u8,
    /// The high 6 bits of the TOS byte.
    pub dscp: u8,
    pub ip_id: u16,
    /// The outer IPv4 header checksum verifies (it is never offloaded).
    pub ip_checksum_valid: bool,
    pub src_port: u16,
    pub dst_port: u16,
    /// The UDP checksum field as sent.
    pub udp_checksum: u16,
    /// None when the field is 0 ("no checksum", RFC 768), else whether it verifies over the
    /// pseudo-header, UDP header and payload.
    pub udp_checksum_valid: Option<bool>,
    pub vni: u32,
    pub inner_dst_mac: Mac,
    pub inner_src_mac: Mac,
    pub inner_ethertype: u16,
    /// The inner IPv4 addresses, when the inner frame is IPv4.
    pub inner_src_ip: Option<Ipv4Addr>,
    pub inner_dst_ip: Option<Ipv4Addr>,
}

impl OuterVxlan {
    /// Reads an Ethernet/IPv4/UDP frame carrying a VXLAN header and an inner Ethernet frame, on
    /// any UDP port (callers check `dst_port`); None for anything else, for IPv4 fragments
    /// (their UDP checksum cannot be checked) and for truncated frames.
    pub fn parse(frame: &[u8]) -> Option<OuterVxlan> {
        if frame.len() < ETH_HLEN || be16(frame, 12) != ETH_P_IP {
            return None;
        }
        let ip = &frame[ETH_HLEN..];
        if ip.len() < IPV4_HLEN || ip[0] >> 4 != 4 || ip[9] != IPPROTO_UDP {
            return None;
        }
        let header_len = usize::from(ip[0] & 0x0f) * 4;
        let total_len = usize::from(be16(ip, 2));
        let flags_offset = be16(ip, 6);
        // More-fragments set or a non-zero offset: a fragment, not a whole datagram.
        if header_len < IPV4_HLEN || total_len < header_len || ip.len() < total_len || flags_offset & 0x3fff != 0 {
            return None;
        }
        let (src, dst) = (ipv4(ip, 12), ipv4(ip, 16));
        // Up to the IPv4 total length: Ethernet padding after it is not part of the packet.
        let udp = &ip[header_len..total_len];
        if udp.len() < UDP_HLEN {
            return None;
        }
        let udp_len = usize::from(be16(udp, 4));
        if udp_len < UDP_HLEN + VXLAN_HLEN + ETH_HLEN || udp_len > udp.len() {
            return None;
        }
        let udp = &udp[..udp_len];
        let vxlan = &udp[UDP_HLEN..UDP_HLEN + VXLAN_HLEN];
        if vxlan[0] & VXLAN_FLAG_VNI == 0 {
            return None;
        }
        let inner = &udp[UDP_HLEN + VXLAN_HLEN..];
        let inner_ethertype = be16(inner, 12);
        let inner_ip = &inner[ETH_HLEN..];
        let (inner_src_ip, inner_dst_ip) =
            if inner_ethertype == ETH_P_IP && inner_ip.len() >= IPV4_HLEN && inner_ip[0] >> 4 == 4 {
                (Some(ipv4(inner_ip, 12)), Some(ipv4(inner_ip, 16)))
            } else {
                (None, None)
            };
        let udp_checksum = be16(udp, 6);
        Some(OuterVxlan {
            src,
            dst,
            ttl: ip[8],
            dont_fragment: flags_offset & 0x4000 != 0,
            ecn: ip[1] & 0x03,
            dscp: ip[1] >> 2,
            ip_id: be16(ip, 4),
            ip_checksum_valid: checksum(&ip[..header_len]) == 0,
            src_port: be16(udp, 0),
            dst_port: be16(udp, 2),
            udp_checksum,
            udp_checksum_valid: (udp_checksum != 0).then(|| l4_checksum(src, dst, IPPROTO_UDP, udp) == 0),
            vni: u32::from_be_bytes([0, vxlan[4], vxlan[5], vxlan[6]]),
            inner_dst_mac: inner[0..6].try_into().expect("6 bytes"),
            inner_src_mac: inner[6..12].try_into().expect("6 bytes"),
            inner_ethertype,
            inner_src_ip,
            inner_dst_ip,
        })
    }
}

fn be16(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

fn ipv4(bytes: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3])
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{
        packet::{udp4, vxlan4},
        require_root, veth_pair,
        vxlan_probe::{inner_ipv4_icmp_echo, VXLAN_PORT},
    };

    pub(crate) const A: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
    pub(crate) const B: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
    pub(crate) const MAC_A: Mac = [0x02, 0xaa, 0, 0, 0, 0x01];
    pub(crate) const MAC_B: Mac = [0x02, 0xaa, 0, 0, 0, 0x02];

    fn inner() -> Vec<u8> {
        inner_ipv4_icmp_echo(MAC_B, MAC_A, Ipv4Addr::new(10, 244, 1, 2), Ipv4Addr::new(10, 244, 2, 3), 7, 1)
    }

    /// `vxlan4` with its UDP checksum filled in.
    fn with_udp_checksum(mut frame: Vec<u8>) -> Vec<u8> {
        let udp = ETH_HLEN + IPV4_HLEN;
        let c = l4_checksum(A, B, IPPROTO_UDP, &frame[udp..]);
        frame[udp + 6..udp + 8].copy_from_slice(&c.to_be_bytes());
        frame
    }

    #[test]
    fn parse_reads_every_field() {
        let mut frame = with_udp_checksum(vxlan4(A, B, 40000, VXLAN_PORT, 0xabcdef, &inner()));
        // TOS: DSCP 46, ECN 1; IP ID 0x1234. Fixed up so the header checksum still verifies.
        frame[ETH_HLEN + 1] = 46 << 2 | 1;
        frame[ETH_HLEN + 4..ETH_HLEN + 6].copy_from_slice(&0x1234u16.to_be_bytes());
        frame[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&[0, 0]);
        let c = checksum(&frame[ETH_HLEN..ETH_HLEN + IPV4_HLEN]);
        frame[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&c.to_be_bytes());
        // Ethernet padding past the IPv4 total length is ignored.
        frame.extend_from_slice(&[0; 4]);
        let v = OuterVxlan::parse(&frame).expect("a VXLAN frame");
        assert_eq!(
            v,
            OuterVxlan {
                src: A,
                dst: B,
                ttl: 64,
                dont_fragment: false,
                ecn: 1,
                dscp: 46,
                ip_id: 0x1234,
                ip_checksum_valid: true,
                src_port: 40000,
                dst_port: VXLAN_PORT,
                udp_checksum: v.udp_checksum,
                udp_checksum_valid: Some(true),
                vni: 0xabcdef,
                inner_dst_mac: MAC_B,
                inner_src_mac: MAC_A,
                inner_ethertype: ETH_P_IP,
                inner_src_ip: Some(Ipv4Addr::new(10, 244, 1, 2)),
                inner_dst_ip: Some(Ipv4Addr::new(10, 244, 2, 3)),
            }
        );
        assert_ne!(v.udp_checksum, 0);
    }

    #[test]
    fn parse_tells_missing_and_wrong_checksums() {
        let none = vxlan4(A, B, 40000, VXLAN_PORT, 1, &inner());
        let v = OuterVxlan::parse(&none).unwrap();
        assert_eq!((v.udp_checksum, v.udp_checksum_valid), (0, None), "0 is no checksum");
        let mut wrong = with_udp_checksum(none);
        *wrong.last_mut().unwrap() ^= 1;
        assert_eq!(OuterVxlan::parse(&wrong).unwrap().udp_checksum_valid, Some(false));
        wrong[ETH_HLEN + 8] = 63;
        assert!(!OuterVxlan::parse(&wrong).unwrap().ip_checksum_valid);
    }

    #[test]
    fn parse_refuses_what_is_not_a_whole_vxlan_frame() {
        let frame = vxlan4(A, B, 40000, VXLAN_PORT, 1, &inner());
        assert!(OuterVxlan::parse(&frame[..frame.len() - 1]).is_none(), "truncated");
        let mut no_flag = frame.clone();
        no_flag[ETH_HLEN + IPV4_HLEN + UDP_HLEN] = 0;
        assert!(OuterVxlan::parse(&no_flag).is_none(), "no VNI flag");
        let mut fragment = frame.clone();
        fragment[ETH_HLEN + 6] |= 0x20; // more fragments
        assert!(OuterVxlan::parse(&fragment).is_none(), "fragment");
        let plain = udp4(MAC_A, MAC_B, A, B, 1234, VXLAN_PORT, b"too short for VXLAN");
        assert!(OuterVxlan::parse(&plain).is_none(), "plain UDP");
        assert!(OuterVxlan::parse(&frame[..ETH_HLEN]).is_none(), "Ethernet only");
    }

    /// Two namespaces joined by a veth (`eth0` in both, [`A`] ↔ [`B`]). Fails unless root.
    pub(crate) fn pair(tag: &str) -> (NetNs, NetNs) {
        require_root().unwrap();
        let (a, b) = (NetNs::create(&format!("{tag}a")).unwrap(), NetNs::create(&format!("{tag}b")).unwrap());
        veth_pair(&a, "eth0", &b, "eth0").unwrap();
        a.ip(&["addr", "add", &format!("{A}/24"), "dev", "eth0"]).unwrap();
        b.ip(&["addr", "add", &format!("{B}/24"), "dev", "eth0"]).unwrap();
        (a, b)
    }

    #[test]
    fn start_names_the_missing_interface_and_namespace() {
        let (a, _b) = pair("capmiss");
        let error = format!("{:#}", Capture::start(&a, "nosuch0").err().expect("no such interface"));
        assert!(error.contains("nosuch0") && error.contains(a.name()), "{error}");
    }

    #[test]
    fn captures_both_directions_and_stops_at_the_deadline() {
        let (a, b) = pair("capdir");
        let mut sender = Capture::start(&a, "eth0").unwrap();
        let mut receiver = Capture::start(&b, "eth0").unwrap();
        crate::lab::ping(&a, B, 1).unwrap();
        let is_icmp = |f: &Frame| f.data.len() > ETH_HLEN + 9 && f.data[ETH_HLEN + 9] == 1;
        let deadline = Instant::now() + Duration::from_secs(2);
        let sent = sender.frames_until(deadline, 2, is_icmp).unwrap();
        let directions: Vec<_> = sent.iter().map(|f| f.direction).collect();
        assert_eq!(directions, [Direction::Outgoing, Direction::Incoming], "request out, reply in");
        let received = receiver.frames_until(deadline, 2, is_icmp).unwrap();
        let directions: Vec<_> = received.iter().map(|f| f.direction).collect();
        assert_eq!(directions, [Direction::Incoming, Direction::Outgoing], "request in, reply out");
        assert_eq!(sent[0].data, received[0].data, "the same bytes on both ends of the veth");
        let started = Instant::now();
        let none = receiver.collect_for(Duration::from_millis(200), |_| false).unwrap();
        assert!(none.is_empty());
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(200) && waited < Duration::from_secs(1), "{waited:?}");
    }

    /// Builds flannel.1 in `ns` as flanneld does for lease `subnet` (10.244.<subnet>.0/24) with
    /// one peer, the other namespace.
    fn flannel_1(ns: &NetNs, local: Ipv4Addr, mac: &str, subnet: u8, peer: Ipv4Addr, peer_mac: &str, peer_subnet: u8) {
        let local = local.to_string();
        let peer = peer.to_string();
        let base = format!("10.244.{subnet}.0");
        let peer_base = format!("10.244.{peer_subnet}.0");
        #[rustfmt::skip]
        let commands: [&[&str]; 5] = [
            &["link", "add", "flannel.1", "type", "vxlan", "id", "1", "local", &local, "dev", "eth0", "nolearning", "dstport", "8472"],
            &["link", "set", "flannel.1", "address", mac, "mtu", "1450", "up"],
            &["addr", "add", &format!("{base}/32"), "dev", "flannel.1"],
            &["neigh", "replace", &peer_base, "lladdr", peer_mac, "dev", "flannel.1", "nud", "permanent"],
            &["route", "replace", &format!("{peer_base}/24"), "via", &peer_base, "dev", "flannel.1", "onlink"],
        ];
        for command in commands {
            ns.ip(command).unwrap();
        }
        crate::netns::run(ns.command("bridge").args([
            "fdb",
            "append",
            peer_mac,
            "dev",
            "flannel.1",
            "dst",
            &peer,
            "self",
            "permanent",
        ]))
        .unwrap();
    }

    /// The reference values in [`OuterVxlan`]'s documentation: what a flannel.1-style kernel
    /// vxlan device puts on the wire, and the checksum-offload trap of the module documentation.
    #[test]
    fn kernel_vxlan_device_reference() {
        let (a, b) = pair("capref");
        flannel_1(&a, A, "02:aa:00:00:00:01", 1, B, "02:aa:00:00:00:02", 2);
        flannel_1(&b, B, "02:aa:00:00:00:02", 2, A, "02:aa:00:00:00:01", 1);
        let details = String::from_utf8(a.ip(&["-d", "link", "show", "flannel.1"]).unwrap().stdout).unwrap();
        assert!(details.contains(" udpcsum "), "IPv4 vxlan devices checksum by default: {details}");
        let ping = |extra: &[&str]| {
            let mut command = a.command("ping");
            command.args(["-c", "3", "-i", "0.05", "-W", "1", "-q"]).args(extra).arg("10.244.2.0");
            crate::netns::run(&mut command).unwrap();
        };
        // Requests only: the echo replies b's flannel.1 sends back leave through the same eth0.
        let request = |f: &Frame| {
            f.direction == Direction::Incoming
                && f.vxlan().is_some_and(|v| v.inner_src_ip == Some(Ipv4Addr::new(10, 244, 1, 0)))
        };
        let deadline = || Instant::now() + Duration::from_secs(2);

        // With checksum offload on (veth's default) the frame arrives with the pseudo-header sum.
        let mut received = Capture::start(&b, "eth0").unwrap();
        ping(&[]);
        let partial = received.frames_until(deadline(), 3, request).unwrap();
        assert_eq!(partial.len(), 3);
        for frame in &partial {
            assert!(frame.checksum_pending, "{frame:?}");
            assert_eq!(frame.vxlan().unwrap().udp_checksum_valid, Some(false), "{frame:?}");
        }

        disable_tx_checksum_offload(&a, "eth0").unwrap();
        let mut sent = Capture::start(&a, "eth0").unwrap();
        ping(&[]);
        // TOS 0xb9: DSCP 46, ECN 1 (ECT(1)) in the inner packet.
        ping(&["-Q", "0xb9"]);
        let frames = received.frames_until(deadline(), 6, request).unwrap();
        assert_eq!(frames.len(), 6);
        let outgoing =
            sent.frames_until(deadline(), 6, |f| f.direction == Direction::Outgoing && f.vxlan().is_some()).unwrap();
        let on_wire: Vec<_> = frames.iter().map(|f| &f.data).collect();
        assert_eq!(outgoing.iter().map(|f| &f.data).collect::<Vec<_>>(), on_wire, "the sender captures the same bytes");
        let first_port = frames[0].vxlan().unwrap().src_port;
        for (i, frame) in frames.iter().enumerate() {
            assert!(!frame.checksum_pending, "{frame:?}");
            let v = frame.vxlan().unwrap();
            assert_eq!((v.src, v.dst, v.dst_port, v.vni), (A, B, VXLAN_PORT, 1));
            assert_eq!((v.inner_src_mac, v.inner_dst_mac), (MAC_A, MAC_B));
            assert_eq!(v.inner_dst_ip, Some(Ipv4Addr::new(10, 244, 2, 0)));
            assert!(v.udp_checksum != 0 && v.udp_checksum_valid == Some(true), "{v:?}");
            assert!(v.ip_checksum_valid);
            assert_eq!((v.ttl, v.dont_fragment, v.dscp), (64, false, 0), "{v:?}");
            assert_eq!(v.ecn, if i < 3 { 0 } else { 1 }, "ECN copied from the inner packet, DSCP not: {v:?}");
            assert!((32768..=60999).contains(&v.src_port), "{v:?}");
            assert_eq!(v.src_port, first_port, "one source port per flow");
        }
    }
}
