//! Packet capture on the testbed's underlay, to prove what crosses the wire.
//!
//! An `AF_PACKET` socket sees every frame of every interface in the network
//! namespace it was opened in; opened in the underlay, it sees all traffic
//! between nodes. Tests send a marker and check whether it appears in clear.

use std::{
    io::{self, Read},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use socket2::{Domain, Protocol, Socket, Type};

/// `ETH_P_ALL`: every protocol.
const ETH_P_ALL: u16 = 0x0003;
const READ_TIMEOUT: Duration = Duration::from_millis(100);

#[derive(Default)]
struct Findings {
    frames: u64,
    /// How many frames held each marker, in `markers` order.
    hits: Vec<u64>,
}

/// A running capture that counts frames holding any of the given markers.
pub struct Capture {
    stop: Arc<AtomicBool>,
    findings: Arc<Mutex<Findings>>,
    markers: Vec<Vec<u8>>,
    reader: Option<JoinHandle<io::Result<()>>>,
}

/// What a capture saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureReport {
    pub frames: u64,
    /// (marker, frames that held it in clear)
    pub hits: Vec<(String, u64)>,
}

impl CaptureReport {
    pub fn hits_for(&self, marker: &str) -> u64 {
        self.hits
            .iter()
            .find(|(m, _)| m == marker)
            .map_or(0, |(_, n)| *n)
    }
}

impl Capture {
    /// Opens the capture socket in the calling thread's network namespace
    /// (run it inside the namespace to watch) and starts reading.
    pub fn start(markers: &[&str]) -> io::Result<Self> {
        let socket = Socket::new(
            Domain::PACKET,
            Type::RAW,
            Some(Protocol::from(i32::from(ETH_P_ALL.to_be()))),
        )?;
        socket.set_read_timeout(Some(READ_TIMEOUT))?;
        let markers: Vec<Vec<u8>> = markers.iter().map(|m| m.as_bytes().to_vec()).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let findings = Arc::new(Mutex::new(Findings {
            frames: 0,
            hits: vec![0; markers.len()],
        }));
        let reader = {
            let (stop, findings, markers) = (stop.clone(), findings.clone(), markers.clone());
            std::thread::spawn(move || read_frames(socket, &stop, &findings, &markers))
        };
        Ok(Self {
            stop,
            findings,
            markers,
            reader: Some(reader),
        })
    }

    /// Frames seen so far.
    pub fn frames(&self) -> u64 {
        self.findings.lock().expect("capture lock").frames
    }

    /// Stops reading and returns what was seen.
    pub fn finish(mut self) -> io::Result<CaptureReport> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(reader) = self.reader.take() {
            reader.join().expect("capture thread panicked")?;
        }
        let findings = self.findings.lock().expect("capture lock");
        Ok(CaptureReport {
            frames: findings.frames,
            hits: self
                .markers
                .iter()
                .zip(&findings.hits)
                .map(|(m, n)| (String::from_utf8_lossy(m).into_owned(), *n))
                .collect(),
        })
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn read_frames(
    mut socket: Socket,
    stop: &AtomicBool,
    findings: &Mutex<Findings>,
    markers: &[Vec<u8>],
) -> io::Result<()> {
    let mut frame = vec![0u8; 65_536];
    while !stop.load(Ordering::SeqCst) {
        let len = match socket.read(&mut frame) {
            Ok(len) => len,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let frame = &frame[..len];
        let mut findings = findings.lock().expect("capture lock");
        findings.frames += 1;
        for (marker, hits) in markers.iter().zip(findings.hits.iter_mut()) {
            if frame.windows(marker.len()).any(|w| w == marker.as_slice()) {
                *hits += 1;
            }
        }
    }
    Ok(())
}
