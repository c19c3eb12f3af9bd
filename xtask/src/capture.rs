//! Packet capture on the testbed's underlay, to prove what crosses the wire.
//!
//! An `AF_PACKET` socket sees every frame of every interface in the network
//! namespace it was opened in; opened in the underlay, it sees all traffic
//! between nodes (and, on `lo`, what the control plane sends itself). Tests
//! send a marker and check whether it appears in clear, on every port or on
//! one TCP port ([`Capture::start_on_tcp_port`]).

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
const ETHERNET_HEADER_LEN: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const IPPROTO_TCP: u8 = 6;
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

/// Which frames a capture counts.
#[derive(Clone, Copy, Debug)]
enum Filter {
    All,
    /// IPv4 TCP segments from or to this port.
    TcpPort(u16),
}

impl Filter {
    fn admits(self, frame: &[u8]) -> bool {
        match self {
            Self::All => true,
            Self::TcpPort(port) => {
                tcp_ports(frame).is_some_and(|(src, dst)| src == port || dst == port)
            }
        }
    }
}

/// Source and destination port of an IPv4 TCP segment in an Ethernet frame.
fn tcp_ports(frame: &[u8]) -> Option<(u16, u16)> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    if ethertype != ETHERTYPE_IPV4 {
        return None;
    }
    let ip = frame.get(ETHERNET_HEADER_LEN..)?;
    let header_len = usize::from(ip.first()? & 0x0f) * 4;
    if *ip.get(9)? != IPPROTO_TCP {
        return None;
    }
    let tcp = ip.get(header_len..header_len + 4)?;
    Some((
        u16::from_be_bytes([tcp[0], tcp[1]]),
        u16::from_be_bytes([tcp[2], tcp[3]]),
    ))
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
        Self::start_filtered(markers, Filter::All)
    }

    /// Like [`Capture::start`], counting only frames of IPv4 TCP segments
    /// from or to `port` (`frames` counts those too).
    pub fn start_on_tcp_port(port: u16, markers: &[&str]) -> io::Result<Self> {
        Self::start_filtered(markers, Filter::TcpPort(port))
    }

    fn start_filtered(markers: &[&str], filter: Filter) -> io::Result<Self> {
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
            std::thread::spawn(move || read_frames(socket, filter, &stop, &findings, &markers))
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
    filter: Filter,
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
        if !filter.admits(frame) {
            continue;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// An Ethernet frame with an IPv4 header of `ihl` words carrying
    /// protocol `protocol` from port 40000 to 8080.
    fn frame(ethertype: u16, ihl: u8, protocol: u8) -> Vec<u8> {
        let mut frame = vec![0u8; 12];
        frame.extend_from_slice(&ethertype.to_be_bytes());
        let mut ip = vec![0u8; usize::from(ihl) * 4];
        ip[0] = 0x40 | ihl;
        ip[9] = protocol;
        frame.extend_from_slice(&ip);
        frame.extend_from_slice(&40000u16.to_be_bytes());
        frame.extend_from_slice(&8080u16.to_be_bytes());
        frame.extend_from_slice(b"payload");
        frame
    }

    #[test]
    fn the_port_filter_reads_ipv4_tcp_ports_only() {
        assert_eq!(tcp_ports(&frame(0x0800, 5, 6)), Some((40000, 8080)));
        assert_eq!(
            tcp_ports(&frame(0x0800, 6, 6)),
            Some((40000, 8080)),
            "IP options"
        );
        assert_eq!(tcp_ports(&frame(0x0800, 5, 17)), None, "UDP");
        assert_eq!(tcp_ports(&frame(0x86dd, 5, 6)), None, "not IPv4");
        assert_eq!(tcp_ports(&frame(0x0800, 5, 6)[..30]), None, "truncated");
        assert!(Filter::TcpPort(8080).admits(&frame(0x0800, 5, 6)));
        assert!(Filter::TcpPort(40000).admits(&frame(0x0800, 5, 6)));
        assert!(!Filter::TcpPort(443).admits(&frame(0x0800, 5, 6)));
        assert!(Filter::All.admits(b"anything"));
    }
}
