//! `cargo xtask loadtest`: load across pods on the testbed. Client pods on
//! every node open connections (connect + 64 B echo + close) through one
//! Service VIP, whose endpoints are server pods on every node, at a given
//! rate and concurrency; the agents' access logs then show whether every
//! connection was mTLS. Agents run with `--force-mtls-local`, so connections
//! between meshed pods of the same node are mTLS too and 100 % is the bar.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use sealmesh_common::cluster::{Service, ServicePort};
use serde_json::{Value, json};

use crate::{
    bench::loadgen::{Histogram, Loadgen, LoadgenError, Report, tune_sysctls},
    mesh::{self, Mesh, MeshError, MeshOptions},
    testbed::{ChildGuard, PodSpec, TestbedSpec},
};

const NAMESPACE: &str = "load";
const SERVICE: &str = "server";
const SERVICE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const SERVICE_PORT: u16 = 80;
const ECHO_PORT: u16 = 8080;
const PAYLOAD: usize = 64;
/// How long the agents get to log the last connections after the clients end.
const ACCESS_LOG_GRACE: Duration = Duration::from_secs(15);

#[derive(Clone, Debug, clap::Args)]
pub struct LoadtestArgs {
    #[arg(long, default_value_t = 2)]
    pub nodes: usize,
    #[arg(long, default_value_t = 2)]
    pub clients_per_node: usize,
    /// New connections per second over all clients (0: as fast as they go).
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    /// Connections open at once per client pod.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// How long the clients run, e.g. `10s`, `1m`.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Print one JSON object with the results as the last line.
    #[arg(long)]
    pub json: bool,
    /// Run on the kind cluster `cargo xtask kind --keep` left (needs docker,
    /// kind and kubectl; --nodes counts its worker nodes).
    #[arg(long)]
    pub kind: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadtestError {
    #[error(transparent)]
    Mesh(#[from] MeshError),
    #[error(transparent)]
    Loadgen(#[from] LoadgenError),
    #[error(transparent)]
    Kind(#[from] crate::kind::KindError),
    #[error("invalid load: {0}")]
    BadArgs(String),
    #[error("loadgen in pod {pod} reported {report:?}, expected a load report")]
    UnexpectedReport { pod: String, report: Box<Report> },
}

/// What a load test found; [`Outcome::passed`] decides the exit status.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub connections: u64,
    pub errors: u64,
    pub bytes: u64,
    pub latency: Histogram,
    pub seconds: f64,
    /// Outbound access-log events of the load clients' connections.
    pub logged: u64,
    pub logged_mtls: u64,
    /// Logged connections per destination pod.
    pub per_server: BTreeMap<String, u64>,
    pub first_error: Option<String>,
}

impl Outcome {
    /// Adds the `load` report of the client `client`; any other report is
    /// handed back.
    pub fn add_client_report(&mut self, client: &str, report: Report) -> Result<(), Report> {
        let Report::Load {
            connections,
            errors,
            bytes,
            seconds,
            latency,
            first_error,
        } = report
        else {
            return Err(report);
        };
        self.connections += connections;
        self.errors += errors;
        self.bytes += bytes;
        self.seconds = self.seconds.max(seconds);
        self.latency.merge(&latency);
        if self.first_error.is_none() {
            self.first_error = first_error.map(|e| format!("{client}: {e}"));
        }
        Ok(())
    }

    /// Replaces the access-log counts with those of `events` (access-log
    /// JSON lines) that are outbound connections of pods named
    /// `<client_prefix>...`.
    pub fn tally_client_connections<'a>(
        &mut self,
        events: impl IntoIterator<Item = &'a serde_json::Value>,
        client_prefix: &str,
    ) {
        self.logged = 0;
        self.logged_mtls = 0;
        self.per_server = BTreeMap::new();
        let of_clients = events.into_iter().filter(|e| {
            e["direction"] == "outbound"
                && e["src"]
                    .as_str()
                    .is_some_and(|src| src.starts_with(client_prefix))
        });
        for event in of_clients {
            self.logged += 1;
            if event["tls"] == true {
                self.logged_mtls += 1;
            }
            let dst = event["dst"].as_str().unwrap_or("").to_owned();
            *self.per_server.entry(dst).or_default() += 1;
        }
    }

    pub fn mtls_fraction(&self) -> f64 {
        if self.logged == 0 {
            0.0
        } else {
            self.logged_mtls as f64 / self.logged as f64
        }
    }

    /// No errors, every connection logged, and every logged one mTLS.
    pub fn passed(&self) -> bool {
        self.errors == 0
            && self.connections > 0
            && self.logged >= self.connections
            && self.logged_mtls == self.logged
    }

    pub fn to_json(&self, args: &LoadtestArgs) -> Value {
        json!({
            "passed": self.passed(),
            "connections": self.connections,
            "errors": self.errors,
            "bytes": self.bytes,
            "seconds": self.seconds,
            "connections_per_s": self.connections as f64 / self.seconds,
            "latency_p50_us": self.latency.quantile_us(0.50),
            "latency_p99_us": self.latency.quantile_us(0.99),
            "mtls_fraction": self.mtls_fraction(),
            "logged_connections": self.logged,
            "logged_mtls_connections": self.logged_mtls,
            "per_server": self.per_server,
            "first_error": self.first_error,
            "nodes": args.nodes,
            "clients_per_node": args.clients_per_node,
            "rate": args.rate,
            "concurrency": args.concurrency,
            "duration_s": args.duration.as_secs_f64(),
        })
    }

    pub fn table(&self) -> String {
        let mut out = String::new();
        let optional = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
        let rows = [
            ("connections", self.connections.to_string()),
            ("errors", self.errors.to_string()),
            (
                "connections/s",
                format!("{:.1}", self.connections as f64 / self.seconds),
            ),
            ("latency p50 us", optional(self.latency.quantile_us(0.50))),
            ("latency p99 us", optional(self.latency.quantile_us(0.99))),
            ("bytes", self.bytes.to_string()),
            (
                "mTLS",
                format!(
                    "{:.2} % ({} of {} logged)",
                    self.mtls_fraction() * 100.0,
                    self.logged_mtls,
                    self.logged
                ),
            ),
        ];
        for (label, value) in rows {
            let _ = writeln!(out, "{label:<16} {value}");
        }
        for (server, count) in &self.per_server {
            let _ = writeln!(out, "{:<16} {count} to {server}", "  by server");
        }
        if let Some(error) = &self.first_error {
            let _ = writeln!(out, "first error      {error}");
        }
        let _ = writeln!(
            out,
            "result           {}",
            if self.passed() { "PASS" } else { "FAIL" }
        );
        out
    }
}

fn check(args: &LoadtestArgs) -> Result<(), LoadtestError> {
    if args.nodes == 0 || args.clients_per_node == 0 || args.concurrency == 0 {
        return Err(LoadtestError::BadArgs(
            "--nodes, --clients-per-node and --concurrency must be at least 1".into(),
        ));
    }
    if !(args.rate >= 0.0 && args.rate.is_finite()) || args.duration.is_zero() {
        return Err(LoadtestError::BadArgs(
            "--rate must be 0 (unlimited) or more, --duration more than 0".into(),
        ));
    }
    Ok(())
}

fn client_name(node: usize, index: usize) -> String {
    format!("client-{node}-{index}")
}

fn spec(args: &LoadtestArgs) -> TestbedSpec {
    let mut spec = TestbedSpec::new(args.nodes).meshed_namespace(NAMESPACE);
    for node in 0..args.nodes {
        spec = spec.pod(
            PodSpec::new(NAMESPACE, &format!("server-{node}"), "server", node)
                .label("app", SERVICE),
        );
        for index in 0..args.clients_per_node {
            spec = spec.pod(
                PodSpec::new(NAMESPACE, &client_name(node, index), "client", node)
                    .label("app", "client"),
            );
        }
    }
    spec.service(Service {
        name: SERVICE.into(),
        namespace: NAMESPACE.into(),
        vip: SERVICE_VIP,
        ports: vec![ServicePort {
            name: None,
            port: SERVICE_PORT,
            target_port: ECHO_PORT,
        }],
        selector: BTreeMap::from([("app".into(), SERVICE.into())]),
    })
}

/// Runs the load test and prints its table (and JSON line).
pub fn run(args: &LoadtestArgs) -> Result<Outcome, LoadtestError> {
    check(args)?;
    if args.kind {
        let outcome = crate::kind::loadtest(args)?;
        print!("{}", outcome.table());
        if args.json {
            println!("{}", outcome.to_json(args));
        }
        return Ok(outcome);
    }
    crate::testbed::require_root().map_err(MeshError::from)?;
    let options = MeshOptions {
        agent_args: vec!["--force-mtls-local".into()],
        ..MeshOptions::default()
    };
    let mesh = Mesh::up(&spec(args), options)?;
    tune_sysctls(&mesh)?;
    let loadgen = mesh::locate_binary("loadgen")?;
    let cluster = mesh.testbed().cluster();

    let mut servers: Vec<ChildGuard> = Vec::new();
    let server_pods: Vec<_> = cluster
        .pods
        .iter()
        .filter(|p| p.labels.get("app").map(String::as_str) == Some(SERVICE))
        .collect();
    for pod in &server_pods {
        let listen = SocketAddr::from((pod.ip, ECHO_PORT)).to_string();
        servers.push(
            in_pod(&loadgen, &mesh, &pod.name)
                .start(&["echo".into(), "--listen".into(), listen])?
                .0,
        );
    }

    let clients: Vec<String> = (0..args.nodes)
        .flat_map(|node| (0..args.clients_per_node).map(move |i| client_name(node, i)))
        .collect();
    let client_args = vec![
        "load".to_owned(),
        "--connect".into(),
        SocketAddr::from((SERVICE_VIP, SERVICE_PORT)).to_string(),
        "--rate".into(),
        (args.rate / clients.len() as f64).to_string(),
        "--concurrency".into(),
        args.concurrency.to_string(),
        "--seconds".into(),
        args.duration.as_secs_f64().to_string(),
        "--size".into(),
        PAYLOAD.to_string(),
    ];
    tracing::info!(
        clients = clients.len(),
        servers = server_pods.len(),
        "load running for {:?}",
        args.duration
    );
    let reports: Vec<(String, Result<Report, LoadgenError>)> = std::thread::scope(|scope| {
        let running: Vec<_> = clients
            .iter()
            .map(|pod| {
                let loadgen = in_pod(&loadgen, &mesh, pod);
                let client_args = &client_args;
                (pod.clone(), scope.spawn(move || loadgen.run(client_args)))
            })
            .collect();
        running
            .into_iter()
            .map(|(pod, handle)| (pod, handle.join().expect("loadgen runner does not panic")))
            .collect()
    });

    let mut outcome = Outcome::default();
    for (pod, report) in reports {
        if let Err(report) = outcome.add_client_report(&pod, report?) {
            return Err(LoadtestError::UnexpectedReport {
                pod,
                report: Box::new(report),
            });
        }
    }
    count_access_log(&mesh, &mut outcome)?;
    drop(servers);

    print!("{}", outcome.table());
    if args.json {
        println!("{}", outcome.to_json(args));
    }
    Ok(outcome)
}

fn in_pod<'a>(binary: &'a Path, mesh: &'a Mesh, pod: &'a str) -> Loadgen<'a> {
    Loadgen {
        binary,
        testbed: mesh.testbed(),
        namespace: NAMESPACE,
        pod,
    }
}

/// Counts the load clients' outbound connections in every agent's access
/// log, waiting for the last ones to close and be logged.
fn count_access_log(mesh: &Mesh, outcome: &mut Outcome) -> Result<(), LoadtestError> {
    let nodes: Vec<String> = mesh
        .testbed()
        .cluster()
        .nodes
        .iter()
        .map(|n| n.name.clone())
        .collect();
    let client_prefix = format!("{NAMESPACE}/client-");
    let deadline = Instant::now() + ACCESS_LOG_GRACE;
    loop {
        let mut events = Vec::new();
        for node in &nodes {
            events.extend(mesh.access_log(node)?);
        }
        outcome.tally_client_connections(&events, &client_prefix);
        if outcome.logged >= outcome.connections || Instant::now() > deadline {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
