//! Smoke tests of `cargo xtask bench` and `cargo xtask loadtest` (root): they
//! run end to end on real testbeds, print the promised JSON, and leave nothing
//! behind. Tiny durations: these check the harnesses, not performance.

use std::{
    collections::BTreeSet,
    path::Path,
    process::{Command, Output},
};

use serde_json::Value;

mod support;

use support::describe;

fn xtask(args: &[&str]) -> Output {
    xtask_with_env(args, &[])
}

fn xtask_with_env(args: &[&str], env: &[(&str, &Path)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .envs(env.iter().copied())
        .env("NO_COLOR", "1")
        .output()
        .expect("xtask runs")
}

/// The JSON object on the last line of stdout.
fn last_json_line(out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("last line is not JSON ({e}): {}", describe(out)))
}

/// Ids (`tb-` + 6 hex digits) of the testbeds a run logged.
fn testbed_ids(out: &Output) -> BTreeSet<String> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    stderr
        .match_indices("tb-")
        .filter_map(|(at, _)| stderr.get(at..at + 9))
        .filter(|id| id[3..].chars().all(|c| c.is_ascii_hexdigit()))
        .map(str::to_owned)
        .collect()
}

fn assert_removed(ids: &BTreeSet<String>) {
    for id in ids {
        let underlay = format!("/run/netns/sm-{id}-u");
        assert!(!Path::new(&underlay).exists(), "{underlay} was left behind");
        let state = format!("/run/sealmesh/{id}");
        assert!(!Path::new(&state).exists(), "{state} was left behind");
    }
}

fn positive(object: &Value, key: &str) -> f64 {
    let value = object[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is not a number in {object}"));
    assert!(value.is_finite() && value > 0.0, "{key} = {value}");
    value
}

/// Equal up to float parsing (serde_json may round the last bit).
fn assert_close(actual: f64, expected: f64, what: &str) {
    assert!(
        (actual - expected).abs() <= expected.abs() * 1e-12,
        "{what}: {actual} != {expected}"
    );
}

fn numbers(value: &Value) -> Vec<f64> {
    let array = value
        .as_array()
        .unwrap_or_else(|| panic!("{value} is not an array"));
    array
        .iter()
        .map(|v| v.as_f64().expect("a number"))
        .collect()
}

/// `rr_p50_added_us` of a column is the median over rounds of its rr p50
/// minus plaintext's of the same round, as its samples show.
fn assert_added_latency(summary: &Value, column: &str) {
    let columns = &summary["columns"];
    let own = numbers(&columns[column]["samples"]["rr_p50_us"]);
    let plaintext = numbers(&columns["plaintext"]["samples"]["rr_p50_us"]);
    let added = numbers(&columns[column]["samples"]["rr_p50_added_us"]);
    assert_eq!(
        added.len(),
        own.len(),
        "one difference per round: {summary}"
    );
    assert_eq!(plaintext.len(), own.len(), "{summary}");
    for ((added, own), plaintext) in added.iter().zip(&own).zip(&plaintext) {
        assert_close(*added, own - plaintext, "per-round difference");
    }
    let mut sorted = added.clone();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = (sorted[(n - 1) / 2] + sorted[n / 2]) / 2.0;
    let reported = columns[column]["rr_p50_added_us"]
        .as_f64()
        .unwrap_or_else(|| panic!("no rr_p50_added_us in {column}: {summary}"));
    assert_close(reported, median, "rr_p50_added_us");
    assert!(columns["plaintext"]["rr_p50_added_us"].is_null());
}

#[test]
fn quick_bench_reports_every_figure_against_plaintext() {
    let out = xtask(&["bench", "--quick", "--json"]);
    assert!(out.status.success(), "{}", describe(&out));
    let summary = last_json_line(&out);
    for key in [
        "throughput_ratio",
        "throughput_16_ratio",
        "rr_p50_ratio",
        "rr_p90_ratio",
        "rr_p99_ratio",
        "conn_rate_ratio",
        "mem_per_conn_bytes",
        "idle_rss_bytes",
        "cpu_seconds_per_gb",
    ] {
        positive(&summary, key);
    }
    assert_eq!(summary["compared"], "sealmesh");
    // The profile is the directory of the binaries (target/debug here).
    assert_eq!(summary["profile"], "debug");
    assert_eq!(summary["agent_mode"], "local");
    let columns = summary["columns"].as_object().expect("columns object");
    assert_eq!(
        columns.keys().collect::<Vec<_>>(),
        ["plaintext", "sealmesh"],
        "{summary}"
    );
    for column in columns.values() {
        for key in [
            "throughput_gbps",
            "throughput_16_gbps",
            "rr_p50_us",
            "rr_p90_us",
            "rr_p99_us",
            "conn_per_s",
        ] {
            positive(column, key);
        }
        assert_eq!(column["conn_errors"], 0, "{column}");
    }
    let sealmesh = &summary["columns"]["sealmesh"];
    // The ratio is computed from the same two figures; allow float rounding only.
    let ratio = sealmesh["throughput_ratio"].as_f64().unwrap();
    let expected = sealmesh["throughput_gbps"].as_f64().unwrap()
        / summary["columns"]["plaintext"]["throughput_gbps"]
            .as_f64()
            .unwrap();
    assert!(
        (ratio - expected).abs() <= expected * 1e-12,
        "throughput_ratio {ratio} != {expected}"
    );
    assert_eq!(
        sealmesh["idle_rss_bytes_by_node"]
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        ["node-0", "node-1"]
    );
    let anon = positive(&summary, "idle_anon_rss_bytes");
    assert!(
        anon < positive(&summary, "idle_rss_bytes"),
        "the anonymous part is a part: {summary}"
    );
    // Plaintext has no proxy: nothing to charge memory or CPU to.
    assert!(summary["columns"]["plaintext"]["idle_rss_bytes"].is_null());
    // An unoptimized agent adds latency to every round trip.
    assert_eq!(
        positive(&summary, "rr_p50_added_us"),
        positive(sealmesh, "rr_p50_added_us")
    );
    assert_added_latency(&summary, "sealmesh");
    assert!(summary.get("vs_peer").is_none(), "no peer: {summary}");
    assert!(sealmesh.get("vs_peer").is_none(), "no peer: {summary}");

    let ids = testbed_ids(&out);
    assert_eq!(ids.len(), 2, "one testbed per column: {ids:?}");
    assert_removed(&ids);
}

#[test]
fn bench_only_runs_the_chosen_measurements_for_the_rounds_asked() {
    let out = xtask(&[
        "bench",
        "--quick",
        "--json",
        "--only",
        "connrate,rr",
        "--rounds",
        "2",
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    let summary = last_json_line(&out);
    positive(&summary, "conn_rate_ratio");
    positive(&summary, "rr_p50_ratio");
    for key in [
        "throughput_ratio",
        "throughput_16_ratio",
        "mem_per_conn_bytes",
        "idle_rss_bytes",
        "cpu_seconds_per_gb",
    ] {
        assert!(summary[key].is_null(), "{key} was measured: {summary}");
    }
    let sealmesh = &summary["columns"]["sealmesh"];
    assert_eq!(
        sealmesh["samples"]["conn_per_s"].as_array().unwrap().len(),
        2,
        "one sample per round: {summary}"
    );
    assert_eq!(summary["plan"]["rounds"], 2);
    // Two rounds: the median of the per-round differences is their mean,
    // which the median of each column's p50s would not give in general.
    assert_added_latency(&summary, "sealmesh");
    assert_eq!(summary["rr_p50_added_us"], sealmesh["rr_p50_added_us"]);
    assert!(
        sealmesh["samples"]["throughput_gbps"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert_removed(&testbed_ids(&out));
}

#[test]
fn bench_measures_the_agents_in_kubernetes_mode() {
    let out = xtask(&[
        "bench",
        "--quick",
        "--json",
        "--kubernetes",
        "--only",
        "memory,connrate",
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    let summary = last_json_line(&out);
    assert_eq!(summary["agent_mode"], "kubernetes");
    // The agents knew the pods only from the API, and proxied every connection.
    positive(&summary, "conn_rate_ratio");
    assert_eq!(summary["columns"]["sealmesh"]["conn_errors"], 0);
    positive(&summary, "idle_rss_bytes");
    positive(&summary, "mem_per_conn_bytes");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr
            .matches("testbed registered with the Kubernetes API")
            .count(),
        1,
        "the sealmesh column's testbed, not plaintext's: {}",
        describe(&out)
    );
    assert_removed(&testbed_ids(&out));
}

#[test]
fn bench_peer_column_runs_the_peer_command_on_every_node() {
    // A "proxy" that intercepts nothing: the peer column then measures
    // plaintext, which checks the hook's contract (env, ready line, cleanup).
    let out = xtask(&[
        "bench",
        "--quick",
        "--json",
        "--peer-cmd",
        r#"test -n "$NODE" && test -n "$NODE_IP" && test -f "$CLUSTER_FILE" && test -n "$BPFFS_DIR" && echo ready && exec sleep 600"#,
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    let summary = last_json_line(&out);
    let peer = &summary["columns"]["peer"];
    for key in [
        "throughput_ratio",
        "rr_p50_ratio",
        "conn_rate_ratio",
        "idle_rss_bytes",
    ] {
        positive(peer, key);
    }
    assert_eq!(
        peer["idle_rss_bytes_by_node"]
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        ["node-0", "node-1"]
    );
    let ids = testbed_ids(&out);
    assert_eq!(ids.len(), 3, "one testbed per column: {ids:?}");
    assert_removed(&ids);
}

#[test]
fn bench_peer_agent_script_runs_another_agent_build_as_the_peer_column() {
    // The script docs/PERFORMANCE.md gives for A/B runs, with this build's
    // agent as the "other" build.
    let agent = Path::new(env!("CARGO_BIN_EXE_xtask")).with_file_name("sealmesh-agent");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/src/bench/peer-agent.sh");
    let peer_cmd = format!("exec {script}");
    let out = xtask_with_env(
        &["bench", "--quick", "--json", "--peer-cmd", &peer_cmd],
        &[("PEER_AGENT", &agent)],
    );
    assert!(out.status.success(), "{}", describe(&out));
    let summary = last_json_line(&out);
    let peer = &summary["columns"]["peer"];
    positive(peer, "rr_p50_ratio");
    positive(peer, "mem_per_conn_bytes");
    assert_added_latency(&summary, "peer");
    assert_added_latency(&summary, "sealmesh");
    // Every figure of the sealmesh column divided by the peer's.
    let sealmesh = &summary["columns"]["sealmesh"];
    let vs_peer = sealmesh["vs_peer"].as_object().expect("vs_peer object");
    assert_eq!(
        vs_peer.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        BTreeSet::from([
            "throughput_gbps",
            "throughput_16_gbps",
            "rr_p50_us",
            "rr_p90_us",
            "rr_p99_us",
            "rr_p50_added_us",
            "conn_per_s",
            "idle_rss_bytes",
            "idle_anon_rss_bytes",
            "mem_per_conn_bytes",
            "cpu_seconds_per_gb",
        ]),
        "{summary}"
    );
    for (key, ratio) in vs_peer {
        let quotient = positive(sealmesh, key) / positive(peer, key);
        assert_close(
            ratio
                .as_f64()
                .unwrap_or_else(|| panic!("vs_peer.{key} = {ratio}")),
            quotient,
            &format!("vs_peer.{key}"),
        );
    }
    assert_eq!(summary["vs_peer"], sealmesh["vs_peer"]);
    assert!(peer.get("vs_peer").is_none(), "{summary}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let header = stdout.lines().find(|l| l.starts_with("metric")).unwrap();
    assert_eq!(
        header.split_whitespace().collect::<Vec<_>>(),
        [
            "metric",
            "plaintext",
            "sealmesh",
            "ratio",
            "vs",
            "peer",
            "peer",
            "ratio",
            "target",
            "(sealmesh)"
        ],
        "{stdout}"
    );
    // Its memory is the agent's alone (the script execs it), so it matches
    // the sealmesh column's, the same binary; a shell left in the process
    // tree would add ~1.5 MiB.
    let sealmesh_rss = positive(&summary["columns"]["sealmesh"], "idle_rss_bytes");
    let peer_rss = positive(peer, "idle_rss_bytes");
    assert!(
        (peer_rss - sealmesh_rss).abs() < 1024.0 * 1024.0,
        "peer {peer_rss} vs sealmesh {sealmesh_rss}: {summary}"
    );
    assert_removed(&testbed_ids(&out));
}

#[test]
fn bench_says_when_the_peer_command_exits_before_it_is_ready() {
    let out = xtask(&["bench", "--quick", "--peer-cmd", "echo starting; exit 3"]);
    assert!(!out.status.success(), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr
            .contains("the peer command on node node-0 closed its output without printing `ready`"),
        "{}",
        describe(&out)
    );
    assert_removed(&testbed_ids(&out));
}

#[test]
fn loadtest_connects_every_client_to_every_node_over_mtls() {
    let out = xtask(&[
        "loadtest",
        "--nodes",
        "2",
        "--clients-per-node",
        "2",
        "--rate",
        "100",
        "--concurrency",
        "4",
        "--duration",
        "2s",
        "--json",
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    let result = last_json_line(&out);
    // 4 clients at 25/s for 2 s: connections due at 0, 40 ms, ..., 1.96 s.
    assert_eq!(result["connections"], 200, "{result}");
    assert_eq!(result["errors"], 0, "{result}");
    assert_eq!(result["logged_connections"], 200, "{result}");
    assert_eq!(result["mtls_fraction"], 1.0, "{result}");
    assert_eq!(result["bytes"], 200 * 2 * 64, "{result}");
    assert_eq!(result["passed"], true);
    positive(&result, "latency_p50_us");
    positive(&result, "latency_p99_us");
    let per_server = result["per_server"].as_object().expect("per_server");
    assert_eq!(
        per_server.keys().collect::<Vec<_>>(),
        ["load/server-0", "load/server-1"],
        "{result}"
    );
    assert_eq!(
        per_server
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum::<u64>(),
        200
    );
    assert_removed(&testbed_ids(&out));
}

#[test]
fn loadtest_on_kind_explains_what_it_needs() {
    // A PATH without docker, kind or kubectl, whatever this host has.
    let empty = tempfile::tempdir().unwrap();
    let out = xtask_with_env(&["loadtest", "--kind"], &[("PATH", empty.path())]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("error: docker, kind, kubectl not found on PATH: ")
            && stderr
                .contains("use the local testbed (`cargo xtask demo`, `cargo xtask loadtest`)"),
        "{stderr}"
    );
}
