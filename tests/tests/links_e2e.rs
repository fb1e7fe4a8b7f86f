//! Restarts and attachments (issue 14): the pinned TCX links of `ebpf::links` and the
//! datapath's repair of them, on a veth in a namespace of its own and a private bpffs.
//! - a failed in-place replace keeps the old program attached (only a dead link is replaced);
//! - a dead link (interface recreated) is replaced;
//! - a pin removed behind the agent's back is repaired by the periodic resync;
//! - our two programs sharing a hook keep their order, and a foreign program at the hook
//!   stays attached and in its place across attach and replace;
//! - a pinned map that cannot be ours (no BTF) is refused before it is reused.
//!
//! `pins_e2e.rs` covers a map pin of another BTF layout and an XDP link under a TC
//! program's name.
//!
//! aya resolves interface names and creates links in the calling thread's network
//! namespace, so everything runs inside `NetNs::run_in`. Root only; fails loudly otherwise.

use std::{net::Ipv4Addr, path::Path, process::Command};

use anyhow::{ensure, Context, Result};
use aya::{
    programs::{links::FdLink, tc::TcAttachOptions, LinkOrder, SchedClassifier, TcAttachType},
    Ebpf,
};
use flannel_agent::{
    config::Backend,
    datapath::{
        ebpf::{
            order_of, EbpfDatapath, EbpfOptions, BRIDGE_EGRESS, SNAT_EGRESS, SNAT_INGRESS, UNDERLAY_EGRESS,
            UNDERLAY_INGRESS,
        },
        Datapath, LocalNode,
    },
    ebpf::{
        bpffs,
        links::{self, Attached, Hook, Order},
        object,
    },
    iface::ExternalInterface,
};
use flannel_tests::{require_root, NetNs, PrivateBpffs};

const IF: &str = "fl-lk0";

/// A namespace with the veth `IF` (peer `fl-lk1`) up, and a private bpffs.
fn setup(tag: &str) -> (NetNs, PrivateBpffs) {
    require_root().unwrap();
    let ns = NetNs::create(tag).unwrap();
    ns.ip(&["link", "add", IF, "type", "veth", "peer", "name", "fl-lk1"]).unwrap();
    ns.ip(&["link", "set", IF, "up"]).unwrap();
    ns.ip(&["link", "set", "fl-lk1", "up"]).unwrap();
    (ns, PrivateBpffs::mount().unwrap())
}

fn id_of(ebpf: &mut Ebpf, program: &str) -> u32 {
    links::loaded(ebpf, program).unwrap().info().unwrap().id()
}

/// The ids of the programs at `hook` of `IF`, in the order TCX runs them.
fn at_hook(hook: TcAttachType) -> Vec<u32> {
    let (_, programs) = SchedClassifier::query_tcx(IF, hook).unwrap();
    programs.iter().map(|p| p.id()).collect()
}

/// Attaches `program` of `ebpf` at `hook` of `IF` outside our pins (a foreign program), last.
fn attach_foreign(ebpf: &mut Ebpf, program: &str, hook: TcAttachType) -> FdLink {
    let classifier = links::loaded(ebpf, program).unwrap();
    let id = classifier.attach_with_options(IF, hook, TcAttachOptions::TcxOrder(LinkOrder::last())).unwrap();
    FdLink::try_from(classifier.take_link(id).unwrap()).unwrap()
}

fn attach(ebpf: &mut Ebpf, program: &str, hook: Hook, root: &Path) -> Result<Attached> {
    links::attach(ebpf, program, IF, hook, root, order_of(program))
}

#[test]
fn a_failed_replace_keeps_the_old_program_attached() {
    let (ns, bpffs) = setup("lkrep");
    ns.run_in(|| {
        let root = bpffs.path();
        let mut old = object::load_unpinned().unwrap();
        assert_eq!(
            attach(&mut old, SNAT_INGRESS, Hook::TcIngress, root).unwrap(),
            Attached::Created { replaced: None }
        );
        let old_id = id_of(&mut old, SNAT_INGRESS);
        // The new agent's program is already at the hook through another link, so the
        // kernel refuses to swap it into ours (EEXIST): an error that is not a dead link.
        let mut new = object::load_unpinned().unwrap();
        let _other = attach_foreign(&mut new, SNAT_INGRESS, TcAttachType::Ingress);
        let new_id = id_of(&mut new, SNAT_INGRESS);
        let error = attach(&mut new, SNAT_INGRESS, Hook::TcIngress, root).expect_err("the kernel refuses the update");
        let message = format!("{error:#}");
        let pin = links::link_pin(root, IF, SNAT_INGRESS);
        for part in [IF, SNAT_INGRESS, &pin.display().to_string()] {
            assert!(message.contains(part), "the error names {part}: {message}");
        }
        assert!(pin.exists(), "the pin stays: {message}");
        assert_eq!(at_hook(TcAttachType::Ingress), vec![old_id, new_id], "the old program still runs in its link");
    })
    .unwrap();
}

#[test]
fn a_dead_link_is_replaced() {
    let (ns, bpffs) = setup("lkdead");
    ns.run_in(|| {
        let root = bpffs.path();
        let mut ebpf = object::load_unpinned().unwrap();
        attach(&mut ebpf, SNAT_EGRESS, Hook::TcEgress, root).unwrap();
        // The interface is recreated under the same name: the pinned link is defunct.
        ns.ip(&["link", "del", IF]).unwrap();
        ns.ip(&["link", "add", IF, "type", "veth", "peer", "name", "fl-lk1"]).unwrap();
        let done = attach(&mut ebpf, SNAT_EGRESS, Hook::TcEgress, root).unwrap();
        assert!(matches!(&done, Attached::Created { replaced: Some(why) } if why.contains("defunct")), "{done:?}");
        assert_eq!(at_hook(TcAttachType::Egress), vec![id_of(&mut ebpf, SNAT_EGRESS)]);
        // Now live and running this program: nothing to do.
        assert_eq!(attach(&mut ebpf, SNAT_EGRESS, Hook::TcEgress, root).unwrap(), Attached::Unchanged);
    })
    .unwrap();
}

#[test]
fn the_resync_repairs_a_removed_pin() {
    let (ns, bpffs) = setup("lkfix");
    ns.run_in(|| {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            // /sys/class/net shows the process's mount-time namespace, not this thread's.
            let index = nametoindex(IF);
            let options = EbpfOptions {
                pin_root: bpffs.path().join("flannel"),
                pod_bridge: "cni0".into(),
                masquerade: Some(flannel_agent::datapath::ebpf::snat::SnatOptions {
                    port_min: 20000,
                    port_max: 29999,
                    tcp_idle: std::time::Duration::from_secs(60),
                    other_idle: std::time::Duration::from_secs(60),
                }),
                netfilter_bypass: false,
            };
            let mut datapath = EbpfDatapath::open(options.clone()).unwrap();
            let local = LocalNode {
                subnet: "10.244.1.0/24".parse().unwrap(),
                network: "10.244.0.0/16".parse().unwrap(),
                public_ip: Ipv4Addr::new(192, 0, 2, 10),
                external: ExternalInterface {
                    name: IF.into(),
                    index,
                    address: Ipv4Addr::new(192, 0, 2, 10),
                    mtu: 1500,
                },
                backend: Backend::HostGw,
                vtep_mac: None,
            };
            datapath.set_local(&local).await.unwrap();
            assert_eq!(at_hook(TcAttachType::Ingress).len(), 1, "fl_snat_ingress attached");
            assert_eq!(datapath.link_repairs(), 0);
            // Someone removes the pin: the link goes with it, though not at once (the kernel
            // releases a link whose last pin is unlinked from deferred work). Until it has
            // gone a new link of the same program is refused (EEXIST), so wait for it.
            std::fs::remove_file(links::link_pin(&options.pin_root, IF, SNAT_INGRESS)).unwrap();
            assert!(wait_until(|| at_hook(TcAttachType::Ingress).is_empty()), "the link went with its pin");
            // What the control loop runs every resync.
            datapath.set_local(&local).await.unwrap();
            datapath.reconcile(&[]).await.unwrap();
            assert_eq!(datapath.link_repairs(), 1, "the repair is counted");
            assert_eq!(at_hook(TcAttachType::Ingress).len(), 1, "fl_snat_ingress is back");
            assert!(links::link_pin(&options.pin_root, IF, SNAT_INGRESS).exists());
            // Nothing more to repair on the next round.
            datapath.set_local(&local).await.unwrap();
            assert_eq!(datapath.link_repairs(), 1);
        });
    })
    .unwrap();
}

/// Polls `done` for up to 5 s; whether it came true.
fn wait_until(mut done: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !done() {
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    true
}

fn nametoindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(index, 0, "{name} exists");
    index
}

#[test]
fn shared_hooks_keep_our_order_and_foreign_programs() {
    let (ns, bpffs) = setup("lkord");
    ns.run_in(|| {
        let root = bpffs.path();
        // The "foreign" programs: another load of our object (its fl_bridge_egress passes
        // everything on with TC_ACT_UNSPEC), attached first, outside our pins.
        let mut foreign = object::load_unpinned().unwrap();
        let _foreign_in = attach_foreign(&mut foreign, BRIDGE_EGRESS, TcAttachType::Ingress);
        let _foreign_out = attach_foreign(&mut foreign, BRIDGE_EGRESS, TcAttachType::Egress);
        let foreign_id = id_of(&mut foreign, BRIDGE_EGRESS);

        // In the order the datapath attaches them: masquerade first, then the bypass.
        let mut ebpf = object::load_unpinned().unwrap();
        for (program, hook) in [
            (SNAT_EGRESS, Hook::TcEgress),
            (SNAT_INGRESS, Hook::TcIngress),
            (UNDERLAY_INGRESS, Hook::TcIngress),
            (UNDERLAY_EGRESS, Hook::TcEgress),
        ] {
            attach(&mut ebpf, program, hook, root).unwrap();
        }
        let ids =
            |ebpf: &mut Ebpf| [SNAT_INGRESS, UNDERLAY_INGRESS, UNDERLAY_EGRESS, SNAT_EGRESS].map(|p| id_of(ebpf, p));
        let [snat_in, underlay_in, underlay_out, snat_out] = ids(&mut ebpf);
        assert_eq!(
            at_hook(TcAttachType::Ingress),
            vec![foreign_id, snat_in, underlay_in],
            "ingress: SNAT reverse first"
        );
        assert_eq!(
            at_hook(TcAttachType::Egress),
            vec![foreign_id, underlay_out, snat_out],
            "egress: recorder, then SNAT"
        );
        assert_eq!(order_of(SNAT_INGRESS), Order::Before(UNDERLAY_INGRESS));

        // A restarted agent swaps its programs in: the order and the foreign program stay.
        let mut restarted = object::load_unpinned().unwrap();
        for (program, hook) in [
            (SNAT_EGRESS, Hook::TcEgress),
            (SNAT_INGRESS, Hook::TcIngress),
            (UNDERLAY_INGRESS, Hook::TcIngress),
            (UNDERLAY_EGRESS, Hook::TcEgress),
        ] {
            assert_eq!(attach(&mut restarted, program, hook, root).unwrap(), Attached::Replaced, "{program}");
        }
        let [snat_in, underlay_in, underlay_out, snat_out] = ids(&mut restarted);
        assert_eq!(at_hook(TcAttachType::Ingress), vec![foreign_id, snat_in, underlay_in]);
        assert_eq!(at_hook(TcAttachType::Egress), vec![foreign_id, underlay_out, snat_out]);

        // The bypass recreated alone (its pin removed) goes back right after SNAT.
        links::detach(root, IF, UNDERLAY_INGRESS).unwrap();
        assert!(wait_until(|| !at_hook(TcAttachType::Ingress).contains(&underlay_in)), "the link went with its pin");
        let _late_foreign = attach_foreign(&mut foreign, fl_other(), TcAttachType::Ingress);
        let late_id = id_of(&mut foreign, fl_other());
        attach(&mut restarted, UNDERLAY_INGRESS, Hook::TcIngress, root).unwrap();
        assert_eq!(at_hook(TcAttachType::Ingress), vec![foreign_id, snat_in, underlay_in, late_id]);
    })
    .unwrap();
}

/// A second stand-in foreign program (a classifier that passes everything on).
fn fl_other() -> &'static str {
    flannel_agent::datapath::ebpf::TUNNEL_EGRESS
}

#[test]
fn a_pinned_map_without_btf_is_refused() {
    require_root().unwrap();
    let bpffs = PrivateBpffs::mount().unwrap();
    let maps = bpffs.path().join("maps");
    bpffs::ensure_pin_dir(&maps).unwrap();
    let pin = maps.join(flannel_common::PEERS_MAP);
    // Same name, type, key and value sizes and capacity as fl_peers_v1, but no BTF.
    bpftool(&[
        "map",
        "create",
        &pin.display().to_string(),
        "type",
        "hash",
        "key",
        "4",
        "value",
        "4",
        "entries",
        &flannel_common::peers::PEERS_MAX_ENTRIES.to_string(),
        "name",
        flannel_common::PEERS_MAP,
    ])
    .unwrap();
    let error = object::load_pinned(&maps).expect_err("a BTF-less pin is refused");
    let message = format!("{error:#}");
    assert!(message.contains(&pin.display().to_string()) && message.contains("without BTF"), "{message}");
    assert!(message.contains("[u8; 4]"), "our layout is named: {message}");
}

#[test]
fn pinned_maps_of_our_own_object_are_accepted() {
    require_root().unwrap();
    let bpffs = PrivateBpffs::mount().unwrap();
    let maps = bpffs.path().join("maps");
    bpffs::ensure_pin_dir(&maps).unwrap();
    drop(object::load_pinned(&maps).unwrap());
    // The second load checks every pin the first made, BTF layouts included.
    drop(object::load_pinned(&maps).unwrap());
    let layout = bpffs::pinned_layout(&maps.join(flannel_common::LEASES_MAP)).unwrap().expect("BTF");
    let value = layout.value.to_string();
    assert!(value.contains("LeaseEntry") && value.contains("public_ip") && value.contains("vni"), "{value}");
}

fn bpftool(args: &[&str]) -> Result<()> {
    let out = Command::new("bpftool").args(args).output().context("running bpftool")?;
    ensure!(out.status.success(), "bpftool {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}
