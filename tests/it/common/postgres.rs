//! The PostgreSQL that the test command provides, the backend's table, and a
//! TCP proxy that can cut the gateway off from the database.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// `TEST_DATABASE_URL`, or the local default. Tests fail, not skip, when no
/// database answers there.
pub fn database_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// Connects, and creates the backend's table (PROTOCOL.md §13) if needed.
pub async fn connect() -> tokio_postgres::Client {
    let url = database_url();
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("no PostgreSQL at {url} ({e}); scripts/test.sh provides one"));
    tokio::spawn(connection);
    // Serialized: concurrent CREATE ... IF NOT EXISTS can still collide.
    // One transaction, its lock held until the CREATE is committed (a
    // session lock released inside the batch freed it before the commit).
    client
        .batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock(80010); {} COMMIT;",
            include_str!("../../fixtures/waiter_sector_assignment.sql")
        ))
        .await
        .unwrap();
    client
}

/// A tenant id no other test run uses.
pub fn fresh_tenant() -> i64 {
    use std::sync::atomic::AtomicI64;
    static NEXT: AtomicI64 = AtomicI64::new(0);
    let base = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    base * 100 + NEXT.fetch_add(1, Ordering::Relaxed) % 100
}

/// Assigns `waiter` to `sectors` in `branch` today (replacing its rows).
pub async fn assign(
    db: &tokio_postgres::Client,
    tenant: i64,
    branch: i64,
    waiter: i64,
    sectors: &[i64],
) {
    db.execute(
        "DELETE FROM waiter_sector_assignment WHERE tenant_id = $1 AND branch_id = $2 AND waiter_id = $3",
        &[&tenant, &branch, &waiter],
    )
    .await
    .unwrap();
    for s in sectors {
        db.execute(
            "INSERT INTO waiter_sector_assignment (tenant_id, branch_id, sector_id, waiter_id) VALUES ($1, $2, $3, $4)",
            &[&tenant, &branch, s, &waiter],
        )
        .await
        .unwrap();
    }
}

/// A TCP proxy in front of a real server, that can be switched off: while
/// off it refuses new connections and has cut the existing ones.
pub struct TcpProxy {
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    links: Arc<Mutex<Vec<AbortHandle>>>,
    accept: AbortHandle,
}

impl TcpProxy {
    pub async fn start(upstream: SocketAddr) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let links: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let (up2, links2) = (up.clone(), links.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if !up2.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let link = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                links2.lock().push(link.abort_handle());
            }
        })
        .abort_handle();
        TcpProxy {
            addr,
            up,
            links,
            accept,
        }
    }

    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
        if !up {
            for link in self.links.lock().drain(..) {
                link.abort();
            }
        }
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.set_up(false);
    }
}
