//! `cargo xtask chaos`: fault-injection scenarios on the local testbed, each
//! under a steady load of meshed cross-node connections, each reporting
//! PASS/FAIL with the figures it measured.
//!
//! Every scenario brings up its own 2-node mesh ([`Bed`]): a client pod on
//! node-0 and an echo server pod on node-1 in a meshed namespace. The load
//! (`chaosload steady`, [`load`]) starts new connections at `--rate` and
//! keeps `--streams` long-lived streams; every message carries a marker that
//! an underlay capture looks for, so each scenario also proves that nothing
//! of the load crossed the wire in clear. A scenario is one function and one
//! row of [`SCENARIOS`].

mod agent;
mod identity;
pub mod load;
mod network;
mod rotation;
mod scale;

use std::{
    fmt::Write as _,
    net::SocketAddr,
    panic::AssertUnwindSafe,
    path::PathBuf,
    time::{Duration, Instant},
};

use sealmesh_common::consts::AGENT_ADMIN_PORT;
use sealmesh_proto::admin::{self as pb, admin_client::AdminClient};
use serde_json::{Value, json};

use crate::{
    bench::loadgen::{Loadgen, LoadgenError, tune_sysctls},
    capture::{Capture, CaptureReport},
    mesh::{self, Mesh, MeshError, MeshOptions},
    testbed::{ChildGuard, PodSpec, TestbedError, TestbedSpec, kube::TestbedKubeError},
};
use load::{RunningLoad, Timeline};

/// The meshed namespace of the scenarios' pods.
const NAMESPACE: &str = "chaos";
const CLIENT_POD: &str = "client";
const SERVER_POD: &str = "server";
/// Node of the client pod (the source side) and of the server pod.
const CLIENT_NODE: &str = "node-0";
const SERVER_NODE: &str = "node-1";
const ECHO_PORT: u16 = 8080;
/// What every message of the load carries; never seen in clear on the underlay.
pub const MARKER: &str = "sealmesh-chaos-plaintext-marker-4b1e";
/// How long the load gets to show it works before a fault.
const WARM_UP: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, clap::Args)]
pub struct ChaosArgs {
    /// Run only this scenario (repeat for several); all by default.
    #[arg(long, value_name = "NAME")]
    pub only: Vec<String>,
    /// Print one JSON object with every scenario's result as the last line.
    #[arg(long)]
    pub json: bool,
    /// New connections per second of the steady load.
    #[arg(long, default_value_t = 40.0)]
    pub rate: f64,
    /// Long-lived streams of the steady load.
    #[arg(long, default_value_t = 4)]
    pub streams: usize,
    /// `scale`: concurrent connections through one agent pair.
    #[arg(long, default_value_t = 10_000)]
    pub connections: usize,
    /// `scale`: how long they are held, e.g. `60s`.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub hold: Duration,
    /// `identity-flood`: bogus Certify calls per second.
    #[arg(long, default_value_t = 1000)]
    pub bogus_rate: u32,
}

impl Default for ChaosArgs {
    fn default() -> Self {
        Self {
            only: Vec::new(),
            json: false,
            rate: 40.0,
            streams: 4,
            connections: 10_000,
            hold: Duration::from_secs(60),
            bogus_rate: 1000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ChaosError {
    #[error(transparent)]
    Mesh(#[from] MeshError),
    #[error(transparent)]
    Testbed(#[from] TestbedError),
    #[error(transparent)]
    Loadgen(#[from] LoadgenError),
    #[error(transparent)]
    Kube(Box<TestbedKubeError>),
    #[error("cannot create certificates: {0}")]
    Pki(#[from] sealmesh_pki::PkiError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout { what: String, timeout: Duration },
    #[error("the load (chaosload) in pod {pod} exited; its stderr: {stderr}")]
    LoadExited { pod: String, stderr: String },
    #[error("{command} failed: {detail}")]
    Command { command: String, detail: String },
    #[error("admin API of the agent on {node}: {detail}")]
    Admin { node: String, detail: String },
    #[error("the identity flood: {0}")]
    Flood(String),
    #[error("unknown scenario {name:?}; the scenarios are: {known}")]
    UnknownScenario { name: String, known: String },
    #[error("invalid arguments: {0}")]
    BadArgs(String),
}

impl From<TestbedKubeError> for ChaosError {
    fn from(error: TestbedKubeError) -> Self {
        Self::Kube(Box::new(error))
    }
}

/// One fault-injection scenario.
pub struct Scenario {
    pub name: &'static str,
    /// What a pass proves, in one line.
    pub proves: &'static str,
    pub run: fn(&ChaosArgs) -> Result<Findings, ChaosError>,
}

/// Every scenario, in the order they run.
pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "agent-restart",
        proves: "a SIGKILLed agent restarted as a kubelet would fails connections closed only while it is down, never in clear",
        run: agent::agent_restart,
    },
    Scenario {
        name: "rolling-update",
        proves: "replacing every agent as a rolling update does (the new one takes the old one's listening sockets) fails no new connection",
        run: agent::rolling_update,
    },
    Scenario {
        name: "identity-outage",
        proves: "an identity service outage spanning a renewal costs no connection while certificates are valid, and renewals resume when it returns",
        run: identity::identity_outage,
    },
    Scenario {
        name: "issuer-rotation",
        proves: "replacing the issuer under load moves every leaf to it without failing a connection",
        run: rotation::issuer_rotation,
    },
    Scenario {
        name: "anchor-rotation",
        proves: "a root rotation under load (add the new anchor, move the issuer to it, remove the old anchor) fails no connection",
        run: rotation::anchor_rotation,
    },
    Scenario {
        name: "peer-partition",
        proves: "while the underlay between the nodes drops everything, new connections fail fast, and after it heals the pool reconnects within a bound",
        run: network::peer_partition,
    },
    Scenario {
        name: "scale",
        proves: "one agent pair holds --connections concurrent mTLS connections for --hold with no error, at a measured memory cost and accept latency",
        run: scale::scale,
    },
    Scenario {
        name: "identity-flood",
        proves: "a flood of bogus CSRs from a pod does not keep agents' real renewals from succeeding within their deadline",
        run: identity::identity_flood,
    },
];

/// What a scenario measured and what it found wrong (nothing: it passed).
#[derive(Clone, Debug, Default)]
pub struct Findings {
    pub figures: Vec<(String, Value)>,
    pub problems: Vec<String>,
}

impl Findings {
    /// Records a figure; floats are kept to three decimals.
    pub fn figure(&mut self, key: &str, value: impl Into<Value>) {
        let value = match value.into() {
            Value::Number(n) if n.is_f64() => {
                let rounded = (n.as_f64().unwrap_or(f64::NAN) * 1000.0).round() / 1000.0;
                json!(rounded)
            }
            other => other,
        };
        self.figures.push((key.to_owned(), value));
    }

    /// Records `problem` unless `ok`.
    pub fn check(&mut self, ok: bool, problem: impl FnOnce() -> String) {
        if !ok {
            self.problems.push(problem());
        }
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.figures.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The load's counts and the capture's verdict, which every scenario reports.
    fn load(&mut self, timeline: &Timeline, capture: &CaptureReport) {
        self.figure("connections_ok", timeline.ok());
        self.figure("connections_failed", timeline.failed().count());
        self.figure("stream_breaks", timeline.stream_breaks.len());
        self.figure("underlay_frames", capture.frames);
        let plaintext = capture.hits_for(MARKER);
        self.figure("plaintext_frames", plaintext);
        self.check(plaintext == 0, || {
            format!("{plaintext} underlay frames carried the load's marker in clear")
        });
        self.check(timeline.ok() > 0, || {
            "the load made no successful connection".to_owned()
        });
    }
}

/// A scenario's result.
#[derive(Clone, Debug)]
pub struct ScenarioResult {
    pub name: &'static str,
    pub proves: &'static str,
    pub seconds: f64,
    pub findings: Findings,
}

impl ScenarioResult {
    pub fn passed(&self) -> bool {
        self.findings.problems.is_empty()
    }

    pub fn to_json(&self) -> Value {
        let figures: serde_json::Map<String, Value> =
            self.findings.figures.iter().cloned().collect();
        json!({
            "name": self.name,
            "passed": self.passed(),
            "proves": self.proves,
            "seconds": (self.seconds * 10.0).round() / 10.0,
            "figures": figures,
            "problems": self.findings.problems,
        })
    }

    pub fn text(&self) -> String {
        let mut out = String::new();
        let verdict = if self.passed() { "PASS" } else { "FAIL" };
        let _ = writeln!(out, "{}  {verdict}  ({:.1} s)", self.name, self.seconds);
        let _ = writeln!(out, "  proves: {}", self.proves);
        for (key, value) in &self.findings.figures {
            let _ = writeln!(out, "  {key:<38} {}", display(value));
        }
        for problem in &self.findings.problems {
            let _ = writeln!(out, "  problem: {problem}");
        }
        out
    }
}

fn display(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    }
}

/// Every selected scenario's result.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub results: Vec<ScenarioResult>,
}

impl Report {
    pub fn passed(&self) -> bool {
        !self.results.is_empty() && self.results.iter().all(ScenarioResult::passed)
    }

    pub fn get(&self, name: &str) -> Option<&ScenarioResult> {
        self.results.iter().find(|r| r.name == name)
    }

    pub fn to_json(&self) -> Value {
        json!({
            "passed": self.passed(),
            "scenarios": self.results.iter().map(ScenarioResult::to_json).collect::<Vec<_>>(),
        })
    }

    pub fn summary(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "{:<18} {:<6} {:>8}", "scenario", "result", "seconds");
        for result in &self.results {
            let _ = writeln!(
                out,
                "{:<18} {:<6} {:>8.1}",
                result.name,
                if result.passed() { "PASS" } else { "FAIL" },
                result.seconds
            );
        }
        out
    }
}

/// The scenarios `only` names (all when empty), in [`SCENARIOS`] order.
pub fn select(only: &[String]) -> Result<Vec<&'static Scenario>, ChaosError> {
    for name in only {
        if !SCENARIOS.iter().any(|s| s.name == name) {
            return Err(ChaosError::UnknownScenario {
                name: name.clone(),
                known: SCENARIOS
                    .iter()
                    .map(|s| s.name)
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
    }
    Ok(SCENARIOS
        .iter()
        .filter(|s| only.is_empty() || only.iter().any(|n| n == s.name))
        .collect())
}

/// Runs the selected scenarios, one after another, and returns their
/// results; a scenario that errs or panics fails with that as its problem.
pub fn run_scenarios(args: &ChaosArgs) -> Result<Report, ChaosError> {
    if !(args.rate > 0.0 && args.rate.is_finite()) || args.connections == 0 {
        return Err(ChaosError::BadArgs(
            "--rate must be more than 0 and --connections at least 1".into(),
        ));
    }
    crate::testbed::require_root()?;
    let mut report = Report::default();
    for scenario in select(&args.only)? {
        tracing::info!(scenario = scenario.name, "running: {}", scenario.proves);
        let started = Instant::now();
        let findings = match std::panic::catch_unwind(AssertUnwindSafe(|| (scenario.run)(args))) {
            Ok(Ok(findings)) => findings,
            Ok(Err(error)) => Findings {
                figures: Vec::new(),
                problems: vec![format!("the scenario could not run: {error}")],
            },
            Err(panic) => Findings {
                figures: Vec::new(),
                problems: vec![format!(
                    "the scenario panicked: {}",
                    panic
                        .downcast_ref::<String>()
                        .map(String::as_str)
                        .or_else(|| panic.downcast_ref::<&str>().copied())
                        .unwrap_or("(no message)")
                )],
            },
        };
        let result = ScenarioResult {
            name: scenario.name,
            proves: scenario.proves,
            seconds: started.elapsed().as_secs_f64(),
            findings,
        };
        print!("{}", result.text());
        report.results.push(result);
    }
    Ok(report)
}

/// `cargo xtask chaos`: runs, prints the summary (and the JSON line last).
pub fn run(args: &ChaosArgs) -> Result<Report, ChaosError> {
    let report = run_scenarios(args)?;
    println!();
    print!("{}", report.summary());
    if args.json {
        println!("{}", report.to_json());
    }
    Ok(report)
}

/// The scenarios' testbed: a client pod on node-0 and an echo server pod on
/// node-1 (plus `extra` pods on node-0), meshed, with an underlay capture.
fn spec(extra: &[&str]) -> TestbedSpec {
    let mut spec = TestbedSpec::new(2)
        .meshed_namespace(NAMESPACE)
        .pod(PodSpec::new(NAMESPACE, CLIENT_POD, "client", 0))
        .pod(PodSpec::new(NAMESPACE, SERVER_POD, "server", 1));
    for pod in extra {
        spec = spec.pod(PodSpec::new(NAMESPACE, pod, pod, 0));
    }
    spec
}

/// A scenario's mesh with its echo server and underlay capture; everything
/// stops and is removed on drop.
struct Bed {
    // Dropped before the mesh.
    capture: Option<Capture>,
    _server: ChildGuard,
    mesh: Mesh,
    loads: usize,
}

impl Bed {
    fn up(options: MeshOptions) -> Result<Self, ChaosError> {
        Self::up_with(&spec(&[]), options)
    }

    fn up_with(spec: &TestbedSpec, options: MeshOptions) -> Result<Self, ChaosError> {
        let mesh = Mesh::up(spec, options)?;
        tune_sysctls(&mesh)?;
        let loadgen = mesh::locate_binary("loadgen")?;
        let listen = SocketAddr::from((pod_ip(&mesh, SERVER_POD), ECHO_PORT));
        let (server, _) = Loadgen {
            binary: &loadgen,
            testbed: mesh.testbed(),
            namespace: NAMESPACE,
            pod: SERVER_POD,
        }
        .start(&["echo".into(), "--listen".into(), listen.to_string()])?;
        let underlay = mesh.testbed().underlay_netns();
        let capture = mesh
            .testbed()
            .run_in_netns(&underlay, || Capture::start(&[MARKER]))?
            .map_err(|source| ChaosError::Io {
                what: "starting the underlay capture".into(),
                source,
            })?;
        Ok(Self {
            capture: Some(capture),
            _server: server,
            mesh,
            loads: 0,
        })
    }

    fn server_addr(&self) -> SocketAddr {
        SocketAddr::from((pod_ip(&self.mesh, SERVER_POD), ECHO_PORT))
    }

    fn log_path(&mut self, what: &str) -> PathBuf {
        self.loads += 1;
        self.mesh
            .testbed()
            .state_dir()
            .join(format!("{what}-{}.log", self.loads))
    }

    /// Starts the steady load in the client pod and waits until it works.
    fn start_load(&mut self, args: &ChaosArgs) -> Result<RunningLoad, ChaosError> {
        let log = self.log_path("chaosload");
        let load = RunningLoad::start(
            self.mesh.testbed(),
            NAMESPACE,
            CLIENT_POD,
            &load::steady_args(self.server_addr(), args.rate, args.streams, MARKER),
            &log,
        )?;
        load.wait_for_successes(0, 5, WARM_UP)?;
        Ok(load)
    }

    /// Ends the capture (a moment after the last traffic) and reports it.
    fn finish_capture(&mut self) -> Result<CaptureReport, ChaosError> {
        std::thread::sleep(Duration::from_millis(300));
        let capture = self
            .capture
            .take()
            .expect("the capture runs until finished");
        capture.finish().map_err(|source| ChaosError::Io {
            what: "reading the underlay capture".into(),
            source,
        })
    }

    /// Stops the load and the capture; records the load's figures.
    fn finish(
        &mut self,
        load: RunningLoad,
        findings: &mut Findings,
    ) -> Result<Timeline, ChaosError> {
        let timeline = Timeline::from_events(&load.stop());
        let capture = self.finish_capture()?;
        findings.load(&timeline, &capture);
        Ok(timeline)
    }

    /// The certificates the agent of `node` holds now (admin API).
    fn certificates(&self, node: &str) -> Result<pb::GetCertificatesResponse, ChaosError> {
        let testbed = self.mesh.testbed();
        let netns = testbed.node_netns(node)?.to_owned();
        let admin_err = |detail: String| ChaosError::Admin {
            node: node.to_owned(),
            detail,
        };
        testbed.run_in_netns(&netns, || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| admin_err(e.to_string()))?;
            runtime.block_on(async {
                let mut admin =
                    AdminClient::connect(format!("http://127.0.0.1:{AGENT_ADMIN_PORT}"))
                        .await
                        .map_err(|e| admin_err(e.to_string()))?;
                Ok(admin
                    .get_certificates(pb::GetCertificatesRequest {})
                    .await
                    .map_err(|e| admin_err(e.to_string()))?
                    .into_inner())
            })
        })?
    }

    /// Polls the admin API of every node until `done` holds for each.
    fn wait_certificates(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&pb::GetCertificatesResponse) -> bool,
    ) -> Result<(), ChaosError> {
        let deadline = Instant::now() + timeout;
        for node in [CLIENT_NODE, SERVER_NODE] {
            loop {
                // An agent restarting does not answer for a moment.
                if self.certificates(node).is_ok_and(|c| done(&c)) {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(ChaosError::Timeout {
                        what: format!("{node}: {what}"),
                        timeout,
                    });
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        Ok(())
    }

    /// The agent log lines of `node` with `message`, and when each was logged.
    fn agent_log_times(&self, node: &str, message: &str) -> Result<Vec<(u64, Value)>, ChaosError> {
        Ok(self
            .mesh
            .agent_log_lines(node)?
            .into_iter()
            .filter(|line| line["message"] == message)
            .filter_map(|line| Some((log_time_us(&line)?, line)))
            .collect())
    }
}

fn pod_ip(mesh: &Mesh, pod: &str) -> std::net::Ipv4Addr {
    mesh.testbed()
        .cluster()
        .pod(NAMESPACE, pod)
        .expect("the scenarios' spec has this pod")
        .ip
}

/// When a JSON log line was written ([`load::unix_micros`] clock).
fn log_time_us(line: &Value) -> Option<u64> {
    let time = humantime::parse_rfc3339_weak(line["timestamp"].as_str()?).ok()?;
    let since = time
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .ok()?;
    u64::try_from(since.as_micros()).ok()
}

/// Resident memory of a process in bytes (`VmRSS` of /proc/<pid>/status).
fn rss_bytes(pid: u32) -> Result<u64, ChaosError> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).map_err(|source| ChaosError::Io {
        what: format!("reading {path}"),
        source,
    })?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|kb| kb.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| ChaosError::Io {
            what: format!("reading VmRSS from {path}"),
            source: std::io::Error::other("no VmRSS line"),
        })
}

/// Quantile (0..=1) of `values` by nearest rank; `None` when empty.
fn quantile(values: &[f64], q: f64) -> Option<f64> {
    let mut sorted: Vec<f64> = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = crate::bench::loadgen::rank(q, sorted.len() as u64)?;
    sorted.get(usize::try_from(rank).ok()? - 1).copied()
}

/// A Rust `Debug` duration as tracing logs it (`12.5s`, `900ms`, `3µs`).
fn parse_debug_duration(text: &str) -> Option<Duration> {
    let (number, scale) = [("ns", 1e-9), ("µs", 1e-6), ("ms", 1e-3), ("s", 1.0)]
        .iter()
        .find_map(|(unit, scale)| Some((text.strip_suffix(unit)?, *scale)))?;
    Duration::try_from_secs_f64(number.parse::<f64>().ok()? * scale).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenario_names_are_unique_and_selectable() {
        let names: Vec<&str> = SCENARIOS.iter().map(|s| s.name).collect();
        let mut unique = names.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), names.len());
        assert_eq!(select(&[]).unwrap().len(), SCENARIOS.len());
        let picked = select(&["scale".into(), "agent-restart".into()]).unwrap();
        assert_eq!(
            picked.iter().map(|s| s.name).collect::<Vec<_>>(),
            ["agent-restart", "scale"],
            "in table order"
        );
        let error = select(&["nope".into()]).err().unwrap().to_string();
        assert!(
            error.contains("agent-restart, rolling-update, identity-outage"),
            "{error}"
        );
    }

    #[test]
    fn findings_round_floats_and_fail_on_problems() {
        let mut findings = Findings::default();
        findings.figure("recovery_s", 1.23456);
        findings.figure("ok", 3u64);
        findings.check(true, || unreachable!());
        let result = ScenarioResult {
            name: "x",
            proves: "y",
            seconds: 1.0,
            findings: findings.clone(),
        };
        assert!(result.passed());
        assert_eq!(result.to_json()["figures"]["recovery_s"], json!(1.235));
        findings.check(false, || "broken".into());
        let report = Report {
            results: vec![ScenarioResult { findings, ..result }],
        };
        assert!(!report.passed());
        assert_eq!(report.to_json()["scenarios"][0]["problems"][0], "broken");
    }

    #[test]
    fn helpers_parse_what_agents_log() {
        assert_eq!(
            parse_debug_duration("12.5s"),
            Some(Duration::from_millis(12_500))
        );
        assert_eq!(
            parse_debug_duration("900ms"),
            Some(Duration::from_millis(900))
        );
        assert_eq!(parse_debug_duration("3µs"), Some(Duration::from_micros(3)));
        assert_eq!(parse_debug_duration("soon"), None);
        let line = json!({"timestamp": "2026-12-04T22:42:00.250000Z"});
        assert_eq!(log_time_us(&line).map(|us| us % 1_000_000), Some(250_000));
        assert_eq!(quantile(&[3.0, 1.0, 2.0], 0.5), Some(2.0));
        assert_eq!(quantile(&[], 0.5), None);
    }
}
