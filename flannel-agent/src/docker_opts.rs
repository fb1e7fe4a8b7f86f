//! `flannel-agent docker-opts`: turns subnet.env into Docker daemon options, as flannel's
//! packaged `mk-docker-opts.sh` does (seed 003 shows its output):
//!
//! ```text
//! DOCKER_OPT_BIP="--bip=172.33.68.1/24"
//! DOCKER_OPT_IPMASQ="--ip-masq=true"
//! DOCKER_OPT_MTU="--mtu=1500"
//! DOCKER_NETWORK_OPTIONS="--bip=172.33.68.1/24 --ip-masq=true --mtu=1500"
//! ```
//!
//! Docker masquerades exactly when flannel does not (`--ip-masq` is the inverse of
//! FLANNEL_IPMASQ). Current upstream scripts drop the option when FLANNEL_IPMASQ=false, pad
//! the combined value with spaces and ignore their own `-m`; we follow the packaged output
//! above and honour `-m`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::subnet_env::{parse_env, write_atomic};

#[derive(Clone, Debug)]
pub struct DockerOpts {
    pub subnet_file: PathBuf,
    pub docker_file: PathBuf,
    /// Write each option as its own DOCKER_OPT_* variable (-i).
    pub individual: bool,
    /// Write the combined variable (-c). With neither -i nor -c, both are written.
    pub combined: bool,
    /// Leave out --ip-masq (-m).
    pub no_ipmasq: bool,
    /// Name of the combined variable (-k).
    pub combined_key: String,
}

pub fn render(subnet_env: &str, source: &Path, opts: &DockerOpts) -> Result<String> {
    let env = parse_env(subnet_env);
    let get = |key: &str| env.get(key).filter(|v| !v.is_empty());
    let Some(subnet) = get("FLANNEL_SUBNET") else {
        bail!("{} has no FLANNEL_SUBNET: is the agent running and ready?", source.display());
    };
    // Sorted by variable name, as the script's `compgen -v DOCKER_OPT_` lists them.
    let mut options = vec![("DOCKER_OPT_BIP", format!("--bip={subnet}"))];
    if !opts.no_ipmasq {
        match get("FLANNEL_IPMASQ").map(String::as_str) {
            Some("true") => options.push(("DOCKER_OPT_IPMASQ", "--ip-masq=false".into())),
            Some("false") => options.push(("DOCKER_OPT_IPMASQ", "--ip-masq=true".into())),
            _ => {}
        }
    }
    if let Some(mtu) = get("FLANNEL_MTU") {
        options.push(("DOCKER_OPT_MTU", format!("--mtu={mtu}")));
    }
    let (individual, combined) =
        if opts.individual || opts.combined { (opts.individual, opts.combined) } else { (true, true) };
    let mut out = String::new();
    if individual {
        for (name, value) in &options {
            out.push_str(&format!("{name}=\"{value}\"\n"));
        }
    }
    if combined {
        let joined: Vec<&str> = options.iter().map(|(_, v)| v.as_str()).collect();
        out.push_str(&format!("{}=\"{}\"\n", opts.combined_key, joined.join(" ")));
    }
    Ok(out)
}

pub fn run(opts: &DockerOpts) -> Result<()> {
    let text = std::fs::read_to_string(&opts.subnet_file)
        .with_context(|| format!("reading subnet file {}", opts.subnet_file.display()))?;
    let out = render(&text, &opts.subnet_file, opts)?;
    write_atomic(&opts.docker_file, out.as_bytes())?;
    tracing::info!(from = %opts.subnet_file.display(), to = %opts.docker_file.display(), "wrote Docker options");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> DockerOpts {
        DockerOpts {
            subnet_file: "/run/flannel/subnet.env".into(),
            docker_file: "/run/flannel/docker".into(),
            individual: false,
            combined: false,
            no_ipmasq: false,
            combined_key: "DOCKER_NETWORK_OPTIONS".into(),
        }
    }

    const SEED_003_ENV: &str =
        "FLANNEL_NETWORK=172.33.0.0/16\nFLANNEL_SUBNET=172.33.68.1/24\nFLANNEL_MTU=1500\nFLANNEL_IPMASQ=false\n";

    #[test]
    fn reproduces_seed_003() {
        let out = render(SEED_003_ENV, Path::new("subnet.env"), &opts()).unwrap();
        assert_eq!(
            out,
            "DOCKER_OPT_BIP=\"--bip=172.33.68.1/24\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=true\"\nDOCKER_OPT_MTU=\"--mtu=1500\"\n\
             DOCKER_NETWORK_OPTIONS=\"--bip=172.33.68.1/24 --ip-masq=true --mtu=1500\"\n"
        );
    }

    #[test]
    fn flags_select_what_is_written() {
        let env = SEED_003_ENV.replace("FLANNEL_IPMASQ=false", "FLANNEL_IPMASQ=true");
        let combined_only = DockerOpts { combined: true, combined_key: "DOCKER_OPTS".into(), ..opts() };
        assert_eq!(
            render(&env, Path::new("f"), &combined_only).unwrap(),
            "DOCKER_OPTS=\"--bip=172.33.68.1/24 --ip-masq=false --mtu=1500\"\n"
        );
        let individual_no_masq = DockerOpts { individual: true, no_ipmasq: true, ..opts() };
        assert_eq!(
            render(&env, Path::new("f"), &individual_no_masq).unwrap(),
            "DOCKER_OPT_BIP=\"--bip=172.33.68.1/24\"\nDOCKER_OPT_MTU=\"--mtu=1500\"\n"
        );
    }

    #[test]
    fn missing_subnet_names_the_file() {
        let error = render("FLANNEL_MTU=1450\n", Path::new("/x/subnet.env"), &opts()).unwrap_err();
        assert!(error.to_string().contains("/x/subnet.env"));
    }
}
