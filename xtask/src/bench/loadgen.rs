//! The `loadgen` binary's vocabulary (src/bin/loadgen.rs): the one JSON line
//! each mode prints, a mergeable latency histogram, and running a mode in a
//! testbed pod. Shared by the binary, `cargo xtask bench` and `cargo xtask
//! loadtest`, so producer and parsers cannot drift apart.

use std::{
    collections::BTreeMap,
    io::{self, BufRead, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{
    mesh::Mesh,
    testbed::{ChildGuard, Testbed, TestbedError},
};

/// The result line of a `loadgen` mode (`{"mode": "...", ...}`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum Report {
    /// A server (`echo`, `sink`) is bound and accepting.
    Listening { addr: SocketAddr },
    /// `bulk`: bytes the sink confirmed receiving over `streams` connections,
    /// from the first write until the last confirmation.
    Bulk {
        streams: usize,
        bytes: u64,
        seconds: f64,
    },
    /// `rr`: round trips of `size` bytes on one connection.
    Rr {
        count: usize,
        size: usize,
        p50_us: f64,
        p90_us: f64,
        p99_us: f64,
    },
    /// `connrate`: connect + echo + close, one after another.
    Connrate {
        connections: u64,
        errors: u64,
        seconds: f64,
        first_error: Option<String>,
    },
    /// `idle`: every connection is open and has echoed once; they are held now.
    Idle { connections: usize },
    /// `load`: connect + echo + close at a rate with bounded concurrency.
    Load {
        connections: u64,
        errors: u64,
        bytes: u64,
        seconds: f64,
        latency: Histogram,
        first_error: Option<String>,
    },
}

impl Report {
    pub fn mode(&self) -> &'static str {
        match self {
            Self::Listening { .. } => "listening",
            Self::Bulk { .. } => "bulk",
            Self::Rr { .. } => "rr",
            Self::Connrate { .. } => "connrate",
            Self::Idle { .. } => "idle",
            Self::Load { .. } => "load",
        }
    }

    /// The report as the one line loadgen prints.
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).expect("reports are plain data")
    }
}

/// Latencies in microseconds, kept to three significant digits (< 1 % error)
/// so results of many clients can be merged and still give true percentiles.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(into = "Vec<(u64, u64)>", from = "Vec<(u64, u64)>")]
pub struct Histogram {
    /// Bucket floor (µs, three significant digits) → samples.
    buckets: BTreeMap<u64, u64>,
}

// On the wire as `[[bucket, count], ...]`: JSON object keys are strings, which
// serde cannot read back as numbers inside the internally tagged [`Report`].
impl From<Histogram> for Vec<(u64, u64)> {
    fn from(histogram: Histogram) -> Self {
        histogram.buckets.into_iter().collect()
    }
}

impl From<Vec<(u64, u64)>> for Histogram {
    fn from(buckets: Vec<(u64, u64)>) -> Self {
        let mut histogram = Self::default();
        for (bucket, count) in buckets {
            *histogram.buckets.entry(bucket).or_default() += count;
        }
        histogram
    }
}

impl Histogram {
    pub fn record(&mut self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        *self.buckets.entry(three_digits(micros)).or_default() += 1;
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (bucket, count) in &other.buckets {
            *self.buckets.entry(*bucket).or_default() += count;
        }
    }

    pub fn count(&self) -> u64 {
        self.buckets.values().sum()
    }

    /// The `q` quantile (0 < q ≤ 1) in µs; `None` without samples.
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        let rank = rank(q, self.count())?;
        let mut seen = 0;
        self.buckets.iter().find_map(|(bucket, count)| {
            seen += count;
            (seen >= rank).then_some(*bucket)
        })
    }
}

/// The 1-based rank of quantile `q` among `n` samples (nearest-rank method).
pub fn rank(q: f64, n: u64) -> Option<u64> {
    (n > 0).then(|| ((q * n as f64).ceil() as u64).clamp(1, n))
}

fn three_digits(mut value: u64) -> u64 {
    let mut scale = 1;
    while value >= 1000 {
        value /= 10;
        scale *= 10;
    }
    value * scale
}

/// Sysctls set in every namespace of every column alike: back-to-back
/// connections would otherwise run out of ephemeral ports (TIME_WAIT).
const SYSCTLS: [(&str, &str); 2] = [
    ("net/ipv4/ip_local_port_range", "10000 65000"),
    ("net/ipv4/tcp_tw_reuse", "1"),
];

#[derive(Debug, thiserror::Error)]
pub enum LoadgenError {
    #[error("cannot set sysctls {SYSCTLS:?} in network namespace {netns}: {source}")]
    Sysctl { netns: String, source: io::Error },
    #[error(transparent)]
    Testbed(#[from] TestbedError),
    #[error("loadgen {mode} in pod {pod}: {source}")]
    Io {
        mode: String,
        pod: String,
        source: io::Error,
    },
    #[error("loadgen {mode} in pod {pod} printed no result: {output}")]
    NoReport {
        mode: String,
        pod: String,
        /// Exit status, stderr and stdout.
        output: String,
    },
}

/// Runs `loadgen <args>` in a pod and waits for its report.
pub struct Loadgen<'a> {
    pub binary: &'a Path,
    pub testbed: &'a Testbed,
    pub namespace: &'a str,
    pub pod: &'a str,
}

impl Loadgen<'_> {
    fn command(&self, args: &[String]) -> Command {
        let mut cmd = Command::new(self.binary);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    fn pod_name(&self) -> String {
        format!("{}/{}", self.namespace, self.pod)
    }

    /// Runs a mode to completion and returns its report.
    pub fn run(&self, args: &[String]) -> Result<Report, LoadgenError> {
        let mode = args.first().cloned().unwrap_or_default();
        let child = self
            .testbed
            .spawn_in_pod(self.namespace, self.pod, self.command(args))?;
        let output = child
            .wait_with_output()
            .map_err(|source| LoadgenError::Io {
                mode: mode.clone(),
                pod: self.pod_name(),
                source,
            })?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        stdout
            .lines()
            .rev()
            .find_map(|line| serde_json::from_str(line).ok())
            .filter(|_| output.status.success())
            .ok_or_else(|| LoadgenError::NoReport {
                mode,
                pod: self.pod_name(),
                output: describe(
                    &output.status.to_string(),
                    &String::from_utf8_lossy(&output.stderr),
                    &stdout,
                ),
            })
    }

    /// Starts a long-running mode (a server, `idle`) and returns it once it
    /// printed its first report, which is returned too.
    pub fn start(&self, args: &[String]) -> Result<(ChildGuard, Report), LoadgenError> {
        let mode = args.first().cloned().unwrap_or_default();
        let mut child = self
            .testbed
            .spawn_in_pod(self.namespace, self.pod, self.command(args))?;
        let stdout = child
            .child_mut()
            .stdout
            .take()
            .expect("stdout is piped by command()");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .map_err(|source| LoadgenError::Io {
                mode: mode.clone(),
                pod: self.pod_name(),
                source,
            })?;
        match serde_json::from_str(&line) {
            Ok(report) => Ok((child, report)),
            Err(_) => {
                let output = child.wait_with_output().ok();
                Err(LoadgenError::NoReport {
                    mode,
                    pod: self.pod_name(),
                    output: describe(
                        &output
                            .as_ref()
                            .map_or_else(|| "unknown".into(), |o| o.status.to_string()),
                        &output
                            .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                            .unwrap_or_default(),
                        &line,
                    ),
                })
            }
        }
    }
}

fn describe(status: &str, stderr: &str, stdout: &str) -> String {
    format!(
        "{status}; stderr: {:?}; stdout: {:?}",
        stderr.trim(),
        stdout.trim()
    )
}

/// Applies [`SYSCTLS`] in every node and pod namespace of the testbed.
pub fn tune_sysctls(mesh: &Mesh) -> Result<(), LoadgenError> {
    let testbed = mesh.testbed();
    let cluster = testbed.cluster();
    let mut netns: Vec<String> = Vec::new();
    for node in &cluster.nodes {
        netns.push(testbed.node_netns(&node.name)?.to_owned());
    }
    for pod in &cluster.pods {
        netns.push(testbed.pod_netns(&pod.namespace, &pod.name)?.to_owned());
    }
    for name in netns {
        // /proc/sys/net shows the network namespace of the thread that opens it.
        testbed
            .thread_in_netns(&name, move || -> io::Result<()> {
                for (key, value) in SYSCTLS {
                    std::fs::write(Path::new("/proc/sys").join(key), value)?;
                }
                Ok(())
            })?
            .join()
            .expect("the sysctl thread does not panic")
            .map_err(|source| LoadgenError::Sysctl {
                netns: name,
                source,
            })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_keeps_three_digits_and_merges() {
        let mut a = Histogram::default();
        for micros in [5, 999, 1234, 98_765] {
            a.record(Duration::from_micros(micros));
        }
        let mut b = Histogram::default();
        b.record(Duration::from_micros(1239));
        a.merge(&b);
        assert_eq!(a.count(), 5);
        assert_eq!(a.quantile_us(0.2), Some(5));
        assert_eq!(a.quantile_us(0.4), Some(999));
        assert_eq!(a.quantile_us(0.6), Some(1230));
        assert_eq!(a.quantile_us(0.8), Some(1230));
        assert_eq!(a.quantile_us(1.0), Some(98_700));
        assert_eq!(Histogram::default().quantile_us(0.5), None);
    }

    #[test]
    fn report_lines_round_trip() {
        let report = Report::Bulk {
            streams: 16,
            bytes: 10,
            seconds: 0.5,
        };
        let line = report.to_line();
        assert_eq!(
            line,
            r#"{"mode":"bulk","streams":16,"bytes":10,"seconds":0.5}"#
        );
        assert_eq!(serde_json::from_str::<Report>(&line).unwrap(), report);
    }

    #[test]
    fn load_reports_with_histograms_round_trip() {
        let mut latency = Histogram::default();
        latency.record(Duration::from_micros(1234));
        latency.record(Duration::from_micros(1234));
        let report = Report::Load {
            connections: 2,
            errors: 0,
            bytes: 256,
            seconds: 1.0,
            latency,
            first_error: None,
        };
        let line = report.to_line();
        assert!(line.contains(r#""latency":[[1230,2]]"#), "{line}");
        assert_eq!(serde_json::from_str::<Report>(&line).unwrap(), report);
    }
}
