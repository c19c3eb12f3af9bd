//! Wakes the registries when entries appear in or leave a set of
//! directories (inotify): the cgroups pods are created in, so a new pod's
//! cgroup is known as soon as the kubelet (or the testbed) makes it.
//!
//! The directories need not exist yet: each is watched once it does, so a
//! directory's parent should be in the set too (`kubepods.slice` is seen
//! when it appears in the cgroup root, its QoS slices when they appear in
//! it). Only the directories themselves are watched, not their subtrees: a
//! pod's container cgroups never wake anyone.

use std::{
    collections::HashMap,
    io,
    os::fd::{AsFd, AsRawFd, RawFd},
    path::PathBuf,
};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tokio::io::unix::AsyncFd;

/// What a directory change looks like to inotify: an entry created, removed
/// or renamed in or out (cgroup mkdir/rmdir, an atomically replaced file).
const CHANGES: AddWatchFlags = AddWatchFlags::IN_CREATE
    .union(AddWatchFlags::IN_DELETE)
    .union(AddWatchFlags::IN_MOVED_TO)
    .union(AddWatchFlags::IN_MOVED_FROM)
    .union(AddWatchFlags::IN_CLOSE_WRITE)
    .union(AddWatchFlags::IN_ONLYDIR);

#[derive(Debug, thiserror::Error)]
#[error(
    "cannot watch directories with inotify: {0}; check fs.inotify.max_user_instances and max_user_watches"
)]
pub struct DirWatchError(#[source] io::Error);

/// Inotify's descriptor, readable through tokio.
struct InotifyFd(Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// Watches a fixed set of directories (see the module docs).
pub struct DirWatcher {
    inotify: AsyncFd<InotifyFd>,
    wanted: Vec<PathBuf>,
    watched: HashMap<PathBuf, WatchDescriptor>,
}

impl std::fmt::Debug for DirWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirWatcher")
            .field("wanted", &self.wanted)
            .field("watched", &self.watched.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl DirWatcher {
    /// Starts watching those of `dirs` that exist (needs a tokio runtime).
    pub fn new(dirs: Vec<PathBuf>) -> Result<Self, DirWatchError> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(|errno| DirWatchError(errno.into()))?;
        // SAFETY: `Inotify` owns its descriptor and closes it only when dropped, which happens
        // when the `AsyncFd` (its only owner) is dropped; `as_raw_fd` always returns that one
        // descriptor.
        let inotify = unsafe { AsyncFd::register(InotifyFd(inotify)) }
            .map_err(|error| DirWatchError(error.into()))?;
        let mut watcher = Self {
            inotify,
            wanted: dirs,
            watched: HashMap::new(),
        };
        watcher.watch_new_dirs();
        Ok(watcher)
    }

    /// Waits until an entry appeared in or left a watched directory (a
    /// burst of changes may come as one wake-up, or as several).
    pub async fn changed(&mut self) -> Result<(), DirWatchError> {
        loop {
            let mut ready = self.inotify.readable().await.map_err(DirWatchError)?;
            match ready.get_inner().0.read_events() {
                Ok(events) => {
                    let gone: Vec<&WatchDescriptor> = events
                        .iter()
                        .filter(|e| e.mask.contains(AddWatchFlags::IN_IGNORED))
                        .map(|e| &e.wd)
                        .collect();
                    self.watched.retain(|_, wd| !gone.contains(&&*wd));
                    // A wanted directory may have just been created.
                    self.watch_new_dirs();
                    if !events.is_empty() {
                        return Ok(());
                    }
                }
                Err(nix::errno::Errno::EAGAIN) => ready.clear_ready(),
                Err(errno) => return Err(DirWatchError(errno.into())),
            }
        }
    }

    /// Directories of the set watched now.
    pub fn watched(&self) -> impl Iterator<Item = &PathBuf> {
        self.watched.keys()
    }

    fn watch_new_dirs(&mut self) {
        for dir in &self.wanted {
            if self.watched.contains_key(dir) {
                continue;
            }
            match self.inotify.get_ref().0.add_watch(dir, CHANGES) {
                Ok(wd) => {
                    self.watched.insert(dir.clone(), wd);
                }
                // Not there (yet), or not a directory: looked for again on
                // the next change.
                Err(nix::errno::Errno::ENOENT | nix::errno::Errno::ENOTDIR) => {}
                Err(errno) => {
                    tracing::warn!(dir = %dir.display(), %errno, "cannot watch a directory; its changes are found by the periodic rescan only");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Whether the watcher wakes within a while (long enough for an event
    /// that is coming, short enough to wait for one that is not).
    async fn wakes(watcher: &mut DirWatcher) -> bool {
        tokio::time::timeout(Duration::from_millis(500), watcher.changed())
            .await
            .map(|r| r.unwrap())
            .is_ok()
    }

    #[tokio::test]
    async fn wakes_for_entries_of_watched_dirs_and_watches_dirs_that_appear() {
        let root = tempfile::tempdir().unwrap();
        let parent = root.path().join("kubepods");
        let mut watcher = DirWatcher::new(vec![root.path().to_owned(), parent.clone()]).unwrap();
        assert_eq!(watcher.watched().count(), 1, "kubepods does not exist yet");

        std::fs::create_dir(&parent).unwrap();
        assert!(wakes(&mut watcher).await);
        assert_eq!(
            watcher.watched().count(),
            2,
            "kubepods is watched once created"
        );

        std::fs::create_dir(parent.join("pod1")).unwrap();
        assert!(wakes(&mut watcher).await, "a pod directory appeared");
        std::fs::create_dir(parent.join("pod1").join("container")).unwrap();
        assert!(
            !wakes(&mut watcher).await,
            "below a pod directory nothing is watched"
        );
        std::fs::remove_dir(parent.join("pod1").join("container")).unwrap();
        std::fs::remove_dir(parent.join("pod1")).unwrap();
        assert!(wakes(&mut watcher).await, "a pod directory left");

        std::fs::remove_dir(&parent).unwrap();
        assert!(wakes(&mut watcher).await);
        // Drain what is left of the removal's events.
        while wakes(&mut watcher).await {}
        assert_eq!(
            watcher.watched().count(),
            1,
            "a removed directory is forgotten"
        );
        std::fs::create_dir(&parent).unwrap();
        assert!(wakes(&mut watcher).await);
        assert_eq!(
            watcher.watched().count(),
            2,
            "and watched again when it returns"
        );
    }

    #[tokio::test]
    async fn wakes_for_a_file_replaced_by_rename() {
        let dir = tempfile::tempdir().unwrap();
        let mut watcher = DirWatcher::new(vec![dir.path().to_owned()]).unwrap();
        std::fs::write(dir.path().join("cluster.yaml.tmp"), "x").unwrap();
        std::fs::rename(
            dir.path().join("cluster.yaml.tmp"),
            dir.path().join("cluster.yaml"),
        )
        .unwrap();
        assert!(wakes(&mut watcher).await);
    }
}
