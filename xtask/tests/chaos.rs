//! `cargo xtask chaos` through its library API, on real testbeds (root):
//! the cheapest scenarios with a light load pass and report their figures.

use serde_json::Value;
use xtask::chaos::{self, ChaosArgs};

fn number(result: &chaos::ScenarioResult, key: &str) -> f64 {
    result
        .findings
        .get(key)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("{} reports no number {key}: {result:?}", result.name))
}

#[test]
fn agent_restart_and_issuer_rotation_pass_and_report_their_figures() {
    let args = ChaosArgs {
        only: vec!["agent-restart".into(), "issuer-rotation".into()],
        rate: 20.0,
        streams: 2,
        ..ChaosArgs::default()
    };
    let report = chaos::run_scenarios(&args).expect("the scenarios run");
    assert_eq!(report.results.len(), 2, "{report:?}");
    assert!(report.passed(), "{}", report.to_json());

    let restart = report.get("agent-restart").unwrap();
    // Kill → first success spans the agent's 2 s down time and its start.
    let recovery = number(restart, "recovery_s");
    assert!((2.0..60.0).contains(&recovery), "recovery {recovery} s");
    assert!(number(restart, "connections_ok") > 0.0);
    assert_eq!(number(restart, "failed_while_up"), 0.0);
    assert_eq!(number(restart, "plaintext_frames"), 0.0);
    assert!(
        number(restart, "underlay_frames") > 0.0,
        "the capture saw the traffic"
    );
    // Connections tried while no agent listened failed (closed, not in clear).
    assert!(number(restart, "failed_while_down") > 0.0);

    let rotation = report.get("issuer-rotation").unwrap();
    assert_eq!(number(rotation, "connections_failed"), 0.0);
    assert_eq!(number(rotation, "stream_breaks"), 0.0);
    let moved = number(rotation, "every_leaf_under_new_issuer_s");
    assert!((0.0..60.0).contains(&moved), "{moved} s");

    // The JSON form carries every scenario with its figures.
    let json = report.to_json();
    assert_eq!(json["passed"], true);
    assert_eq!(json["scenarios"][0]["name"], "agent-restart");
    assert!(json["scenarios"][0]["figures"]["recovery_s"].is_number());
}
