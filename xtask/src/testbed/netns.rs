//! Running code and processes inside a testbed's network namespaces and cgroups.

use std::{
    fs::File,
    os::fd::OwnedFd,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output},
    sync::mpsc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use nix::{
    sched::{CloneFlags, setns},
    sys::signal::SigSet,
};

use super::{TestbedError, layout::NETNS_DIR};

pub(crate) fn netns_path(netns: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(netns)
}

pub(crate) fn open_netns(netns: &str) -> Result<OwnedFd, TestbedError> {
    let path = netns_path(netns);
    File::open(&path)
        .map(OwnedFd::from)
        .map_err(|source| TestbedError::Io {
            what: "cannot open network namespace",
            path,
            source,
        })
}

fn enter(netns: &str, fd: &OwnedFd) -> Result<(), TestbedError> {
    setns(fd, CloneFlags::CLONE_NEWNET).map_err(|source| TestbedError::Setns {
        netns: netns.to_owned(),
        source,
    })
}

/// Runs `f` on a fresh thread that has joined `netns` and returns its result.
/// Sockets created there stay in that namespace wherever they are used later, so
/// this also serves to bind listeners or connect clients "from" a pod. A panic in
/// `f` is propagated to the caller.
pub fn run_in_netns<T: Send, F: FnOnce() -> T + Send>(
    netns: &str,
    f: F,
) -> Result<T, TestbedError> {
    let fd = open_netns(netns)?;
    std::thread::scope(|scope| {
        let thread = scope.spawn(move || {
            enter(netns, &fd)?;
            Ok(f())
        });
        thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Like [`run_in_netns`] but returns at once with the thread's handle (for servers
/// that run while the caller does something else). Threads `f` starts inherit the
/// namespace, so an async runtime built inside `f` lives entirely in it.
pub fn thread_in_netns<T, F>(netns: &str, f: F) -> Result<JoinHandle<T>, TestbedError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let fd = open_netns(netns)?;
    let name = netns.to_owned();
    let (entered_tx, entered_rx) = mpsc::sync_channel(1);
    let handle = std::thread::Builder::new()
        .name(format!("netns {name}"))
        .spawn(move || {
            let entered = enter(&name, &fd);
            let ok = entered.is_ok();
            // The receiver waits for exactly this message.
            let _ = entered_tx.send(entered);
            assert!(ok, "thread failed to enter network namespace {name}");
            f()
        })
        .map_err(|source| TestbedError::Io {
            what: "cannot start a thread for network namespace",
            path: netns_path(netns),
            source,
        })?;
    match entered_rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(TestbedError::Setns {
            netns: netns.to_owned(),
            source: nix::errno::Errno::ESRCH,
        }),
    }
}

/// Spawns `cmd` so that it runs in `netns` and in the cgroup `cgroup` from its first
/// instruction (it joins both between fork and exec, so nothing it starts can escape).
#[allow(unsafe_code)]
pub fn spawn_in(netns: &str, cgroup: &Path, mut cmd: Command) -> Result<ChildGuard, TestbedError> {
    let netns_fd = open_netns(netns)?;
    let procs_path = cgroup.join("cgroup.procs");
    let cgroup_procs = std::fs::OpenOptions::new()
        .write(true)
        .open(&procs_path)
        .map(OwnedFd::from)
        .map_err(|source| TestbedError::Io {
            what: "cannot open cgroup",
            path: procs_path,
            source,
        })?;
    // SAFETY: the closure runs in the forked child before exec, where only
    // async-signal-safe calls are allowed: setns(2), write(2) on descriptors opened
    // above and sigprocmask(2) are, and nothing here allocates or takes locks. Writing
    // "0" to cgroup.procs moves the writing process itself, so no pid formatting is
    // needed. The child starts with no signal blocked, as under a kubelet, whatever
    // the testbed's own threads block (the demo blocks SIGINT/SIGTERM to wait for them).
    unsafe {
        cmd.pre_exec(move || {
            setns(&netns_fd, CloneFlags::CLONE_NEWNET)?;
            nix::unistd::write(&cgroup_procs, b"0")?;
            SigSet::empty().thread_set_mask()?;
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|source| TestbedError::Spawn {
        command: crate::cmd::display(&cmd),
        netns: netns.to_owned(),
        source,
    })?;
    Ok(ChildGuard { child: Some(child) })
}

/// A process started in a testbed; killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
}

impl ChildGuard {
    pub fn id(&self) -> u32 {
        self.child().id()
    }

    pub fn child(&self) -> &Child {
        self.child
            .as_ref()
            .expect("child is present until consumed")
    }

    pub fn child_mut(&mut self) -> &mut Child {
        self.child
            .as_mut()
            .expect("child is present until consumed")
    }

    /// Whether the process has exited, without reaping it (its exit status
    /// stays for [`Self::child_mut`]'s `wait`, and dropping still works).
    pub fn has_exited(&self) -> bool {
        use nix::{
            sys::wait::{Id, WaitPidFlag, WaitStatus, waitid},
            unistd::Pid,
        };
        let pid = Pid::from_raw(i32::try_from(self.id()).expect("pids fit in i32"));
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        !matches!(waitid(Id::Pid(pid), flags), Ok(WaitStatus::StillAlive))
    }

    /// Waits for the process to exit by itself and collects piped output.
    pub fn wait_with_output(mut self) -> std::io::Result<Output> {
        self.child
            .take()
            .expect("child is present until consumed")
            .wait_with_output()
    }

    /// Stops the process as a kubelet does: SIGTERM, then SIGKILL if it has
    /// not exited after `grace`. Returns how it ended.
    pub fn terminate(mut self, grace: Duration) -> std::io::Result<ExitStatus> {
        let mut child = self.child.take().expect("child is present until consumed");
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pids fit in i32"));
        // Fails only if it already exited, which try_wait then reports.
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        child.wait()
    }

    /// Kills the process and reaps it.
    pub fn kill(mut self) {
        self.kill_and_reap();
    }

    fn kill_and_reap(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Fails only if it already exited, which wait() then reaps.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill_and_reap();
    }
}
