//! The fault-test proxy itself: it forwards, black-holes without closing,
//! heals for new connections only, closes on demand, and frees its port
//! when dropped.

use crate::common;

use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::proxy::Proxy;
use common::redis_server::RedisServer;

/// How long a command waits for its reply.
const READ_TIMEOUT: Duration = Duration::from_millis(500);

/// Polls `check` every 10 ms; panics with `what` if it does not hold within
/// `within`.
fn wait_until(within: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "{what} not within {within:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn connect(url: &str) -> redis::RedisResult<redis::Connection> {
    let conn = redis::Client::open(url)?.get_connection_with_timeout(READ_TIMEOUT)?;
    conn.set_read_timeout(Some(READ_TIMEOUT))?;
    conn.set_write_timeout(Some(READ_TIMEOUT))?;
    Ok(conn)
}

/// Clients connected to Redis, counting the direct connection that asks.
fn redis_clients(redis: &RedisServer) -> usize {
    let mut direct = connect(&redis.url()).unwrap();
    let info: String = redis::cmd("INFO")
        .arg("clients")
        .query(&mut direct)
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("connected_clients:"))
        .expect("connected_clients in INFO")
        .trim()
        .parse()
        .unwrap()
}

fn ping(conn: &mut redis::Connection) -> redis::RedisResult<String> {
    redis::cmd("PING").query(conn)
}

#[test]
fn blackhole_silences_without_closing_and_heal_serves_new_connections() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(redis.port);

    let mut old = connect(&proxy.url()).expect("connect through the proxy");
    assert_eq!(ping(&mut old).unwrap(), "PONG");
    assert_eq!(proxy.accepted(), 1);
    assert_eq!(proxy.open_flows(), 1);

    proxy.blackhole();
    let started = Instant::now();
    let err = ping(&mut old).expect_err("a black-holed PING gets no reply");
    assert!(
        err.is_timeout(),
        "a timeout, not a closed connection: {err}"
    );
    assert!(started.elapsed() >= READ_TIMEOUT - Duration::from_millis(50));
    assert_eq!(proxy.open_flows(), 1, "the proxy did not close the flow");

    // A new connection reaches the proxy but never gets an answer: its
    // setup (or its PING) times out.
    let started = Instant::now();
    let answered = connect(&proxy.url()).and_then(|mut c| ping(&mut c));
    match answered {
        Ok(pong) => panic!("a connection made while black-holed answered {pong}"),
        Err(e) => assert!(e.is_timeout(), "a timeout, not a refusal: {e}"),
    }
    assert!(started.elapsed() >= READ_TIMEOUT - Duration::from_millis(50));
    assert_eq!(proxy.accepted(), 2);
    assert_eq!(redis_clients(&redis), 2, "it was never connected to Redis");
    // The client dropped it: the proxy sees that end close.
    wait_until(Duration::from_secs(2), "the dropped flow closing", || {
        proxy.open_flows() == 1
    });

    proxy.heal();
    let mut new = connect(&proxy.url()).expect("connect after heal");
    assert_eq!(ping(&mut new).unwrap(), "PONG");
    assert_eq!(proxy.accepted(), 3);
    let err = ping(&mut old).expect_err("the old flow stays black-holed");
    assert!(err.is_timeout(), "still a timeout: {err}");
    assert_eq!(ping(&mut new).unwrap(), "PONG");
    assert_eq!(proxy.open_flows(), 2);
    assert_eq!(redis_clients(&redis), 3);
}

#[test]
fn close_all_closes_promptly_and_new_connections_still_work() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(redis.port);
    let mut conns: Vec<_> = (0..2)
        .map(|_| connect(&proxy.url()).expect("connect through the proxy"))
        .collect();
    for c in &mut conns {
        assert_eq!(ping(c).unwrap(), "PONG");
    }
    assert_eq!(proxy.open_flows(), 2);

    proxy.close_all();
    for c in &mut conns {
        let started = Instant::now();
        let err = ping(c).expect_err("the proxy closed the connection");
        assert!(!err.is_timeout(), "closed, not timed out: {err}");
        assert!(err.is_connection_dropped(), "a closed connection: {err}");
        assert!(started.elapsed() < READ_TIMEOUT / 2, "promptly");
    }
    wait_until(Duration::from_secs(2), "every flow closing", || {
        proxy.open_flows() == 0
    });

    let mut again = connect(&proxy.url()).expect("connect after close_all");
    assert_eq!(ping(&mut again).unwrap(), "PONG");
    assert_eq!(proxy.open_flows(), 1);
    assert_eq!(proxy.accepted(), 3);
}

#[test]
fn drop_closes_flows_and_frees_the_port() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(redis.port);
    let port = proxy.port;
    let mut forwarded = connect(&proxy.url()).unwrap();
    assert_eq!(ping(&mut forwarded).unwrap(), "PONG");
    let mut silenced = connect(&proxy.url()).unwrap();
    assert_eq!(ping(&mut silenced).unwrap(), "PONG");
    proxy.blackhole();
    // One more, accepted while black-holed (never connected to Redis).
    let raw = TcpStream::connect(("127.0.0.1", port)).unwrap();
    wait_until(
        Duration::from_secs(2),
        "the raw connection accepted",
        || proxy.accepted() == 3,
    );

    let started = Instant::now();
    drop(proxy);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "Drop took {:?}",
        started.elapsed()
    );

    for c in [&mut forwarded, &mut silenced] {
        let err = ping(c).expect_err("Drop closed the connection");
        assert!(err.is_connection_dropped(), "a closed connection: {err}");
    }
    drop(raw);
    wait_until(Duration::from_secs(2), "the port free again", || {
        TcpListener::bind(("127.0.0.1", port)).is_ok()
    });
}
