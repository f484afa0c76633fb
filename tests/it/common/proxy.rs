//! A loopback TCP proxy for fault tests: the gateway connects to the proxy,
//! which forwards to a real server. It can black-hole its flows without
//! closing them (no RST, no FIN), as a NAT or firewall idle timeout, or a
//! host lost without a reset, would: the kernel keeps ACKing, so TCP
//! keepalive cannot see it, only an application-level deadline can.
//!
//! Plain std threads (no runtime), every one bounded: they all exit within
//! ~200 ms of `Drop`. It never touches processes.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often every thread looks at its flags.
const TICK: Duration = Duration::from_millis(50);
/// How long the listener waits between two empty accepts.
const ACCEPT_POLL: Duration = Duration::from_millis(10);
/// How long connecting to the target may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

pub struct Proxy {
    pub port: u16,
    shared: Arc<Shared>,
    listener: Option<JoinHandle<()>>,
}

struct Shared {
    stop: AtomicBool,
    accepted: AtomicUsize,
    /// The flows whose pumps are still running. Its lock also guards the
    /// black-hole mode, so a flow is never accepted half into a mode change.
    flows: Mutex<Flows>,
    pumps: Mutex<Vec<JoinHandle<()>>>,
}

struct Flows {
    blackhole: bool,
    list: Vec<Arc<Flow>>,
}

struct Flow {
    client: TcpStream,
    /// `None` when accepted in black-hole mode: never connected.
    server: Option<TcpStream>,
    blackholed: AtomicBool,
    client_closed: AtomicBool,
    server_closed: AtomicBool,
    /// Shut down by the proxy (an end closed, `close_all`, or `Drop`).
    shut: AtomicBool,
    /// Pumps still running; the last one out removes the flow.
    pumps: AtomicUsize,
}

impl Flow {
    fn is_open(&self) -> bool {
        !self.shut.load(Ordering::SeqCst)
            && !self.client_closed.load(Ordering::SeqCst)
            && !self.server_closed.load(Ordering::SeqCst)
    }

    /// FIN on both sides; the pumps then read 0 and exit.
    fn shut_down(&self) {
        self.shut.store(true, Ordering::SeqCst);
        let _ = self.client.shutdown(Shutdown::Both);
        if let Some(server) = &self.server {
            let _ = server.shutdown(Shutdown::Both);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Proxy {
    /// Listens on 127.0.0.1:<free port>, forwarding every accepted
    /// connection to 127.0.0.1:`target_port`.
    pub fn start(target_port: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            accepted: AtomicUsize::new(0),
            flows: Mutex::new(Flows {
                blackhole: false,
                list: Vec::new(),
            }),
            pumps: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        let handle = std::thread::Builder::new()
            .name(format!("proxy-{port}"))
            .spawn(move || accept_loop(listener, target_port, &s))
            .unwrap();
        Proxy {
            port,
            shared,
            listener: Some(handle),
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Black-holes every flow open now and every flow accepted until
    /// `heal`: bytes read from either side are discarded, nothing is
    /// written, no socket is closed.
    pub fn blackhole(&self) {
        let mut flows = lock(&self.shared.flows);
        flows.blackhole = true;
        for flow in &flows.list {
            flow.blackholed.store(true, Ordering::SeqCst);
        }
    }

    /// New connections are forwarded normally again. Flows black-holed
    /// before stay black-holed until one of their ends closes them.
    pub fn heal(&self) {
        lock(&self.shared.flows).blackhole = false;
    }

    /// Closes every current flow with a FIN on both sides (like a proxy
    /// restart). New connections are still accepted.
    pub fn close_all(&self) {
        for flow in &lock(&self.shared.flows).list {
            flow.shut_down();
        }
    }

    /// Flows currently open: accepted and not yet closed by either end (nor
    /// by the proxy).
    pub fn open_flows(&self) -> usize {
        lock(&self.shared.flows)
            .list
            .iter()
            .filter(|f| f.is_open())
            .count()
    }

    /// Connections accepted since start.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // The listener exits (and its socket closes) within ACCEPT_POLL; it
        // spawns no pump after seeing the stop flag.
        if let Some(h) = self.listener.take() {
            let _ = h.join();
        }
        self.close_all();
        let pumps = std::mem::take(&mut *lock(&self.shared.pumps));
        for h in pumps {
            let _ = h.join();
        }
    }
}

fn accept_loop(listener: TcpListener, target_port: u16, shared: &Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        let client = match listener.accept() {
            Ok((client, _)) => client,
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                std::thread::sleep(ACCEPT_POLL);
                continue;
            }
            Err(_) => {
                std::thread::sleep(ACCEPT_POLL);
                continue;
            }
        };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        let _ = client.set_nonblocking(false);
        let _ = client.set_nodelay(true);
        // In black-hole mode the target is not even connected to. The mode
        // is looked at again under the lock below, so a `blackhole()` that
        // lands in between still black-holes this flow.
        let server = if lock(&shared.flows).blackhole {
            None
        } else {
            let addr = ([127, 0, 0, 1], target_port).into();
            match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    Some(s)
                }
                // The target is down: the client sees its connection close.
                Err(_) => continue,
            }
        };
        for s in std::iter::once(&client).chain(server.as_ref()) {
            let _ = s.set_read_timeout(Some(TICK));
            let _ = s.set_write_timeout(Some(TICK));
        }
        let flow = {
            let mut flows = lock(&shared.flows);
            let flow = Arc::new(Flow {
                pumps: AtomicUsize::new(if server.is_some() { 2 } else { 1 }),
                client,
                server,
                blackholed: AtomicBool::new(flows.blackhole),
                client_closed: AtomicBool::new(false),
                server_closed: AtomicBool::new(false),
                shut: AtomicBool::new(false),
            });
            flows.list.push(flow.clone());
            flow
        };
        let mut pumps = lock(&shared.pumps);
        pumps.retain(|h| !h.is_finished());
        pumps.push(spawn_pump(shared, &flow, Direction::Up));
        if flow.server.is_some() {
            pumps.push(spawn_pump(shared, &flow, Direction::Down));
        }
    }
}

#[derive(Clone, Copy)]
enum Direction {
    /// Client to server.
    Up,
    /// Server to client.
    Down,
}

fn spawn_pump(shared: &Arc<Shared>, flow: &Arc<Flow>, dir: Direction) -> JoinHandle<()> {
    let (shared, flow) = (shared.clone(), flow.clone());
    std::thread::Builder::new()
        .name("proxy-pump".into())
        .spawn(move || {
            pump(&shared, &flow, dir);
            if flow.pumps.fetch_sub(1, Ordering::SeqCst) == 1 {
                lock(&shared.flows).list.retain(|f| !Arc::ptr_eq(f, &flow));
            }
        })
        .unwrap()
}

fn pump(shared: &Shared, flow: &Flow, dir: Direction) {
    let (mut from, to, closed) = match dir {
        Direction::Up => (&flow.client, flow.server.as_ref(), &flow.client_closed),
        Direction::Down => (
            flow.server.as_ref().expect("a down pump has a server"),
            Some(&flow.client),
            &flow.server_closed,
        ),
    };
    let running = || !shared.stop.load(Ordering::SeqCst) && !flow.shut.load(Ordering::SeqCst);
    let mut buf = vec![0u8; 16 * 1024];
    while running() {
        let n = match from.read(&mut buf) {
            Ok(0) => 0,
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => 0,
        };
        if n == 0 {
            // This end closed. A forwarded flow closes the other end too; a
            // black-holed one leaves it silent and open.
            closed.store(true, Ordering::SeqCst);
            if !flow.blackholed.load(Ordering::SeqCst) {
                flow.shut_down();
            }
            return;
        }
        if flow.blackholed.load(Ordering::SeqCst) {
            continue;
        }
        let Some(mut to) = to else { continue };
        let mut data = &buf[..n];
        while !data.is_empty() && running() && !flow.blackholed.load(Ordering::SeqCst) {
            match to.write(data) {
                Ok(0) => {
                    flow.shut_down();
                    return;
                }
                Ok(w) => data = &data[w..],
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(_) => {
                    flow.shut_down();
                    return;
                }
            }
        }
    }
}
