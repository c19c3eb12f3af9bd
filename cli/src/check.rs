//! `sealmesh check [--proxy] [--trust-bundle FILE] [-o table|json|short]`:
//! Linkerd's identity checks on the trust anchors and issuer, on Kubernetes
//! the control plane's workloads, ServiceAccounts and RBAC, in both modes
//! the authorization policies, with `--proxy`
//! checks of every agent's live certificates, and with `--trust-bundle`
//! whether a candidate anchor bundle keeps every anchor the issuer and live
//! leaves still need; printed as `linkerd check` prints them.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use rustls_pki_types::CertificateDer;
use sealmesh_common::{
    authz::{self, PolicyName},
    cluster::{ClusterFile, Pod},
    consts::{DEFAULT_CONTROL_NAMESPACE, DEFAULT_TRUST_DOMAIN, kube::TRUST_ROOTS_CONFIGMAP},
};
use sealmesh_pki::{CaMaterial, Issuer, TrustAnchors};
use sealmesh_proto::admin::{
    AgentStatus, GetCertificatesRequest, GetCertificatesResponse, GetStatusRequest,
};
use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::{
    agents::{
        AgentDirectory, AgentError, ClusterArgs, ClusterArgsError, ClusterSource, call, session,
    },
    certview::{self, CertFacts},
    kube::{KubeCluster, KubeError, Replicas},
    policies::{self, ListedPolicy, policy_set},
    rbac,
    trust_bundle::{self, LiveChain},
};

/// Anchors and issuers must stay valid at least this long (Linkerd's rule).
const MIN_CA_VALIDITY: Duration = Duration::from_secs(60 * 86_400);
/// The file and directory names of a PKI directory (`--pki-dir`), as the
/// testbed lays it out.
const PKI_ANCHORS_FILE: &str = "ca-bundle.crt";
const PKI_ISSUER_DIR: &str = "issuer";
const CONTROL_PLANE_SECTION: &str = "sealmesh-control-plane";
const RBAC_SECTION: &str = "sealmesh-rbac";
const DATA_PLANE_SECTION: &str = "sealmesh-data-plane";
const TRUST_BUNDLE_SECTION: &str = "sealmesh-trust-bundle";
const POLICIES_SECTION: &str = "sealmesh-policies";
const POLICIES_LISTED: &str = "authorization policies can be listed";
const POLICIES_VALID: &str = "authorization policies are valid";
const PRINCIPALS_EXIST: &str = "policy principals name existing ServiceAccounts";
const SELECTORS_MATCH: &str = "policy selectors match pods";
const POLICIES_PROTECT: &str = "policies select meshed pods";
const AGENTS_REACHABLE: &str = "agents are running and reachable";

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Also check the data plane: every agent reachable and ready, its live
    /// certificates chaining to the trust anchors, none missing or near expiry.
    #[arg(long)]
    proxy: bool,
    /// A PKI directory holding `ca-bundle.crt` (trust anchors) and `issuer/`
    /// (the identity service's issuer), as the testbed writes it.
    #[arg(long, conflicts_with_all = ["trust_anchors", "issuer_dir"])]
    pki_dir: Option<PathBuf>,
    /// PEM bundle of trust anchors. Default: the cluster file's
    /// `identity.trustAnchorsFile`; on Kubernetes the trust-roots ConfigMap
    /// and the issuer Secret of the sealmesh namespace.
    #[arg(long)]
    trust_anchors: Option<PathBuf>,
    /// Issuer directory (`crt.pem` + `key.pem`, or `tls.crt` + `tls.key` +
    /// `ca.crt`). Default: `issuer/` next to the trust-anchors file.
    #[arg(long)]
    issuer_dir: Option<PathBuf>,
    /// A candidate trust-anchor bundle (PEM) meant to replace the current
    /// one: warns about every current anchor it drops that still signs the
    /// issuer or, with --proxy, a live certificate of an agent.
    #[arg(long, value_name = "CANDIDATE_PEM")]
    trust_bundle: Option<PathBuf>,
    /// Output format, as `linkerd check -o`.
    #[arg(short, long, value_enum, default_value_t = CheckOutput::Table)]
    output: CheckOutput,
    #[command(flatten)]
    cluster: ClusterArgs,
}

/// `check -o`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum CheckOutput {
    /// Every check, by section, with `√`/`‼`/`×`.
    Table,
    /// `{"success", "categories": [{"categoryName", "checks": [{"description",
    /// "result": success|warning|error, "error", "hint"}]}]}`.
    Json,
    /// Only the warnings and failures, and the result line.
    Short,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Pass,
    Warn,
    Fail,
}

#[derive(Debug)]
struct CheckLine {
    status: Status,
    title: String,
    /// What is wrong (one line per finding) and what to do.
    details: Vec<String>,
    hint: Option<String>,
}

#[derive(Debug, Default)]
struct Section {
    name: &'static str,
    lines: Vec<CheckLine>,
}

impl Section {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            lines: Vec::new(),
        }
    }

    fn pass(&mut self, title: &str) {
        self.push(Status::Pass, title, Vec::new(), None);
    }

    /// Passes when `problems` is empty; otherwise `status` with the problems
    /// as details and `hint` as what to do.
    fn expect(&mut self, title: &str, problems: Vec<String>, status: Status, hint: &str) -> bool {
        if problems.is_empty() {
            self.pass(title);
            true
        } else {
            self.push(status, title, problems, Some(hint.to_owned()));
            false
        }
    }

    fn push(&mut self, status: Status, title: &str, details: Vec<String>, hint: Option<String>) {
        self.lines.push(CheckLine {
            status,
            title: title.to_owned(),
            details,
            hint,
        });
    }
}

fn render(sections: &[Section], format: CheckOutput) -> String {
    match format {
        CheckOutput::Table => render_text(sections, true),
        CheckOutput::Short => render_text(sections, false),
        CheckOutput::Json => render_json(sections),
    }
}

/// The table; without `passed`, only the sections' warnings and failures.
fn render_text(sections: &[Section], passed: bool) -> String {
    let mut out = String::new();
    for section in sections {
        let lines: Vec<&CheckLine> = section
            .lines
            .iter()
            .filter(|l| passed || l.status != Status::Pass)
            .collect();
        if lines.is_empty() && !passed {
            continue;
        }
        let _ = writeln!(out, "{}\n{}", section.name, "-".repeat(section.name.len()));
        for line in lines {
            let mark = match line.status {
                Status::Pass => "√",
                Status::Warn => "‼",
                Status::Fail => "×",
            };
            let _ = writeln!(out, "{mark} {}", line.title);
            for detail in &line.details {
                let _ = writeln!(out, "    {detail}");
            }
            if let Some(hint) = &line.hint {
                let _ = writeln!(out, "    see: {hint}");
            }
        }
        out.push('\n');
    }
    let failed = failed(sections);
    let _ = writeln!(
        out,
        "Status check results are {}",
        if failed { "×" } else { "√" }
    );
    out
}

/// `linkerd check -o json`'s shape: a check's details are its `error`.
fn render_json(sections: &[Section]) -> String {
    let categories: Vec<Value> = sections
        .iter()
        .map(|section| {
            let checks: Vec<Value> = section
                .lines
                .iter()
                .map(|line| {
                    let mut check = json!({
                        "description": line.title,
                        "result": match line.status {
                            Status::Pass => "success",
                            Status::Warn => "warning",
                            Status::Fail => "error",
                        },
                    });
                    if !line.details.is_empty() {
                        check["error"] = json!(line.details.join("\n"));
                    }
                    if let Some(hint) = &line.hint {
                        check["hint"] = json!(hint);
                    }
                    check
                })
                .collect();
            json!({ "categoryName": section.name, "checks": checks })
        })
        .collect();
    let report = json!({ "success": !failed(sections), "categories": categories });
    format!(
        "{}\n",
        serde_json::to_string_pretty(&report).expect("a JSON value serialises")
    )
}

fn failed(sections: &[Section]) -> bool {
    sections
        .iter()
        .flat_map(|s| &s.lines)
        .any(|l| l.status == Status::Fail)
}

pub fn run(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let explicit_pki = args.pki_dir.is_some() || args.trust_anchors.is_some();
    // The cluster is needed for the agents, and for the PKI unless flags name it.
    let mut unloadable_policies = None;
    let source = if args.cluster.path().is_some() || args.proxy || !explicit_pki {
        match args.cluster.source() {
            Ok(source) => Some(source),
            // A cluster file whose only fault is in its policies: every
            // bad policy is named in the policies section.
            Err(error @ ClusterArgsError::Load(_)) => {
                let (cluster, policies) = args
                    .cluster
                    .path()
                    .and_then(policies::load_cluster_file_leniently)
                    .ok_or(error)?;
                unloadable_policies = Some(policies);
                Some(ClusterSource::Local(Box::new(cluster)))
            }
            Err(error) => return Err(error.into()),
        }
    } else {
        None
    };
    let pki = match &source {
        Some(ClusterSource::Kubernetes(cluster)) if !explicit_pki && args.issuer_dir.is_none() => {
            load_cluster_pki(cluster)
        }
        Some(ClusterSource::Local(cluster)) => load_pki_files(&pki_paths(&args, Some(cluster))?),
        _ => load_pki_files(&pki_paths(&args, None)?),
    };
    let now = OffsetDateTime::now_utc();
    let mut sections = Vec::new();
    if let Some(ClusterSource::Kubernetes(cluster)) = &source {
        sections.push(check_control_plane(cluster));
        sections.push(check_rbac(cluster));
    }
    let (identity, (anchors, issuer_chain)) = check_identity(pki, now);
    sections.push(identity);
    let policies = source
        .as_ref()
        .map(|source| check_cluster_policies(source, unloadable_policies));
    let mut live = Vec::new();
    if let Some(chain) = issuer_chain {
        live.push(LiveChain {
            label: format!("the issuer {}", issuer_subject(&chain)),
            chain,
        });
    }
    if args.proxy {
        let source = source.context(
            "--proxy checks the agents of a cluster: pass --kubeconfig FILE, or --cluster-file FILE in local mode",
        )?;
        sections.push(match AgentDirectory::of(&source) {
            Ok(directory) => {
                let (section, leaves) = check_data_plane(&directory, anchors.as_deref(), now);
                live.extend(leaves);
                section
            }
            Err(e) => {
                let mut section = Section::new(DATA_PLANE_SECTION);
                section.expect(
                    AGENTS_REACHABLE,
                    vec![format!("{e:#}")],
                    Status::Fail,
                    match source {
                        ClusterSource::Local(_) => {
                            "run `sealmesh check --proxy` as root on the host of the testbed"
                        }
                        ClusterSource::Kubernetes(_) => {
                            "check that the agent DaemonSet runs (`kubectl -n <sealmesh namespace> get pods`) and that you may list its pods and create pods/portforward there"
                        }
                    },
                );
                section
            }
        });
    }
    sections.extend(policies);
    if let Some(candidate) = &args.trust_bundle {
        sections.push(check_trust_bundle(
            candidate,
            anchors.as_deref(),
            &live,
            args.proxy,
        ));
    }
    print!("{}", render(&sections, args.output));
    Ok(if failed(&sections) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// The workloads sealmesh runs, as the Kubernetes API reports them: the
/// identity service available, an agent on every node, and cert-manager's
/// issuer Certificate ready when cert-manager rotates the issuer.
fn check_control_plane(cluster: &KubeCluster) -> Section {
    let mut section = Section::new(CONTROL_PLANE_SECTION);
    let namespace = cluster.namespace();
    let shortfall = |what: &str, replicas: Result<Replicas, _>| -> Vec<String> {
        match replicas {
            Ok(Replicas { ready, wanted: 0 }) => {
                vec![format!("{what}: none wanted (ready {ready})")]
            }
            Ok(Replicas { ready, wanted }) if ready < wanted => {
                vec![format!("{what}: {ready} of {wanted} available")]
            }
            Ok(_) => Vec::new(),
            Err(error) => vec![format!("{error}")],
        }
    };
    section.expect(
        "the identity service is available",
        shortfall(
            &format!("Deployment {namespace}/sealmesh-identity"),
            cluster.identity_replicas(),
        ),
        Status::Fail,
        &format!(
            "kubectl -n {namespace} describe deployment sealmesh-identity; kubectl -n {namespace} logs deployment/sealmesh-identity"
        ),
    );
    section.expect(
        "an agent runs on every node",
        shortfall(
            &format!("DaemonSet {namespace}/sealmesh-agent"),
            cluster.agent_replicas(),
        ),
        Status::Fail,
        &format!(
            "kubectl -n {namespace} get pods -o wide -l app.kubernetes.io/name=sealmesh-agent: a node without a running agent refuses its meshed pods' connections"
        ),
    );
    match cluster.issuer_certificate() {
        Ok(None) => {}
        Ok(Some((true, _))) => section.pass("cert-manager's issuer Certificate is ready"),
        Ok(Some((false, message))) => section.push(
            Status::Fail,
            "cert-manager's issuer Certificate is ready",
            vec![message],
            Some(format!(
                "kubectl -n {namespace} describe certificate sealmesh-identity-issuer"
            )),
        ),
        Err(error) => section.push(
            Status::Warn,
            "cert-manager's issuer Certificate is ready",
            vec![format!("{error}")],
            None,
        ),
    }
    section
}

/// The control plane's ServiceAccounts exist, and RBAC grants each what
/// `deploy/base` grants it. Not being allowed to read them is a warning.
fn check_rbac(cluster: &KubeCluster) -> Section {
    let mut section = Section::new(RBAC_SECTION);
    let namespace = cluster.namespace();
    let needs = rbac::required(namespace);
    let reinstall = format!(
        "`sealmesh install --node-cidrs <your nodes' CIDRs>{} | kubectl apply -f -` applies the ServiceAccounts, roles and bindings sealmesh needs; pass it your current trust anchors and issuer (--identity-trust-anchors-file, --identity-issuer-certificate-file, --identity-issuer-key-file), or it generates new ones that replace them",
        if namespace == DEFAULT_CONTROL_NAMESPACE {
            String::new()
        } else {
            format!(" --namespace {namespace}")
        }
    );

    let (mut missing, mut unreadable) = (Vec::new(), Vec::new());
    for need in &needs {
        match cluster.service_account_exists(&need.account.name) {
            Ok(true) => {}
            Ok(false) => missing.push(format!("{} does not exist", need.account)),
            Err(error) if error.is_forbidden() => unreadable.push(error.to_string()),
            Err(error) => missing.push(error.to_string()),
        }
    }
    const ACCOUNTS_EXIST: &str = "control plane ServiceAccounts exist";
    if missing.is_empty() && !unreadable.is_empty() {
        section.push(
            Status::Warn,
            ACCOUNTS_EXIST,
            unreadable,
            Some(format!(
                "this check reads the ServiceAccounts of namespace {namespace}: ask for get on them"
            )),
        );
    } else {
        missing.extend(unreadable);
        section.expect(ACCOUNTS_EXIST, missing, Status::Fail, &reinstall);
    }

    const PERMISSIONS: &str = "control plane ServiceAccounts have the permissions they need";
    match cluster.rbac() {
        Ok(granted) => {
            section.expect(
                PERMISSIONS,
                rbac::missing(&granted, &needs),
                Status::Fail,
                &reinstall,
            );
        }
        Err(error) if error.is_forbidden() => section.push(
            Status::Warn,
            PERMISSIONS,
            vec![error.to_string()],
            Some(format!(
                "this check reads ClusterRoles, ClusterRoleBindings, and the Roles and RoleBindings of namespace {namespace} (rbac.authorization.k8s.io): ask for get and list on them"
            )),
        ),
        Err(error) => section.push(Status::Fail, PERMISSIONS, vec![error.to_string()], None),
    }
    section
}

/// Something the policies section needed and could not read.
#[derive(Debug)]
struct Unread {
    message: String,
    /// The API refused the caller (403): a warning, not a failure.
    forbidden: bool,
}

impl From<KubeError> for Unread {
    fn from(error: KubeError) -> Self {
        Self {
            forbidden: error.is_forbidden(),
            message: error.to_string(),
        }
    }
}

/// What the policies section judges: the policies, the cluster's pods and
/// namespaces, its ServiceAccounts and the trust domain principals name.
struct PolicyInputs<'a> {
    policies: Result<Vec<ListedPolicy>, Unread>,
    cluster: Result<&'a ClusterFile, Unread>,
    accounts: Result<BTreeSet<(String, String)>, Unread>,
    trust_domain: &'a str,
}

/// The policies section of either mode. `unloadable`: the policies of a
/// cluster file that did not load because of them.
fn check_cluster_policies(
    source: &ClusterSource,
    unloadable: Option<Vec<ListedPolicy>>,
) -> Section {
    match source {
        ClusterSource::Local(cluster) => {
            let policies = unloadable.unwrap_or_else(|| {
                cluster
                    .authorization_policies
                    .iter()
                    .map(ListedPolicy::of)
                    .collect()
            });
            let accounts = cluster
                .service_accounts
                .iter()
                .map(|a| (a.namespace.clone(), a.name.clone()))
                .chain(
                    cluster
                        .pods
                        .iter()
                        .map(|p| (p.namespace.clone(), p.service_account.clone())),
                )
                .collect();
            check_policies(PolicyInputs {
                policies: Ok(policies),
                cluster: Ok(cluster),
                accounts: Ok(accounts),
                trust_domain: &cluster.trust_domain,
            })
        }
        ClusterSource::Kubernetes(api) => {
            let snapshot = api.snapshot();
            // A DaemonSet that cannot be read is the control-plane section's
            // finding; principals are then read in the default domain.
            let trust_domain = api
                .trust_domain()
                .unwrap_or_else(|_| DEFAULT_TRUST_DOMAIN.to_owned());
            check_policies(PolicyInputs {
                // Agents refuse to start without the CRD (they would
                // otherwise let through what policies deny): a failure here.
                policies: api.authorization_policies().map_err(Unread::from).and_then(|listed| {
                    listed.ok_or_else(|| Unread {
                        message: format!(
                            "the API serves no {}.{}: its CRD is not installed, and agents do not start without it; apply deploy/base (authorizationpolicy-crd.yaml) or the output of `sealmesh install`",
                            authz::PLURAL,
                            authz::API_GROUP
                        ),
                        forbidden: false,
                    })
                }),
                cluster: snapshot.as_ref().map_err(|e| Unread {
                    message: e.to_string(),
                    forbidden: e.is_forbidden(),
                }),
                accounts: api.service_accounts().map_err(Unread::from),
                trust_domain: &trust_domain,
            })
        }
    }
}

/// Every policy readable and valid (an error otherwise: the agents judge
/// it fail-closed), and warnings for what makes a valid policy miss its
/// aim: an exact principal of this trust domain naming no ServiceAccount, a
/// selector matching no pod, a policy whose pods are not meshed (the
/// agents judge only meshed pods' connections).
fn check_policies(inputs: PolicyInputs<'_>) -> Section {
    let mut section = Section::new(POLICIES_SECTION);
    let mut policies = match inputs.policies {
        Ok(policies) => policies,
        Err(unread) if unread.forbidden => {
            section.push(
                Status::Warn,
                POLICIES_LISTED,
                vec![unread.message],
                Some(format!(
                    "this check lists {}.{} in every namespace: ask for list on them (RBAC rule apiGroups: [\"{}\"], resources: [\"{}\"], verbs: [\"list\"])",
                    authz::PLURAL,
                    authz::API_GROUP,
                    authz::API_GROUP,
                    authz::PLURAL
                )),
            );
            return section;
        }
        Err(unread) => {
            section.push(Status::Fail, POLICIES_LISTED, vec![unread.message], None);
            return section;
        }
    };

    // By name, whatever order the file or the API lists them in.
    policies.sort_by(|a, b| a.name.cmp(&b.name));
    let invalid: Vec<String> = policies
        .iter()
        .filter_map(|p| p.invalid().map(|e| format!("{}: {e}", p.name)))
        .collect();
    section.expect(
        POLICIES_VALID,
        invalid,
        Status::Fail,
        "correct the named field (kubectl edit authorizationpolicy NAME -n NAMESPACE); until then the agents judge the policy fail-closed: an invalid ALLOW policy admits nothing, an invalid DENY policy or an unreadable one denies every connection to the pods it may select",
    );

    // Exact principals of this trust domain, by the field naming them.
    let mut principals = Vec::new();
    for policy in &policies {
        let Ok(spec) = &policy.spec else { continue };
        for (r, rule) in spec.rules.iter().enumerate() {
            for (f, from) in rule.from.iter().enumerate() {
                let fields = [
                    ("principals", &from.source.principals),
                    ("notPrincipals", &from.source.not_principals),
                ];
                for (field, values) in fields {
                    for (i, text) in values.iter().enumerate() {
                        if let Some((domain, namespace, account)) = authz::exact_principal(text)
                            && domain == inputs.trust_domain
                        {
                            principals.push((
                                format!(
                                    "{}: spec.rules[{r}].from[{f}].source.{field}[{i}]",
                                    policy.name
                                ),
                                (namespace.to_owned(), account.to_owned()),
                            ));
                        }
                    }
                }
            }
        }
    }
    match &inputs.accounts {
        Ok(accounts) => {
            let missing = principals
                .iter()
                .filter(|(_, account)| !accounts.contains(account))
                .map(|(field, (namespace, account))| {
                    format!("{field}: ServiceAccount {namespace}/{account} does not exist")
                })
                .collect();
            section.expect(
                PRINCIPALS_EXIST,
                missing,
                Status::Warn,
                "a principal matches only the pods of that ServiceAccount: correct the name (kubectl get serviceaccounts -n NAMESPACE) or create the ServiceAccount",
            );
        }
        Err(unread) if !principals.is_empty() => section.push(
            Status::Warn,
            PRINCIPALS_EXIST,
            vec![unread.message.clone()],
            Some("this check lists ServiceAccounts in every namespace: ask for list on serviceaccounts".to_owned()),
        ),
        Err(_) => section.pass(PRINCIPALS_EXIST),
    }

    let cluster = match inputs.cluster {
        Ok(cluster) => cluster,
        Err(unread) => {
            for title in [SELECTORS_MATCH, POLICIES_PROTECT] {
                section.push(
                    Status::Warn,
                    title,
                    vec![unread.message.clone()],
                    Some("this check lists nodes, namespaces, pods and Services in every namespace: ask for list on them".to_owned()),
                );
            }
            return section;
        }
    };
    let set = policy_set(&cluster.control_namespace, &policies);
    // Each policy's pods, as the agents select them.
    let mut selected: BTreeMap<PolicyName, Vec<&Pod>> = BTreeMap::new();
    for pod in &cluster.pods {
        for policy in set.for_pod(&pod.namespace, &pod.labels).policies() {
            selected.entry(policy.name.clone()).or_default().push(pod);
        }
    }
    let (mut unmatched, mut unprotected) = (Vec::new(), Vec::new());
    for policy in &policies {
        let root = policy.name.namespace == cluster.control_namespace;
        let in_scope = |pod: &&Pod| root || pod.namespace == policy.name.namespace;
        let scope = if root {
            "the cluster".to_owned()
        } else {
            format!("namespace {}", policy.name.namespace)
        };
        if !cluster
            .pods
            .iter()
            .filter(in_scope)
            .any(|p| cluster.is_meshed(p))
        {
            unprotected.push(format!(
                "{}: {scope} has no meshed pod, so the policy protects nothing",
                policy.name
            ));
            continue;
        }
        let pods = selected
            .get(&policy.name)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let selector = policy
            .spec
            .as_ref()
            .ok()
            .and_then(|spec| spec.selector.as_ref())
            .map(|s| &s.match_labels)
            .filter(|labels| !labels.is_empty());
        if let Some(labels) = selector
            && pods.is_empty()
        {
            let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            unmatched.push(format!(
                "{}: selector {} matches no pod of {scope}",
                policy.name,
                labels.join(",")
            ));
        } else if !pods.is_empty() && !pods.iter().any(|p| cluster.is_meshed(p)) {
            let names: Vec<String> = pods
                .iter()
                .map(|p| format!("{}/{}", p.namespace, p.name))
                .collect();
            unprotected.push(format!(
                "{}: selects only pods that are not meshed ({}), so it protects nothing",
                policy.name,
                names.join(", ")
            ));
        }
    }
    section.expect(
        SELECTORS_MATCH,
        unmatched,
        Status::Warn,
        "a policy applies to the pods whose labels include all of its selector's matchLabels: correct the labels, or delete the policy",
    );
    section.expect(
        POLICIES_PROTECT,
        unprotected,
        Status::Warn,
        "the agents judge only meshed pods' connections: label the namespace sealmesh.io/mesh=enabled (and remove any pod's sealmesh.io/mesh=disabled annotation), or delete the policy",
    );
    section
}

/// The anchors file and issuer directory to check: explicit flags, else
/// `--pki-dir`'s layout, else the cluster file's anchors and `issuer/` next
/// to them.
fn pki_paths(
    args: &CheckArgs,
    cluster: Option<&ClusterFile>,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    if let Some(dir) = &args.pki_dir {
        return Ok((dir.join(PKI_ANCHORS_FILE), dir.join(PKI_ISSUER_DIR)));
    }
    let cluster_anchors = cluster
        .and_then(|c| c.identity.as_ref())
        .map(|i| i.trust_anchors_file.clone());
    let anchors = args.trust_anchors.clone().or(cluster_anchors).context(
        "no trust anchors to check: pass --trust-anchors FILE and --issuer-dir DIR, --pki-dir DIR, \
             or --cluster-file FILE of a cluster with an identity service",
    )?;
    let issuer = match &args.issuer_dir {
        Some(dir) => dir.clone(),
        None => anchors
            .parent()
            .unwrap_or(Path::new("."))
            .join(PKI_ISSUER_DIR),
    };
    Ok((anchors, issuer))
}

/// The trust anchors and the issuer, loaded (or why not).
type Pki = Result<(TrustAnchors, CaMaterial), String>;

fn load_pki_files((anchors_file, issuer_dir): &(PathBuf, PathBuf)) -> Pki {
    let anchors = TrustAnchors::load(anchors_file).map_err(|e| e.to_string())?;
    let material = CaMaterial::read_dir(issuer_dir).map_err(|e| e.to_string())?;
    Ok((anchors, material))
}

/// Kubernetes mode: the trust-roots ConfigMap and the issuer Secret.
fn load_cluster_pki(cluster: &KubeCluster) -> Pki {
    let source = format!("ConfigMap {}/{TRUST_ROOTS_CONFIGMAP}", cluster.namespace());
    let pem = cluster.trust_anchors_pem().map_err(|e| e.to_string())?;
    let anchors = TrustAnchors::from_pem(&pem, &source).map_err(|e| e.to_string())?;
    let material = cluster.issuer_material().map_err(|e| e.to_string())?;
    Ok((anchors, material))
}

/// The current anchors (DER) and the issuer's chain, when they loaded.
type Loaded = (
    Option<Vec<CertificateDer<'static>>>,
    Option<Vec<CertificateDer<'static>>>,
);

/// The identity section; also returns the anchors and the issuer chain (DER)
/// when they loaded.
fn check_identity(pki: Pki, now: OffsetDateTime) -> (Section, Loaded) {
    let mut section = Section::new("sealmesh-identity");
    let loaded = pki.and_then(|(anchors, material)| {
        let issuer_chain =
            certview::read_certificates(&material.cert_pem, &format!("issuer {}", material.source))
                .map_err(|e| e.to_string())?;
        Ok((anchors, material, issuer_chain))
    });
    let (anchors, material, issuer_chain) = match loaded {
        Ok(loaded) => loaded,
        Err(problem) => {
            section.expect(
                "certificate config is valid",
                vec![problem],
                Status::Fail,
                "pass --trust-anchors with the PEM bundle of roots and --issuer-dir with the issuer \
                 (create them with `sealmesh certs create-root` and `create-issuer`)",
            );
            return (section, (None, None));
        }
    };
    section.pass("certificate config is valid");

    let anchor_facts: Vec<CertFacts> = anchors
        .certificates()
        .iter()
        .enumerate()
        .filter_map(|(i, der)| CertFacts::parse(der, "trust anchors", i).ok())
        .collect();
    let issuer_facts = match CertFacts::parse(&issuer_chain[0], "issuer", 0) {
        Ok(facts) => facts,
        Err(e) => {
            section.expect(
                "issuer cert is valid X.509",
                vec![e.to_string()],
                Status::Fail,
                "replace the issuer",
            );
            return (
                section,
                (Some(anchors.certificates().to_vec()), Some(issuer_chain)),
            );
        }
    };

    ca_checks(
        &mut section,
        "trust anchors",
        true,
        "trust anchor",
        &anchor_facts,
        now,
        "rotate the trust anchors: add a new root (`sealmesh certs create-root`) to the bundle, re-issue the issuer from it, then remove the old root",
    );
    ca_checks(
        &mut section,
        "issuer cert",
        false,
        "issuer",
        std::slice::from_ref(&issuer_facts),
        now,
        "issue a new issuer: `sealmesh certs create-issuer --root <root dir> --out <issuer dir> --force` (the identity service reloads it)",
    );

    let chain_problem = certview::verify_ca_signatures(&issuer_chain, anchors.certificates()).err();
    let chained = section.expect(
        "issuer cert is issued by the trust anchor",
        chain_problem.into_iter().collect(),
        Status::Fail,
        "sign the issuer with a root of the trust-anchor bundle (`sealmesh certs create-issuer --root <root dir>`), or add its root to the bundle",
    );
    let all_passed = section.lines.iter().all(|l| l.status != Status::Fail);
    if chained && all_passed {
        // The identity service's own loader is the final word: key matches,
        // every certificate of the chain valid now.
        let problem = Issuer::from_material(&material, &anchors, now).err();
        section.expect(
            "issuer can sign certificates",
            problem.map(|e| e.to_string()).into_iter().collect(),
            Status::Fail,
            "put the issuer's own key next to its certificate in the issuer directory",
        );
    }
    (
        section,
        (Some(anchors.certificates().to_vec()), Some(issuer_chain)),
    )
}

fn issuer_subject(chain: &[CertificateDer<'_>]) -> String {
    chain
        .first()
        .and_then(|der| CertFacts::parse(der, "issuer", 0).ok())
        .map_or_else(|| "(unparsable)".to_owned(), |facts| facts.subject)
}

/// The candidate bundle must parse and keep every current anchor that signs
/// a live chain (the issuer, and the agents' leaves with --proxy).
fn check_trust_bundle(
    candidate_file: &Path,
    current: Option<&[CertificateDer<'static>]>,
    live: &[LiveChain],
    with_proxy: bool,
) -> Section {
    let mut section = Section::new(TRUST_BUNDLE_SECTION);
    let candidate = std::fs::read(candidate_file)
        .map_err(|e| format!("cannot read {}: {e}", candidate_file.display()))
        .and_then(|bytes| {
            certview::read_certificates(&bytes, &candidate_file.display().to_string())
                .map_err(|e| e.to_string())
        });
    let candidate = match candidate {
        Ok(candidate) => candidate,
        Err(problem) => {
            section.expect(
                "candidate trust bundle is readable",
                vec![problem],
                Status::Fail,
                "pass --trust-bundle a PEM file of root certificates",
            );
            return section;
        }
    };
    section.pass("candidate trust bundle is readable");
    let Some(current) = current else {
        section.expect(
            "candidate trust bundle keeps the anchors in use",
            vec![
                "the current trust anchors did not load (see above), so nothing to compare with"
                    .into(),
            ],
            Status::Fail,
            "fix the current trust anchors first",
        );
        return section;
    };
    let title = if with_proxy {
        "candidate trust bundle keeps every anchor that signs the issuer or a live certificate"
    } else {
        "candidate trust bundle keeps every anchor that signs the issuer (add --proxy for live certificates)"
    };
    let removed: Vec<String> = trust_bundle::removed_signing_anchors(current, &candidate, live)
        .iter()
        .map(trust_bundle::RemovedAnchor::describe)
        .collect();
    section.expect(
        title,
        removed,
        Status::Warn,
        "keep that anchor in the bundle until the issuer is re-issued from a kept root and every agent has renewed its certificates from it (within a certificate lifetime, 24h by default); then remove it",
    );
    section
}

/// Algorithm, CA, validity and 60-day checks of anchors or the issuer.
fn ca_checks(
    section: &mut Section,
    subject: &str,
    plural: bool,
    role: &str,
    certs: &[CertFacts],
    now: OffsetDateTime,
    renew_hint: &str,
) {
    let (is, its, a_ca) = if plural {
        ("are", "their", "CA certificates")
    } else {
        ("is", "its", "a CA certificate")
    };
    let wrong_algorithm: Vec<String> = certs
        .iter()
        .filter(|c| !c.key_is_p256)
        .map(|c| {
            format!(
                "{role} {} uses {}; sealmesh supports ECDSA P-256 only",
                c.subject, c.key_algorithm
            )
        })
        .collect();
    section.expect(
        &format!("{subject} {is} using supported crypto algorithm"),
        wrong_algorithm,
        Status::Fail,
        "create ECDSA P-256 certificates with `sealmesh certs create-root` / `create-issuer`",
    );
    let not_ca: Vec<String> = certs
        .iter()
        .filter(|c| !c.may_sign_certificates)
        .map(|c| format!("{role} {} is not a CA allowed to sign certificates (basicConstraints CA:TRUE, keyCertSign)", c.subject))
        .collect();
    section.expect(
        &format!("{subject} {is} {a_ca}"),
        not_ca,
        Status::Fail,
        "use CA certificates made by `sealmesh certs create-root` / `create-issuer`",
    );
    let invalid: Vec<String> = certs
        .iter()
        .filter(|c| !c.is_valid_at(now))
        .map(|c| {
            format!(
                "{role} {} is not valid now: {} ({})",
                c.subject,
                certview::time_left(c, now),
                c.validity_line(now)
            )
        })
        .collect();
    let valid = section.expect(
        &format!("{subject} {is} within {its} validity period"),
        invalid,
        Status::Fail,
        renew_hint,
    );
    if valid {
        let expiring: Vec<String> = certs
            .iter()
            .filter(|c| c.remaining(now) < MIN_CA_VALIDITY)
            .map(|c| {
                format!(
                    "{role} {} expires in {} (at {})",
                    c.subject,
                    certview::approx(c.remaining(now)),
                    certview::rfc3339(c.not_after)
                )
            })
            .collect();
        section.expect(
            &format!("{subject} {is} valid for at least 60 days"),
            expiring,
            Status::Warn,
            renew_hint,
        );
    }
}

/// What `--proxy` reads from each agent.
struct AgentState {
    status: AgentStatus,
    certificates: GetCertificatesResponse,
}

/// The data-plane section, and the agents' live certificate chains labelled
/// `<node> <identity> (serial <serial>)`.
fn check_data_plane(
    directory: &AgentDirectory,
    anchors: Option<&[CertificateDer<'static>]>,
    now: OffsetDateTime,
) -> (Section, Vec<LiveChain>) {
    let mut section = Section::new(DATA_PLANE_SECTION);
    let results = directory.query_all(|agent| {
        let node = agent.node.clone();
        session(move |mut client| async move {
            let status = call(&node, "GetStatus", client.get_status(GetStatusRequest {})).await?;
            let certificates = call(
                &node,
                "GetCertificates",
                client.get_certificates(GetCertificatesRequest {}),
            )
            .await?;
            Ok::<_, AgentError>(AgentState {
                status,
                certificates,
            })
        })
    });
    let mut unreachable = Vec::new();
    let mut agents = Vec::new();
    for (agent, result) in results {
        match result {
            Ok(state) => agents.push((agent.node, state)),
            Err(e) => unreachable.push(e.to_string()),
        }
    }
    section.expect(
        AGENTS_REACHABLE,
        unreachable,
        Status::Fail,
        "start the agent on that node (local mode: `cargo xtask testbed` starts one per node) and read its log",
    );
    let live: Vec<LiveChain> = agents
        .iter()
        .flat_map(|(node, agent)| {
            agent
                .certificates
                .certificates
                .iter()
                .filter(|cert| !cert.chain.is_empty())
                .map(move |cert| LiveChain {
                    label: format!("{node} {} (serial {})", cert.identity, cert.serial),
                    chain: cert
                        .chain
                        .iter()
                        .map(|der| CertificateDer::from(der.clone()))
                        .collect(),
                })
        })
        .collect();
    if agents.is_empty() {
        return (section, live);
    }

    let not_ready: Vec<String> = agents
        .iter()
        .filter(|(_, a)| !a.status.ready)
        .map(|(node, a)| {
            format!(
                "agent on {node} is not ready: {}",
                a.status.not_ready_reasons.join("; ")
            )
        })
        .collect();
    section.expect(
        "agents are ready",
        not_ready,
        Status::Fail,
        "fix what the agent reports above; it becomes ready once its eBPF programs are attached and every local meshed ServiceAccount has a certificate",
    );

    let Some(anchors) = anchors else {
        return (section, live);
    };
    let expected: BTreeSet<&[u8]> = anchors.iter().map(|c| c.as_ref()).collect();
    let mut anchor_mismatch = Vec::new();
    for (node, agent) in &agents {
        match certview::read_certificates(
            agent.certificates.trust_anchors_pem.as_bytes(),
            "agent anchors",
        ) {
            Ok(theirs) => {
                let theirs: BTreeSet<&[u8]> = theirs.iter().map(|c| c.as_ref()).collect();
                if theirs != expected {
                    anchor_mismatch.push(format!(
                        "agent on {node} trusts {} anchor(s) that differ from the {} checked here",
                        theirs.len(),
                        expected.len()
                    ));
                }
            }
            Err(e) => {
                anchor_mismatch.push(format!("agent on {node} reports unreadable anchors: {e}"))
            }
        }
    }
    section.expect(
        "agents trust the checked trust anchors",
        anchor_mismatch,
        Status::Warn,
        "give the agents the same trust-anchor bundle (they reload it when the file changes), or check the bundle you passed",
    );

    let mut unchained = Vec::new();
    let mut missing = Vec::new();
    let mut expiring = Vec::new();
    for (node, agent) in &agents {
        for cert in &agent.certificates.certificates {
            if cert.chain.is_empty() {
                continue;
            }
            let chain: Vec<CertificateDer<'_>> = cert
                .chain
                .iter()
                .map(|der| CertificateDer::from(der.as_slice()))
                .collect();
            if let Err(why) = certview::verify_chain(&chain, anchors, now) {
                unchained.push(format!(
                    "{node} {} (serial {}): {why}",
                    cert.identity, cert.serial
                ));
            }
            if let Ok(leaf) = CertFacts::parse(&chain[0], &cert.identity, 0)
                && leaf.is_valid_at(now)
                && leaf.remaining(now) < leaf.lifetime() / 4
            {
                expiring.push(format!(
                    "{node} {} expires in {} and was not renewed{}",
                    cert.identity,
                    certview::approx(leaf.remaining(now)),
                    last_error_suffix(&cert.last_error)
                ));
            }
        }
        for wanted in &agent.certificates.wanted {
            let held = agent
                .certificates
                .certificates
                .iter()
                .find(|c| &c.identity == wanted);
            match held {
                Some(c) if c.valid && !c.chain.is_empty() => {}
                Some(c) => missing.push(format!(
                    "{node} {wanted} has no valid certificate{}",
                    last_error_suffix(&c.last_error)
                )),
                None => missing.push(format!(
                    "{node} {wanted} has no certificate: the agent has not requested one"
                )),
            }
        }
    }
    section.expect(
        "data plane certificates chain to the trust anchors",
        unchained,
        Status::Fail,
        "the identity service's issuer must be signed by these trust anchors: run `sealmesh check` without --proxy and fix the issuer",
    );
    section.expect(
        "every meshed ServiceAccount has a valid certificate",
        missing,
        Status::Fail,
        "make sure the identity service runs and is reachable from the node; the agent's log says why its requests fail",
    );
    section.expect(
        "data plane certificates are not close to expiry",
        expiring,
        Status::Warn,
        "agents renew certificates before expiry; check the identity service and the agent's log",
    );
    (section, live)
}

fn last_error_suffix(last_error: &str) -> String {
    if last_error.is_empty() {
        String::new()
    } else {
        format!(": {last_error}")
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use sealmesh_common::cluster::IdentityEndpoint;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        check: CheckArgs,
    }

    fn args(argv: &[&str]) -> CheckArgs {
        Cli::try_parse_from(std::iter::once("check").chain(argv.iter().copied()))
            .unwrap()
            .check
    }

    #[test]
    fn pki_paths_come_from_flags_the_pki_dir_or_the_cluster_file() {
        let mut cluster = ClusterFile::new("tb-test");
        cluster.identity = Some(IdentityEndpoint {
            address: "172.18.0.1:8080".parse().unwrap(),
            trust_anchors_file: "/run/sealmesh/tb-test/pki/ca-bundle.crt".into(),
        });
        let paths = |argv: &[&str], cluster: Option<&ClusterFile>| {
            pki_paths(&args(argv), cluster).map_err(|e| e.to_string())
        };
        assert_eq!(
            paths(&[], Some(&cluster)).unwrap(),
            (
                PathBuf::from("/run/sealmesh/tb-test/pki/ca-bundle.crt"),
                PathBuf::from("/run/sealmesh/tb-test/pki/issuer")
            )
        );
        assert_eq!(
            paths(&["--pki-dir", "/p"], Some(&cluster)).unwrap(),
            (
                PathBuf::from("/p/ca-bundle.crt"),
                PathBuf::from("/p/issuer")
            )
        );
        assert_eq!(
            paths(&["--trust-anchors", "/a.crt", "--issuer-dir", "/i"], None).unwrap(),
            (PathBuf::from("/a.crt"), PathBuf::from("/i"))
        );
        assert!(
            paths(&[], None)
                .unwrap_err()
                .starts_with("no trust anchors to check: pass --trust-anchors FILE")
        );
        assert!(
            Cli::try_parse_from(["check", "--pki-dir", "/p", "--issuer-dir", "/i"]).is_err(),
            "--pki-dir excludes the explicit paths"
        );
    }

    #[test]
    fn sections_render_like_linkerd_check() {
        let mut section = Section::new("sealmesh-identity");
        section.pass("certificate config is valid");
        section.expect(
            "issuer cert is valid for at least 60 days",
            vec!["issuer CN=x expires in 3d".into()],
            Status::Warn,
            "renew it",
        );
        assert_eq!(
            render(std::slice::from_ref(&section), CheckOutput::Table),
            "sealmesh-identity\n-----------------\n√ certificate config is valid\n\
             ‼ issuer cert is valid for at least 60 days\n    issuer CN=x expires in 3d\n    see: renew it\n\n\
             Status check results are √\n"
        );
        section.expect("b", vec!["broken".into()], Status::Fail, "fix b");
        assert!(
            render(&[section], CheckOutput::Table)
                .ends_with("× b\n    broken\n    see: fix b\n\nStatus check results are ×\n")
        );
    }

    #[test]
    fn short_output_keeps_only_warnings_and_failures() {
        let mut passing = Section::new("sealmesh-control-plane");
        passing.pass("the identity service is available");
        let mut mixed = Section::new("sealmesh-identity");
        mixed.pass("certificate config is valid");
        mixed.expect("a", vec!["x".into(), "y".into()], Status::Warn, "fix a");
        mixed.expect("b", vec!["z".into()], Status::Fail, "fix b");
        assert_eq!(
            render(&[passing, mixed], CheckOutput::Short),
            "sealmesh-identity\n-----------------\n‼ a\n    x\n    y\n    see: fix a\n\
             × b\n    z\n    see: fix b\n\n\
             Status check results are ×\n"
        );
        let mut healthy = Section::new("sealmesh-identity");
        healthy.pass("certificate config is valid");
        assert_eq!(
            render(&[healthy], CheckOutput::Short),
            "Status check results are √\n"
        );
    }

    #[test]
    fn json_output_has_linkerds_categories_and_results() {
        let mut section = Section::new("sealmesh-identity");
        section.pass("certificate config is valid");
        section.expect("a", vec!["x".into(), "y".into()], Status::Warn, "fix a");
        section.expect("b", vec!["z".into()], Status::Fail, "fix b");
        let json: Value = serde_json::from_str(&render(&[section], CheckOutput::Json)).unwrap();
        assert_eq!(
            json,
            json!({
                "success": false,
                "categories": [{
                    "categoryName": "sealmesh-identity",
                    "checks": [
                        { "description": "certificate config is valid", "result": "success" },
                        { "description": "a", "result": "warning", "error": "x\ny", "hint": "fix a" },
                        { "description": "b", "result": "error", "error": "z", "hint": "fix b" },
                    ],
                }],
            })
        );
    }

    #[test]
    fn output_formats_parse_like_linkerds() {
        assert_eq!(args(&[]).output, CheckOutput::Table);
        assert_eq!(args(&["-o", "json"]).output, CheckOutput::Json);
        assert_eq!(args(&["--output", "short"]).output, CheckOutput::Short);
        assert!(Cli::try_parse_from(["check", "-o", "wide"]).is_err());
    }

    const POLICY_CLUSTER: &str = r#"
apiVersion: sealmesh.io/v1alpha1
kind: Cluster
name: tb-test
nodes:
  - { name: node-0, ip: 172.18.0.2, podCidr: 10.244.0.0/24, cgroup: /sys/fs/cgroup/x/node-0 }
namespaces:
  - { name: sealmesh }
  - { name: shop, labels: { sealmesh.io/mesh: enabled } }
  - { name: legacy }
serviceAccounts:
  - { name: batch, namespace: shop }
pods:
  - { name: server, namespace: shop, serviceAccount: server, ip: 10.244.0.2, node: node-0, cgroup: /sys/fs/cgroup/x/node-0/server, labels: { app: web } }
  - { name: client, namespace: shop, serviceAccount: client, ip: 10.244.0.3, node: node-0, cgroup: /sys/fs/cgroup/x/node-0/client, labels: { app: client } }
  - { name: opted-out, namespace: shop, serviceAccount: default, ip: 10.244.0.4, node: node-0, cgroup: /sys/fs/cgroup/x/node-0/opted-out, labels: { app: old }, annotations: { sealmesh.io/mesh: disabled } }
  - { name: plain, namespace: legacy, serviceAccount: default, ip: 10.244.0.5, node: node-0, cgroup: /sys/fs/cgroup/x/node-0/plain }
authorizationPolicies:
  - name: web
    namespace: shop
    spec:
      selector: { matchLabels: { app: web } }
      rules:
        - from:
            - source: { principals: [cluster.local/ns/shop/sa/client, spiffe://cluster.local/ns/shop/sa/batch, "cluster.local/ns/ops/*", other.example/ns/shop/sa/nobody] }
            - source: { notPrincipals: [cluster.local/ns/shop/sa/clinet] }
  - { name: db, namespace: shop, spec: { selector: { matchLabels: { app: db } }, rules: [{}] } }
  - { name: old, namespace: shop, spec: { selector: { matchLabels: { app: old } }, rules: [{}] } }
  - { name: legacy, namespace: legacy, spec: { action: DENY, rules: [{}] } }
  - { name: mesh-wide, namespace: sealmesh, spec: { action: DENY, rules: [{ to: [{ operation: { ports: [23] } }] }] } }
"#;

    /// The policies section of a cluster file that did not load because
    /// of `policies`.
    fn policy_section(cluster: &ClusterFile, policies: Vec<ListedPolicy>) -> Section {
        check_cluster_policies(
            &ClusterSource::Local(Box::new(cluster.clone())),
            Some(policies),
        )
    }

    #[test]
    fn policies_are_checked_for_validity_principals_selectors_and_meshed_pods() {
        let (cluster, policies) = policies::leniently(POLICY_CLUSTER).unwrap();
        let section = policy_section(&cluster, policies);
        assert_eq!(
            render(std::slice::from_ref(&section), CheckOutput::Table),
            "sealmesh-policies\n-----------------\n\
             √ authorization policies are valid\n\
             ‼ policy principals name existing ServiceAccounts\n    \
             shop/web: spec.rules[0].from[1].source.notPrincipals[0]: ServiceAccount shop/clinet does not exist\n    \
             see: a principal matches only the pods of that ServiceAccount: correct the name (kubectl get serviceaccounts -n NAMESPACE) or create the ServiceAccount\n\
             ‼ policy selectors match pods\n    \
             shop/db: selector app=db matches no pod of namespace shop\n    \
             see: a policy applies to the pods whose labels include all of its selector's matchLabels: correct the labels, or delete the policy\n\
             ‼ policies select meshed pods\n    \
             legacy/legacy: namespace legacy has no meshed pod, so the policy protects nothing\n    \
             shop/old: selects only pods that are not meshed (shop/opted-out), so it protects nothing\n    \
             see: the agents judge only meshed pods' connections: label the namespace sealmesh.io/mesh=enabled (and remove any pod's sealmesh.io/mesh=disabled annotation), or delete the policy\n\n\
             Status check results are √\n"
        );
        // The same through the loaded file (all policies valid there).
        let loaded = ClusterFile::from_yaml(POLICY_CLUSTER).unwrap();
        let section = check_cluster_policies(&ClusterSource::Local(Box::new(loaded)), None);
        assert_eq!(
            section.lines.iter().map(|l| l.status).collect::<Vec<_>>(),
            [Status::Pass, Status::Warn, Status::Warn, Status::Warn]
        );
    }

    #[test]
    fn an_invalid_policy_is_an_error_naming_the_field_and_short_and_json_show_it() {
        let broken = POLICY_CLUSTER.replace(
            "rules: [{ to: [{ operation: { ports: [23] } }] }]",
            "rules: [{ to: [{ operation: { ports: [telnet] } }] }, { to: [{ operation: { methods: [GET] } }] }]",
        );
        assert!(ClusterFile::from_yaml(&broken).is_err());
        let (cluster, policies) = policies::leniently(&broken).unwrap();
        let section = policy_section(&cluster, policies);
        let short = render(std::slice::from_ref(&section), CheckOutput::Short);
        assert!(
            short.starts_with(
                "sealmesh-policies\n-----------------\n\
                 × authorization policies are valid\n    \
                 sealmesh/mesh-wide: spec.rules[1].to[0].operation.methods: unknown field `methods`, expected `ports` or `notPorts`\n    \
                 see: correct the named field (kubectl edit authorizationpolicy NAME -n NAMESPACE); until then the agents judge the policy fail-closed"
            ),
            "{short}"
        );
        assert!(short.ends_with("Status check results are ×\n"), "{short}");
        let json: Value = serde_json::from_str(&render(&[section], CheckOutput::Json)).unwrap();
        assert_eq!(json["success"], false);
        assert_eq!(json["categories"][0]["categoryName"], POLICIES_SECTION);
        assert_eq!(json["categories"][0]["checks"][0]["result"], "error");

        // Only the bad port: validate() names it.
        let bad_port = POLICY_CLUSTER.replace("ports: [23]", "ports: [telnet]");
        let (cluster, policies) = policies::leniently(&bad_port).unwrap();
        let section = policy_section(&cluster, policies);
        assert_eq!(
            section.lines[0].details,
            [
                "sealmesh/mesh-wide: spec.rules[0].to[0].operation.ports[0]: \"telnet\" is not a port (1-65535)"
            ]
        );
    }

    #[test]
    fn policies_or_accounts_the_user_may_not_list_are_warnings_naming_the_rule() {
        let cluster = ClusterFile::from_yaml(POLICY_CLUSTER).unwrap();
        let forbidden = || Unread {
            message: "cannot list ... (403 Forbidden)".into(),
            forbidden: true,
        };
        let section = check_policies(PolicyInputs {
            policies: Err(forbidden()),
            cluster: Ok(&cluster),
            accounts: Ok(BTreeSet::new()),
            trust_domain: "cluster.local",
        });
        assert_eq!(section.lines.len(), 1);
        assert_eq!(section.lines[0].status, Status::Warn);
        assert_eq!(
            section.lines[0].hint.as_deref(),
            Some(
                "this check lists authorizationpolicies.sealmesh.io in every namespace: ask for list on them (RBAC rule apiGroups: [\"sealmesh.io\"], resources: [\"authorizationpolicies\"], verbs: [\"list\"])"
            )
        );
        let listed: Vec<ListedPolicy> = cluster
            .authorization_policies
            .iter()
            .map(ListedPolicy::of)
            .collect();
        let section = check_policies(PolicyInputs {
            policies: Ok(listed.clone()),
            cluster: Err(forbidden()),
            accounts: Err(forbidden()),
            trust_domain: "cluster.local",
        });
        let statuses: Vec<(&str, Status)> = section
            .lines
            .iter()
            .map(|l| (l.title.as_str(), l.status))
            .collect();
        assert_eq!(
            statuses,
            [
                (POLICIES_VALID, Status::Pass),
                (PRINCIPALS_EXIST, Status::Warn),
                (SELECTORS_MATCH, Status::Warn),
                (POLICIES_PROTECT, Status::Warn),
            ]
        );
        // In another trust domain, none of these principals is checked.
        let section = check_policies(PolicyInputs {
            policies: Ok(listed),
            cluster: Ok(&cluster),
            accounts: Err(forbidden()),
            trust_domain: "example.org",
        });
        assert_eq!(section.lines[1].status, Status::Pass);
    }

    #[test]
    fn without_policies_the_section_passes() {
        let cluster = ClusterFile::from_yaml(
            &POLICY_CLUSTER[..POLICY_CLUSTER.find("authorizationPolicies:").unwrap()],
        )
        .unwrap();
        let section = check_cluster_policies(&ClusterSource::Local(Box::new(cluster)), None);
        assert!(section.lines.iter().all(|l| l.status == Status::Pass));
    }
}
