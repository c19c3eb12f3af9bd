//! The strict-inbound side of the eBPF object: the maps the agent fills
//! (`STRICT_PODS`, `STRICT_POD_ADDRESSES`, `PLAINTEXT_ACCESS`), the trusted
//! connections it counts, and the ring buffer of refusals it reads. All pinned, so a
//! restarted agent finds the pods still enforced and the refusals reported
//! meanwhile. The ring buffer is read by a small thread blocking in poll(2),
//! as the kernel log is, which hands batches to the agent's tasks.

use std::{
    io,
    net::Ipv4Addr,
    os::fd::{AsFd, OwnedFd},
    sync::{Mutex, MutexGuard, PoisonError},
    thread::JoinHandle,
};

use agent_ebpf::{
    InboundRefusal, PlaintextSource, SocketTuple, StrictPodCounters, capacity, names, plaintext,
};
use aya::{
    Ebpf,
    maps::{
        HashMap, LpmTrie, Map, MapData, MapError, PerCpuHashMap, PerCpuValues, RingBuf,
        lpm_trie::Key,
    },
    util::nr_cpus,
};
use ipnet::Ipv4Net;
use nix::{
    errno::Errno,
    poll::{PollFd, PollFlags, PollTimeout, poll},
};
use tokio::sync::mpsc;

use super::{EbpfError, PinLayout, Redirector, check_layout, take_pinned_map};
use crate::inbound_policy::{PlaintextEntry, RefusalSource, StrictPodMaps};

/// The strict-inbound maps of a loaded object.
pub(super) struct StrictInboundMaps {
    pods: Mutex<PerCpuHashMap<MapData, u64, StrictPodCounters>>,
    addresses: Mutex<HashMap<MapData, u32, u8>>,
    plaintext: Mutex<LpmTrie<MapData, PlaintextSource, u8>>,
    trusted: HashMap<MapData, SocketTuple, u8>,
    /// Taken once, by the task reporting refusals.
    refusals: Mutex<Option<RingBuf<MapData>>>,
}

impl StrictInboundMaps {
    pub(super) fn take(ebpf: &mut Ebpf, pins: &PinLayout) -> Result<Self, EbpfError> {
        let pods = take_strict_pods(ebpf, pins)?;
        let addresses = take_pinned_map(
            ebpf,
            pins,
            names::STRICT_POD_ADDRESSES,
            capacity::STRICT_POD_ADDRESSES,
        )?;
        let trusted = take_pinned_map(
            ebpf,
            pins,
            names::TRUSTED_CONNECTIONS,
            capacity::TRUSTED_CONNECTIONS,
        )?;
        let plaintext = take_plaintext_access(ebpf, pins)?;
        let name = names::INBOUND_REFUSALS;
        let map = ebpf
            .take_map(name)
            .ok_or(EbpfError::MissingObjectItem(name))?;
        let Map::RingBuf(data) = &map else {
            return Err(EbpfError::MissingObjectItem(name));
        };
        let info = data
            .info()
            .map_err(|error| EbpfError::from_aya(format!("inspecting map {name}"), error))?;
        if info.max_entries() != capacity::INBOUND_REFUSALS_BYTES {
            return Err(EbpfError::IncompatiblePinnedMap {
                path: pins.maps.join(name),
                found_key: info.key_size(),
                found_value: info.value_size(),
                found_entries: info.max_entries(),
                expected_key: 0,
                expected_value: 0,
                expected_entries: capacity::INBOUND_REFUSALS_BYTES,
            });
        }
        let refusals = RingBuf::try_from(map)
            .map_err(|error| EbpfError::from_aya(format!("opening map {name}"), error))?;
        Ok(Self {
            pods: Mutex::new(pods),
            addresses: Mutex::new(addresses),
            plaintext: Mutex::new(plaintext),
            trusted,
            refusals: Mutex::new(Some(refusals)),
        })
    }

    /// Strict pods enforced now.
    pub(super) fn strict_pod_count(&self) -> usize {
        lock(&self.pods).keys().filter(Result::is_ok).count()
    }

    /// Open trusted connections (node or agent to a strict pod).
    pub(super) fn trusted_connection_count(&self) -> usize {
        self.trusted.keys().filter(Result::is_ok).count()
    }

    /// Plaintext regions of pods guarded by authorization policies.
    pub(super) fn plaintext_entry_count(&self) -> usize {
        lock(&self.plaintext).keys().filter(Result::is_ok).count()
    }
}

/// `PLAINTEXT_ACCESS`, an LPM trie.
fn take_plaintext_access(
    ebpf: &mut Ebpf,
    pins: &PinLayout,
) -> Result<LpmTrie<MapData, PlaintextSource, u8>, EbpfError> {
    let name = names::PLAINTEXT_ACCESS;
    let map = ebpf
        .take_map(name)
        .ok_or(EbpfError::MissingObjectItem(name))?;
    let Map::LpmTrie(data) = &map else {
        return Err(EbpfError::MissingObjectItem(name));
    };
    let info = data
        .info()
        .map_err(|error| EbpfError::from_aya(format!("inspecting map {name}"), error))?;
    check_layout::<Key<PlaintextSource>, u8>(pins, name, &info, capacity::PLAINTEXT_ACCESS)?;
    LpmTrie::try_from(map)
        .map_err(|error| EbpfError::from_aya(format!("opening map {name}"), error))
}

/// Entries of the pinned `PLAINTEXT_ACCESS`, opened from its pin.
pub(super) fn count_pinned_plaintext_entries(pins: &PinLayout) -> Result<usize, EbpfError> {
    let name = names::PLAINTEXT_ACCESS;
    let data = MapData::from_pin(pins.maps.join(name))
        .map_err(|error| EbpfError::from_aya(format!("opening pinned map {name}"), error))?;
    let map: LpmTrie<MapData, PlaintextSource, u8> = LpmTrie::try_from(Map::LpmTrie(data))
        .map_err(|error| EbpfError::from_aya(format!("opening pinned map {name}"), error))?;
    Ok(map.keys().filter(Result::is_ok).count())
}

fn plaintext_key(entry: &PlaintextEntry) -> Key<PlaintextSource> {
    Key::new(
        plaintext::prefix_len(entry.net.prefix_len()),
        PlaintextSource::new(
            entry.pod_cgroup,
            entry.port.unwrap_or(plaintext::ANY_PORT),
            entry.net.network().octets(),
        ),
    )
}

/// The entry a key stands for; None for a key the agent never writes (a prefix shorter than
/// the pod and port, or longer than an address).
fn plaintext_entry(key: &Key<PlaintextSource>) -> Option<PlaintextEntry> {
    let source_bits = key.prefix_len().checked_sub(plaintext::EXACT_BITS)?;
    let data = key.data();
    let net = Ipv4Net::new(data.source().into(), u8::try_from(source_bits).ok()?).ok()?;
    Some(PlaintextEntry {
        pod_cgroup: data.pod_cgroup(),
        port: Some(data.port()).filter(|port| *port != plaintext::ANY_PORT),
        net,
    })
}

/// `STRICT_PODS`, a per-CPU hash map.
fn take_strict_pods(
    ebpf: &mut Ebpf,
    pins: &PinLayout,
) -> Result<PerCpuHashMap<MapData, u64, StrictPodCounters>, EbpfError> {
    let name = names::STRICT_PODS;
    let map = ebpf
        .take_map(name)
        .ok_or(EbpfError::MissingObjectItem(name))?;
    let Map::PerCpuHashMap(data) = &map else {
        return Err(EbpfError::MissingObjectItem(name));
    };
    let info = data
        .info()
        .map_err(|error| EbpfError::from_aya(format!("inspecting map {name}"), error))?;
    check_layout::<u64, StrictPodCounters>(pins, name, &info, capacity::STRICT_PODS)?;
    PerCpuHashMap::try_from(map)
        .map_err(|error| EbpfError::from_aya(format!("opening map {name}"), error))
}

impl Redirector {
    /// The kernel's refusal reports, for the one task that shows them; None
    /// once taken.
    pub fn take_refusals(&self) -> io::Result<Option<RefusalRing>> {
        lock(&self.strict.refusals)
            .take()
            .map(RefusalRing::start)
            .transpose()
    }
}

impl StrictPodMaps for Redirector {
    fn strict_pods(&self) -> Result<Vec<(u64, StrictPodCounters)>, EbpfError> {
        lock(&self.strict.pods)
            .iter()
            .map(|entry| {
                entry.map(|(cgroup, per_cpu)| {
                    let total = per_cpu
                        .iter()
                        .fold(StrictPodCounters::default(), |sum, cpu| StrictPodCounters {
                            refused: sum.refused + cpu.refused,
                            unreported: sum.unreported + cpu.unreported,
                        });
                    (cgroup, total)
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| EbpfError::from_aya("listing strict pods", error))
    }

    fn strict_addresses(&self) -> Result<Vec<Ipv4Addr>, EbpfError> {
        lock(&self.strict.addresses)
            .keys()
            .map(|ip| ip.map(Ipv4Addr::from))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| EbpfError::from_aya("listing strict pod addresses", error))
    }

    fn add_strict_address(&self, ip: Ipv4Addr) -> Result<(), EbpfError> {
        lock(&self.strict.addresses)
            .insert(u32::from(ip), 1, 0)
            .map_err(|error| {
                EbpfError::from_aya(format!("marking {ip} as a strict pod's address"), error)
            })
    }

    fn remove_strict_address(&self, ip: Ipv4Addr) -> Result<(), EbpfError> {
        ignore_absent(
            lock(&self.strict.addresses).remove(&u32::from(ip)),
            format!("unmarking strict pod address {ip}"),
        )
    }

    fn add_strict_pod(&self, cgroup_id: u64) -> Result<(), EbpfError> {
        let action = || format!("enforcing strict inbound for cgroup {cgroup_id}");
        let cpus = nr_cpus().map_err(|(_, error)| EbpfError::from_aya(action(), error))?;
        let zeros = PerCpuValues::try_from(vec![StrictPodCounters::default(); cpus])
            .map_err(|error| EbpfError::from_aya(action(), error))?;
        // BPF_NOEXIST: a pod already enforced keeps its counters.
        match lock(&self.strict.pods).insert(cgroup_id, zeros, BPF_NOEXIST) {
            Ok(()) => Ok(()),
            Err(MapError::SyscallError(error))
                if error.io_error.raw_os_error() == Some(libc::EEXIST) =>
            {
                Ok(())
            }
            Err(error) => Err(EbpfError::from_aya(action(), error)),
        }
    }

    fn remove_strict_pod(&self, cgroup_id: u64) -> Result<(), EbpfError> {
        ignore_absent(
            lock(&self.strict.pods).remove(&cgroup_id),
            format!("ending strict inbound for cgroup {cgroup_id}"),
        )
    }

    fn plaintext_entries(&self) -> Result<Vec<(PlaintextEntry, bool)>, EbpfError> {
        let map = lock(&self.strict.plaintext);
        let mut entries = Vec::new();
        for entry in map.iter() {
            let (key, value) = entry
                .map_err(|error| EbpfError::from_aya("listing plaintext access entries", error))?;
            match plaintext_entry(&key) {
                Some(entry) => entries.push((entry, value == plaintext::ALLOW)),
                None => tracing::warn!(
                    prefix_len = key.prefix_len(),
                    "a plaintext access entry the agent does not write; ignored (an agent of another version wrote it?)"
                ),
            }
        }
        Ok(entries)
    }

    fn set_plaintext_entry(&self, entry: &PlaintextEntry, allow: bool) -> Result<(), EbpfError> {
        let value = if allow {
            plaintext::ALLOW
        } else {
            plaintext::DENY
        };
        match lock(&self.strict.plaintext).insert(&plaintext_key(entry), value, 0) {
            Ok(()) => Ok(()),
            Err(MapError::SyscallError(error))
                if matches!(
                    error.io_error.raw_os_error(),
                    Some(libc::ENOSPC | libc::E2BIG)
                ) =>
            {
                Err(EbpfError::MapFull {
                    map: names::PLAINTEXT_ACCESS,
                    max_entries: capacity::PLAINTEXT_ACCESS,
                })
            }
            Err(error) => Err(EbpfError::from_aya(
                format!("admitting plaintext to cgroup {}", entry.pod_cgroup),
                error,
            )),
        }
    }

    fn remove_plaintext_entry(&self, entry: &PlaintextEntry) -> Result<(), EbpfError> {
        ignore_absent(
            lock(&self.strict.plaintext).remove(&plaintext_key(entry)),
            format!(
                "removing a plaintext access entry of cgroup {}",
                entry.pod_cgroup
            ),
        )
    }
}

/// `BPF_NOEXIST` for map updates: fail instead of replacing.
const BPF_NOEXIST: u64 = 1;

fn ignore_absent(result: Result<(), MapError>, action: String) -> Result<(), EbpfError> {
    match result {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(error) => Err(EbpfError::from_aya(action, error)),
    }
}

/// Batches handed from the reading thread to the agent before it blocks.
const REFUSAL_BATCHES: usize = 64;

/// The refusals the kernel reports, read from the ring buffer by a thread;
/// dropping it stops the thread.
pub struct RefusalRing {
    batches: mpsc::Receiver<Vec<InboundRefusal>>,
    /// Write end of the stop pipe; dropping it wakes the thread.
    stop: Option<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for RefusalRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RefusalRing").finish_non_exhaustive()
    }
}

impl RefusalRing {
    fn start(mut ring: RingBuf<MapData>) -> io::Result<Self> {
        // Close-on-exec, as the kernel log's: a child holding the write end would keep the
        // thread alive.
        let (stop_read, stop_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let (batches_tx, batches) = mpsc::channel(REFUSAL_BATCHES);
        let thread = std::thread::Builder::new()
            .name("ebpf-refusals".into())
            .spawn(move || {
                loop {
                    let stop_requested = {
                        let mut fds = [
                            PollFd::new(ring.as_fd(), PollFlags::POLLIN),
                            PollFd::new(stop_read.as_fd(), PollFlags::POLLIN),
                        ];
                        match poll(&mut fds, PollTimeout::NONE) {
                            Ok(_) | Err(Errno::EINTR) => {}
                            Err(errno) => {
                                tracing::error!(%errno, "polling the refusal ring buffer failed; refusals are no longer shown (they are still enforced and counted)");
                                return;
                            }
                        }
                        fds[1].revents().is_some_and(|events| !events.is_empty())
                    };
                    if stop_requested {
                        return;
                    }
                    let batch = drain(&mut ring);
                    // The agent went away: nothing left to hand the refusals to.
                    if !batch.is_empty() && batches_tx.blocking_send(batch).is_err() {
                        return;
                    }
                }
            })?;
        Ok(Self {
            batches,
            stop: Some(stop_write),
            thread: Some(thread),
        })
    }
}

fn drain(ring: &mut RingBuf<MapData>) -> Vec<InboundRefusal> {
    let mut batch = Vec::new();
    while let Some(item) = ring.next() {
        match InboundRefusal::from_bytes(&item) {
            Some(refusal) => batch.push(refusal),
            None => tracing::warn!(
                len = item.len(),
                "a refusal record of an unexpected size in the ring buffer; skipped (an agent of another version wrote it?)"
            ),
        }
    }
    batch
}

impl RefusalSource for RefusalRing {
    async fn next_batch(&mut self) -> io::Result<Vec<InboundRefusal>> {
        self.batches
            .recv()
            .await
            .ok_or_else(|| io::Error::other("the thread reading the refusal ring buffer stopped"))
    }
}

impl Drop for RefusalRing {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::warn!("the refusal reading thread panicked");
        }
    }
}

/// The maps hold no invariant a panicking holder could break.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
