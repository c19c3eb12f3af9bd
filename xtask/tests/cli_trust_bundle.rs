//! `sealmesh check --proxy --trust-bundle` against a real mesh (root, real
//! agents holding real leaves from the real identity service): a candidate
//! bundle that drops the root still signing the agents' live leaves is
//! warned about, naming that root; one that keeps it passes.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use sealmesh_common::consts::{MESH_LABEL, MESH_LABEL_ENABLED};
use sealmesh_pki::{self as pki, CaSpec, GeneratedCa, Layout};
use xtask::{
    mesh::{Mesh, MeshOptions, locate_binary},
    testbed::{PodSpec, TestbedSpec},
};

const APP_NS: &str = "shop";
const DAY: Duration = Duration::from_secs(86_400);
const SECTION: &str = "sealmesh-trust-bundle\n---------------------\n";

fn spec() -> TestbedSpec {
    TestbedSpec::new(2)
        .namespace(APP_NS, &[(MESH_LABEL, MESH_LABEL_ENABLED)])
        .pod(PodSpec::new(APP_NS, "client", "client", 0))
        .pod(PodSpec::new(APP_NS, "server", "server", 1))
}

fn up() -> Mesh {
    let mesh = Mesh::up(&spec(), MeshOptions::default()).expect("mesh up");
    for node in ["node-0", "node-1"] {
        mesh.wait_for_certificates(node)
            .expect("agent certificates");
    }
    mesh
}

fn sealmesh(mesh: &Mesh, args: &[&OsStr]) -> Output {
    Command::new(locate_binary("sealmesh").expect("sealmesh built"))
        .args(args)
        .env("SEALMESH_CLUSTER_FILE", mesh.testbed().cluster_file_path())
        .output()
        .expect("sealmesh runs")
}

fn section(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout);
    let start = text
        .find(SECTION)
        .unwrap_or_else(|| panic!("no trust-bundle section in:\n{text}"))
        + SECTION.len();
    let rest = &text[start..];
    rest[..rest.find("\n\n").expect("section ends")].to_owned()
}

/// `openssl x509 -fingerprint -sha256` style.
fn fingerprint(pem: &str) -> String {
    let der = pki::parse_pem_certs(pem.as_bytes(), "root")
        .unwrap()
        .remove(0);
    pki::fingerprint(&der)
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn dropping_the_root_of_live_leaves_warns_and_keeping_it_passes() {
    let mesh = up();
    let mesh_root = std::fs::read_to_string(mesh.pki_dir().join("ca-bundle.crt")).unwrap();
    let new_root: GeneratedCa =
        pki::generate_root(&CaSpec::valid_for("new-root.test", 365 * DAY)).unwrap();
    let dir = tempfile::tempdir().unwrap();

    // Rotation half done: the issuer already comes from the new root and the
    // bundle holds both, but the agents still hold leaves of the old issuer.
    let new_issuer = pki::generate_issuer(
        &new_root.material(),
        &CaSpec::valid_for("new-issuer.test", 90 * DAY),
    )
    .unwrap()
    .0;
    new_issuer
        .write_dir(&dir.path().join("issuer"), Layout::Pem, false)
        .unwrap();
    let current = write(
        dir.path(),
        "current.crt",
        &format!("{mesh_root}{}", new_root.cert_pem),
    );
    let only_new = write(dir.path(), "only-new.crt", &new_root.cert_pem);
    let issuer_dir = dir.path().join("issuer");
    let check_against = |candidate: &Path| {
        sealmesh(
            &mesh,
            &[
                "check".as_ref(),
                "--proxy".as_ref(),
                "--trust-anchors".as_ref(),
                current.as_os_str(),
                "--issuer-dir".as_ref(),
                issuer_dir.as_os_str(),
                "--trust-bundle".as_ref(),
                candidate.as_os_str(),
            ],
        )
    };
    let out = check_against(&only_new);
    assert!(out.status.success(), "warnings do not fail: {out:?}");
    let text = section(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "√ candidate trust bundle is readable", "{text}");
    assert_eq!(
        lines[1],
        "‼ candidate trust bundle keeps every anchor that signs the issuer or a live certificate",
        "{text}"
    );
    // The old root signs exactly the two live leaves, not the new issuer.
    let prefix = format!(
        "    trust anchor CN=root.sealmesh.cluster.local (SHA256 fingerprint {}) is not in the candidate bundle but signs ",
        fingerprint(&mesh_root)
    );
    let signs = lines[2]
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("{text}"));
    let signed: Vec<&str> = signs.split(", ").collect();
    assert_eq!(signed.len(), 2, "{text}");
    assert!(
        signed[0].starts_with("node-0 spiffe://cluster.local/ns/shop/sa/client (serial "),
        "{text}"
    );
    assert!(
        signed[1].starts_with("node-1 spiffe://cluster.local/ns/shop/sa/server (serial "),
        "{text}"
    );
    assert_eq!(lines.len(), 4, "one anchor and the hint: {text}");

    // Keeping the old root next to the new one passes.
    let out = check_against(&current);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        section(&out),
        "√ candidate trust bundle is readable\n\
         √ candidate trust bundle keeps every anchor that signs the issuer or a live certificate"
    );

    // Before the rotation (the mesh's own PKI), dropping its only root warns
    // for the issuer and both leaves.
    let out = sealmesh(
        &mesh,
        &[
            "check".as_ref(),
            "--proxy".as_ref(),
            "--pki-dir".as_ref(),
            mesh.pki_dir().as_os_str(),
            "--trust-bundle".as_ref(),
            only_new.as_os_str(),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let text = section(&out);
    assert!(
        text.contains(&format!(
            "{prefix}the issuer CN=identity.sealmesh.cluster.local, node-0 spiffe://cluster.local/ns/shop/sa/client (serial "
        )),
        "{text}"
    );
}
