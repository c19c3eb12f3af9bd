//! Builds the eBPF programs (agent-ebpf's `sealmesh-redirect` binary) for the bpf target with
//! aya-build, which runs `cargo +nightly build -Z build-std=core --target bpfel-unknown-none`.
//! The object lands in `$OUT_DIR/sealmesh-redirect`, embedded by `src/ebpf`.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use aya_build::{Package, Toolchain};

const EBPF_PACKAGE: &str = "agent-ebpf";
/// The feature that enables agent-ebpf's program binary (see its Cargo.toml).
const EBPF_PROGRAMS_FEATURE: &str = "programs";
const NIGHTLY: &str = "nightly";

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?,
    );
    let ebpf_dir = manifest_dir
        .parent()
        .context("the agent crate has no parent directory")?
        .join(EBPF_PACKAGE);
    let ebpf_dir = ebpf_dir
        .to_str()
        .context("the agent-ebpf path is not UTF-8")?;

    check_ebpf_toolchain()?;
    watch_sources(Path::new(ebpf_dir))?;
    aya_build::build_ebpf(
        [Package {
            name: EBPF_PACKAGE,
            root_dir: ebpf_dir,
            features: &[EBPF_PROGRAMS_FEATURE],
            ..Default::default()
        }],
        Toolchain::Nightly,
    )
    .context("building the eBPF programs (agent-ebpf) failed; the compiler output is above")
}

/// Reruns this script when any file of agent-ebpf changes. aya-build asks to watch the package
/// directory, but cargo compares only that directory's own mtime, which an edit of
/// `src/main.rs` does not change — the embedded object would silently go stale.
fn watch_sources(dir: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            watch_sources(&path)?;
        } else {
            println!("cargo::rerun-if-changed={}", path.display());
        }
    }
    Ok(())
}

/// Fails with one message naming everything missing, instead of a cargo/linker error deep inside
/// the nested bpf build.
fn check_ebpf_toolchain() -> anyhow::Result<()> {
    let mut missing = Vec::new();
    match nightly_output(&["rustc", "--print", "sysroot"]) {
        None => {
            missing.push("the nightly toolchain (`rustup toolchain install nightly`)");
        }
        Some(sysroot) => {
            let core_sources =
                Path::new(sysroot.trim()).join("lib/rustlib/src/rust/library/core/Cargo.toml");
            if !core_sources.is_file() {
                missing.push("the rust-src component of nightly (`rustup component add rust-src --toolchain nightly`)");
            }
        }
    }
    // Run through the nightly toolchain: bpf-linker loads the LLVM that toolchain ships.
    if nightly_output(&["bpf-linker", "--version"]).is_none() {
        missing.push("a working bpf-linker (`cargo +nightly install bpf-linker`)");
    }
    if missing.is_empty() {
        return Ok(());
    }
    bail!(
        "cannot build sealmesh's eBPF programs: missing {}. Run `cargo xtask setup` to install them.",
        missing.join(", ")
    )
}

/// stdout of `rustup run nightly <args>`, or None when it cannot run or fails.
fn nightly_output(args: &[&str]) -> Option<String> {
    let output = Command::new("rustup")
        .args(["run", NIGHTLY])
        .args(args)
        // The outer cargo points these at the stable toolchain.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}
