//! `sealmesh install` and `sealmesh uninstall`: the manifests of
//! `deploy/base` and the NetworkPolicies of `deploy/overlays/network-policy`
//! (embedded in the binary) with the trust anchor and issuer, the nodes'
//! CIDRs and the monitoring namespace, printed for `kubectl apply -f -` and
//! `kubectl delete -f -`, as `linkerd install` / `linkerd uninstall` do.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use ipnet::IpNet;
use sealmesh_common::consts::{
    DEFAULT_CONTROL_NAMESPACE, DEFAULT_TRUST_DOMAIN,
    kube::{
        AGENT_DAEMONSET, DEFAULT_MONITORING_NAMESPACE, IDENTITY_NAME, ISSUER_SECRET,
        NAMESPACE_NAME_LABEL, NODE_CIDRS_PLACEHOLDER, TRUST_ROOTS_CONFIGMAP,
    },
};
use sealmesh_pki::{
    CaMaterial, CaSpec, DEFAULT_ISSUER_COMMON_NAME, DEFAULT_ROOT_COMMON_NAME, Issuer, TrustAnchors,
    generate_issuer, generate_root,
};
use serde_json::{Value, json};
use time::OffsetDateTime;

/// The documents, in the order they are applied: the CRD first (so it is
/// Established before anything names its resource), the Namespace, then
/// identities, permissions and NetworkPolicies, then the workloads.
const DOCUMENTS: &[(&str, &str)] = &[
    (
        "deploy/base/authorizationpolicy-crd.yaml",
        include_str!("../../deploy/base/authorizationpolicy-crd.yaml"),
    ),
    (
        "deploy/base/namespace.yaml",
        include_str!("../../deploy/base/namespace.yaml"),
    ),
    (
        "deploy/base/serviceaccounts.yaml",
        include_str!("../../deploy/base/serviceaccounts.yaml"),
    ),
    (
        "deploy/base/agent-rbac.yaml",
        include_str!("../../deploy/base/agent-rbac.yaml"),
    ),
    (
        "deploy/base/identity-rbac.yaml",
        include_str!("../../deploy/base/identity-rbac.yaml"),
    ),
    (
        "deploy/overlays/network-policy/network-policy.yaml",
        include_str!("../../deploy/overlays/network-policy/network-policy.yaml"),
    ),
    (
        "deploy/base/identity.yaml",
        include_str!("../../deploy/base/identity.yaml"),
    ),
    (
        "deploy/base/agent.yaml",
        include_str!("../../deploy/base/agent.yaml"),
    ),
];
/// The namespace the base's documents name.
const BASE_NAMESPACE: &str = "sealmesh";
/// The base's images, without tag (`deploy/base/kustomization.yaml` sets it).
const BASE_IMAGES: [(&str, &str); 2] = [
    ("ghcr.io/sealmesh/agent", "agent"),
    ("ghcr.io/sealmesh/identity", "identity"),
];
/// The label `deploy/base/kustomization.yaml` puts on every object.
const PART_OF_LABEL: (&str, &str) = ("app.kubernetes.io/part-of", "sealmesh");
/// A generated trust anchor's lifetime, and the issuer's (renew it, or use
/// cert-manager: docs/OPERATIONS.md).
const GENERATED_ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const GENERATED_ISSUER_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum InboundPolicy {
    Permissive,
    Strict,
}

#[derive(Debug, Args)]
pub struct InstallArgs {
    /// Namespace sealmesh runs in.
    #[arg(long, default_value = DEFAULT_CONTROL_NAMESPACE)]
    pub namespace: String,
    /// Trust anchors (PEM bundle of root certificates) to use instead of
    /// generating one; needs the issuer files too.
    #[arg(long, value_name = "FILE", requires_all = ["identity_issuer_certificate_file", "identity_issuer_key_file"])]
    pub identity_trust_anchors_file: Option<PathBuf>,
    /// The issuer's certificate (PEM), signed by one of the trust anchors.
    #[arg(long, value_name = "FILE", requires = "identity_trust_anchors_file")]
    pub identity_issuer_certificate_file: Option<PathBuf>,
    /// The issuer's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "identity_trust_anchors_file")]
    pub identity_issuer_key_file: Option<PathBuf>,
    /// Registry of the sealmesh images (`<registry>/agent`, `<registry>/identity`).
    #[arg(long, default_value = "ghcr.io/sealmesh")]
    pub registry: String,
    /// Tag of the sealmesh images.
    #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
    pub image_tag: String,
    /// Trust domain of the mesh's identities.
    #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Inbound policy of meshed pods that no annotation sets.
    #[arg(long, value_enum, default_value_t = InboundPolicy::Permissive)]
    pub default_inbound_policy: InboundPolicy,
    /// Three identity service replicas instead of two (the
    /// PodDisruptionBudget keeps one available either way).
    #[arg(long)]
    pub ha: bool,
    /// CIDRs of the nodes' addresses (comma-separated, e.g.
    /// 10.0.0.0/16,fd00::/64): the only sources the NetworkPolicy admits to
    /// the identity service's gRPC port, since the agents run on the host
    /// network. Add the nodes' tunnel addresses where the CNI sends host
    /// traffic from them (docs/OPERATIONS.md, "NetworkPolicies").
    #[arg(long, value_name = "CIDR,...", value_delimiter = ',', required = true)]
    pub node_cidrs: Vec<IpNet>,
    /// Namespace whose pods (Prometheus) may scrape the identity service's
    /// metrics port.
    #[arg(long, value_name = "NAMESPACE", default_value = DEFAULT_MONITORING_NAMESPACE)]
    pub monitoring_namespace: String,
}

#[derive(Debug, Args)]
pub struct UninstallArgs {
    /// Namespace sealmesh runs in.
    #[arg(long, default_value = DEFAULT_CONTROL_NAMESPACE)]
    pub namespace: String,
}

pub fn install(args: &InstallArgs) -> Result<ExitCode> {
    let pki = MeshPki::for_install(args)?;
    let documents = install_documents(args, &pki)?;
    print_documents(&documents)?;
    Ok(ExitCode::SUCCESS)
}

pub fn uninstall(args: &UninstallArgs) -> Result<ExitCode> {
    print_documents(&uninstall_documents(&args.namespace)?)?;
    Ok(ExitCode::SUCCESS)
}

/// The trust anchors and the issuer the identity service signs with.
struct MeshPki {
    anchors_pem: String,
    issuer_cert_pem: String,
    issuer_key_pem: String,
}

impl MeshPki {
    fn for_install(args: &InstallArgs) -> Result<Self> {
        let pki = match (
            &args.identity_trust_anchors_file,
            &args.identity_issuer_certificate_file,
            &args.identity_issuer_key_file,
        ) {
            (Some(anchors), Some(cert), Some(key)) => Self {
                anchors_pem: read(anchors)?,
                issuer_cert_pem: read(cert)?,
                issuer_key_pem: read(key)?,
            },
            _ => Self::generate()?,
        };
        pki.check()?;
        Ok(pki)
    }

    /// A new root and an issuer under it; the root's key is not kept (as
    /// `linkerd install` does): rotate by installing a new root.
    fn generate() -> Result<Self> {
        let root = generate_root(&CaSpec::valid_for(
            DEFAULT_ROOT_COMMON_NAME,
            GENERATED_ROOT_VALIDITY,
        ))
        .context("generating the trust anchor")?;
        let (issuer, _) = generate_issuer(
            &root.material(),
            &CaSpec::valid_for(DEFAULT_ISSUER_COMMON_NAME, GENERATED_ISSUER_VALIDITY),
        )
        .context("generating the issuer")?;
        Ok(Self {
            anchors_pem: root.cert_pem,
            issuer_cert_pem: issuer.cert_pem,
            issuer_key_pem: issuer.key_pem,
        })
    }

    /// The issuer must chain to the anchors and be valid now, or the identity
    /// service would refuse to start.
    fn check(&self) -> Result<()> {
        let anchors = TrustAnchors::from_pem(self.anchors_pem.as_bytes(), "the trust anchors")
            .context("reading --identity-trust-anchors-file")?;
        let material = CaMaterial {
            source: "the issuer".to_owned(),
            cert_pem: self.issuer_cert_pem.clone().into_bytes(),
            key_pem: self.issuer_key_pem.clone().into_bytes(),
            ca_pem: None,
        };
        Issuer::from_material(&material, &anchors, OffsetDateTime::now_utc())
            .context("the issuer does not fit the trust anchors")?;
        Ok(())
    }
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// The embedded objects (the base and the network policies) as YAML values.
pub(crate) fn base_objects() -> Result<Vec<Value>> {
    let mut objects = Vec::new();
    for (file, text) in DOCUMENTS {
        for document in serde_yaml_ng::Deserializer::from_str(text) {
            let value: Value = serde::Deserialize::deserialize(document)
                .with_context(|| format!("parsing the embedded {file}"))?;
            if !value.is_null() {
                objects.push(value);
            }
        }
    }
    Ok(objects)
}

fn is_cluster_scoped(kind: &str) -> bool {
    matches!(
        kind,
        "Namespace" | "ClusterRole" | "ClusterRoleBinding" | "CustomResourceDefinition"
    )
}

/// What `kubectl apply -f -` installs: the base and the NetworkPolicies in
/// `args.namespace` with its images, node CIDRs and monitoring namespace, the
/// trust-roots ConfigMap and the issuer Secret.
fn install_documents(args: &InstallArgs, pki: &MeshPki) -> Result<Vec<Value>> {
    for (flag, namespace) in [
        ("--namespace", &args.namespace),
        ("--monitoring-namespace", &args.monitoring_namespace),
    ] {
        if namespace.is_empty() || namespace.len() > 63 {
            bail!("{flag} must be a Kubernetes namespace name (1-63 characters)");
        }
    }
    if let Some(everything) = args.node_cidrs.iter().find(|c| c.prefix_len() == 0) {
        bail!(
            "--node-cidrs {everything} admits every address to the identity service: give the nodes' CIDRs"
        );
    }
    let mut objects = base_objects()?;
    for object in &mut objects {
        place(object, &args.namespace);
        if object["kind"] == "NetworkPolicy" {
            fill_network_policy(object, args);
        }
        let kind = object["kind"].as_str().unwrap_or_default().to_owned();
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        for container in containers(object) {
            if let Some(image) = container["image"].as_str()
                && let Some((_, short)) = BASE_IMAGES.iter().find(|(base, _)| *base == image)
            {
                container["image"] = json!(format!("{}/{short}:{}", args.registry, args.image_tag));
            }
            let flags = container_flags(&kind, &name, args);
            if let Some(list) = container.get_mut("args").and_then(Value::as_array_mut) {
                list.extend(flags.into_iter().map(Value::from));
            }
        }
        if args.ha && kind == "Deployment" && name == IDENTITY_NAME {
            object["spec"]["replicas"] = json!(3);
        }
    }
    let labelled = |mut object: Value| {
        object["metadata"]["labels"] = json!({ PART_OF_LABEL.0: PART_OF_LABEL.1 });
        object
    };
    // After the Namespace and permissions, before the workloads that read them.
    let workloads = objects
        .iter()
        .position(|o| o["kind"] == "Deployment" || o["kind"] == "DaemonSet")
        .unwrap_or(objects.len());
    objects.splice(
        workloads..workloads,
        [
            labelled(json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": { "name": TRUST_ROOTS_CONFIGMAP, "namespace": args.namespace },
                "data": { "ca-bundle.crt": pki.anchors_pem },
            })),
            labelled(json!({
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": { "name": ISSUER_SECRET, "namespace": args.namespace },
                "type": "Opaque",
                "stringData": { "crt.pem": pki.issuer_cert_pem, "key.pem": pki.issuer_key_pem },
            })),
        ],
    );
    Ok(objects)
}

/// Fills in what `deploy/overlays/network-policy` leaves to its user: the
/// nodes' CIDRs for the placeholder and the monitoring namespace.
fn fill_network_policy(policy: &mut Value, args: &InstallArgs) {
    let Some(rules) = policy
        .pointer_mut("/spec/ingress")
        .and_then(Value::as_array_mut)
    else {
        return;
    };
    for rule in rules {
        let Some(peers) = rule.get_mut("from").and_then(Value::as_array_mut) else {
            continue;
        };
        if peers
            .iter()
            .any(|peer| peer["ipBlock"]["cidr"] == NODE_CIDRS_PLACEHOLDER)
        {
            // Canonical (host bits cleared), as the API server expects.
            *peers = args
                .node_cidrs
                .iter()
                .map(|cidr| json!({ "ipBlock": { "cidr": cidr.trunc().to_string() } }))
                .collect();
        }
        for peer in peers {
            if let Some(labels) = peer
                .pointer_mut("/namespaceSelector/matchLabels")
                .and_then(Value::as_object_mut)
                && labels.contains_key(NAMESPACE_NAME_LABEL)
            {
                labels.insert(
                    NAMESPACE_NAME_LABEL.to_owned(),
                    json!(args.monitoring_namespace),
                );
            }
        }
    }
}

/// Flags the container of `kind`/`name` gets from the install options.
fn container_flags(kind: &str, name: &str, args: &InstallArgs) -> Vec<String> {
    let mut flags = Vec::new();
    if args.trust_domain != DEFAULT_TRUST_DOMAIN {
        flags.extend(["--trust-domain".to_owned(), args.trust_domain.clone()]);
    }
    if kind == "DaemonSet"
        && name == AGENT_DAEMONSET
        && args.default_inbound_policy == InboundPolicy::Strict
    {
        flags.extend(["--default-inbound-policy".to_owned(), "strict".to_owned()]);
    }
    flags
}

/// What `kubectl delete -f -` removes, the agents' DaemonSet first (each
/// agent then removes sealmesh from its node as it stops) and the Namespace
/// last; only kinds and names, no secret material.
fn uninstall_documents(namespace: &str) -> Result<Vec<Value>> {
    let mut objects: Vec<Value> = base_objects()?
        .into_iter()
        .map(|mut object| {
            place(&mut object, namespace);
            let mut reference = json!({
                "apiVersion": object["apiVersion"],
                "kind": object["kind"],
                "metadata": { "name": object["metadata"]["name"] },
            });
            if !object["metadata"]["namespace"].is_null() {
                reference["metadata"]["namespace"] = object["metadata"]["namespace"].clone();
            }
            reference
        })
        .collect();
    for (kind, name) in [
        ("ConfigMap", TRUST_ROOTS_CONFIGMAP),
        ("Secret", ISSUER_SECRET),
    ] {
        objects.push(json!({
            "apiVersion": "v1", "kind": kind,
            "metadata": { "name": name, "namespace": namespace },
        }));
    }
    objects.sort_by_key(|o| match o["kind"].as_str() {
        Some("DaemonSet") => 0,
        Some("Namespace") => 2,
        _ => 1,
    });
    Ok(objects)
}

/// Puts `object` in `namespace` (and its RBAC subjects), with the base's label.
pub(crate) fn place(object: &mut Value, namespace: &str) {
    let kind = object["kind"].as_str().unwrap_or_default().to_owned();
    if kind == "Namespace" {
        object["metadata"]["name"] = json!(namespace);
    } else if !is_cluster_scoped(&kind) {
        object["metadata"]["namespace"] = json!(namespace);
    }
    // `get_mut`, not indexing: a mutable index inserts the missing key.
    if let Some(subjects) = object.get_mut("subjects").and_then(Value::as_array_mut) {
        for subject in subjects {
            if subject["namespace"] == BASE_NAMESPACE {
                subject["namespace"] = json!(namespace);
            }
        }
    }
    let labels = object["metadata"]
        .as_object_mut()
        .expect("objects have metadata")
        .entry("labels")
        .or_insert_with(|| json!({}));
    labels[PART_OF_LABEL.0] = json!(PART_OF_LABEL.1);
}

fn containers(object: &mut Value) -> Vec<&mut Value> {
    object
        .pointer_mut("/spec/template/spec/containers")
        .and_then(Value::as_array_mut)
        .map(|c| c.iter_mut().collect())
        .unwrap_or_default()
}

fn print_documents(documents: &[Value]) -> Result<()> {
    let mut out = std::io::stdout().lock();
    for document in documents {
        writeln!(out, "---")?;
        out.write_all(serde_yaml_ng::to_string(document)?.as_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        install: InstallArgs,
    }

    fn args(flags: &[&str]) -> InstallArgs {
        Cli::try_parse_from(std::iter::once("install").chain(flags.iter().copied()))
            .unwrap()
            .install
    }

    fn kinds_and_names(objects: &[Value]) -> Vec<(String, String, String)> {
        objects
            .iter()
            .map(|o| {
                (
                    o["kind"].as_str().unwrap().to_owned(),
                    o["metadata"]["namespace"].as_str().unwrap_or("").to_owned(),
                    o["metadata"]["name"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn install_moves_everything_to_the_namespace_and_adds_the_pki() {
        let args = args(&[
            "--namespace",
            "mesh-system",
            "--image-tag",
            "9.9.9",
            "--ha",
            "--default-inbound-policy",
            "strict",
            "--node-cidrs",
            "10.0.0.0/16",
        ]);
        let pki = MeshPki::for_install(&args).unwrap();
        let objects = install_documents(&args, &pki).unwrap();
        let listed = kinds_and_names(&objects);
        // The CRD first and cluster-wide, whatever the namespace.
        assert_eq!(
            listed[0],
            (
                "CustomResourceDefinition".into(),
                "".into(),
                format!(
                    "{}.{}",
                    sealmesh_common::authz::PLURAL,
                    sealmesh_common::authz::API_GROUP
                )
            )
        );
        assert_eq!(
            listed[1],
            ("Namespace".into(), "".into(), "mesh-system".into())
        );
        for (kind, namespace, _) in &listed {
            if !is_cluster_scoped(kind) {
                assert_eq!(namespace, "mesh-system", "{kind}");
            }
        }
        let names: BTreeSet<_> = listed.iter().map(|(k, _, n)| format!("{k}/{n}")).collect();
        for expected in [
            "ConfigMap/sealmesh-identity-trust-roots",
            "Secret/sealmesh-identity-issuer",
            "DaemonSet/sealmesh-agent",
            "Deployment/sealmesh-identity",
        ] {
            assert!(names.contains(expected), "{expected} in {names:?}");
        }
        let workloads = listed
            .iter()
            .position(|(k, _, _)| k == "Deployment" || k == "DaemonSet")
            .unwrap();
        let secret = listed.iter().position(|(k, _, _)| k == "Secret").unwrap();
        assert!(secret < workloads, "the issuer Secret before the workloads");
        for object in &objects {
            if let Some(subjects) = object["subjects"].as_array() {
                for subject in subjects {
                    assert_eq!(subject["namespace"], "mesh-system", "{object}");
                }
            }
            assert_eq!(
                object["metadata"]["labels"][PART_OF_LABEL.0],
                PART_OF_LABEL.1
            );
        }
        let agent = objects.iter().find(|o| o["kind"] == "DaemonSet").unwrap();
        let container = &agent["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(container["image"], "ghcr.io/sealmesh/agent:9.9.9");
        let flags: Vec<&str> = container["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert!(
            flags
                .windows(2)
                .any(|w| w == ["--default-inbound-policy", "strict"]),
            "{flags:?}"
        );
        let identity = objects.iter().find(|o| o["kind"] == "Deployment").unwrap();
        assert_eq!(identity["spec"]["replicas"], 3);
        assert_eq!(
            identity["spec"]["template"]["spec"]["containers"][0]["image"],
            "ghcr.io/sealmesh/identity:9.9.9"
        );
    }

    /// The ingress rules of the NetworkPolicy `name`, by port: its sources.
    fn admitted(objects: &[Value], name: &str) -> Vec<(Value, Value)> {
        let policy = objects
            .iter()
            .find(|o| o["kind"] == "NetworkPolicy" && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("NetworkPolicy {name}"));
        policy["spec"]["ingress"]
            .as_array()
            .unwrap()
            .iter()
            .map(|rule| (rule["ports"].clone(), rule["from"].clone()))
            .collect()
    }

    #[test]
    fn install_admits_only_the_node_cidrs_to_grpc_and_the_monitoring_namespace_to_metrics() {
        let args = args(&[
            "--node-cidrs",
            "10.0.3.7/16,fd00:10::1/64",
            "--monitoring-namespace",
            "observability",
        ]);
        let pki = MeshPki::generate().unwrap();
        let objects = install_documents(&args, &pki).unwrap();
        assert_eq!(
            admitted(&objects, "sealmesh-identity-grpc"),
            [(
                json!([{ "protocol": "TCP", "port": "grpc" }]),
                json!([
                    { "ipBlock": { "cidr": "10.0.0.0/16" } },
                    { "ipBlock": { "cidr": "fd00:10::/64" } }
                ])
            )]
        );
        assert_eq!(
            admitted(&objects, "sealmesh-identity-metrics"),
            [(
                json!([{ "protocol": "TCP", "port": "metrics" }]),
                json!([{ "namespaceSelector": { "matchLabels": {
                    NAMESPACE_NAME_LABEL: "observability"
                } } }])
            )]
        );
        let deny = objects
            .iter()
            .find(|o| o["metadata"]["name"] == "sealmesh-default-deny-ingress")
            .unwrap();
        assert_eq!(
            deny["spec"],
            json!({ "podSelector": {}, "policyTypes": ["Ingress"] })
        );
        let listed = kinds_and_names(&objects);
        let policies = listed.iter().position(|(k, _, _)| k == "NetworkPolicy");
        let workloads = listed.iter().position(|(k, _, _)| k == "Deployment");
        assert!(policies < workloads, "the policies before the workloads");

        let defaults =
            install_documents(&self::args(&["--node-cidrs", "10.0.0.0/16"]), &pki).unwrap();
        assert_eq!(
            admitted(&defaults, "sealmesh-identity-metrics")[0].1,
            json!([{ "namespaceSelector": { "matchLabels": {
                NAMESPACE_NAME_LABEL: DEFAULT_MONITORING_NAMESPACE
            } } }])
        );
    }

    #[test]
    fn node_cidrs_are_required_and_may_not_admit_everything() {
        let error = Cli::try_parse_from(["install"]).err().expect("refused");
        assert!(error.to_string().contains("--node-cidrs"), "{error}");
        let error = Cli::try_parse_from(["install", "--node-cidrs", "10.0.0.0"])
            .err()
            .expect("refused");
        assert!(
            error.to_string().contains("invalid IP address syntax"),
            "{error}"
        );
        let pki = MeshPki::generate().unwrap();
        let error = install_documents(&args(&["--node-cidrs", "10.0.0.0/16,0.0.0.0/0"]), &pki)
            .expect_err("refused");
        assert_eq!(
            error.to_string(),
            "--node-cidrs 0.0.0.0/0 admits every address to the identity service: give the nodes' CIDRs"
        );
    }

    #[test]
    fn an_issuer_of_another_root_is_refused_before_anything_is_printed() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let mine = MeshPki::generate().unwrap();
        let theirs = MeshPki::generate().unwrap();
        let anchors = write("anchors.pem", &mine.anchors_pem);
        let cert = write("issuer.crt", &theirs.issuer_cert_pem);
        let key = write("issuer.key", &theirs.issuer_key_pem);
        let args = args(&[
            "--node-cidrs",
            "10.0.0.0/16",
            "--identity-trust-anchors-file",
            anchors.to_str().unwrap(),
            "--identity-issuer-certificate-file",
            cert.to_str().unwrap(),
            "--identity-issuer-key-file",
            key.to_str().unwrap(),
        ]);
        let error = MeshPki::for_install(&args).err().expect("refused");
        assert!(
            format!("{error:#}").contains("the issuer does not fit the trust anchors"),
            "{error:#}"
        );
    }

    #[test]
    fn uninstall_deletes_the_daemonset_first_and_the_namespace_last_without_secrets() {
        let objects = uninstall_documents("mesh-system").unwrap();
        let listed = kinds_and_names(&objects);
        assert_eq!(
            listed[0],
            (
                "DaemonSet".into(),
                "mesh-system".into(),
                AGENT_DAEMONSET.into()
            )
        );
        assert_eq!(
            listed.last().unwrap(),
            &("Namespace".into(), "".into(), "mesh-system".into())
        );
        for object in &objects {
            assert!(
                object.get("data").is_none() && object.get("stringData").is_none(),
                "{object}"
            );
        }
    }
}
