//! `bench floor`: the kernel's share of a fan-out, without the gateway.
//!
//! The gateway's profile in a broadcast is mostly the kernel's loopback TCP
//! path (BENCHMARKS.md). This scenario measures that path alone, on the
//! same machine: plain threads (one per core, like the gateway's workers)
//! write one frame-sized buffer to each of N accepted sockets per event,
//! with blocking `write` calls (no WebSocket, no async runtime, no queue),
//! while lightweight readers drain the other ends. Its CPU per write and
//! its latency are the floor under the gateway's figures for the same
//! shape. The readers run in a child process (`floor-readers`), so that
//! each side holds one file per socket and a floor of 10 000 sockets fits
//! under a 20 000 open-files limit, as the gateway's run does.

use std::io::Write;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};

use futures_util::StreamExt;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

use super::clients::{self, latency_us, now_us};
use super::procfs::{TICKS_PER_S, cpu_ticks, thread_cpu_ticks};
use super::report::Report;
use super::uring::RingWriter;
use super::{BenchArgs, FloorIo, FloorReaders, Plan};

/// The head of every frame: its send time (µs, u64) and its event (u32),
/// little-endian.
const STAMP_BYTES: usize = 12;

/// Bytes per write by default: about the size of an event frame in the
/// broadcast.
pub const DEFAULT_FRAME_BYTES: usize = 200;

/// The fan-out the floor writes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    /// Sockets written per event.
    pub sockets: usize,
    /// Sockets held open (at least `sockets`): event k writes the
    /// (k mod held/sockets)-th group of `sockets`, as the bench's
    /// publisher sends event k to the k-th (tenant, branch) in turn.
    pub held: usize,
    pub events: usize,
    /// Events per second; 0: back to back.
    pub rate: f64,
    /// Bytes per write (at least 12: the send time and the event).
    pub frame_bytes: usize,
}

impl Shape {
    /// The `floor` scenario's shape, from its flags.
    pub fn of_plan(plan: &Plan, args: &BenchArgs) -> Shape {
        Shape {
            sockets: plan.connections,
            held: plan.connections,
            events: plan.events,
            rate: plan.rate,
            frame_bytes: args.frame_bytes.unwrap_or(DEFAULT_FRAME_BYTES),
        }
    }

    /// The fan-out a gateway run made: as many sockets held as it had
    /// connections, as many written per event as it had recipients, at its
    /// rate, each write the size of its frames on the wire (the text plus
    /// the 2- or 4-byte header of an unmasked server frame). `hot`: hold
    /// only the recipients, written every event (the floor before
    /// 2026-12-03, whose sockets stay warm in the caches).
    pub fn of_run(report: &Report, hot: bool) -> Option<Shape> {
        let published = report.outcome.published as u64;
        let delivered = report.stats.delivered;
        if published == 0 || delivered == 0 {
            return None;
        }
        let text = (report.stats.frame_bytes / delivered) as usize;
        let header = if text < 126 { 2 } else { 4 };
        let sockets = (report.outcome.expected as f64 / published as f64).round() as usize;
        Some(Shape {
            sockets,
            held: if hot {
                sockets
            } else {
                report.opened.max(sockets)
            },
            events: report.outcome.published,
            rate: report.plan.rate,
            frame_bytes: text + header,
        })
    }

    pub fn to_json(self) -> serde_json::Value {
        serde_json::json!({
            "sockets": self.sockets, "held": self.held, "events": self.events, "rate_per_s": self.rate,
            "frame_bytes": self.frame_bytes,
        })
    }
}

pub struct Floor {
    pub shape: Shape,
    pub io: FloorIo,
    pub readers: FloorReaders,
    pub writes: u64,
    pub received: u64,
    /// The writer threads' CPU time per write.
    pub cpu_us_per_write: f64,
    /// The whole process's, which also counts work the kernel does on
    /// threads of its own for the process (io_uring's workers).
    pub process_cpu_us_per_write: f64,
    /// From an event's due time to its last write, median over events.
    pub loop_ms_median: f64,
    pub latencies_us: Vec<u32>,
    /// The event of each latency.
    pub events: Vec<u32>,
}

impl Floor {
    pub fn p99_ms(&self) -> Option<f64> {
        super::report::percentile_ms(&self.latencies_us, 0.99)
    }

    pub fn to_json(&self) -> serde_json::Value {
        let pct = |p: f64| super::report::percentile_ms(&self.latencies_us, p);
        serde_json::json!({
            "shape": self.shape.to_json(),
            "io": format!("{:?}", self.io).to_lowercase(),
            "readers": format!("{:?}", self.readers).to_lowercase(),
            "writes": self.writes,
            "missing": self.writes.saturating_sub(self.received),
            "cpu_us_per_write": self.cpu_us_per_write,
            "process_cpu_us_per_write": self.process_cpu_us_per_write,
            "write_loop_ms_median": self.loop_ms_median,
            "latency_ms": {"p50": pct(0.5), "p99": pct(0.99), "max": pct(1.0)},
            "event_latency_ms": super::report::event_latency_json(&self.latencies_us, &self.events),
        })
    }
}

/// Writes `shape` to sockets whose other ends a child process reads.
pub async fn run(shape: Shape, args: &BenchArgs) -> anyhow::Result<Floor> {
    let n = shape.held.max(shape.sockets);
    let frame_bytes = shape.frame_bytes.max(STAMP_BYTES);
    let template = Template::new(args.floor_readers, frame_bytes);
    if args.floor_io == FloorIo::Uring {
        // Before any socket: a kernel without io_uring, or a seccomp
        // filter that blocks it (Docker's default), is one clear error.
        RingWriter::new(template.bytes.clone()).context(
            "--floor-io uring: cannot set up an io_uring (kernel too old, or blocked by seccomp)",
        )?;
    }
    let (mut readers, servers) = connect_readers(n, frame_bytes, args).await?;
    let events = shape.events;
    // Event k writes group k mod groups; socket i is in group i mod groups.
    let groups = (n / shape.sockets.max(1)).max(1);
    // As many writer threads as the gateway has workers (one per core),
    // each with its share of every group, on the same schedule.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (group_sizes, shares) = deal(servers, groups, threads);
    let schedule = Schedule {
        start: Instant::now() + Duration::from_millis(100),
        interval: if shape.rate > 0.0 {
            Duration::from_secs_f64(1.0 / shape.rate)
        } else {
            Duration::ZERO
        },
        events,
        groups,
    };
    let io = args.floor_io;
    let process_cpu_before = cpu_ticks("/proc/self/stat");
    let (cpu_ticks_sum, mut loops) = write_events(shares, schedule, io, &template).await?;
    let process_ticks = cpu_ticks("/proc/self/stat").saturating_sub(process_cpu_before);
    let (latencies_us, event_of) = read_latencies(&mut readers).await?;
    let writes: u64 = (0..events).map(|k| group_sizes[k % groups]).sum();
    let per_write = |ticks: u64| ticks as f64 / TICKS_PER_S * 1e6 / writes.max(1) as f64;
    loops.sort_by(f64::total_cmp);
    Ok(Floor {
        shape,
        io,
        readers: args.floor_readers,
        writes,
        received: latencies_us.len() as u64,
        cpu_us_per_write: per_write(cpu_ticks_sum),
        process_cpu_us_per_write: per_write(process_ticks),
        loop_ms_median: loops.get(loops.len() / 2).copied().unwrap_or(0.0),
        latencies_us,
        events: event_of,
    })
}

/// Starts the readers' child process and accepts its `n` sockets, made
/// blocking for the writer threads.
async fn connect_readers(
    n: usize,
    frame_bytes: usize,
    args: &BenchArgs,
) -> anyhow::Result<(tokio::process::Child, Vec<std::net::TcpStream>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let mut readers = tokio::process::Command::new(std::env::current_exe()?)
        .arg("floor-readers")
        .args(["--floor-addr", &addr.to_string()])
        .args(["--connections", &n.to_string()])
        .args(["--frame-bytes", &frame_bytes.to_string()])
        .args(["--client-addresses", &args.client_addresses.to_string()])
        .args([
            "--floor-readers",
            &format!("{:?}", args.floor_readers).to_lowercase(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start the floor's readers")?;
    let mut servers = Vec::with_capacity(n);
    let accepted = tokio::time::timeout(Duration::from_secs(120), async {
        while servers.len() < n {
            tokio::select! {
                accepted = listener.accept() => {
                    let (s, _) = accepted?;
                    s.set_nodelay(true)?;
                    let s = s.into_std()?;
                    s.set_nonblocking(false)?;
                    servers.push(s);
                }
                status = readers.wait() => anyhow::bail!("the floor's readers exited early: {}", status?),
            }
        }
        anyhow::Ok(())
    })
    .await;
    accepted.context("the floor's readers did not connect in 120 s")??;
    Ok((readers, servers))
}

/// One writer thread's sockets, by group.
type Share = Vec<Vec<std::net::TcpStream>>;

/// Deals socket i to group i mod `groups`, and each group's sockets in
/// turn to the `threads` writers: the size of each group, and each
/// writer's share.
fn deal(
    servers: Vec<std::net::TcpStream>,
    groups: usize,
    threads: usize,
) -> (Vec<u64>, Vec<Share>) {
    let mut group_sizes = vec![0u64; groups];
    let mut shares: Vec<Share> = (0..threads)
        .map(|_| (0..groups).map(|_| Vec::new()).collect())
        .collect();
    for (i, s) in servers.into_iter().enumerate() {
        let group = i % groups;
        group_sizes[group] += 1;
        shares[(i / groups) % threads][group].push(s);
    }
    (group_sizes, shares)
}

/// When each event is due, and which group it writes.
#[derive(Debug, Clone, Copy)]
struct Schedule {
    start: Instant,
    interval: Duration,
    events: usize,
    groups: usize,
}

/// Runs one writer thread per share: the writers' CPU ticks, and per event
/// the slowest writer's time from the event's due time, in ms.
async fn write_events(
    shares: Vec<Share>,
    schedule: Schedule,
    io: FloorIo,
    template: &Template,
) -> anyhow::Result<(u64, Vec<f64>)> {
    let writers: Vec<_> = shares
        .into_iter()
        .map(|share| {
            let template = template.clone();
            std::thread::spawn(move || write_share(share, schedule, io, template))
        })
        .collect();
    tokio::task::spawn_blocking(move || {
        let mut ticks = 0;
        let mut loops = vec![0f64; schedule.events];
        for w in writers {
            let (t, l) = w
                .join()
                .map_err(|_| anyhow::anyhow!("a writer panicked"))?
                .context("a floor writer failed")?;
            ticks += t;
            for (all, mine) in loops.iter_mut().zip(l) {
                *all = all.max(mine);
            }
        }
        anyhow::Ok((ticks, loops))
    })
    .await?
}

/// One writer thread: each event, at its due time, to its group of
/// `share`. Its CPU ticks, and per event its time from the due time (ms).
fn write_share(
    mut share: Share,
    schedule: Schedule,
    io: FloorIo,
    template: Template,
) -> std::io::Result<(u64, Vec<f64>)> {
    let mut writer = Writer::new(io, template.bytes.clone())?;
    let mut loops = Vec::with_capacity(schedule.events);
    let cpu_before = thread_cpu_ticks();
    for k in 0..schedule.events {
        let due = schedule.start + schedule.interval * k as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        // Stamped when the writer starts the event, not at its due time:
        // the latency is one event's fan-out, the lower bound of any
        // gateway's when it keeps up. A writer that falls behind (a burst,
        // an overloaded machine) does not count its lateness, where a
        // gateway's clients do.
        template.stamp(writer.frame_mut(), now_us(), k as u32);
        writer.send_to_all(&mut share[k % schedule.groups])?;
        loops.push(due.elapsed().as_secs_f64() * 1000.0);
    }
    Ok((thread_cpu_ticks().saturating_sub(cpu_before), loops))
}

/// Once the writers dropped their sockets, each reader ends at end of
/// stream, and the child reports every latency it measured (µs), with
/// its event.
async fn read_latencies(
    readers: &mut tokio::process::Child,
) -> anyhow::Result<(Vec<u32>, Vec<u32>)> {
    let mut out = Vec::new();
    let mut stdout = readers.stdout.take().expect("piped");
    tokio::time::timeout(Duration::from_secs(30), stdout.read_to_end(&mut out))
        .await
        .context("the floor's readers did not report in 30 s")??;
    let status = readers.wait().await?;
    anyhow::ensure!(status.success(), "the floor's readers failed: {status}");
    let word = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes"));
    Ok(out
        .chunks_exact(8)
        .map(|pair| (word(&pair[..4]), word(&pair[4..])))
        .unzip())
}

/// How a writer thread sends one event's frame to its sockets.
enum Writer {
    /// A blocking `write` per socket.
    Write(Vec<u8>),
    /// One `io_uring_enter` per batch of sends.
    Uring(Box<RingWriter>),
}

impl Writer {
    fn new(io: FloorIo, frame: Vec<u8>) -> std::io::Result<Writer> {
        Ok(match io {
            FloorIo::Write => Writer::Write(frame),
            FloorIo::Uring => Writer::Uring(Box::new(RingWriter::new(frame)?)),
        })
    }

    fn frame_mut(&mut self) -> &mut [u8] {
        match self {
            Writer::Write(frame) => frame,
            Writer::Uring(ring) => ring.frame_mut(),
        }
    }

    fn send_to_all(&mut self, sockets: &mut [std::net::TcpStream]) -> std::io::Result<()> {
        match self {
            Writer::Write(frame) => sockets.iter_mut().try_for_each(|s| s.write_all(frame)),
            Writer::Uring(ring) => ring.send_to_all(sockets),
        }
    }
}

/// The frame every writer sends, and where each event's stamp goes.
#[derive(Clone)]
struct Template {
    readers: FloorReaders,
    bytes: Vec<u8>,
    /// Where the send time and the event go: binary in a raw frame, JSON
    /// digits (16 for the time, 10 for the event, space-padded) in a
    /// WebSocket frame.
    sent_at: usize,
    event_at: usize,
}

/// A WebSocket frame's JSON up to its send time, after it, and after the
/// event; the padding string closes it.
const WS_HEAD: &str = r#"{"type":"ROUND_READY","tenant_id":1,"branch_id":1,"sent_us":"#;
const WS_EVENT: &str = r#","seq":"#;
const WS_PAD: &str = r#","pad":""#;

impl Template {
    fn new(readers: FloorReaders, frame_bytes: usize) -> Template {
        match readers {
            FloorReaders::Raw => Template {
                readers,
                bytes: vec![b'x'; frame_bytes],
                sent_at: 0,
                event_at: 8,
            },
            FloorReaders::Ws => {
                let fixed = WS_HEAD.len() + 16 + WS_EVENT.len() + 10 + WS_PAD.len() + 2;
                // The text after a 2-byte header, or a 4-byte one from 126
                // bytes of text on (128 and 129 bytes on the wire cannot
                // be: 130).
                let text_len = if frame_bytes < 128 {
                    frame_bytes.saturating_sub(2)
                } else {
                    (frame_bytes - 4).max(126)
                }
                .max(fixed);
                let mut text = String::with_capacity(text_len);
                text.push_str(WS_HEAD);
                let sent = text.len();
                text.push_str(&"0".repeat(16));
                text.push_str(WS_EVENT);
                let event = text.len();
                text.push_str(&" ".repeat(10));
                text.push_str(WS_PAD);
                text.push_str(&"x".repeat(text_len - fixed));
                text.push_str("\"}");
                let header = FrameHeader {
                    opcode: OpCode::Data(Data::Text),
                    ..FrameHeader::default()
                };
                let mut bytes = Vec::with_capacity(4 + text.len());
                header
                    .format(text.len() as u64, &mut bytes)
                    .expect("into a Vec");
                let at = bytes.len();
                bytes.extend_from_slice(text.as_bytes());
                Template {
                    readers,
                    bytes,
                    sent_at: at + sent,
                    event_at: at + event,
                }
            }
        }
    }

    fn stamp(&self, frame: &mut [u8], sent_us: u64, event: u32) {
        match self.readers {
            FloorReaders::Raw => {
                frame[self.sent_at..][..8].copy_from_slice(&sent_us.to_le_bytes());
                frame[self.event_at..][..4].copy_from_slice(&event.to_le_bytes());
            }
            FloorReaders::Ws => {
                // Microseconds since 1970 have had 16 digits since 2001.
                let sent = format!("{sent_us:16}");
                let event = format!("{event:<10}");
                frame[self.sent_at..][..16].copy_from_slice(&sent.as_bytes()[..16]);
                frame[self.event_at..][..10].copy_from_slice(&event.as_bytes()[..10]);
            }
        }
    }
}

/// The child process of [`run`] (`floor-readers`): connects
/// `--connections` sockets to `--floor-addr`, reads until each ends, then
/// writes every frame's latency (µs) and event, as two u32 little-endian,
/// to stdout.
pub async fn serve_readers(args: &BenchArgs) -> anyhow::Result<()> {
    let addr: SocketAddr = args
        .floor_addr
        .as_deref()
        .context("floor-readers needs --floor-addr")?
        .parse()?;
    let n = args
        .connections
        .context("floor-readers needs --connections")?;
    let frame_bytes = args
        .frame_bytes
        .unwrap_or(DEFAULT_FRAME_BYTES)
        .max(STAMP_BYTES);
    let mut readers = Vec::with_capacity(n);
    for i in 0..n {
        let local = clients::client_address(i, args);
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(local.into(), 0))?;
        let stream = socket.connect(addr).await?;
        readers.push(match args.floor_readers {
            FloorReaders::Raw => tokio::spawn(read_frames(stream, frame_bytes)),
            FloorReaders::Ws => tokio::spawn(read_messages(stream)),
        });
    }
    let mut out = Vec::new();
    for r in readers {
        for (latency, event) in r.await? {
            out.extend_from_slice(&latency.to_le_bytes());
            out.extend_from_slice(&event.to_le_bytes());
        }
    }
    let mut stdout = tokio::io::stdout();
    stdout.write_all(&out).await?;
    stdout.flush().await?;
    Ok(())
}

/// Reads fixed-size frames and records each one's latency and event, until
/// the peer closes.
async fn read_frames(mut stream: tokio::net::TcpStream, frame_bytes: usize) -> Vec<(u32, u32)> {
    let mut latencies = Vec::new();
    let mut buf = vec![0u8; frame_bytes * 4];
    let mut filled = 0;
    // Until end of stream (0) or an error.
    while let Ok(n @ 1..) = stream.read(&mut buf[filled..]).await {
        filled += n;
        let now = now_us();
        let whole = filled / frame_bytes * frame_bytes;
        for frame in buf[..whole].chunks_exact(frame_bytes) {
            let sent = u64::from_le_bytes(frame[..8].try_into().expect("8 bytes"));
            let event = u32::from_le_bytes(frame[8..STAMP_BYTES].try_into().expect("4 bytes"));
            latencies.push((latency_us(now, sent), event));
        }
        buf.copy_within(whole..filled, 0);
        filled -= whole;
    }
    latencies
}

/// Reads WebSocket text frames and parses each as a client does, recording
/// its latency and event, until the peer closes.
async fn read_messages(stream: tokio::net::TcpStream) -> Vec<(u32, u32)> {
    let mut ws =
        WebSocketStream::from_raw_socket(stream, Role::Client, Some(clients::ws_config())).await;
    let mut latencies = Vec::new();
    while let Some(Ok(Message::Text(text))) = ws.next().await {
        let now = now_us();
        if let Ok(frame) = serde_json::from_str::<clients::Frame>(text.as_str()) {
            latencies.push((latency_us(now, frame.sent_us), frame.seq));
        }
    }
    latencies
}
