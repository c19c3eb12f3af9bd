//! cgroup v2 directories of a testbed: creation, killing their processes, removal.

use std::{
    io,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use super::TestbedError;

/// How long processes of a killed cgroup may take to exit before teardown reports it.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

pub fn create(dir: &Path) -> Result<(), TestbedError> {
    std::fs::create_dir_all(dir).map_err(|source| TestbedError::Io {
        what: "cannot create cgroup",
        path: dir.to_owned(),
        source,
    })
}

/// Kills every process in the subtree at `dir` and waits until it is empty.
pub fn kill_all(dir: &Path) -> Result<(), String> {
    if !dir.exists() {
        return Ok(());
    }
    let kill_file = dir.join("cgroup.kill");
    let use_kill_file = kill_file.exists();
    let deadline = Instant::now() + KILL_TIMEOUT;
    loop {
        if use_kill_file {
            std::fs::write(&kill_file, "1")
                .map_err(|e| format!("cannot kill cgroup {}: {e}", dir.display()))?;
        } else {
            // Kernels before 5.14 lack cgroup.kill: signal each member; repeat until
            // empty because members may fork meanwhile.
            for pid in member_pids(dir) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        if !is_populated(dir) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "processes {:?} in cgroup {} survived SIGKILL for {KILL_TIMEOUT:?}",
                member_pids(dir),
                dir.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `populated 1` in cgroup.events means some process lives in the subtree.
fn is_populated(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("cgroup.events"))
        .map(|events| events.lines().any(|l| l == "populated 1"))
        .unwrap_or(false)
}

fn member_pids(dir: &Path) -> Vec<i32> {
    let mut pids = Vec::new();
    for cgroup in subtree(dir) {
        if let Ok(procs) = std::fs::read_to_string(cgroup.join("cgroup.procs")) {
            pids.extend(procs.lines().filter_map(|l| l.parse::<i32>().ok()));
        }
    }
    pids
}

/// `dir` and its descendant cgroups, children before parents.
fn subtree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(subtree(&entry.path()));
            }
        }
    }
    out.push(dir.to_owned());
    out
}

/// Removes the (empty of processes) cgroup subtree at `dir`, children first.
pub fn remove_tree(dir: &Path) -> Result<(), String> {
    let mut problems = Vec::new();
    for cgroup in subtree(dir) {
        if let Err(e) = remove_dir_retrying(&cgroup) {
            problems.push(format!("cannot remove cgroup {}: {e}", cgroup.display()));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// A cgroup whose last process just died can report EBUSY for a moment.
fn remove_dir_retrying(dir: &Path) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e)
                if e.raw_os_error() == Some(Errno::EBUSY as i32) && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e),
        }
    }
}

/// The cgroup v2 path of a process relative to the cgroup2 mount (`0::/a/b` → `/a/b`).
pub fn of_process(pid: u32) -> io::Result<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
        .ok_or_else(|| io::Error::other(format!("process {pid} has no cgroup v2 entry")))
}
