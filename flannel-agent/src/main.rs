use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;
use flannel_agent::{
    cli::{Cli, Command, CountersCommand},
    ebpf::counters,
};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbosity);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(verbosity: u8) {
    let level = match verbosity {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new(level));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Counters(CountersCommand::Attach(arg)) => counters::attach(&arg.iface, &cli.bpf_pin_path),
        Command::Counters(CountersCommand::Detach(arg)) => counters::detach(&arg.iface, &cli.bpf_pin_path),
        Command::Counters(CountersCommand::Show { json }) => {
            let rows = counters::read(&cli.bpf_pin_path)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!("{:<8} {:<16} {:<12} {:>12} {:>14}", "IFINDEX", "INTERFACE", "DIRECTION", "PACKETS", "BYTES");
                for row in rows {
                    let name = counters::interface_name(row.ifindex).unwrap_or_else(|| "-".into());
                    println!(
                        "{:<8} {:<16} {:<12} {:>12} {:>14}",
                        row.ifindex, name, row.direction, row.packets, row.bytes
                    );
                }
            }
            Ok(())
        }
    }
}
