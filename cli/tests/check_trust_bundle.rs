//! `sealmesh check --trust-bundle` as an operator runs it before replacing the
//! trust anchors: the real binary on real certificates in a PKI directory.
//! (Live agent leaves, with --proxy, are covered by xtask/tests/cli_trust_bundle.rs.)

use std::{path::Path, process::Output};

use sealmesh_pki::{
    GeneratedCa, Layout,
    test_support::{DAY, new_issuer, new_root_named, pem_certs},
};
const SECTION: &str = "sealmesh-trust-bundle\n---------------------\n";

fn root(name: &str) -> GeneratedCa {
    new_root_named(name)
}

fn issuer(root: &GeneratedCa) -> GeneratedCa {
    new_issuer(root, "issuer.test", 90 * DAY)
}

fn fingerprint(root: &GeneratedCa) -> String {
    sealmesh_pki::fingerprint(&pem_certs(&root.cert_pem)[0])
}

/// A PKI directory (`ca-bundle.crt` = `current`, `issuer/`) and a candidate
/// bundle next to it.
struct Rotation {
    dir: tempfile::TempDir,
}

impl Rotation {
    fn new(current: &[&GeneratedCa], issuer: &GeneratedCa, candidate: &[&GeneratedCa]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let bundle =
            |cas: &[&GeneratedCa]| cas.iter().map(|ca| ca.cert_pem.clone()).collect::<String>();
        std::fs::write(dir.path().join("ca-bundle.crt"), bundle(current)).unwrap();
        std::fs::write(dir.path().join("candidate.crt"), bundle(candidate)).unwrap();
        issuer
            .write_dir(&dir.path().join("issuer"), Layout::Pem, false)
            .unwrap();
        Self { dir }
    }

    fn candidate(&self) -> std::path::PathBuf {
        self.dir.path().join("candidate.crt")
    }

    fn check(&self, candidate: &Path) -> Output {
        std::process::Command::new(env!("CARGO_BIN_EXE_sealmesh"))
            .args(["check", "--pki-dir"])
            .arg(self.dir.path())
            .arg("--trust-bundle")
            .arg(candidate)
            .env_remove("SEALMESH_CLUSTER_FILE")
            .output()
            .unwrap()
    }
}

/// The trust-bundle section's text (up to the blank line closing it).
fn section(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout);
    let start = text
        .find(SECTION)
        .unwrap_or_else(|| panic!("no trust-bundle section in:\n{text}"))
        + SECTION.len();
    let rest = &text[start..];
    rest[..rest.find("\n\n").expect("section ends")].to_owned()
}

#[test]
fn dropping_the_root_that_signs_the_issuer_warns_naming_it() {
    let old = root("old-root.test");
    let new = root("new-root.test");
    let rotation = Rotation::new(&[&old, &new], &issuer(&old), &[&new]);
    let out = rotation.check(&rotation.candidate());
    assert!(out.status.success(), "warnings do not fail: {out:?}");
    assert_eq!(
        section(&out),
        format!(
            "√ candidate trust bundle is readable\n\
             ‼ candidate trust bundle keeps every anchor that signs the issuer (add --proxy for live certificates)\n\
             \x20   trust anchor CN=old-root.test (SHA256 fingerprint {}) is not in the candidate bundle but signs the issuer CN=issuer.test\n\
             \x20   see: keep that anchor in the bundle until the issuer is re-issued from a kept root and every agent has renewed its certificates from it (within a certificate lifetime, 24h by default); then remove it",
            fingerprint(&old)
        )
    );
}

#[test]
fn dropping_only_roots_nothing_uses_passes() {
    let old = root("old-root.test");
    let new = root("new-root.test");
    // Rotation not started: the new root is unused and may go again.
    let rotation = Rotation::new(&[&old, &new], &issuer(&old), &[&old]);
    let out = rotation.check(&rotation.candidate());
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        section(&out),
        "√ candidate trust bundle is readable\n\
         √ candidate trust bundle keeps every anchor that signs the issuer (add --proxy for live certificates)"
    );
    // Rotation finished: the issuer comes from the new root, the old one may go.
    let rotation = Rotation::new(&[&old, &new], &issuer(&new), &[&new]);
    let out = rotation.check(&rotation.candidate());
    assert!(out.status.success(), "{out:?}");
    assert!(
        section(&out).ends_with("√ candidate trust bundle keeps every anchor that signs the issuer (add --proxy for live certificates)"),
        "{out:?}"
    );
}

#[test]
fn an_unreadable_candidate_fails() {
    let old = root("old-root.test");
    let rotation = Rotation::new(&[&old], &issuer(&old), &[]);
    std::fs::write(rotation.candidate(), "not a certificate").unwrap();
    let out = rotation.check(&rotation.candidate());
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = section(&out);
    assert!(
        text.starts_with("× candidate trust bundle is readable\n    "),
        "{text}"
    );
    assert!(
        text.ends_with("    see: pass --trust-bundle a PEM file of root certificates"),
        "{text}"
    );
    let missing = rotation.dir.path().join("missing.crt");
    let out = rotation.check(&missing);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        section(&out).contains(&format!("    cannot read {}: ", missing.display())),
        "{out:?}"
    );
}
