use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use flannel_agent::{
    cli::{normalize_go_flags, Cli, Command, DockerOptsArgs},
    daemon::{self, DaemonOptions},
    docker_opts::{self, DockerOpts},
    ebpf::inspect,
};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse_from(normalize_go_flags(std::env::args()));
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
    // Our crate at the chosen level; dependencies (tonic, h2, …) only at warn unless RUST_LOG says otherwise.
    let default = format!("warn,flannel_agent={level}");
    let filter = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    // Colour only on a terminal: journald and log files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).init();
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        None => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(daemon::run(DaemonOptions { args: cli.daemon, bpf_pin_path: cli.bpf_pin_path }))
        }
        Some(Command::DockerOpts(args)) => docker_opts::run(&docker_opts_from(args)),
        Some(Command::Inspect { json }) => {
            let snapshot = inspect::snapshot(&cli.bpf_pin_path).with_context(|| {
                format!("no eBPF datapath state under {} (wrong --bpf-pin-path?)", cli.bpf_pin_path.display())
            })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&snapshot)?);
            } else {
                print!("{}", inspect::render(&snapshot));
            }
            Ok(())
        }
    }
}

fn docker_opts_from(args: DockerOptsArgs) -> DockerOpts {
    DockerOpts {
        subnet_file: args.subnet_file,
        docker_file: args.docker_file,
        individual: args.individual,
        combined: args.combined,
        no_ipmasq: args.no_ipmasq,
        combined_key: args.combined_key,
    }
}
