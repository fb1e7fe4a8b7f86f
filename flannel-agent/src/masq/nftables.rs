//! Applying the `flannel-ipv4` table with `nft -f -` (one transaction on stdin) and reading it
//! back with `nft list table ip flannel-ipv4`.

use std::collections::BTreeMap;

use anyhow::{Context, Result};

use super::{
    rules::{nft_script, NftChain, NFT_TABLE},
    run,
};

/// The chains of the table as `nft list table` prints them: rule lines per chain, in order
/// (the chain's `comment` and `type … hook …` lines left out).
pub(super) type ListedTable = BTreeMap<String, Vec<String>>;

pub(super) fn parse_list(text: &str) -> ListedTable {
    let mut chains = ListedTable::new();
    let mut current: Option<String> = None;
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("chain ").and_then(|rest| rest.strip_suffix('{')) {
            let name = name.trim().to_string();
            chains.entry(name.clone()).or_default();
            current = Some(name);
        } else if line == "}" {
            current = None;
        } else if let Some(chain) = &current {
            if !(line.is_empty() || line.starts_with("comment ") || line.starts_with("type ")) {
                chains.get_mut(chain).expect("entered above").push(line.to_string());
            }
        }
    }
    chains
}

/// The table, or `None` when it does not exist.
fn read() -> Result<Option<ListedTable>> {
    let tables = run("nft", &["list", "tables", "ip"], None)?;
    if !tables.lines().any(|line| line.trim() == format!("table ip {NFT_TABLE}")) {
        return Ok(None);
    }
    Ok(Some(parse_list(&run("nft", &["list", "table", "ip", NFT_TABLE], None)?)))
}

/// What differs between the wanted chains and the listed table, one line per difference.
pub(super) fn problems(chains: &[NftChain], listed: Option<&ListedTable>) -> Vec<String> {
    let Some(listed) = listed else {
        return vec![format!("table ip {NFT_TABLE} missing")];
    };
    let mut problems = Vec::new();
    for chain in chains {
        let Some(have) = listed.get(chain.name) else {
            problems.push(format!("chain {} missing", chain.name));
            continue;
        };
        let start = problems.len();
        for rule in &chain.rules {
            if !have.contains(rule) {
                problems.push(format!("{}: missing `{rule}`", chain.name));
            }
        }
        for rule in have {
            if !chain.rules.contains(rule) {
                problems.push(format!("{}: unexpected `{rule}`", chain.name));
            }
        }
        if problems.len() == start && have != &chain.rules {
            problems.push(format!("{}: rules out of order or duplicated", chain.name));
        }
    }
    problems
}

pub(super) fn check(chains: &[NftChain]) -> Result<Vec<String>> {
    Ok(problems(chains, read()?.as_ref()))
}

/// Reads the table; when anything differs, reports it and applies the script (which
/// flushes and refills every chain in one transaction). Returns what was repaired.
pub(super) fn ensure(chains: &[NftChain], report: impl FnOnce(&[String])) -> Result<Vec<String>> {
    let problems = check(chains)?;
    if problems.is_empty() {
        return Ok(problems);
    }
    report(&problems);
    let script = nft_script(chains);
    run("nft", &["-f", "-"], Some(&script)).with_context(|| format!("applying\n{script}"))?;
    Ok(problems)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::masq::rules::{nft_forward_chain, nft_masq_chain};

    /// `nft list table ip flannel-ipv4` (nftables 1.0.6) after the script was applied.
    const LISTED: &str = "table ip flannel-ipv4 {
\tcomment \"rules for flannel-ipv4\"
\tchain postrtg {
\t\tcomment \"chain to manage traffic masquerading by flannel\"
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tmeta mark & 0x00004000 == 0x00004000 return
\t\tip saddr 10.244.1.0/24 ip daddr 10.244.0.0/16 return
\t\tip saddr 10.244.0.0/16 ip daddr 10.244.1.0/24 return
\t\tip saddr != 10.244.0.0/16 ip daddr 10.244.1.0/24 return
\t\tip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random
\t\tip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/16 masquerade fully-random
\t}

\tchain forward {
\t\tcomment \"chain to accept flannel traffic\"
\t\ttype filter hook forward priority filter; policy accept;
\t\tip saddr 10.244.0.0/16 accept
\t\tip daddr 10.244.0.0/16 accept
\t}
}
";

    fn chains(subnet: &str) -> Vec<NftChain> {
        let c = "10.244.0.0/16".parse().unwrap();
        vec![nft_masq_chain(c, subnet.parse().unwrap(), true), nft_forward_chain(c)]
    }

    #[test]
    fn parses_listing() {
        let listed = parse_list(LISTED);
        assert_eq!(listed.keys().collect::<Vec<_>>(), ["forward", "postrtg"]);
        assert_eq!(listed["postrtg"], chains("10.244.1.0/24")[0].rules);
        assert_eq!(listed["forward"], chains("10.244.1.0/24")[1].rules);
    }

    #[test]
    fn installed_table_has_no_problems() {
        assert_eq!(problems(&chains("10.244.1.0/24"), Some(&parse_list(LISTED))), Vec::<String>::new());
    }

    #[test]
    fn differences_are_named() {
        assert_eq!(problems(&chains("10.244.1.0/24"), None), ["table ip flannel-ipv4 missing"]);
        let listed = parse_list(&LISTED.replace("\t\tip daddr 10.244.0.0/16 accept\n", ""));
        assert_eq!(
            problems(&chains("10.244.1.0/24"), Some(&listed)),
            ["forward: missing `ip daddr 10.244.0.0/16 accept`"]
        );
        let found = problems(&chains("10.244.7.0/24"), Some(&parse_list(LISTED)));
        assert_eq!(found.len(), 6, "{found:#?}");
        let mut listed = parse_list(LISTED);
        listed.remove("forward");
        assert_eq!(problems(&chains("10.244.1.0/24"), Some(&listed)), ["chain forward missing"]);
        let mut listed = parse_list(LISTED);
        listed.get_mut("postrtg").unwrap().swap(0, 1);
        assert_eq!(problems(&chains("10.244.1.0/24"), Some(&listed)), ["postrtg: rules out of order or duplicated"]);
    }
}
