//! The WebSocket library's share of a delivery, measured: tungstenite
//! (through tokio-tungstenite, as the gateway uses it) against
//! fastwebsockets, and against a plain `write` of the same frame bytes.
//!
//! Each writer sends `FRAMES` text frames of 200 bytes, one write and flush
//! per frame (a broadcast's shape: each event alone in its write), twice:
//!
//! - over a real loopback TCP connection that a reader thread drains. The
//!   writer runs alone on a current-thread runtime in its own thread, so
//!   that thread's CPU time (/proc/thread-self/stat) is the library plus
//!   the kernel's send path;
//! - into a stream that accepts every write and does nothing (no system
//!   call), timed by the clock: the library's own cost per frame.
//!
//! The three writers take turns, `ROUNDS` times; medians are printed.
//!
//! Run: `cargo run --release -p wsgateway-bench --example ws_write_path`

use std::io::Read;
use std::net::{TcpListener, TcpStream};

use futures_util::SinkExt;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;
use wsgateway_bench::procfs::{TICKS_PER_S, thread_cpu_ticks};

const FRAMES: usize = 100_000;
const ROUNDS: usize = 7;
const PAYLOAD: usize = 200;

#[derive(Clone, Copy, Debug)]
enum Writer {
    /// The frame's bytes, framed once, written with `write_all`.
    Plain,
    Tungstenite,
    Fastwebsockets,
}

fn main() {
    let payload = "x".repeat(PAYLOAD);
    let writers = [Writer::Plain, Writer::Tungstenite, Writer::Fastwebsockets];
    let mut socket_us = vec![Vec::new(); writers.len()];
    let mut memory_ns = vec![Vec::new(); writers.len()];
    for _ in 0..ROUNDS {
        for (i, w) in writers.iter().enumerate() {
            socket_us[i].push(over_loopback(*w, &payload));
            memory_ns[i].push(in_memory(*w, &payload));
        }
    }
    println!("{FRAMES} frames of {PAYLOAD} bytes, one write each; medians of {ROUNDS} rounds");
    for (i, w) in writers.iter().enumerate() {
        println!(
            "{:<15} loopback: {:5.2} µs CPU per frame (runs {})   in memory: {:6.0} ns per frame (runs {})",
            format!("{w:?}"),
            median(&socket_us[i]),
            list(&socket_us[i], 2),
            median(&memory_ns[i]),
            list(&memory_ns[i], 0),
        );
    }
}

fn list(v: &[f64], decimals: usize) -> String {
    v.iter()
        .map(|t| format!("{t:.decimals$}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A stream that takes every write and never has anything to read.
struct Null;

impl tokio::io::AsyncRead for Null {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        _: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Pending
    }
}

impl tokio::io::AsyncWrite for Null {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::task::Poll::Ready(Ok(std::hint::black_box(buf).len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// One writer's time per frame into [`Null`], in nanoseconds.
fn in_memory(writer: Writer, payload: &str) -> f64 {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        let started = std::time::Instant::now();
        write_frames(writer, Null, payload).await;
        started.elapsed().as_nanos() as f64 / FRAMES as f64
    })
}

/// Writes `FRAMES` frames of `payload` with `writer`, one write each.
async fn write_frames<S>(writer: Writer, stream: S, payload: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match writer {
        Writer::Plain => {
            use tokio::io::AsyncWriteExt;
            let mut stream = stream;
            // A server text frame: FIN + text opcode, 16-bit length.
            let mut frame = vec![0x81, 126];
            frame.extend_from_slice(&(payload.len() as u16).to_be_bytes());
            frame.extend_from_slice(payload.as_bytes());
            for _ in 0..FRAMES {
                stream.write_all(&frame).await.unwrap();
            }
        }
        Writer::Tungstenite => {
            let mut ws = WebSocketStream::from_raw_socket(stream, Role::Server, None).await;
            let text = tokio_tungstenite::tungstenite::Utf8Bytes::from(payload.to_owned());
            for _ in 0..FRAMES {
                ws.send(Message::Text(text.clone())).await.unwrap();
            }
        }
        Writer::Fastwebsockets => {
            let mut ws =
                fastwebsockets::WebSocket::after_handshake(stream, fastwebsockets::Role::Server);
            for _ in 0..FRAMES {
                let frame = fastwebsockets::Frame::text(fastwebsockets::Payload::Borrowed(
                    payload.as_bytes(),
                ));
                ws.write_frame(frame).await.unwrap();
            }
        }
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One writer's CPU time per frame over loopback TCP, in microseconds.
fn over_loopback(writer: Writer, payload: &str) -> f64 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    server.set_nodelay(true).unwrap();
    let reader = std::thread::spawn(move || {
        let mut client = client;
        let mut buf = [0u8; 64 * 1024];
        let mut total = 0usize;
        while let Ok(n @ 1..) = client.read(&mut buf) {
            total += n;
        }
        total
    });
    let payload = payload.to_owned();
    let cpu_us = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        server.set_nonblocking(true).unwrap();
        runtime.block_on(async move {
            let stream = tokio::net::TcpStream::from_std(server).unwrap();
            let before = thread_cpu_ticks();
            write_frames(writer, stream, &payload).await;
            let ticks = thread_cpu_ticks().saturating_sub(before);
            ticks as f64 / TICKS_PER_S * 1e6 / FRAMES as f64
        })
    })
    .join()
    .unwrap();
    let received = reader.join().unwrap();
    assert!(
        received >= FRAMES * PAYLOAD,
        "the reader got {received} bytes"
    );
    cpu_us
}
