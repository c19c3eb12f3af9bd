//! The agent's configuration: parsed from the command line (and environment)
//! in one place, with every default filled from the cluster file, then
//! validated before anything starts.

use std::{
    fmt,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
};

use clap::{Parser, ValueEnum};
use sealmesh_common::{
    cluster::{ClusterError, ClusterFile},
    consts::{AGENT_ADMIN_PORT, AGENT_METRICS_PORT},
    host,
    identity::TrustDomain,
};
use serde::Serialize;

/// Directory under the bpffs mount that holds every sealmesh pin; below it,
/// one directory per cluster and node so several testbed nodes share a host.
const BPFFS_SUBDIR: &str = "sealmesh";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot use the cluster file: {0}")]
    Cluster(#[from] ClusterError),
    #[error(
        "node {node:?} is not in the cluster file {file} (nodes: {known}); pass --node with one of them"
    )]
    UnknownNode {
        node: String,
        file: PathBuf,
        known: String,
    },
    #[error(
        "no {what} configured: the cluster file {file} has no identity section; pass {flag} or deploy the identity service first"
    )]
    MissingIdentity {
        what: &'static str,
        flag: &'static str,
        file: PathBuf,
    },
    #[error(
        "no token file for node {node}: the cluster file has no nodes[].tokenFile for it; pass --token-file"
    )]
    MissingTokenFile { node: String },
    #[error("bpffs is not mounted; mount it (mount -t bpf bpf /sys/fs/bpf) or pass --bpffs-dir")]
    NoBpffs,
    #[error("invalid --log-level {level:?}: {reason}")]
    LogLevel { level: String, reason: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Command-line flags as typed; `Config::from_args` turns them into a
/// complete `Config`.
#[derive(Clone, Debug, Parser)]
#[command(name = "sealmesh-agent", version, about = "sealmesh node agent")]
pub struct Args {
    /// Cluster description (written by the testbed) to read nodes, pods and Services from.
    #[arg(long, env = "SEALMESH_CLUSTER_FILE")]
    pub cluster_file: PathBuf,
    /// Name of the node this agent serves (a node of the cluster file).
    #[arg(long, env = "SEALMESH_NODE")]
    pub node: String,
    /// Directory to pin eBPF maps and links in [default: <bpffs>/sealmesh/<cluster>/<node>].
    #[arg(long)]
    pub bpffs_dir: Option<PathBuf>,
    /// cgroup v2 directory to attach the redirect programs to [default: the node's cgroup].
    #[arg(long)]
    pub node_cgroup: Option<PathBuf>,
    /// Identity service gRPC address [default: from the cluster file].
    #[arg(long)]
    pub identity_addr: Option<SocketAddr>,
    /// PEM bundle of trust anchors [default: from the cluster file].
    #[arg(long)]
    pub trust_anchors: Option<PathBuf>,
    /// File holding this node's identity-service token [default: the node's tokenFile].
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Carry same-node meshed connections over mTLS (HBONE to this node) instead of connecting directly.
    #[arg(long)]
    pub force_mtls_local: bool,
    /// Refuse connections to non-meshed destinations instead of passing them through in plaintext.
    #[arg(long)]
    pub deny_plaintext: bool,
    /// Admin gRPC API address (status, connections, tap, certificates, config). It exposes
    /// traffic metadata: keep it on loopback unless the address is otherwise protected
    /// [default: 127.0.0.1:15000].
    #[arg(long)]
    pub admin_listen: Option<SocketAddr>,
    /// Prometheus metrics and /healthz/live, /healthz/ready [default: 0.0.0.0:15020].
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Log filter: a level (info, debug, ...) or tracing directives (sealmesh_agent=debug,h2=info).
    #[arg(long, default_value = "info", env = "SEALMESH_LOG")]
    pub log_level: String,
    /// Log output format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Move payload between pods and this agent with sk_msg/sockhash instead of through the
    /// TCP/IP stack (same-host pod <-> agent hop only). Off by default: on Linux 6.18 a pod
    /// socket in a sockhash can fail a blocking read with EAGAIN when it is woken without data
    /// (e.g. by its own writer thread), which breaks ordinary blocking apps.
    #[arg(long, value_enum, default_value_t = OnOff::Off, env = "SEALMESH_SOCKMAP_ACCELERATION")]
    pub sockmap_acceleration: OnOff,
}

/// A feature switch as typed on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

/// What the proxy does beyond the defaults; copied into the TLS engine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Policy {
    pub force_mtls_local: bool,
    pub deny_plaintext: bool,
}

/// The agent's complete, validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub cluster_file: PathBuf,
    pub cluster_name: String,
    pub node: String,
    pub node_ip: Ipv4Addr,
    pub trust_domain: TrustDomain,
    pub bpffs_dir: PathBuf,
    pub node_cgroup: PathBuf,
    pub identity_addr: SocketAddr,
    pub trust_anchors: PathBuf,
    /// Path only; the token itself is read by the cert store and never logged.
    pub token_file: PathBuf,
    pub policy: Policy,
    pub sockmap_acceleration: bool,
    pub admin_listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub log_level: String,
    pub log_format: LogFormat,
}

/// The configuration as the admin API dumps it. Holds no secret: the token
/// is only named by its file, never read here.
#[derive(Serialize)]
struct ConfigView<'a> {
    cluster_file: &'a Path,
    cluster_name: &'a str,
    node: &'a str,
    node_ip: Ipv4Addr,
    trust_domain: &'a str,
    bpffs_dir: &'a Path,
    node_cgroup: &'a Path,
    identity_addr: SocketAddr,
    trust_anchors: &'a Path,
    token_file: &'a Path,
    token: &'static str,
    policy: Policy,
    sockmap_acceleration: bool,
    admin_listen: SocketAddr,
    metrics_listen: SocketAddr,
    log_level: &'a str,
    log_format: LogFormat,
}

/// What the YAML dump shows instead of the token.
const TOKEN_REDACTED: &str = "<redacted: read from token_file on each request>";

impl Config {
    /// The effective configuration as YAML, secrets redacted (for the admin API).
    pub fn to_redacted_yaml(&self) -> String {
        let view = ConfigView {
            cluster_file: &self.cluster_file,
            cluster_name: &self.cluster_name,
            node: &self.node,
            node_ip: self.node_ip,
            trust_domain: self.trust_domain.domain(),
            bpffs_dir: &self.bpffs_dir,
            node_cgroup: &self.node_cgroup,
            identity_addr: self.identity_addr,
            trust_anchors: &self.trust_anchors,
            token_file: &self.token_file,
            token: TOKEN_REDACTED,
            policy: self.policy,
            sockmap_acceleration: self.sockmap_acceleration,
            admin_listen: self.admin_listen,
            metrics_listen: self.metrics_listen,
            log_level: &self.log_level,
            log_format: self.log_format,
        };
        // Paths, addresses and strings only: serialising cannot fail.
        serde_yaml_ng::to_string(&view).expect("the config view serialises to YAML")
    }

    /// Parses the process's arguments and fills the defaults.
    pub fn load() -> Result<Self, ConfigError> {
        Self::from_args(Args::parse())
    }

    pub fn from_args(args: Args) -> Result<Self, ConfigError> {
        let cluster = ClusterFile::load(&args.cluster_file)?;
        let bpffs_mount = match &args.bpffs_dir {
            Some(_) => None,
            None => Some(host::bpffs_mount().ok_or(ConfigError::NoBpffs)?),
        };
        Self::resolve(args, &cluster, bpffs_mount.as_deref())
    }

    /// Fills defaults from an already-loaded cluster description; separate
    /// from `from_args` so the rules are testable without a host.
    fn resolve(
        args: Args,
        cluster: &ClusterFile,
        bpffs_mount: Option<&Path>,
    ) -> Result<Self, ConfigError> {
        let node = cluster
            .node(&args.node)
            .ok_or_else(|| ConfigError::UnknownNode {
                node: args.node.clone(),
                file: args.cluster_file.clone(),
                known: cluster
                    .nodes
                    .iter()
                    .map(|n| n.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        let missing_identity = |what, flag| ConfigError::MissingIdentity {
            what,
            flag,
            file: args.cluster_file.clone(),
        };
        let identity_addr = match (args.identity_addr, &cluster.identity) {
            (Some(addr), _) => addr,
            (None, Some(id)) => id.address,
            (None, None) => {
                return Err(missing_identity(
                    "identity service address",
                    "--identity-addr",
                ));
            }
        };
        let trust_anchors = match (&args.trust_anchors, &cluster.identity) {
            (Some(path), _) => path.clone(),
            (None, Some(id)) => id.trust_anchors_file.clone(),
            (None, None) => return Err(missing_identity("trust anchors", "--trust-anchors")),
        };
        let token_file = args
            .token_file
            .clone()
            .or_else(|| node.token_file.clone())
            .ok_or_else(|| ConfigError::MissingTokenFile {
                node: node.name.clone(),
            })?;
        let bpffs_dir = match (&args.bpffs_dir, bpffs_mount) {
            (Some(dir), _) => dir.clone(),
            (None, Some(mount)) => mount
                .join(BPFFS_SUBDIR)
                .join(&cluster.name)
                .join(&node.name),
            (None, None) => return Err(ConfigError::NoBpffs),
        };
        tracing_subscriber::EnvFilter::try_new(&args.log_level).map_err(|e| {
            ConfigError::LogLevel {
                level: args.log_level.clone(),
                reason: e.to_string(),
            }
        })?;
        Ok(Self {
            cluster_name: cluster.name.clone(),
            node: node.name.clone(),
            node_ip: node.ip,
            trust_domain: cluster.trust_domain()?,
            bpffs_dir,
            node_cgroup: args.node_cgroup.unwrap_or_else(|| node.cgroup.clone()),
            identity_addr,
            trust_anchors,
            token_file,
            policy: Policy {
                force_mtls_local: args.force_mtls_local,
                deny_plaintext: args.deny_plaintext,
            },
            sockmap_acceleration: args.sockmap_acceleration == OnOff::On,
            admin_listen: args
                .admin_listen
                .unwrap_or(SocketAddr::from((Ipv4Addr::LOCALHOST, AGENT_ADMIN_PORT))),
            metrics_listen: args.metrics_listen.unwrap_or(SocketAddr::from((
                Ipv4Addr::UNSPECIFIED,
                AGENT_METRICS_PORT,
            ))),
            log_level: args.log_level,
            log_format: args.log_format,
            cluster_file: args.cluster_file,
        })
    }
}

/// One-line dump for the start-up log. It holds no secrets (the token file's
/// path, never its content) so nothing needs masking beyond that.
impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cluster_file={} cluster={} node={} node_ip={} trust_domain={} bpffs_dir={} node_cgroup={} \
             identity_addr={} trust_anchors={} token_file={} (content not shown) force_mtls_local={} \
             deny_plaintext={} admin_listen={} metrics_listen={} log_level={} log_format={:?}",
            self.cluster_file.display(),
            self.cluster_name,
            self.node,
            self.node_ip,
            self.trust_domain.domain(),
            self.bpffs_dir.display(),
            self.node_cgroup.display(),
            self.identity_addr,
            self.trust_anchors.display(),
            self.token_file.display(),
            self.policy.force_mtls_local,
            self.policy.deny_plaintext,
            self.admin_listen,
            self.metrics_listen,
            self.log_level,
            self.log_format,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLUSTER: &str = r#"
apiVersion: sealmesh.io/v1alpha1
kind: Cluster
name: tb-cfg
identity: { address: "172.18.0.1:8080", trustAnchorsFile: /run/sealmesh/tb-cfg/ca-bundle.crt }
nodes:
  - { name: node-0, ip: 172.18.0.2, podCidr: 10.244.0.0/24, cgroup: /sys/fs/cgroup/sealmesh/tb-cfg/node-0, tokenFile: /run/sealmesh/tb-cfg/node-0.token }
  - { name: node-1, ip: 172.18.0.3, podCidr: 10.244.1.0/24, cgroup: /sys/fs/cgroup/sealmesh/tb-cfg/node-1 }
"#;

    fn args_for(node: &str, extra: &[&str]) -> Args {
        let mut argv = vec![
            "sealmesh-agent",
            "--cluster-file",
            "/etc/cluster.yaml",
            "--node",
            node,
        ];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).unwrap()
    }

    fn args(extra: &[&str]) -> Args {
        args_for("node-0", extra)
    }

    fn resolve(extra: &[&str]) -> Result<Config, ConfigError> {
        let cluster = ClusterFile::from_yaml(CLUSTER).unwrap();
        Config::resolve(args(extra), &cluster, Some(Path::new("/sys/fs/bpf")))
    }

    #[test]
    fn fills_defaults_from_the_cluster_file() {
        let c = resolve(&[]).unwrap();
        assert_eq!(c.node_ip, Ipv4Addr::new(172, 18, 0, 2));
        assert_eq!(c.identity_addr, "172.18.0.1:8080".parse().unwrap());
        assert_eq!(
            c.trust_anchors,
            Path::new("/run/sealmesh/tb-cfg/ca-bundle.crt")
        );
        assert_eq!(c.token_file, Path::new("/run/sealmesh/tb-cfg/node-0.token"));
        assert_eq!(
            c.node_cgroup,
            Path::new("/sys/fs/cgroup/sealmesh/tb-cfg/node-0")
        );
        assert_eq!(c.bpffs_dir, Path::new("/sys/fs/bpf/sealmesh/tb-cfg/node-0"));
        assert_eq!(c.policy, Policy::default());
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.trust_domain, TrustDomain::default());
        assert_eq!(c.admin_listen, "127.0.0.1:15000".parse().unwrap());
        assert_eq!(c.metrics_listen, "0.0.0.0:15020".parse().unwrap());
    }

    #[test]
    fn flags_override_the_cluster_file() {
        let c = resolve(&[
            "--identity-addr",
            "127.0.0.1:9000",
            "--trust-anchors",
            "/a.pem",
            "--token-file",
            "/t",
            "--node-cgroup",
            "/sys/fs/cgroup/x",
            "--bpffs-dir",
            "/sys/fs/bpf/x",
            "--force-mtls-local",
            "--deny-plaintext",
            "--log-format",
            "json",
            "--log-level",
            "sealmesh_agent=debug",
            "--admin-listen",
            "172.18.0.2:16000",
            "--metrics-listen",
            "127.0.0.1:16020",
        ])
        .unwrap();
        assert_eq!(c.admin_listen, "172.18.0.2:16000".parse().unwrap());
        assert_eq!(c.metrics_listen, "127.0.0.1:16020".parse().unwrap());
        assert_eq!(c.identity_addr, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(c.trust_anchors, Path::new("/a.pem"));
        assert_eq!(c.token_file, Path::new("/t"));
        assert_eq!(c.node_cgroup, Path::new("/sys/fs/cgroup/x"));
        assert_eq!(c.bpffs_dir, Path::new("/sys/fs/bpf/x"));
        assert_eq!(
            c.policy,
            Policy {
                force_mtls_local: true,
                deny_plaintext: true
            }
        );
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.log_level, "sealmesh_agent=debug");
    }

    #[test]
    fn explains_what_is_missing() {
        let cluster = ClusterFile::from_yaml(CLUSTER).unwrap();
        let err = Config::resolve(
            args_for("node-9", &[]),
            &cluster,
            Some(Path::new("/sys/fs/bpf")),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "node \"node-9\" is not in the cluster file /etc/cluster.yaml (nodes: node-0, node-1); pass --node with one of them"
        );

        let err = Config::resolve(
            args_for("node-1", &[]),
            &cluster,
            Some(Path::new("/sys/fs/bpf")),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "no token file for node node-1: the cluster file has no nodes[].tokenFile for it; pass --token-file"
        );

        let mut no_identity = cluster.clone();
        no_identity.identity = None;
        let err =
            Config::resolve(args(&[]), &no_identity, Some(Path::new("/sys/fs/bpf"))).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("no identity service address configured"),
            "{err}"
        );

        let err = Config::resolve(args(&[]), &cluster, None).unwrap_err();
        assert!(matches!(err, ConfigError::NoBpffs), "{err}");

        let err = resolve(&["--log-level", "sealmesh_agent=loud"]).unwrap_err();
        assert!(matches!(err, ConfigError::LogLevel { .. }), "{err}");
    }

    #[test]
    fn yaml_dump_names_the_token_file_and_redacts_the_token() {
        let yaml = resolve(&["--deny-plaintext"]).unwrap().to_redacted_yaml();
        let dumped: serde_yaml_ng::Value = serde_yaml_ng::from_str(&yaml).unwrap();
        assert_eq!(dumped["node"], "node-0");
        assert_eq!(dumped["node_ip"], "172.18.0.2");
        assert_eq!(dumped["token_file"], "/run/sealmesh/tb-cfg/node-0.token");
        assert_eq!(dumped["token"], TOKEN_REDACTED);
        assert_eq!(dumped["policy"]["deny_plaintext"], true);
        assert_eq!(dumped["sockmap_acceleration"], false);
        assert_eq!(dumped["admin_listen"], "127.0.0.1:15000");
        assert_eq!(dumped["log_format"], "text");
    }

    #[test]
    fn display_names_the_token_path_but_not_its_content() {
        let shown = resolve(&[]).unwrap().to_string();
        assert!(
            shown.contains("token_file=/run/sealmesh/tb-cfg/node-0.token (content not shown)"),
            "{shown}"
        );
    }
}
