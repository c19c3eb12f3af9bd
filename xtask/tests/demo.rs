//! `cargo xtask demo`'s core on the testbed (root, real eBPF, real mTLS, real
//! identity service): what the README's first command shows must hold. And
//! the demo app's testapp modes (line server, relay, bot) on loopback.

use std::{
    collections::BTreeSet,
    io::{self, BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{atomic::AtomicBool, mpsc},
    time::{Duration, Instant},
};

use sealmesh_common::identity::TrustDomain;
use xtask::{
    demo::{self, APP_NAMESPACE, DemoOptions, LEGACY_NAMESPACE, VOTING_POLICY},
    testapp::{self, BotReport},
    testbed::kube::KubeMode,
};

fn node(name: &Option<String>) -> &str {
    name.as_deref().unwrap_or("?")
}

fn spiffe(service_account: &str) -> String {
    TrustDomain::default()
        .identity(APP_NAMESPACE, service_account)
        .unwrap()
        .spiffe_uri()
}

#[test]
fn demo_secures_every_meshed_edge_with_both_identities_and_explains_the_unmeshed_one() {
    demo_secures_every_meshed_edge(None, "(local mode: a cluster file)");
}

/// `cargo xtask demo --kubernetes`: the same app and guarantees, with the
/// agents and the identity service on the Kubernetes API, whose service
/// range is not the testbed's: the app dials the ClusterIPs the server
/// allocated, as on a real cluster.
#[test]
fn demo_in_kubernetes_mode_secures_every_meshed_edge_the_same_way() {
    demo_secures_every_meshed_edge(
        Some(KubeMode {
            fake_service_range: "10.0.0.0/24".parse().unwrap(),
            ..KubeMode::fake()
        }),
        "(Kubernetes mode: an in-process API server)",
    );
}

fn demo_secures_every_meshed_edge(kubernetes: Option<KubeMode>, mode_line_end: &str) {
    let stop = AtomicBool::new(false);
    let mut printed = Vec::new();
    let summary = demo::run(
        &DemoOptions {
            duration: Some(Duration::from_secs(8)),
            kubernetes,
            ..DemoOptions::default()
        },
        &stop,
        &mut printed,
    )
    .expect("the demo runs");
    let printed = String::from_utf8(printed).unwrap();
    assert!(
        printed.lines().next().unwrap().ends_with(mode_line_end),
        "{printed}"
    );

    // Exactly the app's edges (from `sealmesh edges -o json`), each secured
    // as its placement implies, with both identities.
    let edges: BTreeSet<(String, String, String, bool, String)> = summary
        .edges
        .iter()
        .map(|e| {
            (
                format!("{}/{}", e.src_ns, e.src),
                format!("{}/{}", e.dst_ns, e.dst),
                format!("{}->{}", node(&e.src_node), node(&e.dst_node)),
                e.tls,
                e.no_tls_reason.clone(),
            )
        })
        .collect();
    let edge = |src: &str, dst: &str, nodes: &str, tls: bool, reason: &str| {
        (
            format!("{APP_NAMESPACE}/{src}"),
            dst.to_owned(),
            nodes.to_owned(),
            tls,
            reason.to_owned(),
        )
    };
    assert_eq!(
        edges,
        BTreeSet::from([
            edge(
                "vote-bot",
                "emojivoto/web",
                "node-0->node-0",
                false,
                "secured_local"
            ),
            edge(
                "vote-bot",
                &format!("{LEGACY_NAMESPACE}/leaderboard"),
                "node-0->node-1",
                false,
                "not_meshed"
            ),
            edge("web", "emojivoto/emoji", "node-0->node-1", true, ""),
            edge("web", "emojivoto/voting", "node-0->node-1", true, ""),
            edge(
                "vote-bot",
                "emojivoto/voting",
                "node-0->node-1",
                false,
                "refused"
            ),
        ]),
        "{printed}"
    );
    // vote-bot's direct call of voting: denied by the app's policy, every time.
    let (denied, allowed): (Vec<_>, Vec<_>) =
        summary.edges.iter().partition(|e| e.denied_total > 0);
    let [denied] = denied.as_slice() else {
        panic!("one denied pair expected: {denied:?}\n{printed}")
    };
    assert_eq!(
        (denied.src.as_str(), denied.dst.as_str()),
        ("vote-bot", "voting")
    );
    assert_eq!(
        denied.denied_policy,
        format!("{APP_NAMESPACE}/{VOTING_POLICY}")
    );
    assert_eq!(denied.denied_total, denied.connections_total, "{denied:?}");
    assert_eq!(summary.policy_denied, Some(true), "{printed}");
    let denied_line = summary
        .tap_lines
        .iter()
        .find(|l| l.contains(&format!("denied policy={APP_NAMESPACE}/{VOTING_POLICY}")))
        .unwrap_or_else(|| panic!("no denied tap line:\n{printed}"));
    assert!(
        denied_line.contains(" src_pod=emojivoto/vote-bot dst_pod=emojivoto/voting "),
        "{denied_line}"
    );
    let policy_why = summary.policy_why.as_deref().expect("sealmesh why ran");
    assert!(
        policy_why.contains(&format!("{APP_NAMESPACE}/{VOTING_POLICY}")),
        "{policy_why}"
    );
    for e in allowed {
        assert_eq!(e.errors_total, 0, "{e:?}\n{printed}");
        assert!(e.connections_total > 0, "{e:?}");
        assert_eq!(e.secured, e.dst_meshed, "{e:?}");
        if e.dst_meshed {
            assert_eq!(e.client_id, spiffe(&e.src), "{e:?}");
            assert_eq!(e.server_id, spiffe(&e.dst), "{e:?}");
        } else {
            // The agent knows no identity for a plaintext connection.
            assert_eq!((e.client_id.as_str(), e.server_id.as_str()), ("", ""));
        }
    }
    let cross_node_mtls = summary
        .edges
        .iter()
        .filter(|e| e.crosses_nodes() && e.tls && e.denied_total == 0)
        .count();
    assert_eq!(cross_node_mtls, 2, "{printed}");

    // The printed table (sealmesh edges -o wide) has the marks and the reason.
    let header = printed
        .lines()
        .find(|l| l.starts_with("SRC "))
        .unwrap_or_else(|| panic!("no edges table:\n{printed}"));
    assert_eq!(
        header.split_whitespace().collect::<Vec<_>>(),
        [
            "SRC",
            "DST",
            "SRC_NS",
            "DST_NS",
            "SECURED",
            "AUTHZ",
            "CLIENT_ID",
            "SERVER_ID"
        ]
    );
    let row = |dst: &str| {
        printed
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(dst))
            .unwrap_or_else(|| panic!("no edge to {dst}:\n{printed}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert_eq!(
        row("leaderboard"),
        [
            "vote-bot",
            "leaderboard",
            "emojivoto",
            "legacy",
            "not_meshed",
            "allowed",
            "-",
            "-"
        ]
    );
    let emoji = row("emoji");
    assert_eq!(
        emoji,
        [
            "web",
            "emoji",
            "emojivoto",
            "emojivoto",
            "√",
            "allowed",
            &spiffe("web"),
            &spiffe("emoji")
        ]
    );

    // `sealmesh tap` showed the mTLS connections with both identities, as
    // the sending (node-0, out) and the receiving agent (node-1, in) saw them.
    for (proxy, node) in [("out", "node-0"), ("in", "node-1")] {
        let tls_line = summary
            .tap_lines
            .iter()
            .find(|l| {
                l.starts_with(&format!("tcp id={node}:"))
                    && l.contains(&format!(" proxy={proxy} "))
                    && l.contains(" src_pod=emojivoto/web dst_pod=emojivoto/emoji ")
            })
            .unwrap_or_else(|| panic!("no {proxy} line web -> emoji on {node}:\n{printed}"));
        assert!(
            tls_line.ends_with(&format!(
                " tls=true client_id={} server_id={}",
                spiffe("web"),
                spiffe("emoji")
            )),
            "{tls_line}"
        );
        assert!(printed.contains(tls_line.as_str()));
    }

    // The app's namespace is strict: the unmeshed leaderboard's plaintext to
    // voting was refused by the kernel, tap showed the refusal, and `sealmesh
    // why` names the annotation that made the namespace strict.
    assert!(
        printed.contains(&format!(
            "  namespace {APP_NAMESPACE}: meshed, inbound strict"
        )),
        "{printed}"
    );
    assert_eq!(summary.plaintext_refused, Some(true), "{printed}");
    let refused = summary
        .tap_lines
        .iter()
        .find(|l| l.starts_with("refused id=node-1:"))
        .unwrap_or_else(|| panic!("no refused line:\n{printed}"));
    assert!(
        refused.contains(" proxy=in ")
            && refused.contains(&format!(
            " src_pod={LEGACY_NAMESPACE}/leaderboard dst_pod={APP_NAMESPACE}/voting reason=strict_inbound "
        )),
        "{refused}"
    );
    let why = summary.why.as_deref().expect("sealmesh why ran");
    assert!(
        why.starts_with(&format!(
            "{LEGACY_NAMESPACE}/leaderboard -> {APP_NAMESPACE}/voting: NOT mTLS: connections are refused"
        )),
        "{why}"
    );
    assert!(
        why.contains(&format!(
            "strict inbound policy: annotation sealmesh.io/inbound-policy=strict on namespace {APP_NAMESPACE}"
        )),
        "{why}"
    );
    assert!(printed.contains(why), "{printed}");

    // Every request of the vote-bot was answered (8 s at 5 rounds/s, two
    // targets per round).
    assert_eq!(summary.bot.failed, 0, "{:?}", summary.bot.failures);
    assert!(summary.bot.ok >= 40, "{:?}\n{printed}", summary.bot);
    assert!(summary.problems().is_empty(), "{:?}", summary.problems());

    // Torn down: no namespace, cgroup, pin or state of the testbed is left.
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&netns.stdout).contains(&summary.testbed),
        "namespaces left: {}",
        String::from_utf8_lossy(&netns.stdout)
    );
    assert!(!Path::new("/run/sealmesh").join(&summary.testbed).exists());
}

/// What the demo prints, line by line, to a channel: a test reads it while
/// the demo runs.
struct LineSender {
    lines: mpsc::Sender<String>,
    partial: Vec<u8>,
}

impl Write for LineSender {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.partial.extend_from_slice(buf);
        while let Some(end) = self.partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            let _ = self
                .lines
                .send(String::from_utf8_lossy(&line[..end]).into_owned());
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The process id of the agent of `node` of testbed `testbed`, from its
/// command line.
fn agent_pid(testbed: &str, node: &str) -> Option<i32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let is_agent = args.first()?.ends_with("/sealmesh-agent")
                && args.windows(2).any(|w| w[0] == "--node" && w[1] == node)
                && args.iter().any(|a| a.contains(testbed));
            is_agent.then_some(pid)
        })
}

/// An agent that crashes during the demo is reported and started again, as
/// the kubelet restarts a DaemonSet pod; `sealmesh tap` says it lost the
/// agent, reconnects, and shows the new agent's connections; the demo runs
/// on to its end.
#[test]
fn demo_restarts_a_crashed_agent_and_tap_follows_the_new_one() {
    let stop = AtomicBool::new(false);
    let (tx, rx) = mpsc::channel();
    let mut printer = LineSender {
        lines: tx,
        partial: Vec::new(),
    };
    let mut printed: Vec<String> = Vec::new();
    let mut wait_for = |what: &str, pred: &dyn Fn(&str) -> bool| -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line: String = rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("the demo printed no {what}:\n{}", printed.join("\n")));
            printed.push(line.clone());
            if pred(&line) {
                return line;
            }
        }
    };
    let summary = std::thread::scope(|scope| {
        let demo = scope.spawn(|| {
            demo::run(
                &DemoOptions {
                    duration: Some(Duration::from_secs(15)),
                    ..DemoOptions::default()
                },
                &stop,
                &mut printer,
            )
            .map_err(|e| e.to_string())
        });
        let cluster = wait_for("cluster line", &|l| l.starts_with("cluster "));
        let testbed = cluster.split_whitespace().nth(1).unwrap().to_owned();
        wait_for("tap start", &|l| l == "tapping 2 agent(s)");
        let pid = agent_pid(&testbed, "node-1").expect("the agent of node-1 runs");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        demo.join()
            .unwrap()
            .unwrap_or_else(|e| panic!("the demo did not run to its end: {e}"))
    });
    printed.extend(rx.try_iter());
    let printed = printed.join("\n");

    assert_eq!(
        summary.agent_exits,
        ["node-1 (signal: 9 (SIGKILL))"],
        "{printed}"
    );
    assert!(
        summary.problems().contains(
            &"the agent of node-1 (signal: 9 (SIGKILL)) exited during the run".to_owned()
        ),
        "{:?}",
        summary.problems()
    );
    let position = |what: &str| {
        printed
            .find(what)
            .unwrap_or_else(|| panic!("no {what:?} in:\n{printed}"))
    };
    let exited = position("# the agent of node-1 exited (signal: 9 (SIGKILL)); starting a new one");
    let running = position("# the agent of node-1 is running again");
    let lost = position("tap: agent node-1 unreachable (");
    let back = position("tap: agent node-1 back");
    assert!(exited < running && lost < back, "{printed}");
    assert_eq!(
        printed.matches("tap: agent node-1 unreachable").count(),
        1,
        "{printed}"
    );
    // The new agent's connections show in tap after its return.
    assert!(
        printed[running.max(back)..]
            .lines()
            .any(|l| l.starts_with("tcp id=node-1:") && l.contains(" tls=true ")),
        "{printed}"
    );
    assert!(!printed.contains("tap: agent node-0"), "{printed}");
}

fn testapp_path() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_testapp"))
}

/// A testapp server on loopback, killed on drop (also when a test panics).
struct Server(Child);

impl Server {
    fn start(mut cmd: Command) -> (Self, SocketAddr) {
        let mut child = cmd.spawn().expect("testapp starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("server printed {line:?}"));
        (Self(child), addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Runs `testapp bot` for `rounds` rounds and parses its reports.
fn bot_reports(targets: &[(&str, SocketAddr)], rounds: u32) -> Vec<BotReport> {
    let mut cmd = testapp::bot(testapp_path(), targets, Duration::from_millis(10));
    cmd.args(["--count", &rounds.to_string(), "--timeout-secs", "3"]);
    let out = cmd.stderr(Stdio::piped()).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| BotReport::parse(l).unwrap_or_else(|| panic!("unparsable report {l:?}")))
        .collect()
}

#[test]
fn relay_answers_each_request_with_every_backends_reply_on_fresh_and_persistent_connections() {
    let (_emoji, emoji) = Server::start(testapp::line_server(testapp_path(), loopback(), "emoji"));
    let (_voting, voting) =
        Server::start(testapp::line_server(testapp_path(), loopback(), "voting"));
    let (_web, web) = Server::start(testapp::relay(
        testapp_path(),
        loopback(),
        "web",
        &[("emoji", emoji), ("voting", voting)],
    ));

    let reports = bot_reports(&[("web", web), ("emoji", emoji)], 4);
    let expected: Vec<BotReport> = (1..=4)
        .flat_map(|seq| {
            let conn = if seq % 2 == 1 { "fresh" } else { "persistent" };
            [
                (
                    "web",
                    format!("web: emoji: vote {seq} | voting: vote {seq}"),
                ),
                ("emoji", format!("emoji: vote {seq}")),
            ]
            .map(|(target, reply)| BotReport {
                target: target.to_owned(),
                conn: conn.to_owned(),
                seq,
                outcome: Ok(reply),
            })
        })
        .collect();
    assert_eq!(reports, expected);
}

#[test]
fn relay_closes_without_an_answer_when_a_backend_is_down_and_the_bot_reports_it() {
    // A port nobody listens on any more.
    let down = TcpListener::bind(loopback()).unwrap().local_addr().unwrap();
    let (_emoji, emoji) = Server::start(testapp::line_server(testapp_path(), loopback(), "emoji"));
    let (_web, web) = Server::start(testapp::relay(
        testapp_path(),
        loopback(),
        "web",
        &[("emoji", emoji), ("voting", down)],
    ));

    let reports = bot_reports(&[("web", web)], 2);
    assert_eq!(reports.len(), 2, "{reports:?}");
    for (report, (seq, conn)) in reports.iter().zip([(1, "fresh"), (2, "persistent")]) {
        assert_eq!((report.seq, report.conn.as_str()), (seq, conn));
        let error = report.outcome.as_ref().expect_err("no partial answer");
        assert!(
            error.contains(&format!("web={web}")) && error.contains("without a full reply"),
            "{error}"
        );
    }
}
