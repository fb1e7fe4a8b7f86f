//! What the benchmark harnesses (`tests/benches/*.rs`, run by `cargo xtask bench <suite>`)
//! share: their common arguments (`--quick`, `--smoke`, `--rounds N`), medians and ratios,
//! and the `Machine:` / `Command:` lines every report starts with, so a pasted table says
//! where it was measured and how to reproduce it. Each bench keeps its own parameters (what a
//! round measures, for how long) and picks them per [`Mode`].

use std::{fmt::Display, str::FromStr};

use anyhow::{bail, Context, Result};

/// How long a run is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The run whose numbers go into BENCHMARKS.md.
    Full,
    /// `--quick`: fewer rounds and shorter measurements; numbers are rough.
    Quick,
    /// `--smoke`: the harness end to end in a few seconds (`cargo xtask test`); numbers are
    /// meaningless.
    Smoke,
}

impl Mode {
    /// `full`, `quick` or `smoke`, whichever this mode is.
    pub fn pick<T>(self, full: T, quick: T, smoke: T) -> T {
        match self {
            Mode::Full => full,
            Mode::Quick => quick,
            Mode::Smoke => smoke,
        }
    }
}

/// A bench's command line.
#[derive(Clone, Debug)]
pub struct BenchArgs {
    /// The arguments after the program name, without the `--bench` that `cargo bench` adds.
    argv: Vec<String>,
}

impl BenchArgs {
    /// This process's arguments.
    pub fn from_env() -> BenchArgs {
        BenchArgs::new(std::env::args().skip(1))
    }

    /// `args` without the program name.
    pub fn new(args: impl IntoIterator<Item = String>) -> BenchArgs {
        BenchArgs { argv: args.into_iter().filter(|a| a != "--bench").collect() }
    }

    /// `--smoke` wins over `--quick`: a smoke run must stay short whatever else is asked.
    pub fn mode(&self) -> Mode {
        if self.has("--smoke") {
            Mode::Smoke
        } else if self.has("--quick") {
            Mode::Quick
        } else {
            Mode::Full
        }
    }

    /// `--rounds N` (at least 1), else `full` in a full run and one round otherwise.
    pub fn rounds(&self, full: usize) -> Result<usize> {
        let rounds = self.value("--rounds")?.unwrap_or(self.mode().pick(full, 1, 1));
        if rounds == 0 {
            bail!("--rounds must be at least 1");
        }
        Ok(rounds)
    }

    /// Whether `flag` was given.
    fn has(&self, flag: &str) -> bool {
        self.argv.iter().any(|a| a == flag)
    }

    /// The value after `flag` (`--flag VALUE`), parsed; `None` when the flag is absent.
    pub fn value<T: FromStr>(&self, flag: &str) -> Result<Option<T>>
    where
        T::Err: Display,
    {
        let Some(at) = self.argv.iter().position(|a| a == flag) else {
            return Ok(None);
        };
        let text = self.argv.get(at + 1).with_context(|| format!("{flag} needs a value"))?;
        text.parse().map(Some).map_err(|e| anyhow::anyhow!("{flag} {text}: {e}"))
    }

    /// The line naming the command that reproduces this run, e.g. ``Command: `cargo xtask
    /// bench datapath --quick` `` (`suite` as `cargo xtask bench` spells it).
    pub fn command_line(&self, suite: &str) -> String {
        let command = std::iter::once(format!("cargo xtask bench {suite}")).chain(self.argv.iter().cloned());
        format!("Command: `{}`", command.collect::<Vec<_>>().join(" "))
    }
}

/// The median of `values` (the upper one of an even count), sorting them in place.
///
/// Panics on an empty slice: every bench measures at least one round.
pub fn median<T: PartialOrd + Copy>(values: &mut [T]) -> T {
    assert!(!values.is_empty(), "median of no samples");
    values.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    values[values.len() / 2]
}

/// `value / base` with two decimals, or `-` when there is no base to compare with.
pub fn ratio(value: f64, base: f64) -> String {
    if base > 0.0 {
        format!("{:.2}", value / base)
    } else {
        "-".into()
    }
}

/// The machine a report was measured on: cores (with the CPU model when /proc/cpuinfo names
/// one) and kernel, e.g. `2 cores (AMD EPYC), Linux 6.18.44`.
pub fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|m| m.trim_start_matches([' ', '\t', ':']).to_string()));
    let cpu = cpu.map(|model| format!(" ({model})")).unwrap_or_default();
    format!("{cores} cores{cpu}, Linux {}", kernel.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> BenchArgs {
        BenchArgs::new(line.split_whitespace().map(String::from))
    }

    #[test]
    fn mode_rounds_and_values() {
        assert_eq!(args("--bench").mode(), Mode::Full);
        assert_eq!(args("--quick").mode(), Mode::Quick);
        assert_eq!(args("--quick --smoke").mode(), Mode::Smoke);
        assert_eq!(args("--bench").rounds(3).unwrap(), 3);
        assert_eq!(args("--quick").rounds(3).unwrap(), 1);
        assert_eq!(args("--smoke --rounds 2").rounds(3).unwrap(), 2);
        assert!(args("--rounds 0").rounds(3).is_err());
        assert!(args("--rounds x").rounds(3).is_err());
        assert!(args("--rounds").rounds(3).is_err());
        assert_eq!(args("--svg a.svg").value::<String>("--svg").unwrap().as_deref(), Some("a.svg"));
        assert_eq!(args("--bench --quick").command_line("datapath"), "Command: `cargo xtask bench datapath --quick`");
    }

    #[test]
    fn median_and_ratio() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4, 1, 3, 2]), 3);
        assert_eq!(ratio(1.0, 4.0), "0.25");
        assert_eq!(ratio(1.0, 0.0), "-");
    }
}
