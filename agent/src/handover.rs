//! Hand-over of a node's listening sockets from the running agent to its
//! successor, so that replacing the agent (a rolling update) refuses no
//! connection.
//!
//! The eBPF redirect keeps sending meshed pods' connections to the agent's
//! fixed ports while agents change. Closing the old listeners and binding new
//! ones would refuse every connection in between (and reset those queued in
//! the old backlog); instead the same kernel sockets pass from one agent to
//! the next (`SCM_RIGHTS` over a Unix socket that only the agent's user can
//! open), so something accepts at every moment:
//!
//! 1. a starting agent connects to `--handover-socket` and announces itself
//!    (`Hello`); a running agent answers `Welcome` and from then on waits for
//!    it before stopping (SIGTERM);
//! 2. once its certificates and eBPF programs are in place, the successor
//!    asks for the listeners (`Take`) and receives them with their addresses;
//! 3. the running agent stops accepting (connections already accepted are
//!    its to finish: HBONE peers get GOAWAY and move to the successor) and
//!    stays up until it is told to stop, so a kubelet does not restart it.
//!
//! Without a running agent (first start, after a crash) the successor binds
//! the ports itself. The protocol is versioned: agents of different protocol
//! versions do not hand over (the successor binds after its predecessor
//! left).

use std::{
    collections::HashMap,
    io::{IoSlice, IoSliceMut},
    net::SocketAddr,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt},
    },
    path::{Path, PathBuf},
    time::Duration,
};

use nix::{
    errno::Errno,
    sys::{
        socket::{
            self, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
            SockType, UnixAddr, sockopt,
        },
        time::TimeVal,
    },
    unistd::geteuid,
};
use sealmesh_common::consts::LISTENERS_HANDED_OVER_MESSAGE;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// Version of the hand-over messages; agents hand over only to their own
/// version.
const PROTOCOL: u32 = 1;

/// Longest hand-over message (a few listener addresses).
const MAX_MESSAGE: usize = 4096;

/// Listeners handed over at most: outbound, inbound, admin, metrics.
const MAX_LISTENERS: usize = 8;

/// How long either side waits for an answer it expects at once.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error(
        "hand-over socket {}: {what}: {source}; check --handover-socket (a path on a node-local filesystem only the agent's user can write)",
        path.display()
    )]
    Socket {
        path: PathBuf,
        what: &'static str,
        source: Errno,
    },
    #[error(
        "the running agent at {} answered {got} instead of {expected}; it may be another version: the new agent binds its ports once the old one has stopped",
        path.display()
    )]
    Unexpected {
        path: PathBuf,
        expected: &'static str,
        got: String,
    },
    #[error("the running agent at {} will not hand over its listeners: {reason}", path.display())]
    Refused { path: PathBuf, reason: String },
    #[error(
        "the running agent at {} sent {fds} sockets for {addrs} listener addresses",
        path.display()
    )]
    Mismatch {
        path: PathBuf,
        fds: usize,
        addrs: usize,
    },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Message {
    /// A starting agent announces itself, with its network namespace (the
    /// sockets serve only agents of the same one).
    Hello { protocol: u32, pid: u32, netns: u64 },
    /// The running agent will wait for it.
    Welcome { protocol: u32, pid: u32 },
    /// The running agent will not hand over, and why.
    Refused { reason: String },
    /// The successor is ready to accept.
    Take,
    /// The listening sockets, in the order of the attached descriptors.
    Listeners { addrs: Vec<SocketAddr> },
}

impl Message {
    fn name(&self) -> String {
        match self {
            Self::Hello { protocol, .. } => format!("hello (protocol {protocol})"),
            Self::Welcome { protocol, .. } => format!("welcome (protocol {protocol})"),
            Self::Refused { reason } => format!("refused ({reason})"),
            Self::Take => "take".to_owned(),
            Self::Listeners { .. } => "listeners".to_owned(),
        }
    }
}

/// The agent running on this node, to which this one has announced itself.
#[derive(Debug)]
pub struct Predecessor {
    socket: OwnedFd,
    path: PathBuf,
    pid: u32,
}

impl Predecessor {
    /// Announces this agent to the agent running on the node, if one listens
    /// on `path`; `None` when none does.
    pub fn announce(path: &Path) -> Result<Option<Self>, HandoverError> {
        let failed = |what| {
            move |source| HandoverError::Socket {
                path: path.to_owned(),
                what,
                source,
            }
        };
        let socket = seqpacket().map_err(failed("creating a socket"))?;
        let addr = UnixAddr::new(path).map_err(failed("the path"))?;
        match socket::connect(socket.as_raw_fd(), &addr) {
            // No socket, or one left by an agent that is gone.
            Err(Errno::ENOENT | Errno::ECONNREFUSED) => return Ok(None),
            Err(source) => return Err(failed("connecting")(source)),
            Ok(()) => {}
        }
        socket::setsockopt(&socket, sockopt::ReceiveTimeout, &timeval(ANSWER_TIMEOUT))
            .map_err(failed("setting a timeout"))?;
        let hello = Message::Hello {
            protocol: PROTOCOL,
            pid: std::process::id(),
            netns: own_netns().map_err(failed("reading this agent's network namespace"))?,
        };
        send(&socket, &hello, &[]).map_err(failed("announcing this agent"))?;
        match receive(&socket).map_err(failed("waiting for the running agent's answer"))? {
            (
                Message::Welcome {
                    protocol: PROTOCOL,
                    pid,
                },
                _,
            ) => Ok(Some(Self {
                socket,
                path: path.to_owned(),
                pid,
            })),
            (Message::Refused { reason }, _) => Err(HandoverError::Refused {
                path: path.to_owned(),
                reason,
            }),
            (other, _) => Err(HandoverError::Unexpected {
                path: path.to_owned(),
                expected: "welcome",
                got: other.name(),
            }),
        }
    }

    /// Process id of the running agent.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Takes the running agent's listening sockets; it stops accepting on
    /// them once they are sent.
    pub fn take_listeners(self) -> Result<InheritedListeners, HandoverError> {
        let path = &self.path;
        let failed = |what| {
            move |source| HandoverError::Socket {
                path: path.clone(),
                what,
                source,
            }
        };
        send(&self.socket, &Message::Take, &[]).map_err(failed("asking for the listeners"))?;
        let (message, fds) =
            receive(&self.socket).map_err(failed("receiving the listening sockets"))?;
        let Message::Listeners { addrs } = message else {
            return Err(HandoverError::Unexpected {
                path: self.path.clone(),
                expected: "listeners",
                got: message.name(),
            });
        };
        if addrs.len() != fds.len() {
            return Err(HandoverError::Mismatch {
                path: self.path.clone(),
                fds: fds.len(),
                addrs: addrs.len(),
            });
        }
        Ok(InheritedListeners {
            from_pid: self.pid,
            sockets: addrs.into_iter().zip(fds).collect(),
        })
    }
}

/// Listening sockets received from the previous agent, by local address.
#[derive(Debug, Default)]
pub struct InheritedListeners {
    from_pid: u32,
    sockets: HashMap<SocketAddr, OwnedFd>,
}

/// Where the agent's listeners come from: the previous agent's sockets when
/// it handed them over, new ones otherwise. Keeps a duplicate of each, to
/// hand them on to the next agent.
#[derive(Debug, Default)]
pub struct Listeners {
    inherited: InheritedListeners,
    held: Vec<(SocketAddr, OwnedFd)>,
}

impl Listeners {
    pub fn inheriting(inherited: InheritedListeners) -> Self {
        Self {
            inherited,
            held: Vec::new(),
        }
    }

    /// The listener on `addr`: the previous agent's, or a new one from
    /// `bind`.
    pub fn tcp(
        &mut self,
        addr: SocketAddr,
        bind: impl FnOnce(SocketAddr) -> std::io::Result<std::net::TcpListener>,
    ) -> std::io::Result<tokio::net::TcpListener> {
        let listener = match self.inherited.sockets.remove(&addr) {
            Some(fd) => {
                tracing::info!(%addr, from_pid = self.inherited.from_pid,
                    "listening socket taken over from the previous agent");
                std::net::TcpListener::from(fd)
            }
            None => bind(addr)?,
        };
        listener.set_nonblocking(true)?;
        let local = listener.local_addr()?;
        self.held
            .push((local, OwnedFd::from(listener.try_clone()?)));
        tokio::net::TcpListener::from_std(listener)
    }

    /// The sockets to hand on; inherited sockets this agent does not use
    /// (its configuration changed) are closed.
    fn into_held(self) -> Vec<(SocketAddr, OwnedFd)> {
        for addr in self.inherited.sockets.keys() {
            tracing::info!(%addr, "the previous agent's listener on this address is not used; closing it");
        }
        self.held
    }
}

/// Where the running agent is in handing over its listeners.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Succession {
    /// No successor has announced itself.
    None,
    /// A successor announced itself and will take the listeners.
    Announced { pid: u32 },
    /// The successor took the listeners: this agent accepts no more.
    HandedOver { pid: u32 },
}

/// The running agent's side: answers successors on `--handover-socket`.
#[derive(Debug)]
pub struct HandoverServer {
    socket: OwnedFd,
    path: PathBuf,
    /// Device and inode of the socket file, to remove only our own.
    file: (u64, u64),
}

impl HandoverServer {
    /// Listens on `path` (mode 0600, in a 0700 directory), replacing a
    /// previous agent's socket there.
    pub fn listen(path: &Path) -> Result<Self, HandoverError> {
        let failed = |what| {
            move |source| HandoverError::Socket {
                path: path.to_owned(),
                what,
                source,
            }
        };
        if let Some(dir) = path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| failed("creating its directory")(io_errno(&e)))?;
        }
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(failed("removing the previous socket")(io_errno(&e)));
            }
            _ => {}
        }
        let socket = seqpacket().map_err(failed("creating a socket"))?;
        let addr = UnixAddr::new(path).map_err(failed("the path"))?;
        socket::bind(socket.as_raw_fd(), &addr).map_err(failed("binding"))?;
        let meta = std::fs::metadata(path).map_err(|e| failed("reading it")(io_errno(&e)))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| failed("restricting it to the agent's user")(io_errno(&e)))?;
        socket::listen(&socket, Backlog::new(4).expect("a small backlog is valid"))
            .map_err(failed("listening"))?;
        Ok(Self {
            socket,
            path: path.to_owned(),
            file: (meta.dev(), meta.ino()),
        })
    }

    /// Answers successors on a thread of its own until one has taken
    /// `listeners`; the returned channel follows the succession.
    pub fn spawn(self, listeners: Listeners) -> watch::Receiver<Succession> {
        let (tx, rx) = watch::channel(Succession::None);
        let listeners = listeners.into_held();
        std::thread::Builder::new()
            .name("agent-handover".to_owned())
            .spawn(move || self.serve(listeners, tx))
            .expect("spawning the hand-over thread");
        rx
    }

    fn serve(self, listeners: Vec<(SocketAddr, OwnedFd)>, succession: watch::Sender<Succession>) {
        loop {
            let successor = match socket::accept(self.socket.as_raw_fd()) {
                // SAFETY: accept returned a new descriptor that nothing else owns.
                Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd) },
                Err(Errno::EINTR) => continue,
                Err(error) => {
                    tracing::error!(path = %self.path.display(), %error,
                        "hand-over socket failed; a new agent will bind after this one stops");
                    return;
                }
            };
            match self.serve_successor(&successor, &listeners, &succession) {
                Ok(pid) => {
                    tracing::info!(
                        successor_pid = pid,
                        listeners = listeners.len(),
                        "{LISTENERS_HANDED_OVER_MESSAGE}"
                    );
                    // This agent's socket file is the successor's now (it
                    // replaced it); only the descriptor is closed.
                    return;
                }
                Err(error) => {
                    succession.send_replace(Succession::None);
                    tracing::warn!(%error, "a new agent announced itself but did not take the listeners; this agent keeps them");
                }
            }
        }
    }

    /// Greets one successor and hands it the listeners when it asks;
    /// returns its pid.
    fn serve_successor(
        &self,
        successor: &OwnedFd,
        listeners: &[(SocketAddr, OwnedFd)],
        succession: &watch::Sender<Succession>,
    ) -> Result<u32, String> {
        let creds = socket::getsockopt(successor, sockopt::PeerCredentials)
            .map_err(|e| format!("reading the caller's credentials: {e}"))?;
        if creds.uid() != geteuid().as_raw() {
            return Err(format!(
                "refused a caller of uid {} (pid {}): only the agent's user may take its sockets",
                creds.uid(),
                creds.pid()
            ));
        }
        socket::setsockopt(successor, sockopt::ReceiveTimeout, &timeval(ANSWER_TIMEOUT))
            .map_err(|e| e.to_string())?;
        let (pid, netns) =
            match receive(successor).map_err(|e| format!("reading its hello: {e}"))? {
                (
                    Message::Hello {
                        protocol: PROTOCOL,
                        pid,
                        netns,
                    },
                    _,
                ) => (pid, netns),
                (other, _) => return Err(format!("it sent {} instead of hello", other.name())),
            };
        if own_netns().ok() != Some(netns) {
            let reason = format!(
                "the agent of pid {pid} runs in another network namespace; listeners serve their own"
            );
            let _ = send(
                successor,
                &Message::Refused {
                    reason: reason.clone(),
                },
                &[],
            );
            return Err(reason);
        }
        let welcome = Message::Welcome {
            protocol: PROTOCOL,
            pid: std::process::id(),
        };
        send(successor, &welcome, &[]).map_err(|e| format!("answering it: {e}"))?;
        succession.send_replace(Succession::Announced { pid });
        tracing::info!(
            successor_pid = pid,
            "a new agent announced itself; it takes over the listeners once ready"
        );
        // The successor takes as long as its start needs (certificates,
        // eBPF); its exit ends the wait (EOF).
        socket::setsockopt(successor, sockopt::ReceiveTimeout, &TimeVal::new(0, 0))
            .map_err(|e| e.to_string())?;
        match receive(successor).map_err(|e| format!("waiting for it: {e}"))? {
            (Message::Take, _) => {}
            (other, _) => return Err(format!("it sent {} instead of take", other.name())),
        }
        let addrs = listeners.iter().map(|(addr, _)| *addr).collect();
        let fds: Vec<_> = listeners.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
        send(successor, &Message::Listeners { addrs }, &fds)
            .map_err(|e| format!("sending the listening sockets: {e}"))?;
        succession.send_replace(Succession::HandedOver { pid });
        Ok(pid)
    }

    /// Removes the socket file if it is still this agent's (not a
    /// successor's).
    pub fn remove_file(path: &Path, file: (u64, u64)) {
        if let Ok(meta) = std::fs::metadata(path)
            && (meta.dev(), meta.ino()) == file
        {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Device and inode of the socket file this server bound.
    pub fn file(&self) -> (u64, u64) {
        self.file
    }
}

/// The inode of the calling thread's network namespace.
fn own_netns() -> nix::Result<u64> {
    std::fs::metadata("/proc/thread-self/ns/net")
        .map(|meta| meta.ino())
        .map_err(|e| io_errno(&e))
}

fn seqpacket() -> nix::Result<OwnedFd> {
    socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
}

fn timeval(duration: Duration) -> TimeVal {
    TimeVal::new(
        duration.as_secs().try_into().unwrap_or(i64::MAX),
        duration.subsec_micros().into(),
    )
}

fn io_errno(error: &std::io::Error) -> Errno {
    Errno::from_raw(error.raw_os_error().unwrap_or(libc::EIO))
}

fn send(socket: &OwnedFd, message: &Message, fds: &[i32]) -> nix::Result<()> {
    let body = serde_json::to_vec(message).expect("hand-over messages serialize");
    let iov = [IoSlice::new(&body)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    socket::sendmsg::<()>(socket.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None).map(drop)
}

/// One message and the descriptors that came with it. The peer closing the
/// socket is `ECONNRESET`, a timeout `EAGAIN`, a malformed message `EBADMSG`.
fn receive(socket: &OwnedFd) -> nix::Result<(Message, Vec<OwnedFd>)> {
    let mut body = vec![0u8; MAX_MESSAGE];
    let mut cmsg = nix::cmsg_space!([i32; MAX_LISTENERS]);
    let (len, fds, truncated) = {
        let mut iov = [IoSliceMut::new(&mut body)];
        let received = socket::recvmsg::<()>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let mut fds = Vec::new();
        for message in received.cmsgs()? {
            if let ControlMessageOwned::ScmRights(received) = message {
                // SAFETY: SCM_RIGHTS installed these descriptors in this
                // process for this message; nothing else owns them.
                fds.extend(
                    received
                        .into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        let truncated = received
            .flags
            .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
        (received.bytes, fds, truncated)
    };
    if len == 0 {
        return Err(Errno::ECONNRESET);
    }
    if truncated {
        return Err(Errno::EMSGSIZE);
    }
    let message = serde_json::from_slice(&body[..len]).map_err(|_| Errno::EBADMSG)?;
    Ok((message, fds))
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read, Write},
        net::{Ipv4Addr, TcpStream},
    };

    use super::*;

    fn bind_loopback(_: SocketAddr) -> std::io::Result<std::net::TcpListener> {
        std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
    }

    /// An agent listening on loopback and serving successors at
    /// `<dir>/agent.sock`.
    struct RunningAgent {
        _dir: tempfile::TempDir,
        path: PathBuf,
        listener: tokio::net::TcpListener,
        succession: watch::Receiver<Succession>,
    }

    fn running_agent() -> RunningAgent {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let mut listeners = Listeners::default();
        let listener = listeners
            .tcp("127.0.0.1:0".parse().unwrap(), bind_loopback)
            .unwrap();
        let succession = HandoverServer::listen(&path).unwrap().spawn(listeners);
        RunningAgent {
            _dir: dir,
            path,
            listener,
            succession,
        }
    }

    #[tokio::test]
    async fn no_running_agent_means_no_predecessor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        assert!(Predecessor::announce(&path).unwrap().is_none());
        // A socket file left by an agent that is gone.
        drop(HandoverServer::listen(&path).unwrap());
        assert!(path.exists());
        assert!(Predecessor::announce(&path).unwrap().is_none());
    }

    #[tokio::test]
    async fn a_successor_takes_the_same_listening_socket_and_nothing_queued_is_lost() {
        let RunningAgent {
            _dir,
            path,
            listener: old_listener,
            mut succession,
        } = running_agent();
        let addr = old_listener.local_addr().unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        let predecessor = tokio::task::spawn_blocking({
            let path = path.clone();
            move || Predecessor::announce(&path)
        })
        .await
        .unwrap()
        .unwrap()
        .expect("the running agent answers");
        assert_eq!(predecessor.pid(), std::process::id());
        succession
            .wait_for(|s| matches!(s, Succession::Announced { .. }))
            .await
            .unwrap();

        // Connections queued in the old agent's backlog, not yet accepted.
        let mut queued = TcpStream::connect(addr).unwrap();
        queued.write_all(b"queued").unwrap();
        let inherited = tokio::task::spawn_blocking(move || predecessor.take_listeners())
            .await
            .unwrap()
            .unwrap();
        let handed_over = *succession
            .wait_for(|s| matches!(s, Succession::HandedOver { .. }))
            .await
            .unwrap();
        assert_eq!(
            handed_over,
            Succession::HandedOver {
                pid: std::process::id()
            }
        );
        // The old agent stops accepting and closes its copy.
        drop(old_listener);

        let mut new = Listeners::inheriting(inherited);
        let new_listener = new
            .tcp(addr, |_| panic!("an inherited address is not bound again"))
            .unwrap();
        assert_eq!(new_listener.local_addr().unwrap(), addr);
        let (accepted, _) = new_listener.accept().await.unwrap();
        let mut accepted = accepted.into_std().unwrap();
        accepted.set_nonblocking(false).unwrap();
        let mut got = [0u8; 6];
        accepted.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"queued");
        // And new connections reach it too.
        let _later = TcpStream::connect(addr).unwrap();
        new_listener.accept().await.unwrap();
    }

    #[tokio::test]
    async fn an_agent_of_another_network_namespace_gets_no_listener() {
        let RunningAgent { _dir, path, .. } = running_agent();
        let announced = std::thread::spawn(move || {
            // This thread only: the test's other threads keep their namespace.
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("a new network namespace (tests run as root)");
            Predecessor::announce(&path)
        })
        .join()
        .unwrap();
        let error = announced.expect_err("the running agent refuses");
        assert!(
            error.to_string().contains("another network namespace"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_successor_that_leaves_before_taking_leaves_the_listeners_with_the_running_agent() {
        let RunningAgent {
            _dir,
            path,
            mut succession,
            ..
        } = running_agent();
        let announced = tokio::task::spawn_blocking({
            let path = path.clone();
            move || Predecessor::announce(&path)
        })
        .await
        .unwrap()
        .unwrap();
        succession
            .wait_for(|s| matches!(s, Succession::Announced { .. }))
            .await
            .unwrap();
        drop(announced);
        succession
            .wait_for(|s| *s == Succession::None)
            .await
            .unwrap();
        // A later successor is still served.
        let again = tokio::task::spawn_blocking(move || Predecessor::announce(&path))
            .await
            .unwrap()
            .unwrap();
        assert!(again.is_some());
    }
}
