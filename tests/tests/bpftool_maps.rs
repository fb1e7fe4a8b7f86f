//! The maps the agent pins are readable by field name with stock tooling: the object loaded
//! with its maps pinned on a private bpffs, one lease written into `fl_leases_v1`, and
//! `bpftool -j map dump pinned` shows it by the BTF field names of `LeaseEntry`. This is what
//! ARCHITECTURE.md promises operators ("`bpftool map dump` prints field names"); it breaks
//! when the object loses its BTF or a map stops being BTF-defined. Root only; fails loudly
//! otherwise.

use std::{net::Ipv4Addr, process::Command};

use anyhow::{ensure, Context, Result};
use aya::maps::{lpm_trie::Key, LpmTrie};
use flannel_agent::ebpf::{bpffs, object};
use flannel_common::{LeaseEntry, LeaseKind, LEASES_MAP};
use flannel_tests::{require_root, PrivateBpffs};
use serde_json::Value;

const PUBLIC_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const VTEP_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x07, 0x01];

/// `bpftool -j map dump pinned <pin>`, parsed.
fn bpftool_dump(pin: &std::path::Path) -> Result<Value> {
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(pin)
        .output()
        .context("running bpftool (Debian package bpftool)")?;
    ensure!(
        out.status.success(),
        "bpftool map dump pinned {} failed ({}): {}",
        pin.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("bpftool's JSON for {}: {}", pin.display(), String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn bpftool_prints_a_pinned_lease_by_field_name() {
    require_root().unwrap();
    let bpffs = PrivateBpffs::mount().unwrap();
    let maps = bpffs.path().join("flannel").join("maps");
    bpffs::ensure_pin_dir(&maps).unwrap();

    let written =
        LeaseEntry { public_ip: PUBLIC_IP.octets(), vtep_mac: VTEP_MAC, kind: LeaseKind::Vxlan as u8, _pad: 0, vni: 1 };
    {
        let mut ebpf = object::load_pinned(&maps).unwrap();
        let mut leases: LpmTrie<_, [u8; 4], LeaseEntry> =
            LpmTrie::try_from(ebpf.map_mut(LEASES_MAP).expect("the object has the lease map")).unwrap();
        leases.insert(&Key::new(24, [10, 244, 7, 0]), written, 0).unwrap();
        // The loader (and every fd it holds) goes here: bpftool must find the entry through
        // the pin alone, as it does for a running agent's maps.
    }

    let pin = maps.join(LEASES_MAP);
    let dump = bpftool_dump(&pin).unwrap();
    let entries = dump.as_array().unwrap_or_else(|| panic!("bpftool did not print a list: {dump}"));
    assert_eq!(entries.len(), 1, "exactly the lease written: {dump}");
    let key = &entries[0]["formatted"]["key"];
    assert_eq!(key["prefix_len"], 24, "{dump}");
    assert_eq!(key["data"], serde_json::json!([10, 244, 7, 0]), "{dump}");
    let value = &entries[0]["formatted"]["value"];
    assert!(value.is_object(), "no BTF-formatted value (is the map BTF-defined?): {dump}");
    assert_eq!(value["public_ip"], serde_json::json!(PUBLIC_IP.octets()), "{dump}");
    assert_eq!(value["vtep_mac"], serde_json::json!(VTEP_MAC), "{dump}");
    assert_eq!(value["kind"], serde_json::json!(LeaseKind::Vxlan as u8), "{dump}");
    assert_eq!(value["vni"], 1, "{dump}");
}
