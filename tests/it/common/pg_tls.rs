//! A PostgreSQL with `ssl=on` that the test starts itself: a fresh cluster
//! in a temporary directory, on a free port of 127.0.0.1 and 127.0.0.2,
//! with a certificate for `localhost` and 127.0.0.1 signed by a test CA,
//! and a `pg_hba.conf` that takes TCP connections over TLS only (and, for
//! the role `certuser`, only with a client certificate of that CA).
//!
//! The cluster runs as the `postgres` user (`setpriv`, util-linux; it
//! execs, so the child's pid is the postmaster's, which is checked against
//! `postmaster.pid`). Tests of one process share one server while any of
//! them holds it; the last to let go stops it (SIGINT, a fast shutdown,
//! then SIGKILL) and the directory is removed. Should the test process die
//! first, the kernel kills the postmaster (`--pdeathsig`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

/// The waiter table's database, and the role that needs a client certificate.
pub const DBNAME: &str = "postgres";
pub const CERT_USER: &str = "certuser";

pub struct TlsPostgres {
    pub port: u16,
    /// The CA that signed the server's certificate (and the client's).
    pub ca: PathBuf,
    /// A CA that signed nothing of this server's.
    pub other_ca: PathBuf,
    /// A client certificate for `certuser`, and its key.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// The cluster and its socket directory.
    pub data: PathBuf,
    socket_dir: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    child: parking_lot::Mutex<Child>,
    pid: u32,
    /// Removed last (fields drop after `Drop::drop`).
    _dir: tempfile::TempDir,
}

static SHARED: tokio::sync::Mutex<Weak<TlsPostgres>> = tokio::sync::Mutex::const_new(Weak::new());

impl TlsPostgres {
    /// The server that other tests of this process hold, or a new one.
    pub async fn shared() -> Arc<TlsPostgres> {
        let mut slot = SHARED.lock().await;
        if let Some(server) = slot.upgrade() {
            return server;
        }
        let server = Arc::new(TlsPostgres::start().await);
        *slot = Arc::downgrade(&server);
        server
    }

    /// A server of the caller's own (one it may restart), stopped on drop.
    pub async fn start() -> TlsPostgres {
        let bin = bin_dir();
        let (uid, gid) = (id("-u"), id("-g"));
        let dir = tempfile::Builder::new()
            .prefix("wsgateway-pgtls-")
            .tempdir()
            .unwrap();
        let root = dir.path().to_owned();
        std::os::unix::fs::chown(&root, Some(uid), Some(gid)).unwrap();
        let data = root.join("data");

        let initdb = {
            let (bin, root, data) = (bin.clone(), root.clone(), data.clone());
            tokio::task::spawn_blocking(move || {
                as_postgres(&bin.join("initdb"), false)
                    .current_dir(&root)
                    .arg("-D")
                    .arg(&data)
                    .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C"])
                    .args(["--no-sync", "--no-instructions"])
                    .output()
                    .unwrap()
            })
        };
        let files = Files::write(&root, uid, gid);
        let out = initdb.await.unwrap();
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(
            data.join("pg_hba.conf"),
            format!(
                "local all all trust\n\
                 hostssl all {CERT_USER} 127.0.0.0/8 cert\n\
                 hostssl all all 127.0.0.0/8 trust\n"
            ),
        )
        .unwrap();

        // A port free now may be taken before the server binds it: try again.
        for _attempt in 0..5 {
            let port = free_port();
            let Some(child) = spawn_server(
                &root,
                &data,
                &files.server_cert,
                &files.server_key,
                &files.ca,
                port,
            )
            .await
            else {
                continue;
            };
            let pid = child.id();
            let server = TlsPostgres {
                port,
                ca: files.ca.clone(),
                other_ca: files.other_ca.clone(),
                client_cert: files.client_cert.clone(),
                client_key: files.client_key.clone(),
                data: data.clone(),
                socket_dir: root.clone(),
                server_cert: files.server_cert.clone(),
                server_key: files.server_key.clone(),
                child: parking_lot::Mutex::new(child),
                pid,
                _dir: dir,
            };
            server.check_it_is_ours().await;
            server.prepare().await;
            return server;
        }
        panic!("PostgreSQL found no free port in 5 attempts");
    }

    /// Stops the server as a crash would (SIGQUIT: an immediate shutdown,
    /// recovery from the WAL at the next start) and starts it again on its
    /// port; returns once it answers.
    pub async fn crash_and_restart(&mut self) {
        let _ = Command::new("kill")
            .args(["-QUIT", &self.pid.to_string()])
            .status();
        let child = self.child.get_mut();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !matches!(child.try_wait(), Ok(Some(_))) {
            assert!(Instant::now() < deadline, "PostgreSQL did not stop");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let ca = self.ca.clone();
        let child = spawn_server(
            &self.socket_dir,
            &self.data,
            &self.server_cert,
            &self.server_key,
            &ca,
            self.port,
        )
        .await
        .expect("the port is ours again");
        self.pid = child.id();
        *self.child.get_mut() = child;
        self.check_it_is_ours().await;
    }

    /// The answering server is the child started here: `postmaster.pid` in
    /// our data directory names our child and our port, and the server on
    /// our socket reports our data directory.
    async fn check_it_is_ours(&self) {
        let pidfile = std::fs::read_to_string(self.data.join("postmaster.pid")).unwrap();
        let lines: Vec<&str> = pidfile.lines().collect();
        assert_eq!(lines[0].trim(), self.pid.to_string(), "{pidfile}");
        assert_eq!(lines[3].trim(), self.port.to_string(), "{pidfile}");
        let db = self.admin().await;
        let row = db.query_one("SHOW data_directory", &[]).await.unwrap();
        let reported: String = row.get(0);
        assert_eq!(
            std::fs::canonicalize(reported).unwrap(),
            std::fs::canonicalize(&self.data).unwrap()
        );
    }

    async fn prepare(&self) {
        let db = self.admin().await;
        db.batch_execute(&format!(
            "SET client_min_messages = warning; {} CREATE ROLE {CERT_USER} LOGIN; \
             GRANT SELECT ON waiter_sector_assignment TO {CERT_USER};",
            include_str!("../../fixtures/waiter_sector_assignment.sql")
        ))
        .await
        .unwrap();
    }

    /// A superuser connection over the Unix socket (no TLS needed there).
    pub async fn admin(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::Config::new()
            .host_path(&self.socket_dir)
            .port(self.port)
            .user("postgres")
            .dbname(DBNAME)
            .connect(tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
    }

    /// `postgres://{user}@{host}:{port}/postgres?{params}`, the values
    /// percent-encoded.
    pub fn url(&self, user: &str, host: &str, params: &[(&str, &str)]) -> String {
        let query: Vec<String> = params
            .iter()
            .map(|(k, v)| format!("{k}={}", utf8_percent_encode(v, NON_ALPHANUMERIC)))
            .collect();
        format!(
            "postgres://{user}@{host}:{}/{DBNAME}?{}",
            self.port,
            query.join("&")
        )
    }
}

impl Drop for TlsPostgres {
    fn drop(&mut self) {
        let child = self.child.get_mut();
        // Fast shutdown; then, if it lingers, SIGKILL. Only our child's pid.
        let _ = Command::new("kill")
            .args(["-INT", &self.pid.to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Starts the postmaster on `port` and waits until it answers; `None`
/// when the port was taken.
async fn spawn_server(
    root: &Path,
    data: &Path,
    server_cert: &Path,
    server_key: &Path,
    ca: &Path,
    port: u16,
) -> Option<Child> {
    let (uid, gid) = (id("-u"), id("-g"));
    let log_path = root.join(format!("postgres-{port}.log"));
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(&log_path)
        .unwrap();
    std::os::unix::fs::chown(&log_path, Some(uid), Some(gid)).unwrap();
    let mut command = as_postgres(&bin_dir().join("postgres"), true);
    command
        .current_dir(root)
        .arg("-D")
        .arg(data)
        .args(["-p", &port.to_string()])
        .arg("-k")
        .arg(root)
        .args(["-c", "listen_addresses=127.0.0.1,127.0.0.2"])
        .args(["-c", "ssl=on"])
        .arg("-c")
        .arg(format!("ssl_cert_file={}", server_cert.display()))
        .arg("-c")
        .arg(format!("ssl_key_file={}", server_key.display()))
        .arg("-c")
        .arg(format!("ssl_ca_file={}", ca.display()))
        .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
        .args(["-c", "full_page_writes=off", "-c", "max_connections=60"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    let mut child = spawn_from_a_lasting_thread(command);
    match wait_ready(&mut child, root, port, &log_path).await {
        Ready::Yes => Some(child),
        Ready::PortTaken => None,
    }
}

struct Files {
    ca: PathBuf,
    other_ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

impl Files {
    /// The CAs and certificates, in `root`; what the server reads belongs
    /// to `postgres`, its key with mode 0600 (PostgreSQL insists).
    fn write(root: &Path, uid: u32, gid: u32) -> Files {
        let other = new_ca("wsgateway other CA");
        let ca = new_ca("wsgateway test CA");
        let server_key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let server = params.signed_by(&server_key, &ca).unwrap();
        let client_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, CERT_USER);
        let client = params.signed_by(&client_key, &ca).unwrap();

        let put = |name: &str, text: String, mode: u32| {
            use std::os::unix::fs::PermissionsExt;
            let path = root.join(name);
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            std::os::unix::fs::chown(&path, Some(uid), Some(gid)).unwrap();
            path
        };
        Files {
            ca: put("ca.pem", ca.pem(), 0o644),
            other_ca: put("other-ca.pem", other.pem(), 0o644),
            server_cert: put("server.crt", server.pem(), 0o644),
            server_key: put("server.key", server_key.serialize_pem(), 0o600),
            client_cert: put("client.crt", client.pem(), 0o644),
            client_key: put("client.key", client_key.serialize_pem(), 0o600),
        }
    }
}

fn new_ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

enum Ready {
    Yes,
    PortTaken,
}

/// Until the server answers on its socket, or has exited (a port taken:
/// try another), or 60 s have passed.
async fn wait_ready(child: &mut Child, socket_dir: &Path, port: u16, log: &Path) -> Ready {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if text.contains("could not bind") || text.contains("Address already in use") {
                return Ready::PortTaken;
            }
            panic!("postgres exited ({status}):\n{text}");
        }
        let attempt = tokio_postgres::Config::new()
            .host_path(socket_dir)
            .port(port)
            .user("postgres")
            .dbname(DBNAME)
            .connect_timeout(Duration::from_secs(2))
            .connect(tokio_postgres::NoTls)
            .await;
        if attempt.is_ok() {
            return Ready::Yes;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "postgres did not answer within 60 s:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `--pdeathsig` fires when the thread that forked the child ends, so the
/// fork happens on a thread that lives as long as the process.
fn spawn_from_a_lasting_thread(mut command: Command) -> Child {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(command.spawn());
        loop {
            std::thread::park();
        }
    });
    rx.recv().unwrap().expect("setpriv runs postgres")
}

/// `program`, as the `postgres` user; killed when its parent thread ends
/// if `pdeathsig`.
fn as_postgres(program: &Path, pdeathsig: bool) -> Command {
    let mut command = Command::new("setpriv");
    command.args(["--reuid=postgres", "--regid=postgres", "--init-groups"]);
    if pdeathsig {
        command.args(["--pdeathsig", "KILL"]);
    }
    command.env_remove("PGDATA");
    command.arg("--").arg(program);
    command
}

/// The newest installed PostgreSQL's binaries.
fn bin_dir() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect(
            "PostgreSQL's server binaries in /usr/lib/postgresql (scripts/test.sh installs them)",
        )
        .filter_map(|e| {
            let e = e.ok()?;
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .expect("no /usr/lib/postgresql/<version>/bin/initdb (scripts/test.sh installs it)")
        .1
}

fn id(flag: &str) -> u32 {
    let out = Command::new("id")
        .args([flag, "postgres"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "no `postgres` user (the postgresql package makes it)"
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
