//! Totals over every test binary `cargo test` ran, for one closing line that
//! says how many tests ran (cargo's own last line is the last doc-test
//! binary's, often "0 passed").

use std::{
    io::{self, BufRead, BufReader, Write},
    process::{Command, ExitStatus, Stdio},
};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TestTotals {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

impl TestTotals {
    /// Adds the counts of a `test result: ok. 3 passed; 1 failed; 2 ignored; ...` line.
    pub fn add_line(&mut self, line: &str) {
        let Some(result) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        for part in result.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(kind), Some(count)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(count) = count.parse::<u64>() else {
                continue;
            };
            match kind {
                "passed" => self.passed += count,
                "failed" => self.failed += count,
                "ignored" => self.ignored += count,
                _ => {}
            }
        }
    }

    /// `tests: N passed, N failed, N skipped`
    pub fn closing_line(&self) -> String {
        format!(
            "tests: {} passed, {} failed, {} skipped",
            self.passed, self.failed, self.ignored
        )
    }
}

/// Runs `cmd` (a `cargo test`), passing its output through while counting,
/// then prints the closing line.
pub fn run_counting(cmd: &mut Command) -> io::Result<(ExitStatus, TestTotals)> {
    let mut child = cmd.stdout(Stdio::piped()).spawn()?;
    let mut totals = TestTotals::default();
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut out = io::stdout().lock();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        totals.add_line(&line);
        writeln!(out, "{line}")?;
    }
    let status = child.wait()?;
    writeln!(out, "{}", totals.closing_line())?;
    Ok((status, totals))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_every_result_line_and_ignores_the_rest() {
        let mut totals = TestTotals::default();
        for line in [
            "running 3 tests",
            "test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s",
            "test foo ... ok",
            "test result: FAILED. 7 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.2s",
            "test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s",
        ] {
            totals.add_line(line);
        }
        assert_eq!(
            totals,
            TestTotals {
                passed: 10,
                failed: 2,
                ignored: 1
            }
        );
        assert_eq!(
            totals.closing_line(),
            "tests: 10 passed, 2 failed, 1 skipped"
        );
    }
}
