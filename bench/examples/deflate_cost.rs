//! What permessage-deflate (RFC 7692) would cost and save on the
//! gateway's events, measured on three event shapes (#18):
//!
//! - bandwidth: each event's text against its compressed payload, with
//!   `no_context_takeover` (every message compressed alone, so one
//!   compressed frame can still go to every recipient) and with context
//!   takeover (one compressor per connection, which sees the previous
//!   events and compresses better, but must run once per recipient);
//! - CPU: compressing an event once (the gateway's cost, shared by its
//!   recipients without context takeover) and decompressing it (each
//!   client's cost), by the clock over many rounds, medians printed.
//!
//! Run: `cargo run --release -p wsgateway-bench --example deflate_cost`

use std::time::Instant;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};

const ROUNDS: usize = 7;
const MESSAGES: usize = 20_000;

/// The four bytes a sync flush ends with, which RFC 7692 strips.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

fn main() {
    let events = [
        ("bench ROUND_READY", small_event(0)),
        ("ENTITY_UPDATED, product", entity_event(0)),
        ("ROUND_SUBMITTED, 6 items", round_event(0)),
    ];
    println!(
        "permessage-deflate on the gateway's events; medians of {ROUNDS} rounds of {MESSAGES}"
    );
    for level in [1, 6] {
        println!("\ndeflate level {level}");
        println!(
            "{:<26} {:>6} {:>8} {:>8} {:>12} {:>12} {:>12}",
            "event", "text B", "alone B", "stream B", "alone µs", "stream µs", "inflate µs"
        );
        for (name, event) in &events {
            let alone = compress_alone(event.as_bytes(), level).len();
            let stream = stream_size(name, level);
            let (compress_us, stream_us, inflate_us) = cpu_us(event.as_bytes(), level);
            println!(
                "{name:<26} {:>6} {alone:>8} {stream:>8.0} {compress_us:>12.2} {stream_us:>12.2} {inflate_us:>12.2}",
                event.len()
            );
        }
    }
    println!(
        "\nalone: no_context_takeover (one frame for every recipient; the compressor reset per event); \
         stream: context takeover (a compressor per connection, run per recipient), \
         size the mean over 1 000 successive events of the shape; inflate: a client's cost per event"
    );
}

/// The bench publisher's event.
fn small_event(k: usize) -> String {
    serde_json::json!({"type": "ROUND_READY", "tenant_id": 1, "branch_id": 3,
        "ts": 1_764_800_000_000u64 + k as u64 * 10, "sent_us": 1_764_800_000_000_000u64 + k as u64 * 9_973,
        "seq": k, "event_id": format!("01JF{:022}", k * 7919)})
    .to_string()
}

/// An admin's entity change: a product with its description.
fn entity_event(k: usize) -> String {
    serde_json::json!({"type": "ENTITY_UPDATED", "tenant_id": 1, "branch_id": 3,
        "ts": 1_764_800_000 + k, "event_id": format!("01JF{:022}", k * 7919),
        "entity": {"kind": "product", "id": 4100 + k % 50, "name": format!("Milanesa napolitana {k}"),
            "description": "Milanesa de ternera con salsa de tomate, jamón y muzzarella gratinada, con papas fritas",
            "price_cents": 1_250_000 + (k % 13) * 5_000, "category_id": 12, "available": !k.is_multiple_of(3),
            "allergens": ["gluten", "lactosa", "huevo"], "updated_by": 17}})
    .to_string()
}

/// A diner's round of six items, as the kitchen and the waiters see it.
fn round_event(k: usize) -> String {
    const NAMES: [&str; 6] = [
        "Empanada de carne",
        "Provoleta",
        "Bife de chorizo",
        "Ensalada mixta",
        "Agua sin gas",
        "Flan con dulce de leche",
    ];
    let items: Vec<_> = (0..6)
        .map(|i| {
            serde_json::json!({"item_id": 90_000 + k * 6 + i, "product_id": 4100 + (k + i * 7) % 50,
                "name": NAMES[i],
                "qty": 1 + (k + i) % 3, "notes": if i == 2 { "a punto" } else { "" },
                "price_cents": 450_000 + i * 125_000})
        })
        .collect();
    serde_json::json!({"type": "ROUND_SUBMITTED", "tenant_id": 1, "branch_id": 3,
        "sector_id": 2, "session_id": 5_000 + k, "table_id": 40 + k % 30,
        "ts": 1_764_800_000 + k, "event_id": format!("01JF{:022}", k * 7919),
        "entity": {"round_id": 70_000 + k, "round_number": 1 + k % 4, "status": "SUBMITTED",
            "submitted_by": "diner", "items": items}})
    .to_string()
}

fn event_of(name: &str, k: usize) -> String {
    match name {
        "bench ROUND_READY" => small_event(k),
        "ENTITY_UPDATED, product" => entity_event(k),
        _ => round_event(k),
    }
}

/// One message compressed with a fresh context, tail stripped.
fn compress_alone(text: &[u8], level: u32) -> Vec<u8> {
    let mut c = Compress::new(Compression::new(level), false);
    compress_with(&mut c, text)
}

fn compress_with(c: &mut Compress, text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + 64);
    c.compress_vec(text, &mut out, FlushCompress::Sync)
        .expect("deflate");
    assert!(out.ends_with(&TAIL));
    out.truncate(out.len() - TAIL.len());
    out
}

fn inflate(payload: &[u8], d: &mut Decompress, out: &mut Vec<u8>) {
    let mut input = Vec::with_capacity(payload.len() + TAIL.len());
    input.extend_from_slice(payload);
    input.extend_from_slice(&TAIL);
    out.clear();
    d.decompress_vec(&input, out, FlushDecompress::Sync)
        .expect("inflate");
}

/// Mean compressed size over successive events through one context.
fn stream_size(name: &str, level: u32) -> f64 {
    let mut c = Compress::new(Compression::new(level), false);
    let total: usize = (0..1_000)
        .map(|k| compress_with(&mut c, event_of(name, k).as_bytes()).len())
        .sum();
    total as f64 / 1_000.0
}

/// Median µs to compress one message alone, to compress it through a live
/// context, and to inflate it.
fn cpu_us(text: &[u8], level: u32) -> (f64, f64, f64) {
    let payload = compress_alone(text, level);
    let mut out = Vec::with_capacity(text.len() * 2);
    // A server and a client keep their (de)compressor and reset it per
    // message, rather than allocate a window per message.
    let mut c = Compress::new(Compression::new(level), false);
    let mut d = Decompress::new(false);
    let mut compress = Vec::new();
    let mut stream = Vec::new();
    let mut decompress = Vec::new();
    for _ in 0..ROUNDS {
        let t = Instant::now();
        for _ in 0..MESSAGES {
            c.reset();
            std::hint::black_box(compress_with(&mut c, std::hint::black_box(text)));
        }
        compress.push(t.elapsed().as_secs_f64() * 1e6 / MESSAGES as f64);
        let mut live = Compress::new(Compression::new(level), false);
        let t = Instant::now();
        for _ in 0..MESSAGES {
            std::hint::black_box(compress_with(&mut live, std::hint::black_box(text)));
        }
        stream.push(t.elapsed().as_secs_f64() * 1e6 / MESSAGES as f64);
        let t = Instant::now();
        for _ in 0..MESSAGES {
            d.reset(false);
            inflate(std::hint::black_box(&payload), &mut d, &mut out);
        }
        decompress.push(t.elapsed().as_secs_f64() * 1e6 / MESSAGES as f64);
        assert_eq!(out, text);
    }
    (
        median(&mut compress),
        median(&mut stream),
        median(&mut decompress),
    )
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
