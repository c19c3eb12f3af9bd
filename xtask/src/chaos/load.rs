//! The load every scenario runs while it injects a fault: the events the
//! `chaosload` binary prints (one vocabulary for producer and harness),
//! running it in a pod, and reading what happened around a fault.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime},
};

use serde::{Deserialize, Serialize};

use super::ChaosError;
use crate::{
    bench::loadgen::Histogram,
    testbed::{ChildGuard, Testbed},
};

/// Microseconds since the Unix epoch: the clock events and harness share
/// (one host, one clock).
pub fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// Seconds between two [`unix_micros`] instants (negative when `to` is first).
pub fn seconds_between(from_us: u64, to_us: u64) -> f64 {
    (to_us as f64 - from_us as f64) / 1e6
}

/// One line of `chaosload` output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LoadEvent {
    /// A new connection (connect, one echo, close) ended; `error` when it failed.
    Attempt {
        start_us: u64,
        end_us: u64,
        error: Option<String>,
    },
    /// A long-lived stream (opened at `start_us`) echoed for the first time.
    StreamUp {
        stream: usize,
        start_us: u64,
        up_us: u64,
    },
    /// A long-lived stream broke (or could not be opened) after `echoes`.
    StreamDown {
        stream: usize,
        start_us: u64,
        end_us: u64,
        echoes: u64,
        error: String,
    },
    /// `hold`: every connection was tried; `latency` is connect + first echo.
    Held {
        connections: u64,
        errors: u64,
        seconds: f64,
        latency: Histogram,
        first_error: Option<String>,
    },
    /// `hold`: after holding, one more echo on each held connection.
    Released {
        still_working: u64,
        errors: u64,
        first_error: Option<String>,
    },
}

impl LoadEvent {
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).expect("events are plain data")
    }
}

/// A new connection as the load saw it.
#[derive(Clone, Debug)]
pub struct Attempt {
    pub start_us: u64,
    pub end_us: u64,
    pub error: Option<String>,
}

impl Attempt {
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }

    /// Whether the attempt was under way at some moment of `[from_us, to_us]`.
    pub fn overlaps(&self, from_us: u64, to_us: u64) -> bool {
        self.start_us <= to_us && self.end_us >= from_us
    }

    pub fn seconds(&self) -> f64 {
        seconds_between(self.start_us, self.end_us)
    }
}

/// A broken long-lived stream.
#[derive(Clone, Debug)]
pub struct StreamBreak {
    pub stream: usize,
    pub start_us: u64,
    pub end_us: u64,
    pub echoes: u64,
    pub error: String,
}

/// What the steady load saw, in order of completion.
#[derive(Clone, Debug, Default)]
pub struct Timeline {
    pub attempts: Vec<Attempt>,
    pub stream_breaks: Vec<StreamBreak>,
}

impl Timeline {
    pub fn from_events(events: &[LoadEvent]) -> Self {
        let mut timeline = Self::default();
        for event in events {
            match event {
                LoadEvent::Attempt {
                    start_us,
                    end_us,
                    error,
                } => timeline.attempts.push(Attempt {
                    start_us: *start_us,
                    end_us: *end_us,
                    error: error.clone(),
                }),
                LoadEvent::StreamDown {
                    stream,
                    start_us,
                    end_us,
                    echoes,
                    error,
                } => timeline.stream_breaks.push(StreamBreak {
                    stream: *stream,
                    start_us: *start_us,
                    end_us: *end_us,
                    echoes: *echoes,
                    error: error.clone(),
                }),
                _ => {}
            }
        }
        timeline
    }

    pub fn ok(&self) -> usize {
        self.attempts.iter().filter(|a| a.ok()).count()
    }

    pub fn failed(&self) -> impl Iterator<Item = &Attempt> {
        self.attempts.iter().filter(|a| !a.ok())
    }

    /// The first successful attempt that started at or after `from_us`.
    pub fn first_success_from(&self, from_us: u64) -> Option<&Attempt> {
        self.attempts
            .iter()
            .filter(|a| a.ok() && a.start_us >= from_us)
            .min_by_key(|a| a.end_us)
    }

    /// The first error message, for a problem report.
    pub fn first_error(&self) -> Option<String> {
        self.failed()
            .min_by_key(|a| a.start_us)
            .and_then(|a| a.error.clone())
            .or_else(|| {
                self.stream_breaks
                    .iter()
                    .min_by_key(|b| b.end_us)
                    .map(|b| format!("stream {}: {}", b.stream, b.error))
            })
    }
}

/// `chaosload` running in a pod; its events are collected as they come.
pub struct RunningLoad {
    child: Option<ChildGuard>,
    events: Arc<Mutex<Vec<LoadEvent>>>,
    reader: Option<JoinHandle<()>>,
    pod: String,
    stderr_log: PathBuf,
}

impl RunningLoad {
    /// Starts `chaosload <args>` in pod `namespace/pod`, its stderr to `stderr_log`.
    pub fn start(
        testbed: &Testbed,
        namespace: &str,
        pod: &str,
        args: &[String],
        stderr_log: &Path,
    ) -> Result<Self, ChaosError> {
        let binary = crate::mesh::locate_binary("chaosload")?;
        let stderr = std::fs::File::create(stderr_log).map_err(|source| ChaosError::Io {
            what: format!("creating {}", stderr_log.display()),
            source,
        })?;
        let mut cmd = Command::new(binary);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        let mut child = testbed.spawn_in_pod(namespace, pod, cmd)?;
        let stdout = child
            .child_mut()
            .stdout
            .take()
            .expect("stdout is piped above");
        let events = Arc::new(Mutex::new(Vec::new()));
        let reader = {
            let events = events.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if let Ok(event) = serde_json::from_str::<LoadEvent>(&line) {
                        events.lock().expect("event lock").push(event);
                    }
                }
            })
        };
        Ok(Self {
            child: Some(child),
            events,
            reader: Some(reader),
            pod: format!("{namespace}/{pod}"),
            stderr_log: stderr_log.to_owned(),
        })
    }

    pub fn events(&self) -> Vec<LoadEvent> {
        self.events.lock().expect("event lock").clone()
    }

    pub fn timeline(&self) -> Timeline {
        Timeline::from_events(&self.events())
    }

    /// Polls the events until `done` holds; fails if the load exits first.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&[LoadEvent]) -> bool,
    ) -> Result<Vec<LoadEvent>, ChaosError> {
        let deadline = Instant::now() + timeout;
        loop {
            let events = self.events();
            if done(&events) {
                return Ok(events);
            }
            if self.child.as_ref().is_some_and(ChildGuard::has_exited) {
                // Let the reader take the last lines before judging.
                std::thread::sleep(Duration::from_millis(100));
                let events = self.events();
                if done(&events) {
                    return Ok(events);
                }
                return Err(ChaosError::LoadExited {
                    pod: self.pod.clone(),
                    stderr: std::fs::read_to_string(&self.stderr_log).unwrap_or_default(),
                });
            }
            if Instant::now() > deadline {
                return Err(ChaosError::Timeout {
                    what: what.to_owned(),
                    timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until `count` new connections succeeded since `from_us`.
    pub fn wait_for_successes(
        &self,
        from_us: u64,
        count: usize,
        timeout: Duration,
    ) -> Result<(), ChaosError> {
        self.wait_for(
            &format!("{count} successful connections of the load"),
            timeout,
            |events| {
                Timeline::from_events(events)
                    .attempts
                    .iter()
                    .filter(|a| a.ok() && a.start_us >= from_us)
                    .count()
                    >= count
            },
        )
        .map(drop)
    }

    /// Stops the load and returns everything it reported.
    pub fn stop(mut self) -> Vec<LoadEvent> {
        if let Some(child) = self.child.take() {
            child.kill();
        }
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        self.events()
    }
}

/// Arguments of `chaosload steady`.
pub fn steady_args(target: SocketAddr, rate: f64, streams: usize, marker: &str) -> Vec<String> {
    vec![
        "steady".into(),
        "--connect".into(),
        target.to_string(),
        "--rate".into(),
        rate.to_string(),
        "--streams".into(),
        streams.to_string(),
        "--marker".into(),
        marker.into(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(start_us: u64, end_us: u64, ok: bool) -> LoadEvent {
        LoadEvent::Attempt {
            start_us,
            end_us,
            error: (!ok).then(|| "connection reset".to_owned()),
        }
    }

    #[test]
    fn events_round_trip_and_make_a_timeline() {
        let events = vec![
            attempt(10, 20, true),
            attempt(30, 35, false),
            LoadEvent::StreamDown {
                stream: 1,
                start_us: 5,
                end_us: 31,
                echoes: 3,
                error: "reset".into(),
            },
            attempt(40, 60, true),
        ];
        for event in &events {
            assert_eq!(
                &serde_json::from_str::<LoadEvent>(&event.to_line()).unwrap(),
                event
            );
        }
        let timeline = Timeline::from_events(&events);
        assert_eq!(timeline.ok(), 2);
        assert_eq!(timeline.failed().count(), 1);
        assert_eq!(timeline.first_success_from(25).unwrap().start_us, 40);
        assert!(timeline.attempts[1].overlaps(35, 50));
        assert!(!timeline.attempts[1].overlaps(36, 50));
        assert_eq!(timeline.first_error().as_deref(), Some("connection reset"));
        assert_eq!(timeline.stream_breaks.len(), 1);
    }
}
