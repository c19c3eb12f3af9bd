//! Follows changes of a few files by filesystem events (inotify through
//! `notify`) instead of polling their mtimes.
//!
//! The watches are on the files' directories, not on the files: a file
//! replaced by rename (`ClusterFile::save`, editors, `kubectl cp`) is a new
//! inode that a watch on the old one never hears of. Events are kept only
//! for the watched names, and for the `..`-prefixed entries of the kubelet's
//! ConfigMap/Secret volumes, where a file is a symlink through `..data` and
//! an update renames a new `..data` over the old one.

use std::{
    collections::HashSet,
    ffi::OsString,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use notify::{
    Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher,
    event::{AccessKind, AccessMode},
};
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum FileWatchError {
    #[error(
        "cannot start watching files (inotify): {0}; check that fs.inotify.max_user_instances allows another instance"
    )]
    Start(#[source] notify::Error),
    #[error(
        "cannot watch directory {dir} for changes of {file}: {source}; check that the directory exists and that fs.inotify.max_user_watches allows another watch"
    )]
    Watch {
        dir: PathBuf,
        file: PathBuf,
        #[source]
        source: notify::Error,
    },
}

/// Watches a set of files (see the module docs); dropping it stops the
/// watch.
pub struct FileWatch {
    watcher: RecommendedWatcher,
    changes: watch::Receiver<u64>,
    /// (directory, file name) of every watched file; read by the watcher's thread.
    names: Arc<Mutex<HashSet<(PathBuf, OsString)>>>,
    dirs: HashSet<PathBuf>,
}

impl std::fmt::Debug for FileWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileWatch")
            .field("dirs", &self.dirs)
            .field("generation", &self.generation())
            .finish_non_exhaustive()
    }
}

impl FileWatch {
    /// Starts watching `files` (they need not exist yet; their directories
    /// must).
    pub fn new<P: AsRef<Path>>(
        files: impl IntoIterator<Item = P>,
    ) -> Result<FileWatch, FileWatchError> {
        let names: Arc<Mutex<HashSet<(PathBuf, OsString)>>> = Arc::default();
        let (sender, changes) = watch::channel(0);
        let watched = names.clone();
        let watcher = notify::recommended_watcher(move |event: notify::Result<Event>| {
            // An error or an overflowed queue may hide a change: count it as one.
            let relevant = event.map_or(true, |event| {
                event.need_rescan()
                    || (changes_content(&event.kind)
                        && names_any(&event, &watched.lock().unwrap_or_else(|p| p.into_inner())))
            });
            if relevant {
                sender.send_modify(|generation| *generation += 1);
            }
        })
        .map_err(FileWatchError::Start)?;
        let mut file_watch = FileWatch {
            watcher,
            changes,
            names,
            dirs: HashSet::new(),
        };
        file_watch.add(files)?;
        Ok(file_watch)
    }

    /// Watches `files` too (those watched already stay so).
    pub fn add<P: AsRef<Path>>(
        &mut self,
        files: impl IntoIterator<Item = P>,
    ) -> Result<(), FileWatchError> {
        for file in files {
            let file = file.as_ref();
            let Some(name) = file.file_name() else {
                continue;
            };
            let dir = directory_of(file);
            self.names
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert((dir.clone(), name.to_owned()));
            if !self.dirs.contains(&dir) {
                self.watcher
                    .watch(&dir, RecursiveMode::NonRecursive)
                    .map_err(|source| FileWatchError::Watch {
                        dir: dir.clone(),
                        file: file.to_owned(),
                        source,
                    })?;
                self.dirs.insert(dir);
            }
        }
        Ok(())
    }

    /// A counter bumped on every change of a watched file: equal to an
    /// earlier reading, nothing changed since.
    pub fn generation(&self) -> u64 {
        *self.changes.borrow()
    }

    /// Wakes on every change (see [`FileWatch::generation`]).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }
}

/// The directory a file's events arrive from, as given (`.` for a bare name).
fn directory_of(file: &Path) -> PathBuf {
    match file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// Everything but reads: opening and closing a file unwritten (as the
/// readers of these files do) changes nothing.
fn changes_content(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(access) => *access == AccessKind::Close(AccessMode::Write),
        _ => true,
    }
}

fn names_any(event: &Event, names: &HashSet<(PathBuf, OsString)>) -> bool {
    event.paths.iter().any(|path| {
        let Some(name) = path.file_name() else {
            return false;
        };
        let dir = directory_of(path);
        names.contains(&(dir.clone(), name.to_owned()))
            || (name.as_encoded_bytes().starts_with(b"..")
                && names.iter().any(|(watched, _)| *watched == dir))
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    async fn changed(changes: &mut watch::Receiver<u64>) -> bool {
        tokio::time::timeout(Duration::from_secs(5), changes.changed())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn rewrite_rename_and_kubelet_swap_are_changes_reads_and_others_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cluster.yaml");
        std::fs::write(&file, "a").unwrap();
        let watch = FileWatch::new([&file]).unwrap();
        let mut changes = watch.subscribe();

        std::fs::write(dir.path().join("other.yaml"), "x").unwrap();
        std::fs::read(&file).unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(300), changes.changed())
                .await
                .is_err(),
            "another file and a read are no change"
        );

        std::fs::write(&file, "b").unwrap();
        assert!(changed(&mut changes).await, "rewritten in place");
        changes.borrow_and_update();

        let tmp = dir.path().join("cluster.yaml.tmp");
        std::fs::write(&tmp, "c").unwrap();
        std::fs::rename(&tmp, &file).unwrap();
        assert!(changed(&mut changes).await, "replaced by rename");
        changes.borrow_and_update();

        std::fs::create_dir(dir.path().join("..2026_01_01")).unwrap();
        assert!(changed(&mut changes).await, "kubelet's next ..data");
        assert!(watch.generation() >= 3);
    }

    #[tokio::test]
    async fn files_added_later_are_followed_too() {
        let first = tempfile::tempdir().unwrap();
        let second = tempfile::tempdir().unwrap();
        let mut watch = FileWatch::new([first.path().join("cluster.yaml")]).unwrap();
        let mut changes = watch.subscribe();
        let token = second.path().join("node.token");
        watch.add([&token]).unwrap();
        std::fs::write(&token, "secret").unwrap();
        assert!(changed(&mut changes).await);
    }

    #[test]
    fn a_missing_directory_is_an_actionable_error() {
        let error = FileWatch::new(["/nonexistent-sealmesh-dir/cluster.yaml"]).unwrap_err();
        assert!(
            error.to_string().starts_with(
                "cannot watch directory /nonexistent-sealmesh-dir for changes of /nonexistent-sealmesh-dir/cluster.yaml:"
            ),
            "{error}"
        );
    }
}
