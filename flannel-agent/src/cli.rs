//! The command line. Flag names and `FLANNELD_*` environment variables follow flanneld.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "flannel-agent", version, about = "flannel-compatible node agent with an eBPF datapath")]
pub struct Cli {
    /// Directory on a BPF filesystem under which maps and links are pinned.
    #[arg(long, global = true, env = "FLANNELD_BPF_PIN_PATH", default_value = "/sys/fs/bpf/flannel")]
    pub bpf_pin_path: PathBuf,

    /// Log verbosity, as flanneld's -v: 0 = info, 1 = debug, 2 or more = trace.
    #[arg(short = 'v', long = "v", global = true, env = "FLANNELD_V", default_value_t = 0)]
    pub verbosity: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Per-interface packet counters (XDP ingress, TC egress) in pinned BPF maps.
    #[command(subcommand)]
    Counters(CountersCommand),
}

#[derive(Debug, Subcommand)]
pub enum CountersCommand {
    /// Load the counter programs and attach them to an interface; links and the map are
    /// pinned, so they stay attached after this command exits. Attaching again replaces the
    /// programs atomically.
    Attach(InterfaceArg),
    /// Remove an interface's pinned links (detaching the programs); the map goes with the
    /// last interface.
    Detach(InterfaceArg),
    /// Print the counters from the pinned map, summed over CPUs.
    Show {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct InterfaceArg {
    /// Interface name in the current network namespace.
    #[arg(long)]
    pub iface: String,
}
