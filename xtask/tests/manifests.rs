//! deploy/ as CI checks it: rendered by the real kustomize, validated by
//! kubernetes-validate against the Kubernetes schemas (both installed by
//! `cargo xtask setup`), against `sealmesh_common::consts`, and against the
//! real binaries' `--help`. Broken copies in temp dirs must fail loudly,
//! naming the file, the object and the error.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use sealmesh_common::{authz, consts, logging::LOG_LEVEL_ENV};
use xtask::{
    manifests::{self, ManifestError, Tools, authz as authz_manifests},
    mesh::locate_binary,
};

fn tools() -> Tools {
    Tools::locate().expect("manifest tools installed (`cargo xtask setup`)")
}

fn repository() -> PathBuf {
    manifests::workspace_root()
}

/// A copy of deploy/ in a temp dir, with `edit` applied to one file.
struct BrokenCopy {
    dir: tempfile::TempDir,
}

impl BrokenCopy {
    fn new(file: &str, from: &str, to: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        copy_dir(&repository().join("deploy"), &dir.path().join("deploy"));
        let path = dir.path().join(file);
        let text = std::fs::read_to_string(&path).expect("file to break exists");
        assert!(text.contains(from), "{file} contains {from:?}");
        std::fs::write(&path, text.replacen(from, to, 1)).expect("write broken file");
        Self { dir }
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    /// `cargo xtask manifests` on the copy: its exit status and stderr.
    fn run_xtask(&self) -> (bool, String) {
        let output = Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args(["manifests", "--skip-flags", "--root"])
            .arg(self.root())
            .output()
            .expect("xtask runs");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create dir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("dir entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy file");
        }
    }
}

fn problems(result: Result<(), ManifestError>) -> Vec<String> {
    match result {
        Err(ManifestError::Invalid { problems, .. }) => problems,
        other => panic!("expected validation problems, got {other:?}"),
    }
}

#[test]
fn base_renders_exactly_the_sealmesh_objects_with_their_source_files() {
    let objects = manifests::render(&tools(), &repository().join("deploy/base")).expect("render");
    let mut found: Vec<(String, String)> = objects
        .iter()
        .map(|o| (o.describe(), o.origin.clone()))
        .collect();
    found.sort();
    let expected = [
        ("ClusterRole sealmesh-agent", "deploy/base/agent-rbac.yaml"),
        (
            "ClusterRole sealmesh-identity",
            "deploy/base/identity-rbac.yaml",
        ),
        (
            "ClusterRoleBinding sealmesh-agent",
            "deploy/base/agent-rbac.yaml",
        ),
        (
            "ClusterRoleBinding sealmesh-identity",
            "deploy/base/identity-rbac.yaml",
        ),
        (
            "ConfigMap sealmesh/sealmesh-identity-trust-roots",
            "deploy/base/kustomization.yaml",
        ),
        (
            "CustomResourceDefinition authorizationpolicies.sealmesh.io",
            "deploy/base/authorizationpolicy-crd.yaml",
        ),
        (
            "DaemonSet sealmesh/sealmesh-agent",
            "deploy/base/agent.yaml",
        ),
        (
            "Deployment sealmesh/sealmesh-identity",
            "deploy/base/identity.yaml",
        ),
        ("Namespace sealmesh", "deploy/base/namespace.yaml"),
        (
            "PodDisruptionBudget sealmesh/sealmesh-identity",
            "deploy/base/identity.yaml",
        ),
        (
            "Role sealmesh/sealmesh-agent",
            "deploy/base/agent-rbac.yaml",
        ),
        (
            "Role sealmesh/sealmesh-identity",
            "deploy/base/identity-rbac.yaml",
        ),
        (
            "RoleBinding sealmesh/sealmesh-agent",
            "deploy/base/agent-rbac.yaml",
        ),
        (
            "RoleBinding sealmesh/sealmesh-identity",
            "deploy/base/identity-rbac.yaml",
        ),
        (
            "Service sealmesh/sealmesh-identity",
            "deploy/base/identity.yaml",
        ),
        (
            "ServiceAccount sealmesh/sealmesh-agent",
            "deploy/base/serviceaccounts.yaml",
        ),
        (
            "ServiceAccount sealmesh/sealmesh-identity",
            "deploy/base/serviceaccounts.yaml",
        ),
    ];
    let expected: Vec<(String, String)> = expected
        .iter()
        .map(|(o, f)| ((*o).to_owned(), (*f).to_owned()))
        .collect();
    assert_eq!(found, expected);

    // Images get the kustomization's tag; origin annotations are gone again.
    let agent = objects
        .iter()
        .find(|o| o.kind() == "DaemonSet")
        .expect("DaemonSet");
    assert_eq!(
        agent.containers()[0]["image"],
        "ghcr.io/sealmesh/agent:0.1.0"
    );
    assert!(objects.iter().all(|o| {
        o.document["metadata"]["annotations"]
            .get("config.kubernetes.io/origin")
            .is_none()
    }));
}

#[test]
fn repository_manifests_are_valid_for_every_supported_kubernetes() {
    let summary =
        manifests::validate_repository(&tools(), &repository(), None).expect("deploy/ is valid");
    assert_eq!(
        summary.kustomizations,
        vec![
            ("deploy/base".to_owned(), 17),
            ("deploy/overlays/cert-manager".to_owned(), 19),
            ("deploy/overlays/kernel-before-5.11".to_owned(), 17),
            ("deploy/overlays/network-policy".to_owned(), 20),
            ("deploy/overlays/prometheus-operator".to_owned(), 19),
            ("deploy/overlays/image-digests".to_owned(), 17),
            ("deploy/overlays/apparmor-field".to_owned(), 17),
        ]
    );
    assert_eq!(summary.example_policies, 5);
}

#[test]
fn cert_manager_overlay_adds_the_issuer_and_the_rotating_issuer_certificate() {
    let objects = manifests::render(&tools(), &repository().join("deploy/overlays/cert-manager"))
        .expect("render");
    let certificate = objects
        .iter()
        .find(|o| o.kind() == "Certificate")
        .expect("Certificate");
    let spec = &certificate.document["spec"];
    assert_eq!(certificate.name(), consts::kube::ISSUER_SECRET);
    assert_eq!(spec["secretName"], consts::kube::ISSUER_SECRET);
    assert_eq!(spec["duration"], "48h");
    assert_eq!(spec["renewBefore"], "25h");
    assert_eq!(spec["isCA"], true);
    assert_eq!(spec["privateKey"]["algorithm"], "ECDSA");
    assert_eq!(spec["privateKey"]["size"], 256);
    assert_eq!(spec["issuerRef"]["kind"], "Issuer");
    assert_eq!(spec["issuerRef"]["name"], "sealmesh-trust-anchor");
    let issuer = objects
        .iter()
        .find(|o| o.kind() == "Issuer")
        .expect("Issuer");
    assert_eq!(issuer.name(), "sealmesh-trust-anchor");
    assert_eq!(
        issuer.document["spec"]["ca"]["secretName"],
        "sealmesh-trust-anchor"
    );
    assert_eq!(
        certificate.origin,
        "deploy/overlays/cert-manager/issuer.yaml"
    );
}

#[test]
fn flags_and_env_in_the_manifests_exist_in_the_real_binaries() {
    let agent =
        locate_binary("sealmesh-agent").expect("sealmesh-agent built (cargo build --workspace)");
    let bin_dir = agent.parent().expect("binary dir");
    for kustomization in manifests::KUSTOMIZATIONS.iter().map(|k| k.path) {
        let objects =
            manifests::render(&tools(), &repository().join(kustomization)).expect("render");
        let lines = manifests::command_lines(&objects);
        let agent_line = lines
            .iter()
            .find(|l| l.binary == "sealmesh-agent")
            .expect("agent container");
        assert!(agent_line.flags.contains(&"--mode".to_owned()));
        assert_eq!(
            agent_line.env,
            [
                LOG_LEVEL_ENV,
                "SEALMESH_NODE",
                "SEALMESH_NAMESPACE",
                "SEALMESH_POD_UID"
            ]
        );
        let identity_line = lines
            .iter()
            .find(|l| l.binary == "sealmesh-identity")
            .expect("identity container");
        assert_eq!(identity_line.flags, ["--mode", "--log-format"]);
        assert_eq!(identity_line.env, [LOG_LEVEL_ENV, "SEALMESH_NAMESPACE"]);
        manifests::check_flags(kustomization, &objects, bin_dir).unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn an_unknown_flag_is_reported_with_its_container() {
    let copy = BrokenCopy::new("deploy/base/agent.yaml", "- --log-format", "- --log-fromat");
    let agent = locate_binary("sealmesh-agent").expect("sealmesh-agent built");
    let objects = manifests::render(&tools(), &copy.root().join("deploy/base")).expect("render");
    assert_eq!(
        problems(manifests::check_flags(
            "deploy/base",
            &objects,
            agent.parent().expect("dir")
        )),
        [
            "DaemonSet sealmesh/sealmesh-agent container agent: sealmesh-agent has no flag --log-fromat (see `sealmesh-agent --help`)"
        ]
    );
}

#[test]
fn a_schema_violation_fails_cargo_xtask_manifests_naming_file_object_and_error() {
    let copy = BrokenCopy::new(
        "deploy/base/identity.yaml",
        "containerPort: 8080",
        "containerPort: grpc",
    );
    let (success, stderr) = copy.run_xtask();
    assert!(!success, "broken manifests must fail: {stderr}");
    for version in ["1.28", "1.33"] {
        assert!(
            stderr.contains(&format!(
                "deploy/base: deploy/base/identity.yaml: Deployment sealmesh/sealmesh-identity: did not validate for resource deployment/sealmesh-identity against version {version}: spec.template.spec.containers.0.ports.0.containerPort: 'grpc' is not of type 'integer'"
            )),
            "{stderr}"
        );
    }
    // The overlay includes the base, so it reports the same object too.
    assert!(
        stderr.contains("deploy/overlays/cert-manager: deploy/base/identity.yaml: Deployment sealmesh/sealmesh-identity: did not validate"),
        "{stderr}"
    );
}

#[test]
fn an_unknown_field_is_rejected_by_strict_validation() {
    let copy = BrokenCopy::new(
        "deploy/base/identity.yaml",
        "replicas: 2",
        "replicas: 2\n  replica: 3",
    );
    let objects = manifests::render(&tools(), &copy.root().join("deploy/base")).expect("render");
    let found = problems(manifests::validate_schemas(
        &tools(),
        "deploy/base",
        &objects,
        manifests::SCHEMA_VERSIONS,
    ));
    assert_eq!(found.len(), 2, "{found:#?}");
    for problem in &found {
        assert!(
            problem.starts_with(
                "deploy/base/identity.yaml: Deployment sealmesh/sealmesh-identity: did not validate"
            ) && problem.contains("'replica' was unexpected"),
            "{problem}"
        );
    }
}

#[test]
fn a_certificate_without_secret_name_is_caught_without_a_schema() {
    let copy = BrokenCopy::new(
        "deploy/overlays/cert-manager/issuer.yaml",
        "  secretName: sealmesh-identity-issuer\n",
        "",
    );
    let objects = manifests::render(&tools(), &copy.root().join("deploy/overlays/cert-manager"))
        .expect("render");
    assert_eq!(
        problems(manifests::validate_schemas(
            &tools(),
            "overlay",
            &objects,
            manifests::SCHEMA_VERSIONS
        )),
        [
            "deploy/overlays/cert-manager/issuer.yaml: Certificate sealmesh/sealmesh-identity-issuer: spec.secretName is required"
        ]
    );
}

#[test]
fn a_token_mount_away_from_the_agents_token_path_breaks_the_contract() {
    let copy = BrokenCopy::new(
        "deploy/base/agent.yaml",
        "mountPath: /var/run/secrets/sealmesh.io/identity",
        "mountPath: /var/run/secrets/tokens",
    );
    let objects = manifests::render(&tools(), &copy.root().join("deploy/base")).expect("render");
    assert_eq!(
        problems(manifests::check_contract("deploy/base", &objects)),
        [format!(
            "DaemonSet sealmesh/sealmesh-agent: needs a projected ServiceAccount token with audience {} mounted at {}",
            consts::kube::IDENTITY_TOKEN_AUDIENCE,
            consts::kube::IDENTITY_TOKEN_PATH
        )]
    );
}

#[test]
fn rbac_beyond_least_privilege_is_reported() {
    // Reading every Secret of the cluster, and a wildcard.
    let copy = BrokenCopy::new(
        "deploy/base/agent-rbac.yaml",
        "    resources: [pods, nodes, services, namespaces]\n    verbs: [get, list, watch]",
        "    resources: [pods, nodes, services, namespaces, secrets]\n    verbs: [get, list, watch, \"*\"]",
    );
    let objects = manifests::render(&tools(), &copy.root().join("deploy/base")).expect("render");
    assert_eq!(
        manifests::rbac_problems(&objects),
        [
            "ClusterRole sealmesh-agent rule 0: uses a wildcard",
            "ClusterRole sealmesh-agent rule 0: grants * on [\"pods\", \"nodes\", \"services\", \"namespaces\", \"secrets\"]",
            "ClusterRole sealmesh-agent rule 0: grants secrets beyond named objects of one namespace (use a Role with resourceNames)",
        ]
    );
    // The repository's RBAC has none of that.
    let objects = manifests::render(&tools(), &repository().join("deploy/base")).expect("render");
    assert_eq!(manifests::rbac_problems(&objects), Vec::<String>::new());
}

#[test]
fn probes_off_the_health_paths_or_declared_agent_ports_break_the_contract() {
    let copy = BrokenCopy::new(
        "deploy/base/identity.yaml",
        "path: /healthz/ready",
        "path: /ready",
    );
    let objects = manifests::render(&tools(), &copy.root().join("deploy/base")).expect("render");
    assert_eq!(
        problems(manifests::check_contract("deploy/base", &objects)),
        [
            "Deployment sealmesh/sealmesh-identity: readinessProbe asks \"/ready\", not /healthz/live or /healthz/ready"
        ]
    );

    // A host port on the agent keeps a surging successor off the node.
    let copy = BrokenCopy::new(
        "deploy/base/agent.yaml",
        "          readinessProbe:",
        "          ports:\n            - containerPort: 15008\n          readinessProbe:",
    );
    let objects = manifests::render(&tools(), &copy.root().join("deploy/base")).expect("render");
    assert_eq!(
        problems(manifests::check_contract("deploy/base", &objects)),
        [
            "DaemonSet sealmesh/sealmesh-agent: declares ports [15008]; on the host network they are hostPorts, which stop a rolling update from starting the new agent beside the old one"
        ]
    );
}

fn sealmesh(args: &[&str]) -> Vec<serde_json::Value> {
    let out = Command::new(locate_binary("sealmesh").expect("sealmesh is built"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sealmesh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_yaml_ng::Deserializer::from_slice(&out.stdout)
        .map(|document| serde::Deserialize::deserialize(document).unwrap())
        .filter(|value: &serde_json::Value| !value.is_null())
        .collect()
}

fn identities(objects: &[serde_json::Value]) -> Vec<(String, String, String)> {
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

/// `sealmesh install` prints what kustomize renders of
/// deploy/overlays/network-policy (the base and the NetworkPolicies: the same
/// objects, images and labels) with generated PKI in the trust-roots
/// ConfigMap and the issuer Secret and the given node CIDRs in place of the
/// placeholder; it validates against the schemas, keeps the contract, leaves
/// nothing to fill in, and an API server takes every object. `sealmesh
/// uninstall` names the same objects, the agents' DaemonSet first.
#[test]
fn sealmesh_install_prints_the_base_and_policies_with_its_pki_and_a_server_takes_it() {
    let installed = sealmesh(&["install", "--node-cidrs", "10.0.0.0/16,192.168.10.0/24"]);
    let base = manifests::render(
        &tools(),
        &repository().join("deploy/overlays/network-policy"),
    )
    .expect("render");
    let mut expected: Vec<_> =
        identities(&base.iter().map(|o| o.document.clone()).collect::<Vec<_>>());
    expected.push((
        "Secret".into(),
        "sealmesh".into(),
        consts::kube::ISSUER_SECRET.into(),
    ));
    let mut got = identities(&installed);
    expected.sort();
    got.sort();
    assert_eq!(got, expected);
    for object in &base {
        let twin = installed
            .iter()
            .find(|o| o["kind"] == object.kind() && o["metadata"]["name"] == object.name())
            .unwrap();
        assert_eq!(
            twin["metadata"]["labels"],
            object.document["metadata"]["labels"],
            "{}",
            object.describe()
        );
        for (mine, theirs) in object.containers().iter().zip(
            twin["spec"]["template"]["spec"]["containers"]
                .as_array()
                .unwrap_or(&Vec::new()),
        ) {
            assert_eq!(mine["image"], theirs["image"], "{}", object.describe());
            assert_eq!(mine["args"], theirs["args"], "{}", object.describe());
        }
    }
    let roots = installed.iter().find(|o| o["kind"] == "ConfigMap").unwrap();
    assert!(
        roots["data"]["ca-bundle.crt"]
            .as_str()
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----"),
        "the generated anchor is in the trust roots"
    );

    let objects: Vec<_> = installed
        .iter()
        .map(|document| manifests::ManifestObject {
            origin: "sealmesh install".into(),
            document: document.clone(),
        })
        .collect();
    manifests::validate_schemas(
        &tools(),
        "sealmesh install",
        &objects,
        manifests::SCHEMA_VERSIONS,
    )
    .expect("valid");
    manifests::check_contract("sealmesh install", &objects).expect("contract");
    assert_eq!(
        manifests::placeholder_problems(&objects),
        Vec::<String>::new()
    );
    // The identity service's gRPC port admits exactly the node CIDRs given.
    let grpc = installed
        .iter()
        .find(|o| o["kind"] == "NetworkPolicy" && o["metadata"]["name"] == "sealmesh-identity-grpc")
        .expect("the gRPC port's NetworkPolicy");
    assert_eq!(
        grpc["spec"]["ingress"],
        serde_json::json!([{
            "from": [
                { "ipBlock": { "cidr": "10.0.0.0/16" } },
                { "ipBlock": { "cidr": "192.168.10.0/24" } }
            ],
            "ports": [{ "protocol": "TCP", "port": "grpc" }]
        }])
    );

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let server = fake_apiserver::FakeApiServer::start().await.unwrap();
        let client = server.client();
        for document in &installed {
            let object: kube::api::DynamicObject =
                serde_json::from_value(document.clone()).unwrap();
            let gvk =
                kube::api::GroupVersionKind::try_from(object.types.as_ref().unwrap()).unwrap();
            let (resource, capabilities) =
                kube::discovery::pinned_kind(&client, &gvk).await.unwrap();
            let api: kube::Api<kube::api::DynamicObject> =
                if capabilities.scope == kube::discovery::Scope::Namespaced {
                    kube::Api::namespaced_with(client.clone(), "sealmesh", &resource)
                } else {
                    kube::Api::all_with(client.clone(), &resource)
                };
            api.create(&Default::default(), &object)
                .await
                .unwrap_or_else(|e| panic!("{} {:?}: {e}", gvk.kind, object.metadata.name));
        }
        // The CRD came first and is served: the example policies apply.
        let namespaces: kube::Api<k8s_openapi::api::core::v1::Namespace> =
            kube::Api::all(client.clone());
        namespaces
            .create(
                &Default::default(),
                &serde_json::from_value(serde_json::json!({"metadata": {"name": "shop"}})).unwrap(),
            )
            .await
            .unwrap();
        let gvk =
            kube::api::GroupVersionKind::gvk(authz::API_GROUP, authz::API_VERSION, authz::KIND);
        let (resource, _) = kube::discovery::pinned_kind(&client, &gvk).await.unwrap();
        for example in
            authz_manifests::read_documents(&repository().join(authz_manifests::EXAMPLES_FILE))
                .unwrap()
        {
            let namespace = example["metadata"]["namespace"].as_str().unwrap();
            let api: kube::Api<kube::api::DynamicObject> =
                kube::Api::namespaced_with(client.clone(), namespace, &resource);
            let created = api
                .create(
                    &Default::default(),
                    &serde_json::from_value(example).unwrap(),
                )
                .await
                .unwrap();
            assert!(created.data["spec"]["action"].is_string(), "defaulted");
        }
    });

    let uninstall = identities(&sealmesh(&["uninstall"]));
    assert_eq!(
        uninstall[0],
        (
            "DaemonSet".into(),
            "sealmesh".into(),
            consts::kube::AGENT_DAEMONSET.into()
        )
    );
    assert_eq!(uninstall.last().unwrap().0, "Namespace");
    let mut uninstall_sorted = uninstall.clone();
    uninstall_sorted.sort();
    assert_eq!(
        uninstall_sorted, got,
        "uninstall names every installed object"
    );
}

/// The base asks no SYS_RESOURCE (runtimes whose bounding set lacks it refuse
/// to start the container); the overlay for kernels before 5.11, which
/// charge eBPF maps to RLIMIT_MEMLOCK, adds it and nothing else.
#[test]
fn only_the_old_kernel_overlay_grants_sys_resource() {
    let capabilities = |dir: &str| -> Vec<String> {
        let objects = manifests::render(&tools(), &repository().join(dir)).expect("render");
        let agent = objects
            .iter()
            .find(|o| o.kind() == "DaemonSet")
            .expect("the agent DaemonSet");
        agent.containers()[0]["securityContext"]["capabilities"]["add"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        capabilities("deploy/base"),
        ["BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN"]
    );
    assert_eq!(
        capabilities("deploy/overlays/kernel-before-5.11"),
        ["BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN", "SYS_RESOURCE"]
    );
}

fn rendered(dir: &str) -> Vec<manifests::ManifestObject> {
    manifests::render(&tools(), &repository().join(dir)).expect("render")
}

fn object<'a>(
    objects: &'a [manifests::ManifestObject],
    kind: &str,
    name: &str,
) -> &'a manifests::ManifestObject {
    objects
        .iter()
        .find(|o| o.kind() == kind && o.name() == name)
        .unwrap_or_else(|| panic!("{kind} {name}"))
}

/// The overlay denies ingress to the namespace's pods and admits the
/// identity service's gRPC port from the node-CIDR placeholder only and its
/// metrics port from the monitoring namespace only; the placeholder (and the
/// base's empty trust bundle) are reported as left to fill in.
#[test]
fn network_policy_overlay_admits_grpc_from_node_cidrs_and_metrics_from_monitoring() {
    let objects = rendered("deploy/overlays/network-policy");
    let policies: Vec<_> = objects
        .iter()
        .filter(|o| o.kind() == "NetworkPolicy")
        .map(|o| (o.describe(), o.origin.clone(), o.document["spec"].clone()))
        .collect();
    let origin = "deploy/overlays/network-policy/network-policy.yaml";
    let identity_pods = serde_json::json!({
        "matchLabels": { "app.kubernetes.io/name": consts::kube::IDENTITY_NAME }
    });
    assert_eq!(
        policies,
        [
            (
                "NetworkPolicy sealmesh/sealmesh-default-deny-ingress".to_owned(),
                origin.to_owned(),
                serde_json::json!({ "podSelector": {}, "policyTypes": ["Ingress"] })
            ),
            (
                "NetworkPolicy sealmesh/sealmesh-identity-grpc".to_owned(),
                origin.to_owned(),
                serde_json::json!({
                    "podSelector": identity_pods,
                    "policyTypes": ["Ingress"],
                    "ingress": [{
                        "from": [{ "ipBlock": { "cidr": consts::kube::NODE_CIDRS_PLACEHOLDER } }],
                        "ports": [{ "protocol": "TCP", "port": "grpc" }]
                    }]
                })
            ),
            (
                "NetworkPolicy sealmesh/sealmesh-identity-metrics".to_owned(),
                origin.to_owned(),
                serde_json::json!({
                    "podSelector": identity_pods,
                    "policyTypes": ["Ingress"],
                    "ingress": [{
                        "from": [{ "namespaceSelector": { "matchLabels": {
                            consts::kube::NAMESPACE_NAME_LABEL: consts::kube::DEFAULT_MONITORING_NAMESPACE
                        } } }],
                        "ports": [{ "protocol": "TCP", "port": "metrics" }]
                    }]
                })
            ),
        ]
    );
    // The named ports are the identity service's gRPC and metrics ports.
    let identity = object(&objects, "Deployment", consts::kube::IDENTITY_NAME);
    let ports: Vec<_> = identity.containers()[0]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].clone(), p["containerPort"].clone()))
        .collect();
    assert_eq!(
        ports,
        [
            ("grpc".into(), consts::IDENTITY_GRPC_PORT.into()),
            ("metrics".into(), consts::IDENTITY_METRICS_PORT.into())
        ]
    );
    assert_eq!(
        manifests::placeholder_problems(&objects),
        [
            format!(
                "NetworkPolicy sealmesh/sealmesh-identity-grpc: still admits the placeholder {} instead of the nodes' CIDRs (`sealmesh install --node-cidrs`, or patch it: docs/OPERATIONS.md)",
                consts::kube::NODE_CIDRS_PLACEHOLDER
            ),
            "ConfigMap sealmesh/sealmesh-identity-trust-roots: ca-bundle.crt holds no certificate (put your trust anchors there)".to_owned(),
        ]
    );
}

#[test]
fn network_policies_admitting_pods_or_everyone_break_the_contract() {
    let contract = |file: &str, from: &str, to: &str| {
        let copy = BrokenCopy::new(file, from, to);
        let objects = manifests::render(
            &tools(),
            &copy.root().join("deploy/overlays/network-policy"),
        )
        .expect("render");
        problems(manifests::check_contract("overlay", &objects))
    };
    let policies = "deploy/overlays/network-policy/network-policy.yaml";
    // Pods (here: every pod of the namespace) next to the node CIDRs.
    assert_eq!(
        contract(
            policies,
            "        - ipBlock:\n            cidr: 192.0.2.0/24\n",
            "        - ipBlock:\n            cidr: 192.0.2.0/24\n        - podSelector: {}\n",
        ),
        [
            "NetworkPolicy sealmesh/sealmesh-identity-grpc ingress rule 0: port 8080: admits a podSelector peer: only the nodes' CIDRs (ipBlock) may reach it, where the host-network agents are, no pod"
        ]
    );
    assert_eq!(
        contract(policies, "cidr: 192.0.2.0/24", "cidr: 0.0.0.0/0"),
        [
            "NetworkPolicy sealmesh/sealmesh-identity-grpc ingress rule 0: port 8080: 0.0.0.0/0 admits every address"
        ]
    );
    // Every namespace may scrape.
    assert_eq!(
        contract(
            policies,
            "            matchLabels:\n              kubernetes.io/metadata.name: monitoring\n",
            "            matchLabels: {}\n",
        ),
        [
            "NetworkPolicy sealmesh/sealmesh-identity-metrics ingress rule 0: port 9990: admits {\"namespaceSelector\":{\"matchLabels\":{}}}: only the monitoring namespace (namespaceSelector matchLabels kubernetes.io/metadata.name: <name>) may scrape it"
        ]
    );
    // No default deny: every other port of every pod would be open.
    assert_eq!(
        contract(
            policies,
            "  podSelector: {}\n",
            "  podSelector:\n    matchLabels: {app.kubernetes.io/name: sealmesh-identity}\n"
        ),
        [
            "no NetworkPolicy denies ingress by default (podSelector {}, policyTypes [Ingress], no ingress rules)"
        ]
    );
}

/// The PodMonitors scrape what the base's prometheus.io/* annotations name:
/// the identity service's container port named `metrics`, the agent's
/// (undeclared) metrics port by relabeling the address.
#[test]
fn pod_monitors_scrape_the_annotated_metrics_ports_and_paths() {
    let objects = rendered("deploy/overlays/prometheus-operator");
    let identity = object(&objects, "PodMonitor", consts::kube::IDENTITY_NAME);
    assert_eq!(
        identity.document["spec"]["podMetricsEndpoints"],
        serde_json::json!([{ "port": "metrics", "path": "/metrics" }])
    );
    let deployment = object(&objects, "Deployment", consts::kube::IDENTITY_NAME);
    let metrics = deployment.containers()[0]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "metrics")
        .expect("a port named metrics")["containerPort"]
        .clone();
    assert_eq!(metrics, consts::IDENTITY_METRICS_PORT);
    let agent = object(&objects, "PodMonitor", consts::kube::AGENT_DAEMONSET);
    let endpoint = &agent.document["spec"]["podMetricsEndpoints"][0];
    assert_eq!(endpoint["path"], "/metrics");
    let addresses: Vec<_> = endpoint["relabelings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["targetLabel"].clone(), r["replacement"].clone()))
        .collect();
    let port = consts::AGENT_METRICS_PORT;
    assert_eq!(
        addresses,
        [
            ("__address__".into(), format!("$1:{port}").into()),
            ("__address__".into(), format!("[$1]:{port}").into())
        ]
    );
    assert_eq!(
        agent.document["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"],
        consts::kube::AGENT_DAEMONSET
    );
    assert_eq!(
        manifests::pod_monitor_problems(&objects),
        Vec::<String>::new()
    );

    // A port the annotation does not name, and a field PodMonitors lack.
    let copy = BrokenCopy::new(
        "deploy/overlays/prometheus-operator/pod-monitors.yaml",
        "    - port: metrics\n      path: /metrics\n",
        "    - port: grpc\n      pathh: /metrics\n",
    );
    let objects = manifests::render(
        &tools(),
        &copy.root().join("deploy/overlays/prometheus-operator"),
    )
    .expect("render");
    assert_eq!(
        manifests::pod_monitor_problems(&objects),
        [
            "PodMonitor sealmesh/sealmesh-identity endpoint 0: scrapes path null (Deployment sealmesh/sealmesh-identity says prometheus.io/port 9990, prometheus.io/path \"/metrics\")",
            "PodMonitor sealmesh/sealmesh-identity endpoint 0: port \"grpc\" is port 8080 (Deployment sealmesh/sealmesh-identity says prometheus.io/port 9990, prometheus.io/path \"/metrics\")",
        ]
    );
    assert_eq!(
        problems(manifests::validate_schemas(
            &tools(),
            "overlay",
            &objects,
            manifests::SCHEMA_VERSIONS
        )),
        [
            "deploy/overlays/prometheus-operator/pod-monitors.yaml: PodMonitor sealmesh/sealmesh-identity: spec.podMetricsEndpoints[0].pathh is no field of a PodMetricsEndpoint"
        ]
    );
}

#[test]
fn image_digests_overlay_pins_both_images_by_digest() {
    let objects = rendered("deploy/overlays/image-digests");
    let zeros = "0".repeat(64);
    let images: Vec<_> = objects
        .iter()
        .flat_map(|o| o.containers())
        .map(|c| c["image"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        images,
        [
            format!("ghcr.io/sealmesh/identity@sha256:{zeros}"),
            format!("ghcr.io/sealmesh/agent@sha256:{zeros}"),
        ]
    );
    assert_eq!(manifests::unpinned_images(&objects), Vec::<String>::new());
    // The base's tags are what the overlay replaces.
    assert_eq!(
        manifests::unpinned_images(&rendered("deploy/base")).len(),
        2
    );
    // The placeholder digests are left to fill in.
    assert_eq!(
        manifests::placeholder_problems(&objects)[..2],
        [
            format!(
                "Deployment sealmesh/sealmesh-identity: image ghcr.io/sealmesh/identity@sha256:{zeros} has the placeholder digest (look the real one up: docs/OPERATIONS.md)"
            ),
            format!(
                "DaemonSet sealmesh/sealmesh-agent: image ghcr.io/sealmesh/agent@sha256:{zeros} has the placeholder digest (look the real one up: docs/OPERATIONS.md)"
            ),
        ]
    );

    // One hex digit short fails `cargo xtask manifests`.
    let copy = BrokenCopy::new(
        "deploy/overlays/image-digests/kustomization.yaml",
        &format!("digest: sha256:{zeros}"),
        &format!("digest: sha256:{}", "0".repeat(63)),
    );
    let (success, stderr) = copy.run_xtask();
    assert!(!success, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "deploy/overlays/image-digests: DaemonSet sealmesh/sealmesh-agent: image ghcr.io/sealmesh/agent@sha256:{} is not pinned by digest (<image>@sha256:<64 hex digits>)",
            "0".repeat(63)
        )),
        "{stderr}"
    );
}

/// The agent's AppArmor profile is Unconfined (the runtime default denies
/// its bpffs pins), by the beta annotation in the base (every supported
/// server) and by securityContext.appArmorProfile in the overlay, whose
/// schema only 1.30 and later have; the capabilities stay the base's.
#[test]
fn apparmor_is_an_annotation_in_the_base_and_the_field_from_1_30() {
    let annotation = "container.apparmor.security.beta.kubernetes.io/agent";
    let base = rendered("deploy/base");
    let agent = object(&base, "DaemonSet", consts::kube::AGENT_DAEMONSET);
    assert_eq!(
        agent.document["spec"]["template"]["metadata"]["annotations"][annotation],
        "unconfined"
    );
    assert!(
        agent.containers()[0]["securityContext"]
            .get("appArmorProfile")
            .is_none()
    );
    let identity = object(&base, "Deployment", consts::kube::IDENTITY_NAME);
    assert_eq!(
        identity.document["spec"]["template"]["metadata"]["annotations"]
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| k.starts_with("container.apparmor"))
            .count(),
        0,
        "RuntimeDefault named explicitly would keep the identity service off nodes without AppArmor"
    );

    let objects = rendered("deploy/overlays/apparmor-field");
    let agent = object(&objects, "DaemonSet", consts::kube::AGENT_DAEMONSET);
    assert!(
        agent.document["spec"]["template"]["metadata"]["annotations"]
            .get(annotation)
            .is_none()
    );
    let security = &agent.containers()[0]["securityContext"];
    assert_eq!(
        security["appArmorProfile"],
        serde_json::json!({ "type": "Unconfined" })
    );
    assert_eq!(
        security["capabilities"],
        serde_json::json!({ "drop": ["ALL"], "add": ["BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN"] })
    );
    manifests::validate_schemas(
        &tools(),
        "deploy/overlays/apparmor-field",
        &objects,
        manifests::APPARMOR_FIELD_SCHEMA_VERSIONS,
    )
    .expect("valid from 1.30");
    assert_eq!(
        problems(manifests::validate_schemas(
            &tools(),
            "deploy/overlays/apparmor-field",
            &objects,
            &["1.28.0"]
        )),
        [
            "deploy/base/agent.yaml: DaemonSet sealmesh/sealmesh-agent: did not validate for resource daemonset/sealmesh-agent against version 1.28: spec.template.spec.containers.0.securityContext: Additional properties are not allowed ('appArmorProfile' was unexpected)"
        ]
    );

    // The runtime's default profile for the agent breaks the contract.
    let copy = BrokenCopy::new(
        "deploy/base/agent.yaml",
        "apparmor.security.beta.kubernetes.io/agent: unconfined",
        "apparmor.security.beta.kubernetes.io/agent: runtime/default",
    );
    let objects = manifests::render(&tools(), &copy.root().join("deploy/base")).expect("render");
    assert_eq!(
        manifests::apparmor_problems(&objects),
        [
            "DaemonSet sealmesh/sealmesh-agent container agent: AppArmor must be Unconfined (annotation container.apparmor.security.beta.kubernetes.io/agent: unconfined, or from Kubernetes 1.30 securityContext.appArmorProfile.type: Unconfined); the runtime's default profile denies the agent's writes below /sys/fs (its bpffs pins)"
        ]
    );
}

/// The schema of deploy/base's AuthorizationPolicy CRD.
fn policy_schema() -> serde_json::Value {
    let crd = authz_manifests::read_documents(&repository().join(authz_manifests::CRD_FILE))
        .expect("the CRD reads")
        .remove(0);
    authz_manifests::policy_schema(&crd)
        .expect("the CRD has a schema")
        .clone()
}

/// A policy object in namespace `shop` with this spec (YAML).
fn policy_object(spec: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": authz_manifests::api_version(),
        "kind": authz::KIND,
        "metadata": { "name": "p", "namespace": "shop" },
        "spec": serde_yaml_ng::from_str::<serde_json::Value>(spec).expect("spec YAML"),
    })
}

/// Whether the CRD's schema (jsonschema) and the agents' reader
/// (`sealmesh_common::authz`) accept each spec.
fn verdicts(specs: &[&str]) -> Vec<(bool, bool)> {
    let objects: Vec<_> = specs.iter().map(|spec| policy_object(spec)).collect();
    let errors = authz_manifests::schema_errors(&tools(), &policy_schema(), &objects)
        .expect("jsonschema runs");
    objects
        .iter()
        .zip(errors)
        .map(|(object, errors)| {
            (
                errors.is_empty(),
                authz_manifests::read_policy(object).is_ok(),
            )
        })
        .collect()
}

/// The examples read as the agents read policies, and judge connections as
/// their comments say.
#[test]
fn example_policies_read_as_the_agents_read_them_and_do_what_they_say() {
    use authz::{CompiledPolicy, Connection, Decision, PolicySet};
    use sealmesh_common::identity::TrustDomain;
    use std::collections::BTreeMap;

    let examples =
        authz_manifests::read_documents(&repository().join(authz_manifests::EXAMPLES_FILE))
            .expect("the examples read");
    let policies: Vec<_> = examples
        .iter()
        .map(|object| authz_manifests::read_policy(object).expect("a valid policy"))
        .collect();
    let dry_run: Vec<_> = policies
        .iter()
        .filter(|p| p.dry_run())
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(dry_run, ["metrics-from-prometheus"]);
    let set = PolicySet::new(
        consts::DEFAULT_CONTROL_NAMESPACE,
        policies.iter().map(CompiledPolicy::compile),
    );
    let id = |ns: &str, sa: &str| TrustDomain::default().identity(ns, sa).unwrap();
    let pod = |app: &str| set.for_pod("shop", &BTreeMap::from([("app".into(), app.into())]));
    let judge = |app: &str, identity: Option<&_>, ip: &str, port| {
        pod(app).judge(&Connection {
            identity,
            source_ip: Some(ip.parse().unwrap()),
            port,
        })
    };
    let denier = |app: &str, identity: Option<&_>, ip: &str, port| {
        judge(app, identity, ip, port)
            .denied_by()
            .map(|d| d.to_string())
    };
    let pod_ip = "10.244.1.7";
    let frontend = id("shop", "frontend");
    assert!(judge("web", Some(&frontend), pod_ip, 8080).allowed());
    assert_eq!(
        denier("web", Some(&id("shop", "cart")), pod_ip, 8080).as_deref(),
        Some("shop/web-from-frontend")
    );
    assert_eq!(
        denier("web", Some(&id("legacy-billing", "app")), pod_ip, 8080).as_deref(),
        Some("shop/deny-legacy-and-ssh rule 0")
    );
    assert_eq!(
        denier("db", Some(&id("shop", "cart")), pod_ip, 22).as_deref(),
        Some("shop/deny-legacy-and-ssh rule 1")
    );
    assert!(judge("db", Some(&id("shop", "cart")), pod_ip, 5432).allowed());
    // Plaintext: from the nodes (probes) to the database port; from a pod,
    // refused cluster-wide.
    assert!(judge("db", None, "10.0.3.4", 5432).allowed());
    assert_eq!(
        denier("cart", None, pod_ip, 80).as_deref(),
        Some("sealmesh/require-mtls rule 0")
    );
    // The dry run reports, never refuses.
    let scrape = judge("cart", Some(&id("shop", "cart")), pod_ip, 9090);
    assert_eq!(scrape.decision, Decision::NoPolicy);
    assert_eq!(
        scrape.dry_run_denial.map(|d| d.to_string()).as_deref(),
        Some("shop/metrics-from-prometheus")
    );
    let prometheus = judge("cart", Some(&id("monitoring", "prometheus")), pod_ip, 9090);
    assert_eq!(prometheus.dry_run_denial, None);
}

/// Specs the API server must refuse are refused by the CRD's schema and by
/// the agents' reader alike; valid edge cases pass both.
#[test]
fn the_crds_schema_and_the_agents_reader_agree_on_invalid_and_valid_specs() {
    let invalid = [
        // A source or operation that sets nothing, or only empty lists.
        "{ rules: [{ from: [{ source: {} }] }] }",
        "{ rules: [{ from: [{ source: { principals: [] } }] }] }",
        "{ rules: [{ to: [{ operation: {} }] }] }",
        "{ rules: [{ from: [{}] }] }",
        // `*` inside a value, empty values.
        r#"{ rules: [{ from: [{ source: { principals: ["cluster.local/ns/*/sa/web"] } }] }] }"#,
        r#"{ rules: [{ from: [{ source: { principals: ["spiffe://"] } }] }] }"#,
        r#"{ rules: [{ from: [{ source: { notNamespaces: ["a*b"] } }] }] }"#,
        r#"{ rules: [{ from: [{ source: { namespaces: [""] } }] }] }"#,
        // Ports out of range or named; addresses that are not IPv4.
        r#"{ rules: [{ to: [{ operation: { ports: ["0"] } }] }] }"#,
        r#"{ rules: [{ to: [{ operation: { notPorts: ["65536"] } }] }] }"#,
        r#"{ rules: [{ to: [{ operation: { ports: ["http"] } }] }] }"#,
        r#"{ rules: [{ from: [{ source: { ipBlocks: ["fd00::/8"] } }] }] }"#,
        r#"{ rules: [{ from: [{ source: { notIpBlocks: ["10.0.0.0/33"] } }] }] }"#,
        r#"{ rules: [{ from: [{ source: { ipBlocks: ["256.0.0.1"] } }] }] }"#,
        // An unknown action, L7 fields sealmesh does not have, a label value
        // no pod can carry.
        "{ action: AUDIT }",
        "{ rules: [{ to: [{ operation: { methods: [GET] } }] }] }",
        "{ rules: [{ when: [{ key: request.auth.claims, values: [x] }] }] }",
        &format!(
            "{{ selector: {{ matchLabels: {{ app: {} }} }} }}",
            "a".repeat(64)
        ),
    ];
    for (spec, verdict) in invalid.iter().zip(verdicts(&invalid)) {
        assert_eq!(verdict, (false, false), "(schema, Rust) on {spec}");
    }
    let valid = [
        "{}",
        "{ action: DENY, rules: [{}] }",
        r#"{ rules: [{ from: [{ source: { notPrincipals: ["*"] } }] }] }"#,
        r#"{ rules: [{ from: [{ source: { principals: ["spiffe://*", "*/sa/web", "cluster.local/ns/shop/*"] } }] }] }"#,
        r#"{ rules: [{ from: [{ source: { namespaces: ["*"], ipBlocks: ["10.0.0.1", "0.0.0.0/0"] } }] }] }"#,
        r#"{ rules: [{ to: [{ operation: { ports: ["1", "65535"], notPorts: ["8080"] } }] }] }"#,
        "{ selector: { matchLabels: { app.kubernetes.io/name: web, tier: '' } } }",
    ];
    for (spec, verdict) in valid.iter().zip(verdicts(&valid)) {
        assert_eq!(verdict, (true, true), "(schema, Rust) on {spec}");
    }
    // A label key must not be empty: a CEL rule says so to the API server
    // (CEL needs one to run), the agents' reader refuses it too.
    let empty_key = "{ selector: { matchLabels: { '': web } } }";
    assert_eq!(verdicts(&[empty_key]), [(true, false)]);
    let labels = &policy_schema()["properties"]["spec"]["properties"]["selector"]["properties"]["matchLabels"];
    assert_eq!(
        labels["x-kubernetes-validations"][0]["rule"],
        "self.all(key, key != '')"
    );
}

/// The schema is never more lenient than the agents: whatever a field's
/// pattern admits, `sealmesh_common::authz` reads (else the API server
/// would store policies the agents can only fail closed on). It is
/// stricter only on port spellings the API's own fields refuse too.
#[test]
fn the_crds_schema_admits_nothing_the_agents_refuse() {
    let values = [
        "",
        "*",
        "**",
        "*a",
        "a*",
        "a*b",
        "*a*",
        "spiffe://",
        "spiffe://*",
        "spiffe://a*",
        "spiffe://*a",
        "spiffe://a*b",
        "spiffe*",
        "0",
        "1",
        "80",
        "080",
        "+80",
        "65535",
        "65536",
        "99999",
        "-1",
        "1.5",
        "10.0.0.1",
        "10.0.0.0/8",
        "10.0.0.1/8",
        "10.0.0.0/32",
        "10.0.0.0/33",
        "010.0.0.1",
        "10.0.0",
        "10.0.0.0/",
        "::1",
        "a b",
    ];
    let fields = [
        ("from", "source", "principals"),
        ("from", "source", "notNamespaces"),
        ("from", "source", "ipBlocks"),
        ("to", "operation", "ports"),
    ];
    let mut specs = Vec::new();
    for (list, entry, field) in fields {
        for value in values {
            specs.push(format!(
                "{{ rules: [{{ {list}: [{{ {entry}: {{ {field}: [{}] }} }}] }}] }}",
                serde_json::Value::from(value)
            ));
        }
    }
    let specs: Vec<&str> = specs.iter().map(String::as_str).collect();
    let mut stricter = Vec::new();
    for (spec, (schema, rust)) in specs.iter().zip(verdicts(&specs)) {
        assert!(
            !schema || rust,
            "the schema admits what the agents refuse: {spec}"
        );
        if rust && !schema {
            stricter.push(*spec);
        }
    }
    assert_eq!(
        stricter,
        [
            r#"{ rules: [{ to: [{ operation: { ports: ["080"] } }] }] }"#,
            r#"{ rules: [{ to: [{ operation: { ports: ["+80"] } }] }] }"#,
        ],
        "only ports with a leading zero or sign, which Kubernetes' own port fields refuse"
    );
}

/// The CRD mirrors the Rust model: a field renamed in the schema, or an
/// action default that differs, fails `cargo xtask manifests`; so does an
/// example the agents would refuse.
#[test]
fn a_crd_or_example_drifting_from_the_rust_model_fails_cargo_xtask_manifests() {
    let renamed = BrokenCopy::new(authz_manifests::CRD_FILE, "notPorts:", "notPort:");
    let (success, stderr) = renamed.run_xtask();
    assert!(!success, "{stderr}");
    for problem in [
        "spec.rules[].to[].operation.notPorts: in sealmesh_common::authz, missing from the schema",
        "spec.rules[].to[].operation.notPort: in the schema, not in sealmesh_common::authz",
    ] {
        assert!(
            stderr.contains(&format!(
                "deploy/base: deploy/base/authorizationpolicy-crd.yaml: CustomResourceDefinition authorizationpolicies.sealmesh.io: {problem}"
            )),
            "{stderr}"
        );
    }
    let default_deny =
        BrokenCopy::new(authz_manifests::CRD_FILE, "default: ALLOW", "default: DENY");
    let (success, stderr) = default_deny.run_xtask();
    assert!(!success, "{stderr}");
    assert!(
        stderr.contains("spec.action must be an enum of ALLOW and DENY defaulting to ALLOW"),
        "{stderr}"
    );
    let named_port = BrokenCopy::new(
        authz_manifests::EXAMPLES_FILE,
        r#"ports: ["5432"]"#,
        "ports: [postgres]",
    );
    let (success, stderr) = named_port.run_xtask();
    assert!(!success, "{stderr}");
    for problem in [
        "the CRD's schema refuses spec.rules[0].to[0].operation.ports[0]: 'postgres' does not match",
        "spec.rules[0].to[0].operation.ports[0]: \"postgres\" is not a port (1-65535)",
    ] {
        assert!(
            stderr.contains(&format!(
                "deploy/examples/authorization-policies.yaml: AuthorizationPolicy shop/db-from-shop: {problem}"
            )),
            "{stderr}"
        );
    }
}
