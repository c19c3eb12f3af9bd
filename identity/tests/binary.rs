//! The `sealmesh-identity` binary with the flags other components use.

mod support;

use std::{
    net::TcpListener,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use nix::{sys::signal, unistd::Pid};
use sealmesh_pki::{CaSpec, Layout, generate_issuer};
use support::*;
use time::OffsetDateTime;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn identity_command(cluster: &TestCluster) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sealmesh-identity"));
    command
        .arg("--cluster-file")
        .arg(&cluster.cluster_file)
        .arg("--trust-anchors")
        .arg(&cluster.anchors_file)
        .arg("--issuer-dir")
        .arg(&cluster.issuer_dir)
        .env_remove(sealmesh_common::logging::LOG_LEVEL_ENV);
    command
}

/// Kills the child if the test fails before it is stopped.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn serves_with_the_documented_flags_and_stops_on_sigterm() {
    let cluster = TestCluster::new();
    let (grpc, metrics) = (free_port(), free_port());
    let mut child = ChildGuard(
        identity_command(&cluster)
            .args(["--listen", &format!("127.0.0.1:{grpc}")])
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics}")])
            .args([
                "--cert-lifetime",
                "1h",
                "--clock-skew",
                "10s",
                "--log-level",
                "debug",
            ])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let metrics_addr = format!("127.0.0.1:{metrics}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(metrics_addr).await.is_err() {
        assert!(Instant::now() < deadline, "metrics endpoint never came up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        http_get(metrics_addr, "/healthz/ready").await,
        (200, "ok\n".into())
    );
    let (status, metrics_text) = http_get(metrics_addr, "/metrics").await;
    assert_eq!(status, 200);
    let build_info = format!(
        "sealmesh_build_info{{component=\"identity\",version=\"{}\"}} 1\n",
        env!("CARGO_PKG_VERSION")
    );
    assert!(metrics_text.contains(&build_info), "{metrics_text}");
    assert!(
        metrics_text.contains("\nprocess_resident_memory_bytes "),
        "{metrics_text}"
    );

    let web = identity("web");
    let mut client = sealmesh_proto::identity::identity_client::IdentityClient::new(tls_channel(
        format!("127.0.0.1:{grpc}").parse().unwrap(),
        &cluster.anchors(),
    ));
    let response = client
        .certify(request(&web, NODE0_TOKEN, csr_for(&web)))
        .await
        .unwrap()
        .into_inner();
    assert_issued_for(&response, &cluster.anchors(), &web);
    let valid_until = response.valid_until.unwrap().seconds;
    let expected = OffsetDateTime::now_utc().unix_timestamp() + 3600 + 10;
    assert!(
        (expected - 2..=expected).contains(&valid_until),
        "{valid_until} vs {expected}"
    );

    // A client that keeps its connection open must not hold up shutdown
    // beyond the grace period; wait off the runtime so the client's
    // connection task keeps running meanwhile.
    signal::kill(Pid::from_raw(child.0.id() as i32), signal::Signal::SIGTERM).unwrap();
    let started = Instant::now();
    let (child, output) = tokio::task::spawn_blocking(move || {
        let output = child.0.wait_with_output_ref();
        (child, output)
    })
    .await
    .unwrap();
    drop((child, client));
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "shutdown took {:?}",
        started.elapsed()
    );
    assert!(output.0.success(), "exit status {:?}", output.0);
    let log = output.1;
    // stderr is a pipe, as under a kubelet: plain text, no colour escapes.
    assert!(!log.contains('\x1b'), "{log}");
    assert!(log.contains("starting identity service"), "{log}");
    assert!(log.contains("serving over TLS"), "{log}");
    assert!(
        log.contains("issued the identity service's serving certificate"),
        "{log}"
    );
    assert!(
        log.contains("issued certificate"),
        "debug log shows issuance: {log}"
    );
    assert!(log.contains("csr_subject"), "{log}");
    assert!(
        !log.contains(NODE0_TOKEN),
        "the log must never hold a token"
    );
    assert!(
        !log.contains("PRIVATE KEY"),
        "the log must never hold a key"
    );
}

trait WaitWithOutputRef {
    fn wait_with_output_ref(&mut self) -> (std::process::ExitStatus, String);
}

impl WaitWithOutputRef for std::process::Child {
    fn wait_with_output_ref(&mut self) -> (std::process::ExitStatus, String) {
        use std::io::Read;
        let mut log = String::new();
        self.stderr
            .take()
            .unwrap()
            .read_to_string(&mut log)
            .unwrap();
        (self.wait().unwrap(), log)
    }
}

#[test]
fn refuses_to_start_with_an_expired_issuer_and_says_why() {
    let root = new_root();
    let now = OffsetDateTime::now_utc();
    let (expired, _) = generate_issuer(
        &root.material(),
        &CaSpec {
            common_name: "expired.test".into(),
            not_before: now - Duration::from_secs(7200),
            not_after: now - Duration::from_secs(60),
        },
    )
    .unwrap();
    let cluster = TestCluster::with(root, expired, Layout::Tls);
    let output = identity_command(&cluster)
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains("certificate \"CN=expired.test\" expired at")
            && stderr.contains("refusing to start without a valid issuer"),
        "{stderr}"
    );
}

/// A parent that blocks SIGTERM before spawning (a shell's `trap`, a
/// supervisor waiting for signals with sigwait) hands the mask down; the
/// service must still stop gracefully on the kubelet's SIGTERM.
#[tokio::test]
async fn stops_on_sigterm_even_when_started_with_it_blocked() {
    use std::os::unix::process::CommandExt;

    let cluster = TestCluster::new();
    let (grpc, metrics) = (free_port(), free_port());
    let mut command = identity_command(&cluster);
    command
        .args(["--listen", &format!("127.0.0.1:{grpc}")])
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics}")])
        .stderr(Stdio::piped());
    // SAFETY: sigprocmask(2) is async-signal-safe, so it may run between fork and exec.
    unsafe {
        command.pre_exec(|| {
            signal::SigSet::from_iter([signal::Signal::SIGTERM, signal::Signal::SIGINT])
                .thread_block()?;
            Ok(())
        });
    }
    let mut child = ChildGuard(command.spawn().unwrap());
    let metrics_addr: std::net::SocketAddr = format!("127.0.0.1:{metrics}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(metrics_addr).await.is_err() {
        assert!(Instant::now() < deadline, "metrics endpoint never came up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    signal::kill(Pid::from_raw(child.0.id() as i32), signal::Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "still running 15 s after SIGTERM: the blocked signal never arrived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut log = String::new();
    std::io::Read::read_to_string(&mut child.0.stderr.take().unwrap(), &mut log).unwrap();
    assert!(status.success(), "exit status {status:?}: {log}");
    assert!(log.contains("shutting down"), "{log}");
}
