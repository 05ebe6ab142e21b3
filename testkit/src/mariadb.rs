//! A throwaway MariaDB for tests: one server per test process, one fresh, empty,
//! uniquely named database per test.
//!
//! [`server`] uses the server named by `BLOCKREPL_TEST_MYSQL_URL` (a URL whose user
//! may create databases) when it is set, and otherwise starts a private `mariadbd`
//! in a temporary directory (on tmpfs when there is one: InnoDB's fsyncs make
//! `mariadb-install-db` take ~15 s on a disk and ~2 s in memory). The private server
//! has real authentication: it is reached over its socket by a user with a password,
//! created through the OS user's `unix_socket` account. Its default time zone is
//! deliberately not UTC (+05:00), so that any code that forgets to work in UTC shows
//! up as a five-hour error instead of passing by luck on a UTC machine.
//!
//! Rust runs no destructors for statics, so the server cannot be stopped from
//! here. Instead it runs under a small `sh` watchdog whose standard input is a pipe
//! held open by this process: when the test process ends, however it ends, the
//! kernel closes the pipe, `cat` sees end-of-file, and the watchdog stops `mariadbd`
//! and removes the directory.
//!
//! The integration tests, the unit tests under `src/db/` and the benchmark all use
//! this one server harness.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{Nullable, Text};

/// The environment variable naming an existing server to use instead of a private one.
pub const URL_VAR: &str = "BLOCKREPL_TEST_MYSQL_URL";

/// How long a private server may take to initialise and start.
const START_DEADLINE: Duration = Duration::from_secs(60);

/// The user the harness creates on a private server.
const TEST_USER: &str = "blockrepl_test";

/// A running server and how to reach it as a user that may create databases.
pub struct MariaDb {
    /// `mysql://user:password@host[:port]` with no path and no query.
    base: String,
    /// The query string every URL carries (`unix_socket=...`, and `ssl_ca=...`
    /// for [`private_tls`]), empty for TCP.
    query: String,
    /// Keeps the watchdog's standard input open; it is closed when a server of
    /// [`private`] is dropped, or by the end of the process (see the module doc).
    _watchdog: Option<Mutex<(Child, ChildStdin)>>,
    /// The private server's pid file (none for an external server).
    pid_file: Option<PathBuf>,
}

/// One empty database on the shared server.
pub struct TestDb {
    /// `mysql://...` URL of this database, usable by `MysqlConnection::establish`.
    pub url: String,
    pub name: String,
    /// The server's URL without a database, to drop this one when done.
    admin_url: String,
}

/// The process-wide server, started on first use.
pub fn server() -> &'static MariaDb {
    static SERVER: OnceLock<MariaDb> = OnceLock::new();
    SERVER.get_or_init(|| match std::env::var(URL_VAR) {
        Ok(url) if !url.is_empty() => MariaDb::external(&url),
        _ => MariaDb::start_private("shared", false, false),
    })
}

/// A private server of the caller's own, stopped when dropped: for tests that
/// pause or kill the server, which must not hurt the tests sharing [`server`].
pub fn private(label: &str) -> MariaDb {
    MariaDb::start_private(label, false, false)
}

/// A private server, stopped when dropped, that its clients reach over TLS:
/// its user is created `REQUIRE SSL` and its URLs carry `ssl_ca=` (which makes
/// the client library negotiate TLS, and so set up OpenSSL's per-thread state
/// in every thread that connects). For tests of what TLS changes, such as the
/// order of teardown at exit.
pub fn private_tls(label: &str) -> MariaDb {
    MariaDb::start_private(label, false, true)
}

/// A private server whose commits survive a kill -9 of `mariadbd` (InnoDB's log
/// is written at every commit), for tests that kill it and start it again on
/// the same data directory and socket ([`MariaDb::kill9`], [`MariaDb::restart`]).
pub fn private_durable(label: &str) -> MariaDb {
    MariaDb::start_private(label, true, false)
}

impl MariaDb {
    fn external(url: &str) -> MariaDb {
        let (base, query) = split_url(url);
        MariaDb { base, query, _watchdog: None, pid_file: None }
    }

    fn start_private(label: &str, durable: bool, tls: bool) -> MariaDb {
        let dir = scratch_dir(label);
        let _ = std::fs::remove_dir_all(&dir); // a leftover of a crashed run with our pid
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let data = dir.join("data");
        let socket = dir.join("mysqld.sock");
        let os_user = command_output("id", &["-un"]);
        let is_root = command_output("id", &["-u"]) == "0";

        // Options that make a throwaway server small and quick; durability is irrelevant.
        let fast = [
            "--innodb-buffer-pool-size=64M",
            "--innodb-log-file-size=8M",
            // 0 keeps the last second's commits in the process only; a server
            // that is killed on purpose must keep them (1: written at commit).
            if durable { "--innodb-flush-log-at-trx-commit=1" } else { "--innodb-flush-log-at-trx-commit=0" },
            "--innodb-doublewrite=0",
        ];
        // mariadbd refuses to run as root unless told to, and only root may pass --user.
        let user_arg = is_root.then(|| format!("--user={os_user}"));

        let mut install = Command::new("mariadb-install-db");
        install
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            // Its own temporary tables: two installs at once (two test
            // processes) collided on names in /tmp.
            .arg(format!("--tmpdir={}", dir.display()))
            .arg("--skip-test-db")
            .arg("--auth-root-authentication-method=socket")
            .arg(format!("--auth-root-socket-user={os_user}"))
            .args(user_arg.iter())
            .args(fast);
        let out = install
            .output()
            .unwrap_or_else(|e| panic!("cannot run mariadb-install-db (scripts/setup installs it): {e}"));
        assert!(
            out.status.success(),
            "mariadb-install-db failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );

        let error_log = dir.join("error.log");
        let mut mariadbd: Vec<String> = vec![
            "mariadbd".into(),
            "--no-defaults".into(),
            format!("--datadir={}", data.display()),
            format!("--socket={}", socket.display()),
            format!("--pid-file={}", dir.join("mysqld.pid").display()),
            format!("--log-error={}", error_log.display()),
            format!("--tmpdir={}", dir.display()),
            "--skip-networking".into(),
            "--skip-log-bin".into(),
            "--skip-name-resolve".into(),
            "--performance-schema=OFF".into(),
            "--default-time-zone=+05:00".into(),
            "--max-connections=500".into(),
        ];
        mariadbd.extend(user_arg);
        mariadbd.extend(fast.iter().map(|s| s.to_string()));
        // TLS works over the Unix socket too, so the socket proxies of the tests serve.
        let cert = dir.join("cert.pem");
        if tls {
            let key = dir.join("key.pem");
            let out = Command::new("openssl")
                .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost"])
                .arg("-keyout")
                .arg(&key)
                .arg("-out")
                .arg(&cert)
                .output()
                .unwrap_or_else(|e| panic!("cannot run openssl (scripts/setup installs it): {e}"));
            assert!(out.status.success(), "openssl req failed: {}", String::from_utf8_lossy(&out.stderr));
            mariadbd.push(format!("--ssl-cert={}", cert.display()));
            mariadbd.push(format!("--ssl-key={}", key.display()));
        }

        // The watchdog. SIGINT/SIGHUP are ignored so that Ctrl-C on `cargo test` kills
        // the test process (closing the pipe) rather than the watchdog. `sh` gives a
        // background job /dev/null as its standard input, hence the pipe is passed on
        // as fd 3. The watchdog exits as soon as mariadbd does, so a server that fails
        // to start is noticed at once, and it then leaves the end of the server's log
        // on its standard error for the panic message; unless the file `held`
        // exists ([`MariaDb::kill9`]): then it waits for the file to go
        // ([`MariaDb::restart`]) and starts mariadbd again on the same directory.
        let script = r#"trap '' INT HUP
exec 3<&0
{ cat >/dev/null; : > "$SCRATCH/gone"; rm -f "$SCRATCH/held"; kill "$(cat "$SCRATCH/server.pid")"; } <&3 >/dev/null 2>&1 &
while :; do
  "$@" </dev/null >/dev/null 2>>"$SCRATCH/error.log" 3<&- &
  pid=$!
  echo "$pid" > "$SCRATCH/server.pid"
  wait "$pid"
  status=$?
  [ -e "$SCRATCH/held" ] || break
  while [ -e "$SCRATCH/held" ]; do sleep 0.05; done
  [ -e "$SCRATCH/gone" ] && break
done
exec 3<&-
tail -n 25 "$SCRATCH/error.log" >&2
rm -rf "$SCRATCH"
exit "$status""#;
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("sh")
            .args(&mariadbd)
            .env("SCRATCH", &dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start mariadbd: {e}"));
        let stdin = child.stdin.take().expect("piped stdin");

        let socket_str = socket.display().to_string();
        let query = format!("unix_socket={socket_str}");
        let os_url = format!("mysql://{os_user}@localhost/?{query}");
        let deadline = Instant::now() + START_DEADLINE;
        let mut conn = loop {
            if let Ok(Some(status)) = child.try_wait() {
                let mut log = String::new();
                let _ = child.stderr.take().map(|mut e| e.read_to_string(&mut log));
                panic!("mariadbd exited during start-up ({status}):\n{log}");
            }
            if socket.exists() {
                match MysqlConnection::establish(&os_url) {
                    Ok(c) => break c,
                    Err(e) if Instant::now() > deadline => {
                        panic!("mariadbd did not accept connections: {e}: {}", tail(&error_log))
                    }
                    Err(_) => {}
                }
            }
            assert!(
                Instant::now() < deadline,
                "mariadbd did not start within {START_DEADLINE:?}: {}",
                tail(&error_log)
            );
            std::thread::sleep(Duration::from_millis(20));
        };

        let password = format!("pw-{}-{}", std::process::id(), nanos());
        let require = if tls { "REQUIRE SSL" } else { "" };
        conn.batch_execute(&format!(
            "CREATE USER '{TEST_USER}'@'localhost' IDENTIFIED BY '{password}' {require};
             GRANT ALL PRIVILEGES ON *.* TO '{TEST_USER}'@'localhost';"
        ))
        .unwrap_or_else(|e| panic!("cannot create the test user: {e}"));

        let query = if tls { format!("{query}&ssl_ca={}", cert.display()) } else { query };
        MariaDb {
            base: format!("mysql://{TEST_USER}:{password}@localhost"),
            query,
            _watchdog: Some(Mutex::new((child, stdin))),
            pid_file: Some(dir.join("server.pid")),
        }
    }

    /// Kills a private server with SIGKILL (a crash) and keeps it down until
    /// [`MariaDb::restart`]. Meant for [`private_durable`] servers, which lose
    /// no commit.
    pub fn kill9(&self) {
        let held = self.scratch().join("held");
        std::fs::write(&held, b"").unwrap_or_else(|e| panic!("cannot write {}: {e}", held.display()));
        let pid = self.pid().expect("a private server");
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
        // Down once the watchdog has seen it die (it rewrites server.pid on restart).
        let end = Instant::now() + START_DEADLINE;
        while nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok() {
            assert!(Instant::now() < end, "mariadbd {pid} did not die");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts a server killed by [`MariaDb::kill9`] again on the same data
    /// directory and socket; returns once it accepts connections.
    pub fn restart(&self) {
        let _ = std::fs::remove_file(self.scratch().join("held"));
        let end = Instant::now() + START_DEADLINE;
        while MysqlConnection::establish(&self.admin_url()).is_err() {
            assert!(Instant::now() < end, "mariadbd did not come back: {}", tail(&self.scratch().join("error.log")));
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGSTOP (`true`) or SIGCONT (`false`) to a private server.
    pub fn pause(&self, stop: bool) {
        let pid = self.pid().expect("a private server");
        let sig = if stop { nix::sys::signal::Signal::SIGSTOP } else { nix::sys::signal::Signal::SIGCONT };
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).unwrap();
    }

    fn scratch(&self) -> PathBuf {
        self.pid_file.as_ref().and_then(|p| p.parent()).expect("a private server").to_path_buf()
    }

    /// The URL of database `name` on this server (which need not exist).
    pub fn url_for(&self, name: &str) -> String {
        if self.query.is_empty() {
            format!("{}/{name}", self.base)
        } else {
            format!("{}/{name}?{}", self.base, self.query)
        }
    }

    /// The private server's process id (none for an external server).
    pub fn pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.pid_file.as_ref()?).ok()?;
        text.trim().parse().ok()
    }

    /// The server's URL with no database selected.
    pub fn admin_url(&self) -> String {
        self.url_for("")
    }

    /// Creates an empty database whose name starts with `prefix` and is unique across
    /// the threads of this process and across processes sharing an external server.
    pub fn fresh_database(&self, prefix: &str) -> TestDb {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let clean: String = prefix
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' })
            .take(32)
            .collect();
        let name = format!("t_{clean}_{}_{n}", std::process::id());
        let mut conn = MysqlConnection::establish(&self.admin_url())
            .unwrap_or_else(|e| panic!("cannot connect to the test server: {e}"));
        conn.batch_execute(&format!("CREATE DATABASE `{name}` CHARACTER SET utf8mb4"))
            .unwrap_or_else(|e| panic!("cannot create database {name}: {e}"));
        TestDb { url: self.url_for(&name), name, admin_url: self.admin_url() }
    }
}

impl TestDb {
    /// A plain connection, without the session settings `db::connect` makes; this is
    /// how another program (the orchestrator) sees the database.
    pub fn connect(&self) -> MysqlConnection {
        MysqlConnection::establish(&self.url).unwrap_or_else(|e| panic!("cannot connect to {}: {e}", self.name))
    }

    /// Runs one or more `;`-separated statements.
    pub fn execute(&self, sql: &str) {
        self.connect().batch_execute(sql).unwrap_or_else(|e| panic!("{e}: in\n{sql}"));
    }

    /// The first column of every row of `sql`, which must name that column `v`.
    pub fn column(&self, sql: &str) -> Vec<Option<String>> {
        #[derive(QueryableByName)]
        struct V {
            #[diesel(sql_type = Nullable<Text>)]
            v: Option<String>,
        }
        diesel::sql_query(sql)
            .load::<V>(&mut self.connect())
            .unwrap_or_else(|e| panic!("{e}: in\n{sql}"))
            .into_iter()
            .map(|r| r.v)
            .collect()
    }

    /// The tables of this database, sorted.
    pub fn tables(&self) -> Vec<String> {
        self.column(
            "SELECT CAST(table_name AS CHAR) AS v FROM information_schema.tables
             WHERE table_schema = DATABASE() ORDER BY table_name",
        )
        .into_iter()
        .flatten()
        .collect()
    }

    /// `SHOW CREATE TABLE`, without the `AUTO_INCREMENT=n` counter, which reflects
    /// the rows inserted so far rather than the schema.
    pub fn show_create_table(&self, table: &str) -> String {
        #[derive(QueryableByName)]
        struct Show {
            #[diesel(sql_type = Text, column_name = "Create Table")]
            create: String,
        }
        let sql = format!("SHOW CREATE TABLE `{table}`");
        let rows =
            diesel::sql_query(&sql).load::<Show>(&mut self.connect()).unwrap_or_else(|e| panic!("{e}: in {sql}"));
        let create = rows.into_iter().next().map(|r| r.create).unwrap_or_else(|| panic!("no result for {sql}"));
        create.split(' ').filter(|w| !w.starts_with("AUTO_INCREMENT=")).collect::<Vec<_>>().join(" ")
    }
}

impl Drop for TestDb {
    /// Keeps a shared external server clean; a private server is removed whole anyway.
    fn drop(&mut self) {
        if let Ok(mut conn) = MysqlConnection::establish(&self.admin_url) {
            let _ = conn.batch_execute(&format!("DROP DATABASE IF EXISTS `{}`", self.name));
        }
    }
}

/// Splits `mysql://user:pw@host:port/db?query` into (`mysql://user:pw@host:port`, `query`).
fn split_url(url: &str) -> (String, String) {
    let (before_query, query) = url.split_once('?').unwrap_or((url, ""));
    let scheme_end = before_query.find("://").map_or(0, |i| i + 3);
    let base = match before_query[scheme_end..].find('/') {
        Some(i) => &before_query[..scheme_end + i],
        None => before_query,
    };
    (base.to_string(), query.to_string())
}

/// Where a private server lives: tmpfs when there is one (see the module doc).
fn scratch_dir(label: &str) -> PathBuf {
    let shm = Path::new("/dev/shm");
    let parent = if shm.is_dir() && writable(shm) { shm.to_path_buf() } else { std::env::temp_dir() };
    parent.join(format!("blockrepl-test-mariadb-{}-{label}", std::process::id()))
}

fn writable(dir: &Path) -> bool {
    let probe = dir.join(format!(".blockrepl-probe-{}", std::process::id()));
    let ok = std::fs::write(&probe, b"").is_ok();
    let _ = std::fs::remove_file(&probe);
    ok
}

fn command_output(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(out.status.success(), "{program} {args:?} failed");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn nanos() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

/// The last lines of the server's error log, for failure messages.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    format!("\n--- {} ---\n{}", path.display(), lines[lines.len().saturating_sub(20)..].join("\n"))
}

#[test]
fn split_url_keeps_credentials_host_and_query() {
    assert_eq!(
        split_url("mysql://u:p@h:3306/db?unix_socket=/s"),
        ("mysql://u:p@h:3306".to_string(), "unix_socket=/s".to_string())
    );
    assert_eq!(split_url("mysql://u@h"), ("mysql://u@h".to_string(), String::new()));
    assert_eq!(
        split_url("mysql://u@localhost/?unix_socket=/a/b"),
        ("mysql://u@localhost".to_string(), "unix_socket=/a/b".to_string())
    );
}
