//! `sealmesh certs` as an operator runs it: the real binary.

use std::{os::unix::fs::PermissionsExt, path::Path, process::Command};

use sealmesh_pki::{CaMaterial, Issuer, TrustAnchors};
use time::OffsetDateTime;

fn sealmesh(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sealmesh"))
        .args(args)
        .output()
        .expect("sealmesh runs")
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn creates_a_root_and_an_issuer_that_chains_to_it_in_both_layouts() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let out = sealmesh(&["certs", "create-root", "--out", path(&root)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(mode(&root.join("key.pem")), 0o600);
    assert_eq!(mode(&root.join("crt.pem")), 0o644);

    for (layout, files) in [
        ("pem", &["crt.pem", "key.pem"][..]),
        ("tls", &["tls.crt", "tls.key", "ca.crt"][..]),
    ] {
        let issuer = dir.path().join(format!("issuer-{layout}"));
        let out = sealmesh(&[
            "certs",
            "create-issuer",
            "--root",
            path(&root),
            "--out",
            path(&issuer),
            "--layout",
            layout,
            "--validity",
            "48h",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8(out.stdout).unwrap();
        for file in files {
            assert!(
                stdout.contains(&format!("wrote {}", issuer.join(file).display())),
                "{stdout}"
            );
        }
        let mut names: Vec<_> = std::fs::read_dir(&issuer)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        let mut expected = files.to_vec();
        expected.sort();
        assert_eq!(names, expected);
        assert_eq!(mode(&issuer.join(files[1])), 0o600);

        let anchors = TrustAnchors::load(&root.join("crt.pem")).unwrap();
        let loaded = Issuer::from_material(
            &CaMaterial::read_dir(&issuer).unwrap(),
            &anchors,
            OffsetDateTime::now_utc(),
        )
        .unwrap();
        assert_eq!(loaded.info().subject, "CN=identity.sealmesh.cluster.local");
        assert_eq!(loaded.anchor_subject(), "CN=root.sealmesh.cluster.local");
        let lifetime = loaded.info().not_after - loaded.info().not_before;
        assert_eq!(lifetime, time::Duration::hours(48));
        if layout == "tls" {
            assert_eq!(
                std::fs::read(issuer.join("ca.crt")).unwrap(),
                std::fs::read(root.join("crt.pem")).unwrap()
            );
        }
    }
}

#[test]
fn refuses_to_overwrite_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    assert!(
        sealmesh(&[
            "certs",
            "create-root",
            "--out",
            path(&root),
            "--layout",
            "tls"
        ])
        .status
        .success()
    );
    let first = std::fs::read(root.join("tls.crt")).unwrap();

    let out = sealmesh(&[
        "certs",
        "create-root",
        "--out",
        path(&root),
        "--layout",
        "tls",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains(&format!(
            "{} already exists; pass --force to overwrite it",
            root.join("tls.crt").display()
        )),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(root.join("tls.crt")).unwrap(),
        first,
        "left untouched"
    );

    let out = sealmesh(&[
        "certs",
        "create-root",
        "--out",
        path(&root),
        "--layout",
        "tls",
        "--force",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(
        std::fs::read(root.join("tls.crt")).unwrap(),
        first,
        "replaced"
    );
    assert_eq!(mode(&root.join("tls.key")), 0o600);
}

#[test]
fn issuer_needs_a_readable_root_and_never_outlives_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = sealmesh(&[
        "certs",
        "create-issuer",
        "--root",
        path(dir.path()),
        "--out",
        path(&dir.path().join("i")),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("holds no CA: expected crt.pem + key.pem, or tls.crt + tls.key"),
        "{stderr}"
    );

    let root = dir.path().join("root");
    assert!(
        sealmesh(&[
            "certs",
            "create-root",
            "--out",
            path(&root),
            "--validity",
            "24h"
        ])
        .status
        .success()
    );
    let issuer = dir.path().join("issuer");
    let out = sealmesh(&[
        "certs",
        "create-issuer",
        "--root",
        path(&root),
        "--out",
        path(&issuer),
    ]);
    assert!(out.status.success());
    assert!(
        String::from_utf8(out.stderr)
            .unwrap()
            .contains("the issuer expires with the root")
    );
    let anchors = TrustAnchors::load(&root.join("crt.pem")).unwrap();
    let loaded = Issuer::from_material(
        &CaMaterial::read_dir(&issuer).unwrap(),
        &anchors,
        OffsetDateTime::now_utc(),
    )
    .unwrap();
    assert_eq!(loaded.info().not_after, anchors.infos()[0].not_after);
}

#[test]
fn refuses_expired_or_too_short_validities_and_overlong_common_names() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    for (args, message) in [
        (
            &["--validity", "0s"][..],
            "a CA must be valid for at least 1h (it signs 24h leaves); use e.g. 8760h",
        ),
        (
            &["--validity", "59m"][..],
            "a CA must be valid for at least 1h",
        ),
        (
            &["--common-name", &"c".repeat(300)][..],
            "a common name has 1 to 64 characters (RFC 5280); this one has 300",
        ),
        (&["--common-name", ""][..], "this one has 0"),
    ] {
        let mut command = vec!["certs", "create-root", "--out", path(&root)];
        command.extend_from_slice(args);
        let out = sealmesh(&command);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(stderr.contains(message), "{args:?}: {stderr}");
        assert!(!root.exists(), "{args:?}: nothing is written");
    }
    let out = sealmesh(&[
        "certs",
        "create-root",
        "--out",
        path(&root),
        "--common-name",
        &"c".repeat(64),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let issuer = dir.path().join("issuer");
    let out = sealmesh(&[
        "certs",
        "create-issuer",
        "--root",
        path(&root),
        "--out",
        path(&issuer),
        "--validity",
        "0s",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(!issuer.exists());
}
