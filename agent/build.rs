//! Builds the eBPF programs (agent-ebpf's `sealmesh-redirect` binary) for the bpf target with
//! aya-build, which runs `rustup run <toolchain> cargo build -Z build-std=core --target
//! bpfel-unknown-none` with the dated nightly pinned in `agent-ebpf/rust-toolchain.toml`.
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
/// Pins the eBPF build's nightly; `cargo xtask setup` installs what it names.
const EBPF_TOOLCHAIN_FILE: &str = "rust-toolchain.toml";

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

    // watch_sources covers the toolchain file too: a new pin rebuilds the programs.
    let toolchain = pinned_toolchain(&Path::new(ebpf_dir).join(EBPF_TOOLCHAIN_FILE))?;
    check_ebpf_toolchain(&toolchain)?;
    watch_sources(Path::new(ebpf_dir))?;
    aya_build::build_ebpf(
        [Package {
            name: EBPF_PACKAGE,
            root_dir: ebpf_dir,
            features: &[EBPF_PROGRAMS_FEATURE],
            ..Default::default()
        }],
        Toolchain::Custom(&toolchain),
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

/// The `channel` of a rust-toolchain.toml (`channel = "nightly-YYYY-MM-DD"`).
fn pinned_toolchain(file: &Path) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("channel"))
        .filter_map(|rest| rest.trim_start().strip_prefix('='))
        .map(|value| value.trim().trim_matches('"').to_owned())
        .find(|channel| !channel.is_empty())
        .with_context(|| format!("{} names no `channel = \"...\"`", file.display()))
}

/// Fails with one message naming everything missing, instead of a cargo/linker error deep inside
/// the nested bpf build.
fn check_ebpf_toolchain(toolchain: &str) -> anyhow::Result<()> {
    let mut missing = Vec::new();
    match toolchain_output(toolchain, &["rustc", "--print", "sysroot"]) {
        None => missing.push(format!("the {toolchain} toolchain")),
        Some(sysroot) => {
            let core_sources =
                Path::new(sysroot.trim()).join("lib/rustlib/src/rust/library/core/Cargo.toml");
            if !core_sources.is_file() {
                missing.push(format!("the rust-src component of {toolchain}"));
            }
        }
    }
    // Run through the pinned toolchain: bpf-linker loads the LLVM that toolchain ships.
    if toolchain_output(toolchain, &["bpf-linker", "--version"]).is_none() {
        missing.push(format!("a bpf-linker that runs with {toolchain}'s LLVM"));
    }
    if missing.is_empty() {
        return Ok(());
    }
    bail!(
        "cannot build sealmesh's eBPF programs: missing {}. Run `cargo xtask setup` to install them.",
        missing.join(", ")
    )
}

/// stdout of `rustup run <toolchain> <args>`, or None when it cannot run or fails.
fn toolchain_output(toolchain: &str, args: &[&str]) -> Option<String> {
    let output = Command::new("rustup")
        .args(["run", toolchain])
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
