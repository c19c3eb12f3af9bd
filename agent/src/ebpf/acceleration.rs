//! Whether this kernel can carry pod sockets in a sockhash safely, found out on the kernel itself.
//!
//! Sockmap acceleration puts the pod's socket of every pod <-> agent connection in a sockhash,
//! and that changes how the pod's own socket behaves. Two limits of Linux 6.18 make that unsafe
//! for ordinary apps (docs/PERFORMANCE.md, "Sockmap acceleration"): a blocking read woken
//! without data returns EAGAIN instead of waiting on (`tcp_bpf_recvmsg` waits once), and
//! redirected bytes get no back-pressure (they queue on the receiver past its rcvbuf until the
//! host's TCP memory runs out). `--sockmap-acceleration auto`, the default, turns acceleration
//! on only where [`probe`] finds neither: it runs the shipped `sk_msg` program, on a private copy
//! of its maps, over loopback pairs of the agent's own, the way a pod and the agent use them.
//! The agent runs it in a child process of itself ([`probe_in_child`]), so the probe's second
//! program load, threads and code stay out of the agent's memory, and a probe stuck in the
//! kernel is killed instead of holding the agent's start.

use std::{
    fs,
    io::{self, Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use agent_ebpf::{SocketTuple, names};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, SockHash},
    programs::SkMsg,
};
use nix::sys::statfs::{BPF_FS_MAGIC, statfs};
use serde::{Deserialize, Serialize};

use super::REDIRECT_OBJECT;

/// `--sockmap-acceleration`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SockmapAcceleration {
    /// On if the kernel passes [`probe`], off otherwise (said once at start).
    Auto,
    /// On without probing (measurements, kernels known to be fixed).
    On,
    Off,
}

/// Why this kernel cannot carry pod sockets in a sockhash.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum KernelLimit {
    #[error("sk_msg programs on a sockhash do not work here: {0}")]
    Unsupported(String),
    #[error(
        "a blocking read on a socket in a sockhash returns EAGAIN when the socket is woken without \
         data (tcp_bpf_recvmsg waits once), so a pod app blocked in recv while another of its \
         threads half-closes the socket would get an error"
    )]
    BlockingReadReturnsEagain,
    #[error(
        "redirected bytes get no back-pressure: {queued_bytes} bytes were queued for a receiver \
         that read none and the sender never had to wait, so one pod could use up the node's TCP \
         memory"
    )]
    NoBackPressure { queued_bytes: usize },
}

/// More than TCP lets a sender queue for a receiver that reads nothing with the kernel's default
/// limits (send buffer at most 4 MiB, receive buffer at most 6 MiB): a redirect that takes this
/// much without making the sender wait has no back-pressure.
pub const BACK_PRESSURE_BOUND: usize = 16 << 20;
/// How long a probe waits for what should take microseconds, before calling the probe failed.
const PROBE_WAIT: Duration = Duration::from_secs(5);
/// How long the agent gives its probe process: every check's wait, and the program load.
const PROBE_PROCESS_TIMEOUT: Duration = Duration::from_secs(15);
/// The first argument that makes the agent binary run [`probe`] and print its findings as JSON,
/// instead of running the agent ([`probe_in_child`]).
pub const PROBE_ARG: &str = "--probe-sockmap-acceleration";

/// The agent's choice for `--sockmap-acceleration`, made once before the redirector loads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccelerationChoice {
    pub on: bool,
    /// What kept `auto` off on this kernel (empty otherwise).
    pub limits: Vec<KernelLimit>,
}

impl AccelerationChoice {
    pub const OFF: Self = Self {
        on: false,
        limits: Vec::new(),
    };
    pub const ON: Self = Self {
        on: true,
        limits: Vec::new(),
    };

    /// Applies `mode`, running `probe` for `auto`, and says the outcome of a probe once.
    pub fn decide(mode: SockmapAcceleration, probe: impl FnOnce() -> Vec<KernelLimit>) -> Self {
        match mode {
            SockmapAcceleration::On => Self::ON,
            SockmapAcceleration::Off => Self::OFF,
            SockmapAcceleration::Auto => {
                let limits = probe();
                if limits.is_empty() {
                    tracing::info!("sockmap acceleration on: the kernel passed its probe");
                } else {
                    let limits_text: Vec<String> = limits.iter().map(ToString::to_string).collect();
                    tracing::info!(
                        limits = %limits_text.join("; "),
                        "sockmap acceleration off: pod sockets in a sockhash are not safe on this \
                         kernel; the pod <-> agent hop goes through TCP"
                    );
                }
                Self {
                    on: limits.is_empty(),
                    limits,
                }
            }
        }
    }
}

/// Where the probe pins its scratch maps, below a node's pin directory; gone once it returns.
pub fn probe_pin_dir(bpffs_dir: &Path) -> PathBuf {
    bpffs_dir.join("acceleration-probe")
}

/// Runs [`probe`] as `<agent_binary> PROBE_ARG <pin_dir>` and returns what it found; a probe
/// process that fails, prints something else or outlives [`PROBE_PROCESS_TIMEOUT`] (killed)
/// counts as [`KernelLimit::Unsupported`].
pub fn probe_in_child(agent_binary: &Path, pin_dir: &Path) -> Vec<KernelLimit> {
    run_child(agent_binary, pin_dir)
        .unwrap_or_else(|error| vec![KernelLimit::Unsupported(format!("probe process: {error}"))])
}

fn run_child(agent_binary: &Path, pin_dir: &Path) -> Result<Vec<KernelLimit>, String> {
    let mut child = Command::new(agent_binary)
        .arg(PROBE_ARG)
        .arg(pin_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| format!("starting {}: {error}", agent_binary.display()))?;
    let deadline = Instant::now() + PROBE_PROCESS_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "no answer within {PROBE_PROCESS_TIMEOUT:?}; killed"
                ));
            }
            Err(error) => return Err(format!("waiting for it: {error}")),
        }
    };
    // Small outputs: both fit the pipes, so the child never blocked on writing them.
    let mut stdout = String::new();
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stdout.take() {
        let _ = pipe.read_to_string(&mut stdout);
    }
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    if !status.success() {
        return Err(format!("{status}: {}", stderr.trim()));
    }
    serde_json::from_str(&stdout)
        .map_err(|error| format!("unreadable answer {:?}: {error}", stdout.trim()))
}

/// The probe process's side of [`probe_in_child`]: probes, prints the limits as JSON.
pub fn run_probe_process(pin_dir: Option<PathBuf>) -> ExitCode {
    let Some(pin_dir) = pin_dir else {
        eprintln!("{PROBE_ARG} needs the scratch pin directory");
        return ExitCode::from(2);
    };
    match serde_json::to_string(&probe(&pin_dir)) {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("{error}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the shipped `sk_msg` program over loopback socket pairs and returns the limits found:
/// empty if this kernel carries pod sockets in a sockhash safely. `pin_dir` is a scratch
/// directory on bpffs (the object's maps are pinned by name; the probe's copies are unpinned
/// again at once), removed before it returns.
pub fn probe(pin_dir: &Path) -> Vec<KernelLimit> {
    let mut probe = match Probe::start(pin_dir) {
        Ok(probe) => probe,
        Err(error) => return vec![KernelLimit::Unsupported(error)],
    };
    let mut limits = Vec::new();
    let checks: [Check; 2] = [Pair::blocking_read, Pair::back_pressure];
    for check in checks {
        match probe.pair().and_then(|pair| check(&pair)) {
            Ok(None) => {}
            Ok(Some(limit)) => limits.push(limit),
            Err(error) => {
                limits.push(KernelLimit::Unsupported(error));
                break;
            }
        }
    }
    limits
}

/// One check on a fresh pair: the limit found, or why the check could not run.
type Check = fn(&Pair) -> Result<Option<KernelLimit>, String>;

/// The sk_msg program attached to a private sockhash, and a loopback listener for pairs.
struct Probe {
    sockets: SockHash<MapData, SocketTuple>,
    tcp_only_senders: HashMap<MapData, SocketTuple, u8>,
    listener: TcpListener,
    /// Keeps the program attached (aya detaches it on drop).
    _ebpf: Ebpf,
}

/// One connection as a pod and the agent hold it: both sockets in the probe's sockhash.
struct Pair {
    pod: TcpStream,
    agent: TcpStream,
}

impl Probe {
    fn start(pin_dir: &Path) -> Result<Self, String> {
        // Scratch space on bpffs only: the directory is emptied before and after. It may
        // not exist yet (a node's first agent): the filesystem it will be created on counts.
        let existing = pin_dir
            .ancestors()
            .find(|dir| dir.exists())
            .unwrap_or(Path::new("/"));
        if !statfs(existing).is_ok_and(|fs| fs.filesystem_type() == BPF_FS_MAGIC) {
            return Err(format!("{} is not on a bpf filesystem", pin_dir.display()));
        }
        let _ = fs::remove_dir_all(pin_dir);
        fs::create_dir_all(pin_dir)
            .map_err(|error| format!("creating {}: {error}", pin_dir.display()))?;
        let loaded = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(REDIRECT_OBJECT);
        // The maps stay alive through their file descriptors; the pins only had to be somewhere.
        let _ = fs::remove_dir_all(pin_dir);
        let mut ebpf = loaded.map_err(|error| format!("loading the programs: {error}"))?;
        let sockets: SockHash<MapData, SocketTuple> = ebpf
            .take_map(names::ACCELERATED_SOCKETS)
            .ok_or("the object has no sockhash")?
            .try_into()
            .map_err(|error| format!("opening the sockhash: {error}"))?;
        let tcp_only_senders = ebpf
            .take_map(names::TCP_ONLY_SENDERS)
            .ok_or("the object has no sender map")?
            .try_into()
            .map_err(|error| format!("opening the sender map: {error}"))?;
        let program: &mut SkMsg = ebpf
            .program_mut(names::SK_MSG_PROGRAM)
            .ok_or("the object has no sk_msg program")?
            .try_into()
            .map_err(|error| format!("reading the sk_msg program: {error}"))?;
        program
            .load()
            .map_err(|error| format!("loading the sk_msg program: {error}"))?;
        program
            .attach(sockets.fd())
            .map_err(|error| format!("attaching the sk_msg program: {error}"))?;
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .map_err(|error| format!("listening on loopback: {error}"))?;
        Ok(Self {
            sockets,
            tcp_only_senders,
            listener,
            _ebpf: ebpf,
        })
    }

    /// A connected pair in the sockhash, checked to carry a message each way by redirection.
    fn pair(&mut self) -> Result<Pair, String> {
        let pod = TcpStream::connect(self.listener.local_addr().map_err(io_error("listener"))?)
            .map_err(io_error("connecting on loopback"))?;
        let (agent, _) = self.listener.accept().map_err(io_error("accepting"))?;
        for socket in [&pod, &agent] {
            socket
                .set_read_timeout(Some(PROBE_WAIT))
                .map_err(io_error("setting a read timeout"))?;
            let tuple = own_tuple(socket).map_err(io_error("reading socket addresses"))?;
            self.sockets
                .insert(tuple, socket.as_raw_fd(), 0)
                .map_err(|error| format!("adding a socket to the sockhash: {error}"))?;
        }
        let pair = Pair { pod, agent };
        for (from, to) in [(&pair.pod, &pair.agent), (&pair.agent, &pair.pod)] {
            (&*from)
                .write_all(b"p")
                .map_err(io_error("sending a probe byte"))?;
            let mut byte = [0; 1];
            (&*to)
                .read_exact(&mut byte)
                .map_err(io_error("receiving a probe byte"))?;
            let tuple = own_tuple(from).map_err(io_error("reading socket addresses"))?;
            if self.tcp_only_senders.get(&tuple, 0).is_ok() {
                return Err("the sk_msg program did not redirect a message to its peer".into());
            }
        }
        Ok(pair)
    }
}

impl Pair {
    /// A reader blocked on the pod socket, then the socket's own half-close from another thread,
    /// which wakes the reader: it must go back to sleep, and get the byte the agent sends once it
    /// sleeps again. Decided by the reader's state, not by timing: a woken thread is runnable
    /// until it has either returned or waits again.
    fn blocking_read(&self) -> Result<Option<KernelLimit>, String> {
        let reader = self
            .pod
            .try_clone()
            .map_err(|error| format!("cloning a socket: {error}"))?;
        let (tid_tx, tid_rx) = mpsc::channel();
        let (read_tx, read_rx) = mpsc::channel();
        // Detached if it outlives the probe: its read times out after PROBE_WAIT.
        thread::spawn(move || {
            let _ = tid_tx.send(nix::unistd::gettid());
            let mut byte = [0; 1];
            let _ = read_tx.send((&reader).read(&mut byte).map_err(|error| error.kind()));
        });
        let tid = tid_rx
            .recv()
            .map_err(|_| "the probe's reader thread died".to_owned())?;
        wait_until_sleeping(tid)?;
        self.pod
            .shutdown(Shutdown::Write)
            .map_err(|error| format!("half-closing: {error}"))?;
        let deadline = Instant::now() + PROBE_WAIT;
        let mut sent = false;
        let outcome = loop {
            match read_rx.try_recv() {
                Ok(outcome) => break outcome,
                Err(mpsc::TryRecvError::Empty) => {}
                Err(mpsc::TryRecvError::Disconnected) => {
                    return Err("the probe's reader thread died".into());
                }
            }
            if !sent && thread_state(tid) == Some('S') {
                (&self.agent)
                    .write_all(b"r")
                    .map_err(io_error("sending a probe byte"))?;
                sent = true;
            }
            if Instant::now() > deadline {
                return Err("the probe's reader got nothing".into());
            }
            thread::sleep(Duration::from_millis(1));
        };
        match outcome {
            Ok(1) => Ok(None),
            Err(io::ErrorKind::WouldBlock) => Ok(Some(KernelLimit::BlockingReadReturnsEagain)),
            other => Err(format!("the probe's blocking read ended with {other:?}")),
        }
    }

    /// The pod sends without blocking to an agent socket that reads nothing: the sender must be
    /// made to wait before more than [`BACK_PRESSURE_BOUND`] is queued.
    fn back_pressure(&self) -> Result<Option<KernelLimit>, String> {
        self.pod
            .set_nonblocking(true)
            .map_err(|error| format!("making a socket non-blocking: {error}"))?;
        let chunk = vec![0; 64 << 10];
        let mut queued = 0;
        while queued < BACK_PRESSURE_BOUND {
            match (&self.pod).write(&chunk) {
                Ok(sent) => queued += sent,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(error) => {
                    return Err(format!("sending to a receiver that reads nothing: {error}"));
                }
            }
        }
        Ok(Some(KernelLimit::NoBackPressure {
            queued_bytes: queued,
        }))
    }
}

/// Phrases an I/O failure of the probe as what it was doing.
fn io_error(what: &'static str) -> impl Fn(io::Error) -> String {
    move |error| format!("{what}: {error}")
}

/// The socket's connection as `sk_msg` keys it: (local, remote), host order.
fn own_tuple(socket: &TcpStream) -> io::Result<SocketTuple> {
    let ipv4 = |addr: SocketAddr| match addr {
        SocketAddr::V4(addr) => Ok(addr),
        SocketAddr::V6(_) => Err(io::Error::other("an IPv6 loopback socket")),
    };
    let (local, remote) = (ipv4(socket.local_addr()?)?, ipv4(socket.peer_addr()?)?);
    Ok(SocketTuple::new(
        u32::from(*local.ip()),
        local.port(),
        u32::from(*remote.ip()),
        remote.port(),
    ))
}

/// Waits until the thread sleeps (state `S`): the reader has nothing else to sleep in than its
/// read, so it is then waiting for data inside the kernel.
fn wait_until_sleeping(tid: nix::unistd::Pid) -> Result<(), String> {
    let deadline = Instant::now() + PROBE_WAIT;
    loop {
        let state = thread_state(tid);
        if state == Some('S') {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the probe's reader never blocked (state {state:?})"
            ));
        }
        thread::sleep(Duration::from_millis(1));
    }
}

/// A thread of this process's scheduler state (`S` sleeping, `R` runnable, `D` waiting for a
/// lock...), or None once it has exited.
fn thread_state(tid: nix::unistd::Pid) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    // The state follows the command name, which is in parentheses and may hold anything.
    let (_, rest) = stat.rsplit_once(") ")?;
    rest.chars().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checks' other outcome, which this kernel's sockhash never gives: sockets outside any
    /// sockhash behave as the probe requires, so a kernel that fixed both limits passes.
    #[test]
    fn plain_tcp_sockets_pass_both_checks() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let plain_pair = || {
            let pod = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (agent, _) = listener.accept().unwrap();
            pod.set_read_timeout(Some(PROBE_WAIT)).unwrap();
            Pair { pod, agent }
        };
        assert_eq!(plain_pair().blocking_read(), Ok(None));
        assert_eq!(plain_pair().back_pressure(), Ok(None));
    }

    /// The probe empties its scratch directory, so it takes one on bpffs only.
    #[test]
    fn a_scratch_directory_off_bpffs_is_refused_and_left_alone() {
        let dir = std::env::temp_dir().join(format!("sealmesh-probe-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("keep"), b"").unwrap();
        let limits = probe(&dir);
        let kept = dir.join("keep").exists();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            limits,
            [KernelLimit::Unsupported(format!(
                "{} is not on a bpf filesystem",
                dir.display()
            ))]
        );
        assert!(kept);
    }

    /// A probe process that fails or answers nonsense keeps acceleration off, with the reason.
    #[test]
    fn a_failed_probe_process_counts_as_unsupported() {
        let failed = probe_in_child(Path::new("/bin/false"), Path::new("/nonexistent"));
        assert!(
            matches!(&failed[..], [KernelLimit::Unsupported(reason)] if reason.starts_with("probe process: exit status: 1")),
            "{failed:?}"
        );
        let nonsense = probe_in_child(Path::new("/bin/echo"), Path::new("/nonexistent"));
        assert!(
            matches!(&nonsense[..], [KernelLimit::Unsupported(reason)] if reason.contains("unreadable answer \"--probe-sockmap-acceleration /nonexistent\"")),
            "{nonsense:?}"
        );
        let missing = probe_in_child(Path::new("/nonexistent/agent"), Path::new("/nonexistent"));
        assert!(
            matches!(&missing[..], [KernelLimit::Unsupported(reason)] if reason.starts_with("probe process: starting /nonexistent/agent")),
            "{missing:?}"
        );
    }
}
