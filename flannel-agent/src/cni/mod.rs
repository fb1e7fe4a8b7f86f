//! The `flannel` CNI plugin: a drop-in for flannel-io/cni-plugin.
//!
//! A meta-plugin: it reads its network config (stdin) and flanneld's subnet.env, builds the
//! config of a delegate plugin (`bridge` with `host-local` IPAM unless configured otherwise,
//! see [`delegate`]), saves it as `<dataDir>/<CNI_CONTAINERID>` and runs the delegate from
//! CNI_PATH. DEL runs the delegate's DEL with the saved config and removes it.
//!
//! | module | job |
//! |---|---|
//! | [`spec`] | the CNI protocol: `CNI_*` variables, config and version checks, error and VERSION JSON |
//! | [`netconf`] | the plugin's config and the saved delegate config, decoded as Go decodes them |
//! | [`subnet_file`] | subnet.env as the plugin reads it, Go's address parsing and printing |
//! | [`delegate`] | the delegate config and its saved copy |
//! | [`exec`] | finding and running the delegate, its errors and result |
//! | [`commands`] | ADD and DEL (CHECK, GC and STATUS only check versions, as in flannel) |
//!
//! Go's JSON decoding rules and `json.Marshal`'s exact output are [`crate::gojson`]'s.
//!
//! Where this differs from flannel (all deliberate): the error JSON carries `cniVersion` (the
//! spec's format); ADD refuses a CNI_NETNS that is the plugin's own namespace before doing
//! anything (flannel's library checks after the delegate has run); DEL keeps the saved config
//! when the delegate fails so a retry can finish (flannel's deferred cleanup removes it); ADD
//! passes the delegate's result through as printed (flannel re-encodes it through the Go
//! result types, same content); a subnet.env key without `=` is an error (flannel panics); a
//! plugin binary still "text file busy" after the retries is an error (flannel goes on with
//! empty output).

pub mod commands;
pub mod delegate;
pub mod exec;
pub mod netconf;
pub mod spec;
pub mod subnet_file;

use std::{
    ffi::OsString,
    io::{Read, Write},
    os::unix::fs::MetadataExt,
};

use spec::{code, CniError, SUPPORTED_VERSIONS};

/// One run of the plugin: its environment and standard streams.
pub struct Invocation<'a> {
    /// The whole environment: `CNI_*` are read from it and it is passed on to the delegate.
    pub env: Vec<(OsString, OsString)>,
    pub stdin: &'a mut dyn Read,
    pub stdout: &'a mut dyn Write,
    pub stderr: &'a mut dyn Write,
}

/// The binary's entry point: the process's environment and stdio; returns the exit code.
pub fn main() -> i32 {
    let stdin = std::io::stdin();
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    run(Invocation {
        env: std::env::vars_os().collect(),
        stdin: &mut stdin.lock(),
        stdout: &mut stdout.lock(),
        stderr: &mut stderr.lock(),
    })
}

/// Runs one command (skel's `PluginMain`): 0 on success; 1 with the error JSON on stdout.
pub fn run(inv: Invocation) -> i32 {
    let Invocation { env, stdin, stdout, stderr } = inv;
    let mut config = Vec::new();
    let result = dispatch(&env, stdin, &mut config, stdout, stderr);
    let _ = stdout.flush();
    match result {
        Ok(()) => 0,
        Err(error) => {
            let version = spec::decode_version(&config).unwrap_or_else(|_| spec::CURRENT_VERSION.to_string());
            if let Err(e) = stdout.write_all(error.to_json(&version).as_bytes()).and_then(|()| stdout.flush()) {
                let _ = writeln!(stderr, "Error writing error JSON to stdout: {e}");
            }
            1
        }
    }
}

/// The about text printed to stderr when CNI_COMMAND is not set.
fn about() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
        "loongarch64" => "loong64",
        other => other,
    };
    format!(
        "CNI Plugin flannel version v{} ({}/{arch}) commit {}",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::OS,
        option_env!("FLANNEL_RS_COMMIT").unwrap_or("unknown")
    )
}

fn dispatch(
    env: &[(OsString, OsString)],
    stdin: &mut dyn Read,
    config: &mut Vec<u8>,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> Result<(), CniError> {
    // Go's Getenv: the first definition counts.
    let getenv = |name: &str| {
        env.iter().find(|(k, _)| k == name).map(|(_, v)| v.to_string_lossy().into_owned()).unwrap_or_default()
    };
    let args = match spec::args_from_env(getenv) {
        Ok(args) => args,
        Err(e) if e.code == code::INVALID_ENVIRONMENT_VARIABLES && getenv("CNI_COMMAND").is_empty() => {
            let _ = writeln!(stderr, "{}", about());
            let _ = writeln!(stderr, "CNI protocol versions supported: {}", SUPPORTED_VERSIONS.join(", "));
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    if args.command == "VERSION" {
        return stdout
            .write_all(spec::version_json().as_bytes())
            .map_err(|e| CniError::new(code::IO_FAILURE, e.to_string(), ""));
    }
    *config = exec::read_all(stdin)
        .map_err(|e| CniError::new(code::IO_FAILURE, format!("error reading from stdin: {e}"), ""))?;
    let config: &[u8] = config;
    spec::validate_config(config)?;

    let netns_override = args.netns_override.eq_ignore_ascii_case("true") || args.netns_override == "1";
    let mut ctx = commands::Ctx { args: &args, stdin: config, env, stdout, stderr };
    match args.command.as_str() {
        "ADD" => {
            spec::check_version(config)?;
            if !netns_override {
                check_netns(&args.netns)?;
            }
            commands::add(&mut ctx).map_err(spec::Failure::into_cni)
        }
        "DEL" => {
            spec::check_version(config)?;
            commands::del(&mut ctx).map_err(spec::Failure::into_cni)?;
            if !netns_override {
                check_netns(&args.netns)?;
            }
            Ok(())
        }
        // flannel's cmdCheck does nothing. Delegating it would not be safer: the bridge plugin
        // before v1.3.0 (Debian's is 1.1.1) fails CHECK on any route without a gateway, and
        // every route flannel configures is one.
        "CHECK" => spec::check_version_at_least(config, "0.4.0", "CHECK").map(drop),
        // Nothing to collect and no status to report beyond the version checks either.
        "GC" => spec::check_version_at_least(config, "1.1.0", "GC").map(drop),
        "STATUS" => spec::check_version_at_least(config, "1.1.0", "STATUS").map(drop),
        other => Err(CniError::new(code::INVALID_ENVIRONMENT_VARIABLES, format!("unknown CNI_COMMAND: {other}"), "")),
    }
}

/// skel's CheckNetNS: CNI_NETNS must not be the namespace the plugin runs in. A path that
/// cannot be opened is not checked (DEL may get one that is already gone).
fn check_netns(path: &str) -> Result<(), CniError> {
    let Ok(target) = std::fs::File::open(path).and_then(|f| f.metadata()) else {
        return Ok(());
    };
    let own = std::fs::metadata("/proc/thread-self/ns/net")
        .map_err(|_| CniError::new(code::INVALID_NETNS, "get plugin's netns failed", ""))?;
    if own.dev() == target.dev() && own.ino() == target.ino() {
        return Err(CniError::new(
            code::INVALID_NETNS,
            "plugin's netns and netns from CNI_NETNS should not be the same",
            "",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
