//! Applying flannel's chains with `iptables-restore --noflush` (one batch on stdin) and
//! reading them back with `iptables-save -t <table>`.
//!
//! flannel's chains are owned: declaring `:FLANNEL-POSTRTG - [0:0]` in a `--noflush` batch
//! creates the chain or empties it, and the batch then appends the whole wanted content, so
//! the chain ends up exactly as wanted (old subnet's rules included, nothing survives) in one
//! commit. The jump from the built-in chain is shared territory: it is appended only when
//! absent, and any other rule there that jumps to our chain or carries our comment (a
//! duplicate jump, or an old flanneld's rules written straight into POSTROUTING) is deleted.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result};

use super::{rules::IptChain, run};

/// What the installed iptables can do (flannel asks go-iptables the same questions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Features {
    /// `MASQUERADE --random-fully`: iptables ≥ 1.6.2.
    pub random_fully: bool,
    /// `iptables-restore --wait`: iptables ≥ 1.6.2.
    pub wait: bool,
}

impl Features {
    pub fn probe() -> Result<Features> {
        let out = run("iptables", &["--version"], None)?;
        let version = parse_version(&out).with_context(|| format!("no version in `iptables --version`: {out:?}"))?;
        Ok(Features::of(version))
    }

    fn of(version: (u32, u32, u32)) -> Features {
        let new_enough = version >= (1, 6, 2);
        Features { random_fully: new_enough, wait: new_enough }
    }
}

/// `iptables v1.8.9 (nf_tables)` → (1, 8, 9).
fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    text.split_whitespace().find_map(|word| {
        let mut parts = word.strip_prefix('v')?.split('.').map(|p| p.parse::<u32>().ok());
        Some((parts.next()??, parts.next()??, parts.next().flatten().unwrap_or(0)))
    })
}

/// One table as `iptables-save -t <table>` prints it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct SavedTable {
    /// Chains declared with `:NAME …`.
    pub chains: BTreeSet<String>,
    /// `-A CHAIN …` lines per chain, in order.
    pub rules: BTreeMap<String, Vec<String>>,
}

impl SavedTable {
    pub fn parse(text: &str) -> SavedTable {
        let mut saved = SavedTable::default();
        for line in text.lines().map(str::trim_end) {
            if let Some(declaration) = line.strip_prefix(':') {
                if let Some(name) = declaration.split_whitespace().next() {
                    saved.chains.insert(name.to_string());
                }
            } else if let Some(rest) = line.strip_prefix("-A ") {
                if let Some(chain) = rest.split_whitespace().next() {
                    saved.rules.entry(chain.to_string()).or_default().push(line.to_string());
                }
            }
        }
        saved
    }

    pub fn read(table: &str) -> Result<SavedTable> {
        Ok(SavedTable::parse(&run("iptables-save", &["-t", table], None)?))
    }

    fn rules_of(&self, chain: &str) -> &[String] {
        self.rules.get(chain).map(Vec::as_slice).unwrap_or_default()
    }
}

/// The built-in chain's rules that must go: every rule jumping to our chain or carrying our
/// comment, except the first exact jump. Returns them and whether that exact jump was found.
fn stale_hook_rules<'a>(chain: &IptChain, saved: &'a SavedTable) -> (Vec<&'a str>, bool) {
    let ours = |line: &str| {
        let words: Vec<&str> = line.split_whitespace().collect();
        words.windows(2).any(|w| matches!(w[0], "-j" | "-g") && w[1] == chain.chain)
            || line.contains(&format!("--comment \"{}\"", chain.comment))
    };
    let mut kept = false;
    let mut stale = Vec::new();
    for line in saved.rules_of(chain.hook) {
        if !kept && *line == chain.jump {
            kept = true;
        } else if ours(line) {
            stale.push(line.as_str());
        }
    }
    (stale, kept)
}

/// What differs between `chain` as wanted and `saved`, one readable line per difference
/// (empty when the chain and its jump are exactly as installed by [`restore_payload`]).
pub(super) fn problems(chain: &IptChain, saved: &SavedTable) -> Vec<String> {
    let (table, name) = (chain.table, chain.chain);
    let mut problems = Vec::new();
    if !saved.chains.contains(name) {
        problems.push(format!("{table}: chain {name} missing"));
    }
    let have = saved.rules_of(name);
    for rule in &chain.rules {
        if !have.contains(rule) {
            problems.push(format!("{table}: missing `{rule}`"));
        }
    }
    for rule in have {
        if !chain.rules.contains(rule) {
            problems.push(format!("{table}: unexpected `{rule}`"));
        }
    }
    if problems.is_empty() && have != chain.rules.as_slice() {
        problems.push(format!("{table}: {name} rules out of order or duplicated"));
    }
    let (stale, kept) = stale_hook_rules(chain, saved);
    if !kept {
        problems.push(format!("{table}: missing `{}`", chain.jump));
    }
    problems.extend(stale.iter().map(|line| format!("{table}: stale `{line}`")));
    problems
}

/// The `iptables-restore --noflush` input making every chain exactly as wanted, given what
/// `iptables-save` showed for its table.
pub(super) fn restore_payload(chains: &[(IptChain, SavedTable)]) -> String {
    let mut payload = String::new();
    for (chain, saved) in chains {
        payload += &format!("*{}\n:{} - [0:0]\n", chain.table, chain.chain);
        let (stale, kept) = stale_hook_rules(chain, saved);
        for line in stale {
            // `-A CHAIN spec` → `-D CHAIN spec`: deletes the first rule with that spec.
            payload += &format!("-D {}\n", &line[3..]);
        }
        if !kept {
            payload += &chain.jump;
            payload.push('\n');
        }
        for rule in &chain.rules {
            payload += rule;
            payload.push('\n');
        }
        payload += "COMMIT\n";
    }
    payload
}

/// The differences for every chain (reads each table once).
pub(super) fn check(chains: &[IptChain]) -> Result<Vec<String>> {
    Ok(read_all(chains)?.iter().flat_map(|(chain, saved)| problems(chain, saved)).collect())
}

/// Reads the tables; when anything differs, reports the differences and applies the one
/// batch. Returns the differences that were repaired (empty: nothing was written).
pub(super) fn ensure(chains: &[IptChain], features: Features, report: impl FnOnce(&[String])) -> Result<Vec<String>> {
    let observed = read_all(chains)?;
    let problems: Vec<String> = observed.iter().flat_map(|(chain, saved)| problems(chain, saved)).collect();
    if problems.is_empty() {
        return Ok(problems);
    }
    report(&problems);
    let payload = restore_payload(&observed);
    let mut args = vec!["--noflush"];
    if features.wait {
        args.push("--wait");
    }
    run("iptables-restore", &args, Some(&payload)).with_context(|| format!("applying\n{payload}"))?;
    Ok(problems)
}

fn read_all(chains: &[IptChain]) -> Result<Vec<(IptChain, SavedTable)>> {
    let mut tables: BTreeMap<&str, SavedTable> = BTreeMap::new();
    let mut observed = Vec::new();
    for chain in chains {
        if !tables.contains_key(chain.table) {
            tables.insert(chain.table, SavedTable::read(chain.table)?);
        }
        observed.push((chain.clone(), tables[chain.table].clone()));
    }
    Ok(observed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::masq::rules::{forward_chain, masq_chain};

    fn masq() -> IptChain {
        masq_chain("10.244.0.0/16".parse().unwrap(), "10.244.1.0/24".parse().unwrap(), true, true)
    }

    /// iptables-save of a nat table with `chain` installed exactly, plus someone else's rule.
    fn installed(chain: &IptChain) -> String {
        let mut text = format!(
            "# Generated by iptables-save v1.8.9 (nf_tables)\n*{}\n:{} ACCEPT [0:0]\n:{} - [0:0]\n:KUBE-POSTROUTING - [0:0]\n",
            chain.table, chain.hook, chain.chain
        );
        text +=
            &format!("-A {} -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n", chain.hook);
        text += &format!("{}\n", chain.jump);
        for rule in &chain.rules {
            text += &format!("{rule}\n");
        }
        text + "COMMIT\n# Completed\n"
    }

    #[test]
    fn version() {
        assert_eq!(parse_version("iptables v1.8.9 (nf_tables)\n"), Some((1, 8, 9)));
        assert_eq!(parse_version("iptables v1.4.21"), Some((1, 4, 21)));
        assert_eq!(parse_version("iptables v1.6"), Some((1, 6, 0)));
        assert_eq!(parse_version("whatever"), None);
        assert_eq!(Features::of((1, 6, 2)), Features { random_fully: true, wait: true });
        assert_eq!(Features::of((1, 6, 1)), Features { random_fully: false, wait: false });
        assert!(!Features::of((1, 4, 21)).random_fully);
    }

    #[test]
    fn parse_save() {
        let saved = SavedTable::parse(&installed(&masq()));
        assert!(saved.chains.contains("FLANNEL-POSTRTG") && saved.chains.contains("POSTROUTING"));
        assert_eq!(saved.rules["FLANNEL-POSTRTG"], masq().rules);
        assert_eq!(saved.rules["POSTROUTING"].len(), 2);
    }

    #[test]
    fn installed_chain_has_no_problems() {
        let chain = masq();
        assert_eq!(problems(&chain, &SavedTable::parse(&installed(&chain))), Vec::<String>::new());
    }

    #[test]
    fn empty_table_is_all_problems_and_full_payload() {
        let chain = masq();
        let saved = SavedTable::parse("*nat\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n");
        let found = problems(&chain, &saved);
        assert_eq!(found[0], "nat: chain FLANNEL-POSTRTG missing");
        assert_eq!(found.len(), 1 + 6 + 1, "{found:#?}");
        let expected = format!("*nat\n:FLANNEL-POSTRTG - [0:0]\n{}\n{}\nCOMMIT\n", chain.jump, chain.rules.join("\n"));
        assert_eq!(restore_payload(&[(chain, saved)]), expected);
    }

    #[test]
    fn missing_rule_is_named() {
        let chain = masq();
        let text = installed(&chain).replace(&format!("{}\n", chain.rules[4]), "");
        assert_eq!(problems(&chain, &SavedTable::parse(&text)), [format!("nat: missing `{}`", chain.rules[4])]);
    }

    /// Another subnet's rules show up as unexpected; the payload's chain declaration flushes
    /// them, and the jump already present is left where it is.
    #[test]
    fn old_subnet_rules_are_replaced() {
        let old = masq_chain("10.244.0.0/16".parse().unwrap(), "10.244.7.0/24".parse().unwrap(), true, true);
        let chain = masq();
        let saved = SavedTable::parse(&installed(&old));
        let found = problems(&chain, &saved);
        assert_eq!(found.len(), 6, "{found:#?}");
        assert!(found.iter().any(|p| p.contains("unexpected") && p.contains("10.244.7.0/24")));
        let expected = format!("*nat\n:FLANNEL-POSTRTG - [0:0]\n{}\nCOMMIT\n", chain.rules.join("\n"));
        assert_eq!(restore_payload(&[(chain, saved)]), expected);
    }

    /// Duplicate jumps and an old flanneld's rules straight in POSTROUTING are deleted.
    #[test]
    fn stale_hook_rules_are_deleted() {
        let chain = masq();
        let text = installed(&chain).replace(
            "COMMIT",
            "-A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\n\
             -A POSTROUTING -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment \"flanneld masq\" -j RETURN\n\
             -A POSTROUTING -j FLANNEL-POSTRTG\nCOMMIT",
        );
        let saved = SavedTable::parse(&text);
        let found = problems(&chain, &saved);
        assert_eq!(found.len(), 3, "{found:#?}");
        assert!(found.iter().all(|p| p.starts_with("nat: stale `-A POSTROUTING")));
        let payload = restore_payload(&[(chain.clone(), saved)]);
        let expected = format!(
            "*nat\n:FLANNEL-POSTRTG - [0:0]\n\
             -D POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\n\
             -D POSTROUTING -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment \"flanneld masq\" -j RETURN\n\
             -D POSTROUTING -j FLANNEL-POSTRTG\n{}\nCOMMIT\n",
            chain.rules.join("\n")
        );
        assert_eq!(payload, expected);
    }

    #[test]
    fn reordered_rules_are_a_problem() {
        let chain = masq();
        let mut swapped = chain.clone();
        swapped.rules.swap(4, 5);
        let found = problems(&chain, &SavedTable::parse(&installed(&swapped)));
        assert_eq!(found, ["nat: FLANNEL-POSTRTG rules out of order or duplicated"]);
    }

    #[test]
    fn two_tables_in_one_payload() {
        let (nat, filter) = (masq(), forward_chain("10.244.0.0/16".parse().unwrap()));
        let payload = restore_payload(&[
            (nat.clone(), SavedTable::parse(&installed(&nat))),
            (filter.clone(), SavedTable::default()),
        ]);
        assert!(payload.starts_with("*nat\n:FLANNEL-POSTRTG - [0:0]\n-A FLANNEL-POSTRTG"));
        assert!(payload.ends_with(&format!(
            "COMMIT\n*filter\n:FLANNEL-FWD - [0:0]\n{}\n{}\n{}\nCOMMIT\n",
            filter.jump, filter.rules[0], filter.rules[1]
        )));
    }
}
