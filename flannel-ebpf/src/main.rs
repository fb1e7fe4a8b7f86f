//! The flannel datapath programs. One object, several programs; the agent loads the ones the
//! configured datapath needs and pins their maps under `--bpf-pin-path`.
#![no_std]
#![no_main]

mod bridge;
mod forward;
mod maps;
mod parse;
mod pod;
mod snat;
mod tunnel;
mod underlay;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach this; it only satisfies no_std.
    loop {}
}

/// Programs that use GPL-only helpers need a GPL-compatible license string.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
