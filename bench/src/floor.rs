//! `bench floor`: the kernel's share of a fan-out, without the gateway.
//!
//! The gateway's profile in a broadcast is mostly the kernel's loopback TCP
//! path (BENCHMARKS.md). This scenario measures that path alone, on the
//! same machine: plain threads (one per core, like the gateway's workers)
//! write one frame-sized buffer to each of N accepted sockets per event,
//! with blocking `write` calls (no WebSocket, no async runtime, no queue),
//! while lightweight readers drain the other ends. Its CPU per write and its latency are the floor under the
//! gateway's figures for the same shape.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpSocket};

use super::clients::now_us;
use super::procfs::{TICKS_PER_S, thread_cpu_ticks};
use super::{BenchArgs, Plan};

/// Bytes per write: about the size of an event frame in the broadcast.
const FRAME_BYTES: usize = 200;

pub struct Floor {
    pub writes: u64,
    pub received: u64,
    pub cpu_us_per_write: f64,
    /// From an event's due time to its last write, median over events.
    pub loop_ms_median: f64,
    pub latencies_us: Vec<u32>,
}

impl Floor {
    pub fn to_json(&self) -> serde_json::Value {
        let pct = |p: f64| super::report::percentile_ms(&self.latencies_us, p);
        serde_json::json!({
            "writes": self.writes,
            "missing": self.writes.saturating_sub(self.received),
            "cpu_us_per_write": self.cpu_us_per_write,
            "write_loop_ms_median": self.loop_ms_median,
            "latency_ms": {"p50": pct(0.5), "p99": pct(0.99), "max": pct(1.0)},
        })
    }
}

pub async fn run(plan: &Plan, args: &BenchArgs) -> anyhow::Result<Floor> {
    let n = plan.connections;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let accept = tokio::spawn(async move {
        let mut servers = Vec::with_capacity(n);
        while servers.len() < n {
            let (s, _) = listener.accept().await?;
            s.set_nodelay(true)?;
            let s = s.into_std()?;
            s.set_nonblocking(false)?;
            servers.push(s);
        }
        anyhow::Ok(servers)
    });
    let received = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::with_capacity(n);
    for i in 0..n {
        let local = Ipv4Addr::new(
            127,
            0,
            0,
            1 + (i % args.client_addresses.max(1) as usize) as u8,
        );
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(local.into(), 0))?;
        let stream = socket.connect(addr).await?;
        let received = received.clone();
        readers.push(tokio::spawn(read_frames(stream, received)));
    }
    let servers = accept.await??;

    let events = plan.events;
    let interval = if plan.rate > 0.0 {
        Duration::from_secs_f64(1.0 / plan.rate)
    } else {
        Duration::ZERO
    };
    // As many writer threads as the gateway has workers (one per core),
    // each with its share of the sockets, on the same schedule.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut shares: Vec<Vec<std::net::TcpStream>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, s) in servers.into_iter().enumerate() {
        shares[i % threads].push(s);
    }
    let start = Instant::now() + Duration::from_millis(100);
    let writers: Vec<_> = shares
        .into_iter()
        .map(|mut share| {
            std::thread::spawn(move || -> std::io::Result<(u64, Vec<f64>)> {
                let mut frame = [b'x'; FRAME_BYTES];
                let mut loops = Vec::with_capacity(events);
                let cpu_before = thread_cpu_ticks();
                for k in 0..events {
                    let due = start + interval * k as u32;
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    frame[..8].copy_from_slice(&now_us().to_le_bytes());
                    for s in share.iter_mut() {
                        s.write_all(&frame)?;
                    }
                    loops.push(due.elapsed().as_secs_f64() * 1000.0);
                }
                Ok((thread_cpu_ticks().saturating_sub(cpu_before), loops))
            })
        })
        .collect();
    let (cpu_ticks, mut loops) = tokio::task::spawn_blocking(move || {
        let mut ticks = 0;
        // Per event, the slowest writer's time from the event's due time.
        let mut loops = vec![0f64; events];
        for w in writers {
            let (t, l) = w
                .join()
                .map_err(|_| anyhow::anyhow!("a writer panicked"))??;
            ticks += t;
            for (all, mine) in loops.iter_mut().zip(l) {
                *all = all.max(mine);
            }
        }
        anyhow::Ok((ticks, loops))
    })
    .await??;

    // The writers dropped their sockets: each reader ends at end of stream.
    let writes = (n * events) as u64;
    let mut latencies_us = Vec::with_capacity(writes as usize);
    for r in readers {
        latencies_us.extend(tokio::time::timeout(Duration::from_secs(20), r).await??);
    }
    loops.sort_by(f64::total_cmp);
    Ok(Floor {
        writes,
        received: received.load(Ordering::Relaxed),
        cpu_us_per_write: cpu_ticks as f64 / TICKS_PER_S * 1e6 / writes.max(1) as f64,
        loop_ms_median: loops.get(loops.len() / 2).copied().unwrap_or(0.0),
        latencies_us,
    })
}

/// Reads fixed-size frames and records each one's latency, until the peer
/// closes.
async fn read_frames(mut stream: tokio::net::TcpStream, received: Arc<AtomicU64>) -> Vec<u32> {
    let mut latencies = Vec::new();
    let mut buf = [0u8; FRAME_BYTES * 4];
    let mut filled = 0;
    // Until end of stream (0) or an error.
    while let Ok(n @ 1..) = stream.read(&mut buf[filled..]).await {
        filled += n;
        let now = now_us();
        let whole = filled / FRAME_BYTES * FRAME_BYTES;
        for frame in buf[..whole].chunks_exact(FRAME_BYTES) {
            let sent = u64::from_le_bytes(frame[..8].try_into().expect("8 bytes"));
            latencies.push(now.saturating_sub(sent).min(u32::MAX as u64) as u32);
            received.fetch_add(1, Ordering::Relaxed);
        }
        buf.copy_within(whole..filled, 0);
        filled -= whole;
    }
    latencies
}
