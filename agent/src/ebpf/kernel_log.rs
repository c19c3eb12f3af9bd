//! Forwards the programs' aya-log records (a ring buffer) into the agent's `tracing`.
//!
//! A small dedicated thread blocks in poll(2) on the ring buffer, so forwarding works whether or
//! not the caller runs a tokio runtime and never competes with the data path's tasks. Dropping
//! the forwarder closes a pipe the thread also polls, which wakes it to exit.

use std::{
    os::fd::{AsFd, OwnedFd},
    thread::JoinHandle,
};

use aya::Ebpf;
use aya_log::EbpfLogger;
use nix::{
    errno::Errno,
    poll::{PollFd, PollFlags, PollTimeout, poll},
};
use tracing::level_filters::LevelFilter;

use super::EbpfError;

/// tracing target of records written by the eBPF programs (e.g. `--log-level sealmesh_agent::ebpf::kernel=debug`
/// shows every redirect).
pub const KERNEL_LOG_TARGET: &str = "sealmesh_agent::ebpf::kernel";

/// The level the programs should log at (the value of aya-log's `AYA_LOG_LEVEL` global): what
/// the installed subscriber would keep, so disabled levels cost nothing in the kernel.
pub(super) fn kernel_log_level() -> u8 {
    let level = match LevelFilter::current().into_level() {
        None => return 0,
        Some(level) => level,
    };
    let aya_level = match level {
        tracing::Level::ERROR => aya_log::Level::Error,
        tracing::Level::WARN => aya_log::Level::Warn,
        tracing::Level::INFO => aya_log::Level::Info,
        tracing::Level::DEBUG => aya_log::Level::Debug,
        tracing::Level::TRACE => aya_log::Level::Trace,
    };
    aya_level as u8
}

pub(super) struct KernelLogForwarder {
    /// Write end of the stop pipe; dropping it wakes the thread.
    stop: Option<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl KernelLogForwarder {
    pub(super) fn start(ebpf: &mut Ebpf) -> Result<Self, EbpfError> {
        let mut logger = EbpfLogger::init_with_logger(ebpf, LogToTracing)
            .map_err(|error| EbpfError::KernelLog(error.to_string()))?;
        // Close-on-exec: a child process inheriting the write end would keep the pipe open, and
        // the thread (and whoever drops the forwarder) would wait for that child to exit.
        let (stop_read, stop_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|errno| EbpfError::KernelLog(errno.to_string()))?;
        let thread = std::thread::Builder::new()
            .name("ebpf-log".into())
            .spawn(move || {
                loop {
                    let stop_requested = {
                        let mut fds = [
                            PollFd::new(logger.as_fd(), PollFlags::POLLIN),
                            PollFd::new(stop_read.as_fd(), PollFlags::POLLIN),
                        ];
                        match poll(&mut fds, PollTimeout::NONE) {
                            Ok(_) | Err(Errno::EINTR) => {}
                            Err(errno) => {
                                tracing::warn!(%errno, "polling the eBPF log ring buffer failed; eBPF logs stop here");
                                return;
                            }
                        }
                        fds[1].revents().is_some_and(|events| !events.is_empty())
                    };
                    logger.flush();
                    if stop_requested {
                        return;
                    }
                }
            })
            .map_err(|error| EbpfError::KernelLog(error.to_string()))?;
        Ok(Self {
            stop: Some(stop_write),
            thread: Some(thread),
        })
    }
}

impl Drop for KernelLogForwarder {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::warn!("the eBPF log forwarding thread panicked");
        }
    }
}

struct LogToTracing;

impl log::Log for LogToTracing {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let message = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(target: KERNEL_LOG_TARGET, "{message}"),
            log::Level::Warn => tracing::warn!(target: KERNEL_LOG_TARGET, "{message}"),
            log::Level::Info => tracing::info!(target: KERNEL_LOG_TARGET, "{message}"),
            log::Level::Debug => tracing::debug!(target: KERNEL_LOG_TARGET, "{message}"),
            log::Level::Trace => tracing::trace!(target: KERNEL_LOG_TARGET, "{message}"),
        }
    }

    fn flush(&self) {}
}
