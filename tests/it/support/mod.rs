//! Test support: one throwaway PostgreSQL cluster for the test binary (started on
//! first use, gone when the binary exits), a fresh database with the Odoo
//! fixture per test, configs written to a per-test directory, and the daemon
//! run in-process or as a child process.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Condvar, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use steward_core::config::Config;
use steward_devkit::cluster::{DevCluster, DevClusterOptions};
use tokio::sync::watch;

pub(crate) fn cluster() -> &'static DevCluster {
    init_logging();
    static CLUSTER: OnceLock<DevCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        DevCluster::start(DevClusterOptions::default()).expect("start the test PostgreSQL cluster")
    })
}

/// The test binary's cluster of PostgreSQL `major` (started on first use;
/// binaries fetched with npm when the major is not installed), for the
/// version matrix in `versions.rs`.
pub(crate) fn cluster_of(major: u32) -> &'static DevCluster {
    init_logging();
    static CLUSTERS: Mutex<BTreeMap<u32, &'static OnceLock<DevCluster>>> =
        Mutex::new(BTreeMap::new());
    let cell: &'static OnceLock<DevCluster> = CLUSTERS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .entry(major)
        .or_insert_with(|| Box::leak(Box::new(OnceLock::new())));
    // Started outside the map's lock: clusters of several majors start at once.
    cell.get_or_init(|| {
        DevCluster::start_major(major, DevClusterOptions::default())
            .unwrap_or_else(|e| panic!("start a PostgreSQL {major} test cluster: {e}"))
    })
}

/// Daemon logs go to the test's captured output (shown when it fails).
pub(crate) fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("STEWARD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("steward=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// A database with the Odoo fixture loaded, and a directory for its config and state.
pub(crate) struct TestDb {
    pub name: String,
    pub dir: tempfile::TempDir,
    pg: &'static DevCluster,
    _turn: Turn,
}

/// Whose turn it is on the machine. Tests whose assertions are about time
/// (a rate limit, a speed-up) run alone: in one test binary, any test
/// sharing the cores with them would be measured too. Every other test
/// holds a shared turn for as long as its database lives. A shared turn
/// waits only for a test running alone, never for one waiting to, so a
/// test that opens two databases cannot deadlock.
struct Turn {
    alone: bool,
}

static TURNS: Mutex<(usize, bool)> = Mutex::new((0, false));
static TURN_CHANGED: Condvar = Condvar::new();

impl Turn {
    fn take(alone: bool) -> Turn {
        let mut turns = TURNS.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            let (shared, someone_alone) = *turns;
            if !someone_alone && (!alone || shared == 0) {
                break;
            }
            turns = TURN_CHANGED
                .wait(turns)
                .unwrap_or_else(PoisonError::into_inner);
        }
        if alone {
            turns.1 = true;
        } else {
            turns.0 += 1;
        }
        Turn { alone }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let mut turns = TURNS.lock().unwrap_or_else(PoisonError::into_inner);
        if self.alone {
            turns.1 = false;
        } else {
            turns.0 -= 1;
        }
        TURN_CHANGED.notify_all();
    }
}

impl TestDb {
    pub(crate) fn new(test: &str) -> TestDb {
        TestDb::on(cluster(), test)
    }

    /// As [`TestDb::new`], on the cluster `pg` (another PostgreSQL major).
    pub(crate) fn on(pg: &'static DevCluster, test: &str) -> TestDb {
        TestDb::with_turn(pg, test, Turn::take(false))
    }

    /// For a test that measures time: waits until no other test holds a
    /// database, and keeps others from starting until this one is dropped.
    pub(crate) fn alone(test: &str) -> TestDb {
        TestDb::with_turn(cluster(), test, Turn::take(true))
    }

    fn with_turn(pg: &'static DevCluster, test: &str, turn: Turn) -> TestDb {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{}_{}",
            test.to_lowercase()
                .replace(|c: char| !c.is_ascii_alphanumeric(), "_"),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let name: String = name
            .chars()
            .rev()
            .take(60)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        let name = name
            .trim_start_matches(|c: char| !c.is_ascii_alphabetic())
            .to_string();
        let name = if name.is_empty() {
            format!("db_{}", N.fetch_add(1, Ordering::Relaxed))
        } else {
            name
        };
        pg.create_database(&name).expect("create the test database");
        pg.load_odoo_fixture(&name).expect("load the Odoo fixture");
        let dir = tempfile::Builder::new()
            .prefix(&format!("steward-{test}-"))
            .tempdir()
            .expect("temp dir");
        TestDb {
            name,
            dir,
            pg,
            _turn: turn,
        }
    }

    /// The cluster holding this database.
    pub(crate) fn cluster(&self) -> &'static DevCluster {
        self.pg
    }

    pub(crate) fn url(&self) -> String {
        self.pg.url(&self.name)
    }

    /// Runs SQL (several statements allowed) and returns psql's output.
    pub(crate) fn sql(&self, sql: &str) -> String {
        self.pg
            .psql(&self.name, sql)
            .unwrap_or_else(|e| panic!("SQL failed: {e}\n{sql}"))
    }

    /// One transaction of `rows` product price updates over products
    /// 100001.. (at most 1,000 of them, each updated `rows / 1000` times), so
    /// what grows with the transaction, not with the number of records, shows.
    pub(crate) fn update_prices_in_one_transaction(&self, rows: u64) {
        let keys = rows.min(1000);
        let rounds = rows / keys;
        self.sql(&format!(
            "DO $$ BEGIN FOR i IN 1..{rounds} LOOP \
             UPDATE product_template SET list_price = list_price + 1 WHERE id BETWEEN 100001 AND {last}; \
             END LOOP; END $$",
            last = 100_000 + keys
        ));
    }

    pub(crate) async fn client(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(connection);
        client
    }

    pub(crate) fn state_path(&self) -> PathBuf {
        self.dir.path().join("steward.redb")
    }

    /// The standard test configuration: Odoo entities product, partner, uom,
    /// workcenter and bom; one HTTP target per `(name, url, entities)`.
    pub(crate) fn config_text(&self, targets: &[(&str, &str, &[&str])]) -> String {
        let mut text = format!(
            r#"
[source]
url = "{url}"
slot = "steward_{db}"
publication = "steward_{db}"
status_interval_ms = 500

[state]
path = "{state}"
commit_max_delay_ms = 5

[metrics]
# Off: tests run many daemons at once and would all want 127.0.0.1:9187
# (the default). A test that scrapes sets its own port with `with_metrics`.
listen = ""

[entities.product]
table = "product_template"
fields = {{ sku = "default_code", name = "name.en_US", name_de = {{ path = "name.de_DE", fallback = "name.en_US" }}, price = "list_price", uom_id = "uom_id", active = "active" }}

[entities.partner]
table = "res_partner"
fields = {{ name = "name", vat = "vat", ref = "ref", active = "active" }}

[entities.uom]
table = "uom_uom"
fields = {{ name = "name.en_US", factor = "factor", active = "active" }}

[entities.workcenter]
table = "mrp_workcenter"
fields = {{ code = "code", name = "name", costs_hour = "costs_hour", active = "active" }}

[entities.bom]
table = "mrp_bom"
fields = {{ product_tmpl_id = "product_tmpl_id", qty = "product_qty", code = "code", active = "active" }}
"#,
            url = self.url(),
            db = self.name,
            state = self.state_path().display()
        );
        for (name, url, entities) in targets {
            let list = entities
                .iter()
                .map(|e| format!("\"{e}\""))
                .collect::<Vec<_>>()
                .join(", ");
            text.push_str(&format!(
                "\n[targets.{name}]\ntype = \"http\"\nurl = \"{url}\"\nentities = [{list}]\ninitial = \"none\"\nbatch_linger_ms = 5\nretry_initial_ms = 50\nretry_max_ms = 500\ntimeout_ms = 2000\n"
            ));
        }
        text
    }

    /// `text` (from [`TestDb::config_text`]) with the metrics listener on
    /// `127.0.0.1:port`, plus `extra` lines for the `[metrics]` table.
    pub(crate) fn with_metrics(text: &str, port: u16, extra: &str) -> String {
        let off = "listen = \"\"\n";
        assert!(text.contains(off), "not a config_text config:\n{text}");
        text.replacen(off, &format!("listen = \"127.0.0.1:{port}\"\n{extra}"), 1)
    }

    pub(crate) fn write_config(&self, text: &str) -> PathBuf {
        let path = self.dir.path().join("steward.toml");
        std::fs::write(&path, text).expect("write config");
        path
    }

    pub(crate) fn config(&self, text: &str) -> Config {
        let path = self.write_config(text);
        steward_sinks::config::load(&path).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The slot's confirmed_flush_lsn as a number, if the slot exists.
    pub(crate) fn confirmed_flush(&self) -> Option<u64> {
        let out = self.sql(&format!(
            "SELECT confirmed_flush_lsn - '0/0'::pg_lsn FROM pg_replication_slots WHERE slot_name = 'steward_{}'",
            self.name
        ));
        out.lines().find_map(|l| l.trim().parse::<u64>().ok())
    }

    pub(crate) fn current_wal(&self) -> u64 {
        let out = self.sql("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn");
        out.lines()
            .find_map(|l| l.trim().parse::<u64>().ok())
            .expect("current wal")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Free the test's slots (steward's and any other it made) so the
        // shared cluster keeps neither WAL nor slot places for finished tests.
        let _ = self.pg.psql(
            "postgres",
            &format!(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '{}' AND NOT active",
                self.name
            ),
        );
    }
}

/// The daemon running inside the test process.
pub(crate) struct InProcess {
    shutdown: watch::Sender<bool>,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl InProcess {
    pub(crate) fn start(config: Config) -> InProcess {
        let (shutdown, rx) = watch::channel(false);
        let handle = tokio::spawn(steward::daemon::run(config, rx));
        InProcess { shutdown, handle }
    }

    pub(crate) async fn stop(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(true);
        tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("daemon stops within 30 s")?
    }

    pub(crate) fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }
}

/// The steward binary as a child process (for kill -9).
pub(crate) struct Child {
    pub child: std::process::Child,
}

impl Child {
    pub(crate) fn run(config: &Path, log: &Path) -> Child {
        Child::run_with_env(config, log, &[])
    }

    /// As [`Child::run`], with extra environment variables (the daemon's
    /// tuning knobs, which an in-process daemon would share with every test).
    pub(crate) fn run_with_env(config: &Path, log: &Path, env: &[(&str, &str)]) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_steward"))
            .args(["run", "-c"])
            .arg(config)
            .env("STEWARD_LOG", "steward=debug")
            .envs(env.iter().copied())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn steward");
        Child { child }
    }

    pub(crate) fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub(crate) fn terminate(mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        self.child.wait().expect("wait")
    }
}

/// A TCP port nothing listens on right now.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Polls `condition` until it holds, panicking with `what` after `timeout`.
pub(crate) async fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `steward status --json` for `config`, run as a second process (it asks a
/// running daemon through its control socket); `Null` when it fails. Safe
/// to call from a polling closure on the test's runtime.
pub(crate) fn daemon_status(config: &Path) -> serde_json::Value {
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_steward"))
            .args(["status", "--json", "-c"])
            .arg(config)
            .env("STEWARD_LOG", "off")
            .output()
    };
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    let out = if multi_thread {
        tokio::task::block_in_place(run)
    } else {
        run()
    };
    out.ok()
        .filter(|o| o.status.success())
        .and_then(|o| serde_json::from_slice(&o.stdout).ok())
        .unwrap_or(serde_json::Value::Null)
}

/// The latest state per (entity, key) from delivered CloudEvents: highest
/// version wins, and within one version the last id. Deleted keys are absent.
pub(crate) fn final_state(
    events: &[serde_json::Value],
) -> BTreeMap<(String, String), serde_json::Value> {
    let mut latest: BTreeMap<(String, String), (u64, String, serde_json::Value)> = BTreeMap::new();
    for e in events {
        let entity = e["entity"].as_str().expect("entity").to_string();
        let key = e["subject"].as_str().expect("subject").to_string();
        let version: u64 = e["version"]
            .as_str()
            .expect("version")
            .parse()
            .expect("numeric version");
        let id = e["id"].as_str().expect("id").to_string();
        let slot =
            latest
                .entry((entity, key))
                .or_insert((0, String::new(), serde_json::Value::Null));
        if (version, &id) >= (slot.0, &slot.1) {
            *slot = (version, id, e.clone());
        }
    }
    latest
        .into_iter()
        .filter(|(_, (_, _, e))| e["op"] == "upsert")
        .map(|(k, (_, _, e))| (k, e["data"].clone()))
        .collect()
}

/// How long a `Steward` child gets for a log line or to stop.
const STEWARD_WAIT: Duration = Duration::from_secs(30);

/// The steward binary with a log file and extra environment.
pub(crate) struct Steward {
    child: std::process::Child,
    log: PathBuf,
}

impl Steward {
    pub(crate) fn start(config: &Path, log: &Path, env: &[(&str, &str)]) -> Steward {
        Steward::start_with(&[], config, log, env)
    }

    /// `steward GLOBAL_ARGS run -c CONFIG`, e.g. with `--log-format json`.
    pub(crate) fn start_with(
        global_args: &[&str],
        config: &Path,
        log: &Path,
        env: &[(&str, &str)],
    ) -> Steward {
        let file = std::fs::File::create(log).expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_steward"));
        cmd.args(global_args)
            .args(["run", "-c"])
            .arg(config)
            .env("STEWARD_LOG", "steward=debug")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log"))
            .stderr(file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Steward {
            child: cmd.spawn().expect("spawn steward"),
            log: log.to_path_buf(),
        }
    }

    pub(crate) fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, signal).expect("send a signal");
    }

    pub(crate) fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log has `n` lines containing `text`.
    pub(crate) async fn wait_log(&self, text: &str, n: usize) {
        let start = Instant::now();
        loop {
            let logs = self.logs();
            if logs.matches(text).count() >= n {
                return;
            }
            if start.elapsed() > STEWARD_WAIT {
                panic!("timed out waiting for log line {text:?} (x{n}); log:\n{logs}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL: no clean-up of any kind.
    pub(crate) fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the process is still running.
    pub(crate) fn running(&mut self) -> bool {
        self.child.try_wait().expect("wait").is_none()
    }

    /// SIGTERM and the exit status, within `STEWARD_WAIT`.
    pub(crate) async fn terminate(self) -> (std::process::ExitStatus, String) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        self.wait_exit().await
    }

    /// The exit status and the log, within `STEWARD_WAIT`.
    pub(crate) async fn wait_exit(mut self) -> (std::process::ExitStatus, String) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return (status, self.logs());
            }
            if start.elapsed() > STEWARD_WAIT {
                let _ = self.child.kill();
                panic!("steward did not stop after SIGTERM; log:\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Steward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `id → list_price` of every product as the database has it now.
pub(crate) fn db_prices(db: &TestDb) -> BTreeMap<String, String> {
    db.sql("SELECT id, list_price FROM product_template")
        .lines()
        .filter_map(|l| {
            let (id, price) = l.split_once('|')?;
            Some((id.to_string(), price.to_string()))
        })
        .collect()
}

/// `key → price` of the latest version of each product the receiver holds.
pub(crate) fn target_prices(events: &[serde_json::Value]) -> BTreeMap<String, String> {
    final_state(events)
        .into_iter()
        .filter(|((entity, _), _)| entity == "product")
        .map(|((_, key), data)| {
            let price = match &data["price"] {
                serde_json::Value::Null => String::new(),
                v => v.to_string(),
            };
            (key, price)
        })
        .collect()
}

/// Index and sequential scans of `table` so far, as the statistics of the
/// sessions that have ended count them.
pub(crate) fn table_scans(db: &TestDb, table: &str) -> u64 {
    db.sql(&format!(
        "SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0) FROM pg_stat_user_tables \
         WHERE relname = '{table}'"
    ))
    .trim()
    .parse()
    .unwrap()
}

/// [`table_scans`] once steady: a session's statistics are flushed as it
/// ends, so this waits until two readings a second apart agree.
pub(crate) async fn steady_table_scans(db: &TestDb, table: &str) -> u64 {
    let mut scans = table_scans(db, table);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let again = table_scans(db, table);
        if again == scans || Instant::now() > deadline {
            return again;
        }
        scans = again;
    }
}

/// A 24 MiB tmpfs that can be filled to make the state file's writes fail
/// (ENOSPC) and emptied again. Mounting needs root: `None` otherwise, and the
/// caller skips. Unmounted when dropped.
pub(crate) struct SmallDisk {
    pub(crate) path: PathBuf,
}

impl SmallDisk {
    pub(crate) fn mount(at: PathBuf) -> Option<SmallDisk> {
        std::fs::create_dir_all(&at).ok()?;
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=24m", "tmpfs"])
            .arg(&at)
            .status()
            .is_ok_and(|s| s.success());
        mounted.then_some(SmallDisk { path: at })
    }

    /// Fills every free byte.
    pub(crate) fn fill(&self) {
        let _ = std::process::Command::new("dd")
            .args(["if=/dev/zero", "bs=64k"])
            .arg(format!("of={}", self.filler().display()))
            .stderr(std::process::Stdio::null())
            .status();
    }

    pub(crate) fn free(&self) {
        std::fs::remove_file(self.filler()).unwrap();
    }

    fn filler(&self) -> PathBuf {
        self.path.join("filler")
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}
