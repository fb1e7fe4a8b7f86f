//! BPF_PROG_TEST_RUN unit tests of the counter programs on crafted packets: verdict and the
//! exact counter change. Runs as root (CI is root); fails loudly otherwise.

use std::net::Ipv4Addr;

use aya::{
    maps::PerCpuHashMap,
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
    Ebpf,
};
use flannel_agent::ebpf::{counters, object};
use flannel_common::{Direction, IfaceCounterKey, PacketCounter, COUNTERS_MAP};
use flannel_tests::{packet, require_root};

/// BPF_PROG_TEST_RUN runs XDP and skb programs on the caller's loopback device.
const LOOPBACK_IFINDEX: u32 = 1;
const XDP_PASS: u32 = 2;
/// TC_ACT_UNSPEC (-1) as the kernel reports it in the u32 retval.
const TC_ACT_UNSPEC: u32 = u32::MAX;

fn frame() -> Vec<u8> {
    let f = packet::udp4(
        [2, 0, 0, 0, 0, 1],
        [2, 0, 0, 0, 0, 2],
        Ipv4Addr::new(192, 0, 2, 1),
        Ipv4Addr::new(192, 0, 2, 2),
        40000,
        9,
        &[0xab; 22],
    );
    assert_eq!(f.len(), 64);
    f
}

fn counter(ebpf: &Ebpf, direction: Direction) -> PacketCounter {
    let map: PerCpuHashMap<_, IfaceCounterKey, PacketCounter> =
        PerCpuHashMap::try_from(ebpf.map(COUNTERS_MAP).expect("counters map")).expect("per-CPU hash");
    let key = IfaceCounterKey { ifindex: LOOPBACK_IFINDEX, direction: direction as u32 };
    match map.get(&key, 0) {
        Ok(per_cpu) => per_cpu.iter().fold(PacketCounter::default(), |a, c| PacketCounter {
            packets: a.packets + c.packets,
            bytes: a.bytes + c.bytes,
        }),
        Err(aya::maps::MapError::KeyNotFound) => PacketCounter::default(),
        Err(e) => panic!("reading counter: {e}"),
    }
}

fn run(
    program: &impl TestRun<Opts<'static> = TestRunOptions<'static>, Result = aya::programs::TestRunResult>,
    data: &'static [u8],
    repeat: u32,
) -> u32 {
    let opts = TestRunOptions { data_in: Some(data), repeat, ..Default::default() };
    program.test_run(opts).expect("BPF_PROG_TEST_RUN").return_value
}

#[test]
fn xdp_counter_passes_and_counts_each_frame() {
    require_root().unwrap();
    let mut ebpf = object::load_unpinned().unwrap();
    let xdp: &mut Xdp = ebpf.program_mut(counters::XDP_PROGRAM).unwrap().try_into().unwrap();
    xdp.load().unwrap();
    let data: &'static [u8] = Box::leak(frame().into_boxed_slice());

    assert_eq!(counter(&ebpf, Direction::XdpIngress), PacketCounter::default());
    let xdp: &Xdp = ebpf.program(counters::XDP_PROGRAM).unwrap().try_into().unwrap();
    assert_eq!(run(xdp, data, 1), XDP_PASS);
    assert_eq!(counter(&ebpf, Direction::XdpIngress), PacketCounter { packets: 1, bytes: 64 });

    // Each of `repeat` runs counts once.
    let xdp: &Xdp = ebpf.program(counters::XDP_PROGRAM).unwrap().try_into().unwrap();
    assert_eq!(run(xdp, data, 9), XDP_PASS);
    assert_eq!(counter(&ebpf, Direction::XdpIngress), PacketCounter { packets: 10, bytes: 640 });
    // The egress counter is untouched by XDP.
    assert_eq!(counter(&ebpf, Direction::TcEgress), PacketCounter::default());
}

#[test]
fn tc_counter_continues_to_next_program_and_counts() {
    require_root().unwrap();
    let mut ebpf = object::load_unpinned().unwrap();
    let tc: &mut SchedClassifier = ebpf.program_mut(counters::TC_PROGRAM).unwrap().try_into().unwrap();
    tc.load().unwrap();
    let data: &'static [u8] = Box::leak(frame().into_boxed_slice());
    let tc: &SchedClassifier = ebpf.program(counters::TC_PROGRAM).unwrap().try_into().unwrap();
    assert_eq!(run(tc, data, 3), TC_ACT_UNSPEC);
    assert_eq!(counter(&ebpf, Direction::TcEgress), PacketCounter { packets: 3, bytes: 192 });
    assert_eq!(counter(&ebpf, Direction::XdpIngress), PacketCounter::default());
}
