//! The identity service's configuration, parsed in one place (flags or
//! environment) and dumped at start-up. It holds only paths and settings,
//! never secrets: tokens and keys stay in the files (or Secrets) it points at.
//!
//! One [`IdentityConfig`] with a [`Mode`]: local mode reads callers, placements and
//! the PKI from files; Kubernetes mode reads them through the API. Flags of
//! the other mode are refused, so a mistaken deployment fails at start
//! instead of silently ignoring what the operator wrote.

use std::{
    net::{Ipv4Addr, SocketAddr},
    num::NonZeroU32,
    path::PathBuf,
    time::Duration,
};

use clap::{
    ArgMatches, CommandFactory, FromArgMatches, Parser, ValueEnum, error::ErrorKind,
    parser::ValueSource,
};
use sealmesh_common::{
    consts::{
        DEFAULT_CONTROL_NAMESPACE, DEFAULT_TRUST_DOMAIN, IDENTITY_GRPC_PORT, IDENTITY_METRICS_PORT,
        kube::{AGENT_SERVICE_ACCOUNT, IDENTITY_NAME, IDENTITY_TOKEN_AUDIENCE},
    },
    identity::{IdentityError, TrustDomain},
    logging::{LogArgs, LogFormat},
};

use crate::limits::{DEFAULT_CALLER_RATE, DEFAULT_MAX_CONCURRENT_REQUESTS, RequestLimits};

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

/// The service's settings. Every field is public so tests, the bench and the
/// testbed can build a `IdentityConfig` in code (see [`IdentityConfig::new`] and
/// [`IdentityConfig::kubernetes`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityConfig {
    /// Where callers, placements and the PKI come from.
    pub mode: Mode,
    /// Address of the gRPC Certify and health API.
    pub listen: SocketAddr,
    /// Address of the HTTP endpoint serving /metrics, /healthz/live and /healthz/ready.
    pub metrics_listen: SocketAddr,
    /// Lifetime of issued leaf certificates.
    pub cert_lifetime: Duration,
    /// Clock-skew allowance added before NotBefore and after NotAfter of leaves.
    pub clock_skew: Duration,
    /// `--log-level` and `--log-format`.
    pub log: LogArgs,
    /// Concurrency, deadline and per-caller rate of Certify calls.
    pub limits: RequestLimits,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    Local(LocalSources),
    Kubernetes(KubeSettings),
}

impl Mode {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Local(_) => ModeName::Local.as_str(),
            Self::Kubernetes(_) => ModeName::Kubernetes.as_str(),
        }
    }
}

/// Local mode: everything from files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalSources {
    /// Nodes, pods, ServiceAccounts and the token files that authenticate callers.
    pub cluster_file: PathBuf,
    /// PEM bundle of trust anchors (roots).
    pub trust_anchors: PathBuf,
    /// The issuer directory (`crt.pem` + `key.pem`, or `tls.crt` + `tls.key` (+ `ca.crt`)).
    pub issuer_dir: PathBuf,
    /// How often the issuer directory's content hash is checked, as a backup
    /// for the file watcher.
    pub issuer_poll_interval: Duration,
}

/// Kubernetes mode: callers through TokenReview, placements from a pod
/// watch, issuer and anchors from a Secret and a ConfigMap (watched).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubeSettings {
    /// The control namespace (issuer Secret, trust-roots ConfigMap, agent
    /// ServiceAccount, the Deployment) in the trust domain, which together
    /// name identities.
    pub trust_domain: TrustDomain,
    /// Audience TokenReview requires of callers' tokens.
    pub token_audience: String,
    /// ServiceAccount (in the control namespace) whose pod-bound tokens are
    /// node-mode callers.
    pub agent_service_account: String,
    /// The identity Deployment, which issuer Events are recorded on.
    pub deployment: String,
}

impl KubeSettings {
    /// The defaults: namespace `sealmesh`, trust domain `cluster.local`.
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            token_audience: IDENTITY_TOKEN_AUDIENCE.to_owned(),
            agent_service_account: AGENT_SERVICE_ACCOUNT.to_owned(),
            deployment: IDENTITY_NAME.to_owned(),
        }
    }

    pub fn namespace(&self) -> &str {
        self.trust_domain.control_namespace()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Flags(#[from] clap::Error),
    #[error(
        "--{flag} is a {flag_mode}-mode flag{origin}; remove it, or run with --mode {flag_mode}"
    )]
    WrongMode {
        flag: String,
        /// Empty, or where the value came from when not the command line.
        origin: String,
        flag_mode: &'static str,
    },
    #[error("--{flag} is required in local mode (or set {env})")]
    MissingLocal {
        flag: &'static str,
        env: &'static str,
    },
    #[error("--trust-domain / --namespace: {0}")]
    TrustDomain(IdentityError),
}

impl IdentityConfig {
    /// A local-mode configuration with every default, for the three required paths.
    pub fn new(cluster_file: PathBuf, trust_anchors: PathBuf, issuer_dir: PathBuf) -> Self {
        Self::with_mode(Mode::Local(LocalSources {
            cluster_file,
            trust_anchors,
            issuer_dir,
            issuer_poll_interval: DEFAULT_ISSUER_POLL_INTERVAL,
        }))
    }

    /// A Kubernetes-mode configuration with every default.
    pub fn kubernetes(settings: KubeSettings) -> Self {
        Self::with_mode(Mode::Kubernetes(settings))
    }

    fn with_mode(mode: Mode) -> Self {
        Self {
            mode,
            listen: default_grpc_listen(),
            metrics_listen: default_metrics_listen(),
            cert_lifetime: DEFAULT_CERT_LIFETIME,
            clock_skew: DEFAULT_CLOCK_SKEW,
            log: LogArgs {
                log_level: "info".to_owned(),
                log_format: LogFormat::Text,
            },
            limits: RequestLimits::default(),
        }
    }

    /// Parses the process's flags and environment; prints the error and
    /// exits (status 2, as clap does) when they are wrong.
    pub fn from_args() -> Self {
        Self::from_matches(Flags::command().get_matches()).unwrap_or_else(|e| match e {
            ConfigError::Flags(e) => e.exit(),
            other => Flags::command()
                .error(ErrorKind::ArgumentConflict, other)
                .exit(),
        })
    }

    /// Parses `args` (the first is the program name) and the environment.
    pub fn try_parse_from<I, T>(args: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Self::from_matches(Flags::command().try_get_matches_from(args)?)
    }

    fn from_matches(matches: ArgMatches) -> Result<Self, ConfigError> {
        let flags = Flags::from_arg_matches(&matches)?;
        let command = Flags::command();
        let refuse = |ids: &[&str], flag_mode: ModeName| {
            for arg in command.get_arguments() {
                let id = arg.get_id().as_str();
                if !ids.contains(&id) {
                    continue;
                }
                let origin = match matches.value_source(id) {
                    Some(ValueSource::CommandLine) => String::new(),
                    Some(ValueSource::EnvVariable) => arg
                        .get_env()
                        .map(|env| format!(" (set by {})", env.to_string_lossy()))
                        .unwrap_or_default(),
                    _ => continue,
                };
                return Err(ConfigError::WrongMode {
                    flag: arg.get_long().unwrap_or(id).to_owned(),
                    origin,
                    flag_mode: flag_mode.as_str(),
                });
            }
            Ok(())
        };
        let mode = match flags.mode {
            ModeName::Local => {
                refuse(KUBE_ONLY_FLAGS, ModeName::Kubernetes)?;
                let required = |value: Option<PathBuf>, flag, env| {
                    value.ok_or(ConfigError::MissingLocal { flag, env })
                };
                Mode::Local(LocalSources {
                    cluster_file: required(
                        flags.cluster_file,
                        "cluster-file",
                        "SEALMESH_CLUSTER_FILE",
                    )?,
                    trust_anchors: required(
                        flags.trust_anchors,
                        "trust-anchors",
                        "SEALMESH_TRUST_ANCHORS",
                    )?,
                    issuer_dir: required(flags.issuer_dir, "issuer-dir", "SEALMESH_ISSUER_DIR")?,
                    issuer_poll_interval: flags.issuer_poll_interval,
                })
            }
            ModeName::Kubernetes => {
                refuse(LOCAL_ONLY_FLAGS, ModeName::Local)?;
                let trust_domain = TrustDomain::new(&flags.trust_domain, &flags.namespace)
                    .map_err(ConfigError::TrustDomain)?;
                Mode::Kubernetes(KubeSettings {
                    trust_domain,
                    token_audience: flags.token_audience,
                    agent_service_account: flags.agent_service_account,
                    deployment: flags.deployment,
                })
            }
        };
        Ok(Self {
            mode,
            listen: flags.listen,
            metrics_listen: flags.metrics_listen,
            cert_lifetime: flags.cert_lifetime,
            clock_skew: flags.clock_skew,
            log: flags.log,
            limits: RequestLimits {
                max_concurrent: flags.max_concurrent_requests,
                deadline: flags.request_deadline,
                caller_rate: NonZeroU32::new(flags.caller_rate_limit),
            },
        })
    }
}

/// Clap argument ids (field names) of each mode's own flags.
const LOCAL_ONLY_FLAGS: &[&str] = &[
    "cluster_file",
    "trust_anchors",
    "issuer_dir",
    "issuer_poll_interval",
];
const KUBE_ONLY_FLAGS: &[&str] = &[
    "namespace",
    "trust_domain",
    "token_audience",
    "agent_service_account",
    "deployment",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ModeName {
    /// Callers, placements and PKI from files (the local testbed).
    Local,
    /// Callers, placements and PKI through the Kubernetes API.
    Kubernetes,
}

impl ModeName {
    fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Kubernetes => "kubernetes",
        }
    }
}

/// `sealmesh-identity` flags, as clap sees them; [`IdentityConfig`] is what they mean.
#[derive(Debug, Parser)]
#[command(
    name = "sealmesh-identity",
    version,
    about = "sealmesh identity service: issues short-lived per-ServiceAccount mTLS certificates"
)]
struct Flags {
    /// Where callers, pod placements, the issuer and the trust anchors come from.
    #[arg(long, value_enum, env = "SEALMESH_MODE", default_value_t = ModeName::Local)]
    mode: ModeName,

    /// Cluster file: nodes, pods, ServiceAccounts and the token files that
    /// authenticate callers.
    #[arg(long, env = "SEALMESH_CLUSTER_FILE", help_heading = "Local mode")]
    cluster_file: Option<PathBuf>,

    /// PEM bundle of trust anchors (roots); may hold several during a root rotation.
    #[arg(long, env = "SEALMESH_TRUST_ANCHORS", help_heading = "Local mode")]
    trust_anchors: Option<PathBuf>,

    /// Directory holding the issuer: `crt.pem` + `key.pem`, or cert-manager's
    /// `tls.crt` + `tls.key` (+ `ca.crt`). Watched for rotation.
    #[arg(long, env = "SEALMESH_ISSUER_DIR", help_heading = "Local mode")]
    issuer_dir: Option<PathBuf>,

    /// How often the issuer directory's content hash is checked, as a backup for
    /// the file watcher.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s", help_heading = "Local mode")]
    issuer_poll_interval: Duration,

    /// Control namespace: holds the issuer Secret, the trust-roots ConfigMap,
    /// the agent ServiceAccount and the identity Deployment; part of identity
    /// DNS names.
    #[arg(long, env = "SEALMESH_NAMESPACE", default_value = DEFAULT_CONTROL_NAMESPACE, help_heading = "Kubernetes mode")]
    namespace: String,

    /// SPIFFE trust domain of issued identities.
    #[arg(long, env = "SEALMESH_TRUST_DOMAIN", default_value = DEFAULT_TRUST_DOMAIN, help_heading = "Kubernetes mode")]
    trust_domain: String,

    /// Audience callers' ServiceAccount tokens must carry (checked by TokenReview).
    #[arg(long, default_value = IDENTITY_TOKEN_AUDIENCE, help_heading = "Kubernetes mode")]
    token_audience: String,

    /// ServiceAccount (in --namespace) of the node agents: its pod-bound
    /// tokens may request the identities of pods on the agent's node.
    #[arg(long, default_value = AGENT_SERVICE_ACCOUNT, help_heading = "Kubernetes mode")]
    agent_service_account: String,

    /// The identity Deployment (in --namespace) that issuer Events are recorded on.
    #[arg(long, default_value = IDENTITY_NAME, help_heading = "Kubernetes mode")]
    deployment: String,

    /// Address of the gRPC Certify and health API.
    #[arg(long, default_value_t = default_grpc_listen())]
    listen: SocketAddr,

    /// Address of the HTTP endpoint serving /metrics, /healthz/live and /healthz/ready.
    #[arg(long, default_value_t = default_metrics_listen())]
    metrics_listen: SocketAddr,

    /// Lifetime of issued leaf certificates.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "24h")]
    cert_lifetime: Duration,

    /// Clock-skew allowance added before NotBefore and after NotAfter of leaves.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "20s")]
    clock_skew: Duration,

    /// Requests served at once; more wait, up to their deadline.
    #[arg(long, default_value_t = DEFAULT_MAX_CONCURRENT_REQUESTS, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_concurrent_requests: usize,

    /// How long one request may take, waiting included.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    request_deadline: Duration,

    /// Certify calls per second per caller address (bursts up to ten times
    /// this); beyond it calls are refused with RESOURCE_EXHAUSTED before any
    /// token is reviewed. 0: unlimited.
    #[arg(long, default_value_t = DEFAULT_CALLER_RATE)]
    caller_rate_limit: u32,

    #[command(flatten)]
    log: LogArgs,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_with_the_documented_defaults() {
        let config = IdentityConfig::try_parse_from([
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
            IdentityConfig::new("/c.yaml".into(), "/ca.crt".into(), "/issuer".into())
        );
        assert_eq!(config.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(config.metrics_listen.to_string(), "0.0.0.0:9990");
    }

    #[test]
    fn flags_override_durations_and_addresses() {
        let config = IdentityConfig::try_parse_from([
            "sealmesh-identity",
            "--cluster-file=/c.yaml",
            "--trust-anchors=/ca.crt",
            "--issuer-dir=/issuer",
            "--issuer-poll-interval=2s",
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
        assert_eq!(config.log.log_level, "debug");
        let Mode::Local(local) = config.mode else {
            panic!("local mode is the default")
        };
        assert_eq!(local.issuer_poll_interval, Duration::from_secs(2));
    }

    #[test]
    fn kubernetes_mode_has_the_documented_defaults() {
        let config =
            IdentityConfig::try_parse_from(["sealmesh-identity", "--mode", "kubernetes"]).unwrap();
        let expected = IdentityConfig::kubernetes(KubeSettings::new(TrustDomain::default()));
        assert_eq!(config, expected);
        let Mode::Kubernetes(settings) = &config.mode else {
            unreachable!()
        };
        assert_eq!(settings.namespace(), "sealmesh");
        assert_eq!(settings.trust_domain.domain(), "cluster.local");
        assert_eq!(settings.token_audience, "identity.sealmesh.io");
        assert_eq!(settings.agent_service_account, "sealmesh-agent");
        assert_eq!(settings.deployment, "sealmesh-identity");
        assert!(format!("{config:?}").contains("mode: Kubernetes("));
    }

    #[test]
    fn kubernetes_mode_takes_its_own_flags() {
        let config = IdentityConfig::try_parse_from([
            "sealmesh-identity",
            "--mode=kubernetes",
            "--namespace=mesh-system",
            "--trust-domain=example.org",
            "--token-audience=aud.example",
            "--agent-service-account=node-agent",
            "--deployment=ca",
            "--listen=127.0.0.1:1234",
        ])
        .unwrap();
        let Mode::Kubernetes(settings) = config.mode else {
            panic!("kubernetes mode")
        };
        assert_eq!(
            settings,
            KubeSettings {
                trust_domain: TrustDomain::new("example.org", "mesh-system").unwrap(),
                token_audience: "aud.example".into(),
                agent_service_account: "node-agent".into(),
                deployment: "ca".into(),
            }
        );
        assert_eq!(config.listen, "127.0.0.1:1234".parse().unwrap());
    }

    #[test]
    fn kubernetes_mode_refuses_local_flags() {
        for flag in [
            "--cluster-file=/c.yaml",
            "--trust-anchors=/ca.crt",
            "--issuer-dir=/issuer",
            "--issuer-poll-interval=1s",
        ] {
            let error =
                IdentityConfig::try_parse_from(["sealmesh-identity", "--mode=kubernetes", flag])
                    .unwrap_err();
            let name = flag.trim_start_matches("--").split('=').next().unwrap();
            assert_eq!(
                error.to_string(),
                format!("--{name} is a local-mode flag; remove it, or run with --mode local")
            );
        }
    }

    #[test]
    fn local_mode_refuses_kubernetes_flags_and_needs_its_paths() {
        let error = IdentityConfig::try_parse_from([
            "sealmesh-identity",
            "--cluster-file=/c.yaml",
            "--trust-anchors=/ca.crt",
            "--issuer-dir=/issuer",
            "--token-audience=x",
        ])
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            "--token-audience is a kubernetes-mode flag; remove it, or run with --mode kubernetes"
        );
        let error = IdentityConfig::try_parse_from([
            "sealmesh-identity",
            "--cluster-file=/c.yaml",
            "--issuer-dir=/issuer",
        ])
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            "--trust-anchors is required in local mode (or set SEALMESH_TRUST_ANCHORS)"
        );
    }

    #[test]
    fn an_invalid_trust_domain_is_refused() {
        let error = IdentityConfig::try_parse_from([
            "sealmesh-identity",
            "--mode=kubernetes",
            "--trust-domain=Not A Domain",
        ])
        .unwrap_err();
        assert!(
            matches!(error, ConfigError::TrustDomain(_)),
            "unexpected error {error}"
        );
    }
}
