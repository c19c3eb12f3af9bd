//! The identity service's configuration, parsed in one place (flags or
//! environment) and dumped at start-up. It holds only paths and settings,
//! never secrets: tokens and keys stay in the files it points at.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use clap::{Parser, ValueEnum};
use sealmesh_common::consts::{IDENTITY_GRPC_PORT, IDENTITY_METRICS_PORT};

/// How long an issued leaf certificate lives unless configured otherwise.
pub const DEFAULT_CERT_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);
/// Allowance for clocks that run behind ours: leaves start this much earlier
/// (and end this much later).
pub const DEFAULT_CLOCK_SKEW: Duration = Duration::from_secs(20);
/// How often the issuer directory is re-hashed in case the watcher missed a change.
pub const DEFAULT_ISSUER_POLL_INTERVAL: Duration = Duration::from_secs(10);

fn default_grpc_listen() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::UNSPECIFIED, IDENTITY_GRPC_PORT))
}

fn default_metrics_listen() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::UNSPECIFIED, IDENTITY_METRICS_PORT))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn as_filter(self) -> &'static str {
        match self {
            Self::Error => "error",
            Self::Warn => "warn",
            Self::Info => "info",
            Self::Debug => "debug",
            Self::Trace => "trace",
        }
    }
}

/// `sealmesh-identity` flags. Every field is public so tests and the testbed
/// can build a `Config` in code (see [`Config::new`]).
#[derive(Clone, Debug, PartialEq, Eq, Parser)]
#[command(
    name = "sealmesh-identity",
    version,
    about = "sealmesh identity service: issues short-lived per-ServiceAccount mTLS certificates"
)]
pub struct Config {
    /// Cluster file (local mode): nodes, pods, ServiceAccounts and the token files
    /// that authenticate callers.
    #[arg(long, env = "SEALMESH_CLUSTER_FILE")]
    pub cluster_file: PathBuf,

    /// PEM bundle of trust anchors (roots); may hold several during a root rotation.
    #[arg(long, env = "SEALMESH_TRUST_ANCHORS")]
    pub trust_anchors: PathBuf,

    /// Directory holding the issuer: `crt.pem` + `key.pem`, or cert-manager's
    /// `tls.crt` + `tls.key` (+ `ca.crt`). Watched for rotation.
    #[arg(long, env = "SEALMESH_ISSUER_DIR")]
    pub issuer_dir: PathBuf,

    /// Address of the gRPC Certify and health API.
    #[arg(long, default_value_t = default_grpc_listen())]
    pub listen: SocketAddr,

    /// Address of the HTTP endpoint serving /metrics, /live and /ready.
    #[arg(long, default_value_t = default_metrics_listen())]
    pub metrics_listen: SocketAddr,

    /// Lifetime of issued leaf certificates.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "24h")]
    pub cert_lifetime: Duration,

    /// Clock-skew allowance added before NotBefore and after NotAfter of leaves.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "20s")]
    pub clock_skew: Duration,

    /// How often the issuer directory's content hash is checked, as a backup for
    /// the file watcher.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    pub issuer_poll_interval: Duration,

    #[arg(long, value_enum, default_value_t = LogLevel::Info)]
    pub log_level: LogLevel,
}

impl Config {
    /// A configuration with every default, for the three required paths.
    pub fn new(cluster_file: PathBuf, trust_anchors: PathBuf, issuer_dir: PathBuf) -> Self {
        Self {
            cluster_file,
            trust_anchors,
            issuer_dir,
            listen: default_grpc_listen(),
            metrics_listen: default_metrics_listen(),
            cert_lifetime: DEFAULT_CERT_LIFETIME,
            clock_skew: DEFAULT_CLOCK_SKEW,
            issuer_poll_interval: DEFAULT_ISSUER_POLL_INTERVAL,
            log_level: LogLevel::Info,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_with_the_documented_defaults() {
        let config = Config::try_parse_from([
            "sealmesh-identity",
            "--cluster-file",
            "/c.yaml",
            "--trust-anchors",
            "/ca.crt",
            "--issuer-dir",
            "/issuer",
        ])
        .unwrap();
        assert_eq!(
            config,
            Config::new("/c.yaml".into(), "/ca.crt".into(), "/issuer".into())
        );
        assert_eq!(config.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(config.metrics_listen.to_string(), "0.0.0.0:9990");
    }

    #[test]
    fn flags_override_durations_and_addresses() {
        let config = Config::try_parse_from([
            "sealmesh-identity",
            "--cluster-file=/c.yaml",
            "--trust-anchors=/ca.crt",
            "--issuer-dir=/issuer",
            "--listen=127.0.0.1:1234",
            "--metrics-listen=127.0.0.1:0",
            "--cert-lifetime=1h 30m",
            "--clock-skew=5s",
            "--log-level=debug",
        ])
        .unwrap();
        assert_eq!(config.listen, "127.0.0.1:1234".parse().unwrap());
        assert_eq!(config.cert_lifetime, Duration::from_secs(5400));
        assert_eq!(config.clock_skew, Duration::from_secs(5));
        assert_eq!(config.log_level, LogLevel::Debug);
    }
}
