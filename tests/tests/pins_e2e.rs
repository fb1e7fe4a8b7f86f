//! What a pin left by something else (an earlier version, another program) does to the agent,
//! for the two cases `links_e2e.rs` leaves out, with the foreign objects made through the
//! bpf(2) syscall here (no second eBPF object is built):
//! - a pinned map of our type, key and value sizes and capacity but another BTF value layout
//!   is refused by `object::load_pinned`, the error naming the pin and both layouts;
//! - an XDP link pinned under the name of one of our TC programs (what an earlier version
//!   attached as `links/<iface>/fl_underlay_ingress`) is replaced by a TCX link running our
//!   program, the new link made before the old pin goes: while our link cannot be made the XDP
//!   link stays pinned and attached.
//!
//! Everything lives in a namespace of its own and a private bpffs, both removed on drop (with
//! the links and maps only they held). Root only; fails loudly otherwise.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
    time::{Duration, Instant},
};

use aya::programs::{links::FdLink, tc::TcAttachOptions, LinkOrder, SchedClassifier, TcAttachType};
use flannel_agent::{
    datapath::ebpf::{order_of, UNDERLAY_INGRESS},
    ebpf::{
        bpffs,
        links::{self, Attached, Hook, PinState},
        object,
    },
};
use flannel_tests::{require_root, NetNs, PrivateBpffs};

#[test]
fn a_pinned_map_of_another_btf_layout_is_refused() {
    require_root().unwrap();
    let bpffs = PrivateBpffs::mount().unwrap();
    let maps = bpffs.path().join("maps");
    bpffs::ensure_pin_dir(&maps).unwrap();
    let pin = maps.join(flannel_common::PEERS_MAP);

    // fl_peers_v1 is HashMap<[u8; 4], u32, PEERS_MAX_ENTRIES>. This one has the same type,
    // sizes and capacity and the same key, but its value is a 4-byte struct of two u16s: a
    // size check alone would take it.
    let btf = RawBtf::peers_lookalike();
    let btf_fd = sys::btf_load(&btf.bytes).unwrap();
    let map = sys::map_create(
        BPF_MAP_TYPE_HASH,
        4,
        4,
        flannel_common::peers::PEERS_MAX_ENTRIES as u32,
        flannel_common::PEERS_MAP,
        (&btf_fd, btf.key, btf.value),
    )
    .unwrap();
    sys::obj_pin(&map, &pin).unwrap();
    drop((map, btf_fd));

    // What the kernel holds for the pin is what we built.
    let theirs = bpffs::pinned_layout(&pin).unwrap().expect("the pin has BTF");
    assert_eq!(theirs.key.to_string(), "[u8; 4] (4 bytes)", "same key as ours");
    let theirs_value = theirs.value.to_string();
    assert_eq!(theirs_value, "PeerValue (4 bytes) { lo: u16 @0, hi: u16 @2 }");

    let error = object::load_pinned(&maps).expect_err("a pin of another layout is refused");
    let message = format!("{error:#}");
    assert!(message.contains(&pin.display().to_string()), "the error names the pin: {message}");
    assert!(message.contains(&theirs_value), "the error names the pinned layout: {message}");
    assert!(message.contains("value u32 (4 bytes)"), "the error names our layout: {message}");
    assert!(pin.exists(), "the refused pin is left alone");
}

const IF: &str = "fl-pn0";

#[test]
fn an_xdp_link_under_a_tc_program_name_is_replaced_by_a_tcx_link() {
    require_root().unwrap();
    let ns = NetNs::create("pnxdp").unwrap();
    ns.ip(&["link", "add", IF, "type", "veth", "peer", "name", "fl-pn1"]).unwrap();
    ns.ip(&["link", "set", IF, "up"]).unwrap();
    ns.ip(&["link", "set", "fl-pn1", "up"]).unwrap();
    let bpffs = PrivateBpffs::mount().unwrap();
    let root = bpffs.path();
    let pin = links::link_pin(root, IF, UNDERLAY_INGRESS);

    ns.run_in(|| {
        let index = ifindex(IF);
        // An earlier version's XDP link, pinned where fl_underlay_ingress's link goes.
        let xdp_prog = sys::prog_load_xdp_pass().unwrap();
        let xdp_prog_id = sys::prog_id(&xdp_prog).unwrap();
        let xdp_link = sys::link_create(&xdp_prog, index, BPF_XDP).unwrap();
        bpffs::ensure_pin_dir(&links::links_dir(root, IF)).unwrap();
        sys::obj_pin(&xdp_link, &pin).unwrap();
        // Only the pin holds the link (and the link the program) from here on.
        drop((xdp_link, xdp_prog));
        assert_eq!(xdp_programs(&ns), vec![xdp_prog_id], "the XDP link runs");
        let state = links::pin_state(&pin, index, Hook::TcIngress).unwrap();
        assert!(matches!(&state, PinState::Replaceable(why) if why.contains("another type")), "{state:?}");

        // While our link cannot be made the old one stays: our program is already at the hook
        // through a link of its own, so the kernel refuses a second (EEXIST).
        let mut ebpf = object::load_unpinned().unwrap();
        let classifier = links::loaded(&mut ebpf, UNDERLAY_INGRESS).unwrap();
        let ours = classifier.info().unwrap().id();
        let id = classifier
            .attach_with_options(IF, TcAttachType::Ingress, TcAttachOptions::TcxOrder(LinkOrder::last()))
            .unwrap();
        let blocker = FdLink::try_from(classifier.take_link(id).unwrap()).unwrap();
        let error = links::attach(&mut ebpf, UNDERLAY_INGRESS, IF, Hook::TcIngress, root, order_of(UNDERLAY_INGRESS))
            .expect_err("the kernel refuses a second link of the same program");
        let message = format!("{error:#}");
        assert!(message.contains(&format!("attaching {UNDERLAY_INGRESS} at TcIngress of {IF}")), "{message}");
        assert!(pin.exists(), "the XDP pin stays when the new link cannot be made: {error:#}");
        assert!(
            matches!(links::pin_state(&pin, index, Hook::TcIngress).unwrap(), PinState::Replaceable(_)),
            "it still holds the XDP link"
        );
        assert_eq!(xdp_programs(&ns), vec![xdp_prog_id], "the XDP program still runs");
        drop(blocker);
        assert!(tcx_ingress().is_empty());

        // Now it can: a TCX link running our program takes the pin, and the XDP link is gone.
        let done =
            links::attach(&mut ebpf, UNDERLAY_INGRESS, IF, Hook::TcIngress, root, order_of(UNDERLAY_INGRESS)).unwrap();
        assert!(matches!(&done, Attached::Created { replaced: Some(why) } if why.contains("another type")), "{done:?}");
        assert_eq!(links::pin_state(&pin, index, Hook::TcIngress).unwrap(), PinState::Live { program_id: ours });
        assert_eq!(tcx_ingress(), vec![ours], "our program runs at TCX ingress");
        // The pin's removal releases the XDP link through deferred work: wait a little.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !xdp_programs(&ns).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(xdp_programs(&ns), Vec::<u32>::new(), "the XDP program is no longer attached");
        assert_eq!(
            links::attach(&mut ebpf, UNDERLAY_INGRESS, IF, Hook::TcIngress, root, order_of(UNDERLAY_INGRESS)).unwrap(),
            Attached::Unchanged
        );
    })
    .unwrap();
    // The TCX link goes with the pin.
    links::detach(root, IF, UNDERLAY_INGRESS).unwrap();
}

fn ifindex(name: &str) -> u32 {
    let c = CString::new(name).unwrap();
    // SAFETY: NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(index, 0, "{name} exists");
    index
}

/// The programs at TCX ingress of `IF` (the calling thread's namespace), in order.
fn tcx_ingress() -> Vec<u32> {
    let (_, programs) = SchedClassifier::query_tcx(IF, TcAttachType::Ingress).unwrap();
    programs.iter().map(|p| p.id()).collect()
}

/// The ids of the XDP programs attached to `IF`, as `bpftool net show dev IF -j` run in `ns`
/// reports them.
fn xdp_programs(ns: &NetNs) -> Vec<u32> {
    let out = ns.command("bpftool").args(["net", "show", "dev", IF, "-j"]).output().expect("running bpftool");
    assert!(out.status.success(), "bpftool net show: {}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool's JSON");
    json.as_array()
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.get("xdp")?.as_array())
        .flatten()
        .map(|xdp| xdp["id"].as_u64().expect("an XDP entry has a program id") as u32)
        .collect()
}

const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_PROG_TYPE_XDP: u32 = 6;
/// enum bpf_attach_type's BPF_XDP.
const BPF_XDP: u32 = 37;

/// A raw BTF blob (linux/btf.h, little-endian: the `.BTF` format `BPF_BTF_LOAD` takes) built
/// by hand, and the ids of the types a map's key and value are.
///
/// The blob is the 24-byte header (magic 0xeb9f, version 1, flags 0, header length, then the
/// type section's and the string section's offset and length, both relative to the header's
/// end), the type section (each type a 12-byte `btf_type`: name offset, info = kind << 24 |
/// vlen, size or type; then its kind's data), then the string section (NUL-terminated names;
/// offset 0 is the empty string). Type ids count from 1 in section order; 0 is void.
struct RawBtf {
    bytes: Vec<u8>,
    key: u32,
    value: u32,
}

impl RawBtf {
    /// The key of fl_peers_v1 as Rust emits it (`[u8; 4]`: an array of the int `u8`, indexed
    /// by an int) and, as value, `struct PeerValue { lo: u16, hi: u16 }`: 4 bytes like our u32,
    /// another layout.
    fn peers_lookalike() -> RawBtf {
        let mut b = BtfBuilder::default();
        let u8_ = b.int("u8", 1);
        let index = b.int("__ARRAY_SIZE_TYPE__", 4);
        let key = b.array(u8_, index, 4);
        let u16_ = b.int("u16", 2);
        let value = b.structure("PeerValue", 4, &[("lo", u16_, 0), ("hi", u16_, 16)]);
        RawBtf { bytes: b.finish(), key, value }
    }
}

/// Appends types to a BTF type section and names to its string section.
struct BtfBuilder {
    types: Vec<u8>,
    strings: Vec<u8>,
    next_id: u32,
}

impl Default for BtfBuilder {
    fn default() -> Self {
        // The string section starts with the empty name.
        BtfBuilder { types: Vec::new(), strings: vec![0], next_id: 1 }
    }
}

const BTF_KIND_INT: u32 = 1;
const BTF_KIND_ARRAY: u32 = 3;
const BTF_KIND_STRUCT: u32 = 4;

impl BtfBuilder {
    fn name(&mut self, name: &str) -> u32 {
        let offset = self.strings.len() as u32;
        self.strings.extend_from_slice(name.as_bytes());
        self.strings.push(0);
        offset
    }

    fn words(&mut self, words: &[u32]) {
        for word in words {
            self.types.extend_from_slice(&word.to_le_bytes());
        }
    }

    /// A `btf_type` header; returns the new type's id.
    fn header(&mut self, name: &str, kind: u32, vlen: u32, size_or_type: u32) -> u32 {
        let name_off = if name.is_empty() { 0 } else { self.name(name) };
        self.words(&[name_off, kind << 24 | vlen, size_or_type]);
        self.next_id += 1;
        self.next_id - 1
    }

    /// An unsigned integer of `size` bytes; its data word is encoding << 24 | bit offset << 16
    /// | bits.
    fn int(&mut self, name: &str, size: u32) -> u32 {
        let id = self.header(name, BTF_KIND_INT, 0, size);
        self.words(&[size * 8]);
        id
    }

    /// An anonymous array of `len` `element`s; its data is `btf_array` (element type, index
    /// type, number of elements).
    fn array(&mut self, element: u32, index: u32, len: u32) -> u32 {
        let id = self.header("", BTF_KIND_ARRAY, 0, 0);
        self.words(&[element, index, len]);
        id
    }

    /// A struct of `size` bytes; its data is one `btf_member` (name offset, type, bit offset)
    /// per member.
    fn structure(&mut self, name: &str, size: u32, members: &[(&str, u32, u32)]) -> u32 {
        let id = self.header(name, BTF_KIND_STRUCT, members.len() as u32, size);
        for (member, ty, bit_offset) in members {
            let name_off = self.name(member);
            self.words(&[name_off, *ty, *bit_offset]);
        }
        id
    }

    fn finish(self) -> Vec<u8> {
        const HDR_LEN: u32 = 24;
        let (type_len, str_len) = (self.types.len() as u32, self.strings.len() as u32);
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&0xeb9fu16.to_le_bytes());
        bytes.extend_from_slice(&[1, 0]);
        for word in [HDR_LEN, 0, type_len, type_len, str_len] {
            bytes.extend_from_slice(&word.to_le_bytes());
        }
        bytes.extend_from_slice(&self.types);
        bytes.extend_from_slice(&self.strings);
        bytes
    }
}

/// The bpf(2) commands the tests make foreign objects with. Each `attr` is the prefix of
/// `union bpf_attr` its command reads; the kernel zero-extends the rest.
mod sys {
    use super::*;

    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_BTF_LOAD: libc::c_long = 18;
    const BPF_LINK_CREATE: libc::c_long = 28;

    use flannel_agent::ebpf::bpffs::sys::bpf;

    fn new_fd(command: libc::c_long, attr: &mut impl Sized) -> io::Result<OwnedFd> {
        // SAFETY: the kernel just returned this new fd; nothing else owns it.
        bpf(command, attr).map(|fd| unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    /// What the kernel wrote into a log buffer (up to its NUL).
    fn log_text(log: &[u8]) -> String {
        let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
        String::from_utf8_lossy(&log[..end]).into_owned()
    }

    /// BPF_BTF_LOAD; the kernel's verdict on a refused blob is in the error.
    pub fn btf_load(btf: &[u8]) -> io::Result<OwnedFd> {
        #[repr(C)]
        struct BtfLoad {
            btf: u64,
            btf_log_buf: u64,
            btf_size: u32,
            btf_log_size: u32,
            btf_log_level: u32,
        }
        let mut log = vec![0u8; 64 * 1024];
        let mut attr = BtfLoad {
            btf: btf.as_ptr() as u64,
            btf_log_buf: log.as_mut_ptr() as u64,
            btf_size: btf.len() as u32,
            btf_log_size: log.len() as u32,
            btf_log_level: 1,
        };
        new_fd(BPF_BTF_LOAD, &mut attr)
            .map_err(|e| io::Error::new(e.kind(), format!("BPF_BTF_LOAD: {e}: {}", log_text(&log))))
    }

    /// BPF_MAP_CREATE of a map named `name` whose key and value are the BTF types `btf.1` and
    /// `btf.2` of the BTF object `btf.0`.
    pub fn map_create(
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        name: &str,
        btf: (&OwnedFd, u32, u32),
    ) -> io::Result<OwnedFd> {
        #[repr(C)]
        struct MapCreate {
            map_type: u32,
            key_size: u32,
            value_size: u32,
            max_entries: u32,
            map_flags: u32,
            inner_map_fd: u32,
            numa_node: u32,
            map_name: [u8; 16],
            map_ifindex: u32,
            btf_fd: u32,
            btf_key_type_id: u32,
            btf_value_type_id: u32,
        }
        let mut map_name = [0u8; 16];
        map_name[..name.len().min(15)].copy_from_slice(&name.as_bytes()[..name.len().min(15)]);
        let mut attr = MapCreate {
            map_type,
            key_size,
            value_size,
            max_entries,
            map_flags: 0,
            inner_map_fd: 0,
            numa_node: 0,
            map_name,
            map_ifindex: 0,
            btf_fd: btf.0.as_raw_fd() as u32,
            btf_key_type_id: btf.1,
            btf_value_type_id: btf.2,
        };
        new_fd(BPF_MAP_CREATE, &mut attr).map_err(|e| io::Error::new(e.kind(), format!("BPF_MAP_CREATE: {e}")))
    }

    /// BPF_PROG_LOAD of an XDP program that passes every packet: `r0 = XDP_PASS; exit`.
    pub fn prog_load_xdp_pass() -> io::Result<OwnedFd> {
        // struct bpf_insn: code, dst_reg:4 | src_reg:4, off, imm.
        const XDP_PASS: i32 = 2;
        let insns: [(u8, u8, i16, i32); 2] = [
            (0xb7, 0, 0, XDP_PASS), // BPF_ALU64 | BPF_MOV | BPF_K: r0 = 2
            (0x95, 0, 0, 0),        // BPF_JMP | BPF_EXIT
        ];
        let raw: Vec<u8> = insns
            .iter()
            .flat_map(|(code, regs, off, imm)| {
                let mut insn = vec![*code, *regs];
                insn.extend_from_slice(&off.to_le_bytes());
                insn.extend_from_slice(&imm.to_le_bytes());
                insn
            })
            .collect();
        #[repr(C)]
        struct ProgLoad {
            prog_type: u32,
            insn_cnt: u32,
            insns: u64,
            license: u64,
            log_level: u32,
            log_size: u32,
            log_buf: u64,
            kern_version: u32,
            prog_flags: u32,
            prog_name: [u8; 16],
        }
        let mut log = vec![0u8; 64 * 1024];
        let mut prog_name = [0u8; 16];
        prog_name[..8].copy_from_slice(b"fl_old_x");
        let mut attr = ProgLoad {
            prog_type: BPF_PROG_TYPE_XDP,
            insn_cnt: insns.len() as u32,
            insns: raw.as_ptr() as u64,
            license: c"GPL".as_ptr() as u64,
            log_level: 1,
            log_size: log.len() as u32,
            log_buf: log.as_mut_ptr() as u64,
            kern_version: 0,
            prog_flags: 0,
            prog_name,
        };
        new_fd(BPF_PROG_LOAD, &mut attr)
            .map_err(|e| io::Error::new(e.kind(), format!("BPF_PROG_LOAD: {e}: {}", log_text(&log))))
    }

    /// The id of a loaded program (the first field of bpf_prog_info is its type, then the id).
    pub fn prog_id(prog: &OwnedFd) -> io::Result<u32> {
        // The first two words of `struct bpf_prog_info`: type, id.
        let mut info = [0u32; 2];
        flannel_agent::ebpf::bpffs::sys::obj_info(prog, &mut info)?;
        Ok(info[1])
    }

    /// BPF_LINK_CREATE of `prog` at `attach_type` of the interface `ifindex` (of the calling
    /// thread's namespace).
    pub fn link_create(prog: &OwnedFd, ifindex: u32, attach_type: u32) -> io::Result<OwnedFd> {
        #[repr(C)]
        struct LinkCreate {
            prog_fd: u32,
            target_ifindex: u32,
            attach_type: u32,
            flags: u32,
        }
        let mut attr = LinkCreate { prog_fd: prog.as_raw_fd() as u32, target_ifindex: ifindex, attach_type, flags: 0 };
        new_fd(BPF_LINK_CREATE, &mut attr).map_err(|e| io::Error::new(e.kind(), format!("BPF_LINK_CREATE: {e}")))
    }

    /// BPF_OBJ_PIN of `fd` at `path` (on bpffs).
    pub fn obj_pin(fd: &OwnedFd, path: &Path) -> io::Result<()> {
        #[repr(C)]
        struct ObjPin {
            pathname: u64,
            bpf_fd: u32,
            file_flags: u32,
        }
        let path_c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
        let mut attr = ObjPin { pathname: path_c.as_ptr() as u64, bpf_fd: fd.as_raw_fd() as u32, file_flags: 0 };
        bpf(BPF_OBJ_PIN, &mut attr)
            .map(drop)
            .map_err(|e| io::Error::new(e.kind(), format!("BPF_OBJ_PIN {}: {e}", path.display())))
    }
}
