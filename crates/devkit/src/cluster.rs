//! Throwaway PostgreSQL cluster for `steward demo`, the integration tests
//! (one cluster per test binary, one database per test) and the benchmarks.
//!
//! The postmaster is not started with `pg_ctl` but under a tiny `sh`
//! supervisor whose stdin is a pipe held only by this process. Tests keep the
//! cluster in a `static OnceLock`, whose `Drop` never runs, and a test binary
//! can die by SIGKILL; in every case the kernel closes the pipe when this
//! process exits, the supervisor reads end-of-file, stops the server (fast
//! shutdown) and removes the temporary directory. The same pipe carries the
//! `stop` / `start` commands used by [`DevCluster::restart`].
//!
//! When running as root every server process runs as the `postgres` OS user,
//! because the PostgreSQL server refuses to run as root.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::unistd::{Gid, Uid};

use steward_postgres::quote_ident;

const INSTALL_HINT: &str =
    "PostgreSQL server binaries not found; install them with: apt-get install postgresql";

const ODOO_SCHEMA: &str = include_str!("../../../tests/fixtures/odoo/schema.sql");
const ODOO_SEED: &str = include_str!("../../../tests/fixtures/odoo/seed.sql");
const ODOO_NOISE: &str = include_str!("../../../tests/fixtures/odoo/noise.sql");

/// How long `start` and `restart` wait for the server to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `stop` waits for a fast shutdown.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(50);
/// Port clashes with other test binaries picking a free port at the same time
/// are possible (the port is free when chosen, not when bound): retry a few times.
const PORT_ATTEMPTS: usize = 4;

/// `$1` is the directory to remove at the end, the rest is the postmaster command.
/// `start` restarts (so it also recovers from a crashed postmaster); end-of-file
/// on stdin means the owning process is gone: stop and clean up.
/// SIGPIPE is ignored so a late write can never kill the supervisor before `rm`.
const SUPERVISOR_SCRIPT: &str = r#"root=$1
shift
trap '' PIPE
pid=
up() { "$@" </dev/null & pid=$!; }
down() {
  if [ -n "$pid" ]; then
    kill -INT "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    pid=
  fi
}
up "$@"
while read -r cmd; do
  case "$cmd" in
    stop) down ;;
    start) down; up "$@" ;;
  esac
done
down
rm -rf "$root"
"#;

/// The lines every `pg_hba.conf` of a dev cluster ends with: trust on loopback.
const DEFAULT_HBA: &str = "\
local   all          all                 trust
host    all          all   127.0.0.1/32  trust
host    all          all   ::1/128       trust
local   replication  all                 trust
host    replication  all   127.0.0.1/32  trust
host    replication  all   ::1/128       trust
";

/// Why a dev cluster could not be started or used; messages say how to fix
/// the environment where that is the cause.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    /// No PostgreSQL server binaries were found.
    #[error("{INSTALL_HINT} (or set STEWARD_PG_BINDIR to the directory holding initdb, postgres and psql); looked in: {searched}")]
    BinariesNotFound {
        /// The directories looked in.
        searched: String,
    },
    /// `STEWARD_PG_BINDIR` lacks a needed program.
    #[error("STEWARD_PG_BINDIR={dir} has no {missing}; point it at the bin directory of a PostgreSQL server installation, such as /usr/lib/postgresql/15/bin")]
    BadBinDir {
        /// The directory given.
        dir: String,
        /// The program it lacks.
        missing: String,
    },
    /// Running as root without a `postgres` user to run the server as.
    #[error("running as root, but there is no OS user `postgres` to run the PostgreSQL server as (the server refuses to run as root); install it with: apt-get install postgresql")]
    NoPostgresUser,
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// A helper program (initdb, psql, openssl, ...) failed.
    #[error("{command} failed ({status}):\n{output}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// Its output (stdout and stderr).
        output: String,
    },
    /// The server did not come up.
    #[error("PostgreSQL in {dir} did not start: {reason}\n--- tail of {log} ---\n{log_tail}")]
    Start {
        /// The data directory.
        dir: String,
        /// What went wrong.
        reason: String,
        /// Path of the server log.
        log: String,
        /// Its last lines.
        log_tail: String,
    },
    /// Waiting for the server took too long.
    #[error("timed out after {secs} s waiting for {what}\n--- tail of {log} ---\n{log_tail}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long, in seconds.
        secs: u64,
        /// Path of the server log.
        log: String,
        /// Its last lines.
        log_tail: String,
    },
    /// A value the kit refuses: a name that is empty, too long or holds NUL,
    /// a `pg_hba.conf` line with a line break, an unparsable server answer.
    #[error("invalid {what} {value:?}: {why}")]
    Invalid {
        /// What the value is.
        what: &'static str,
        /// The value.
        value: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The server refused a new `pg_hba.conf` ([`DevCluster::set_hba`]).
    #[error("pg_hba.conf rejected (kept the previous file): {0}")]
    Hba(String),
    /// The process that owns the server is gone.
    #[error(
        "the dev cluster's supervisor process is gone; the cluster was dropped or its server died"
    )]
    SupervisorGone,
}

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> DevError {
    let what = what.into();
    move |source| DevError::Io { what, source }
}

/// Options for [`DevCluster::start`].
#[derive(Clone, Debug)]
pub struct DevClusterOptions {
    /// Keep on for crash tests; off makes bulk loads faster.
    pub fsync: bool,
    /// `postgresql.conf` settings written after the defaults, so they override them
    /// (for example `("wal_level", "replica")`).
    pub extra_settings: Vec<(String, String)>,
    /// Serve TLS with a fresh certificate for `localhost` / `127.0.0.1`, signed by
    /// a throwaway CA whose certificate is at [`DevCluster::ssl_ca_path`].
    pub ssl: bool,
}

impl Default for DevClusterOptions {
    fn default() -> Self {
        DevClusterOptions {
            fsync: true,
            extra_settings: Vec::new(),
            ssl: false,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct RunAs {
    uid: Uid,
    gid: Gid,
}

#[derive(Debug)]
struct Supervisor {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
}

/// A running throwaway PostgreSQL server; see the module docs for its lifecycle.
#[derive(Debug)]
pub struct DevCluster {
    root: PathBuf,
    data_dir: PathBuf,
    bin_dir: PathBuf,
    /// `bin_dir/psql`, else the system's (the npm builds have none).
    psql: PathBuf,
    /// Changes only in [`DevCluster::restart_on_port`].
    port: AtomicU16,
    version_num: u32,
    run_as: Option<RunAs>,
    ssl_ca: Option<PathBuf>,
    supervisor: Mutex<Supervisor>,
}

impl DevCluster {
    /// Creates, configures and starts a cluster; blocks until it accepts connections.
    /// Uses the binaries [`find_bin_dir`] picks (`STEWARD_PG_BINDIR`, else the
    /// newest installed major).
    pub fn start(opts: DevClusterOptions) -> Result<DevCluster, DevError> {
        DevCluster::start_in(find_bin_dir()?, opts)
    }

    /// As [`DevCluster::start`], with PostgreSQL `major` (14 to 18) from
    /// [`crate::pgbin::postgres_bin_dir`]: installed, cached, or fetched with npm.
    pub fn start_major(major: u32, opts: DevClusterOptions) -> Result<DevCluster, DevError> {
        DevCluster::start_in(crate::pgbin::postgres_bin_dir(major)?, opts)
    }

    /// As [`DevCluster::start`], with the server programs in `bin_dir`.
    pub fn start_in(bin_dir: PathBuf, opts: DevClusterOptions) -> Result<DevCluster, DevError> {
        let settings = settings_text(&opts)?;
        let mut cluster = DevCluster::new(bin_dir)?;
        cluster.initdb()?;
        fs::write(cluster.data_dir.join("pg_hba.conf"), DEFAULT_HBA)
            .map_err(io_err("cannot write pg_hba.conf"))?;
        let mut conf = OpenOptions::new()
            .append(true)
            .open(cluster.data_dir.join("postgresql.conf"))
            .map_err(io_err("cannot open postgresql.conf"))?;
        conf.write_all(b"\n# steward dev cluster\ninclude 'steward.conf'\n")
            .map_err(io_err("cannot write postgresql.conf"))?;
        if opts.ssl {
            cluster.ssl_ca = Some(cluster.make_certificates()?);
        }
        cluster.launch(&settings)?;
        Ok(cluster)
    }

    /// A cluster value owning a fresh temporary directory, not started yet;
    /// its `Drop` removes the directory.
    pub(crate) fn new(bin_dir: PathBuf) -> Result<DevCluster, DevError> {
        let run_as = if Uid::effective().is_root() {
            let user = nix::unistd::User::from_name("postgres")
                .ok()
                .flatten()
                .ok_or(DevError::NoPostgresUser)?;
            Some(RunAs {
                uid: user.uid,
                gid: user.gid,
            })
        } else {
            None
        };
        let psql = psql_for(&bin_dir);
        let root = tempfile::Builder::new()
            .prefix("steward-pg-")
            .tempdir()
            .map_err(io_err(
                "cannot create a temporary directory for the dev cluster",
            ))?
            .keep();
        let data_dir = root.join("data");
        let cluster = DevCluster {
            root,
            data_dir,
            bin_dir,
            psql,
            port: AtomicU16::new(0),
            version_num: 0,
            run_as,
            ssl_ca: None,
            supervisor: Mutex::new(Supervisor {
                child: None,
                stdin: None,
            }),
        };
        cluster.chown(&cluster.root)?;
        Ok(cluster)
    }

    /// Picks a port, writes `steward.conf` (port, socket directory, then
    /// `settings`), starts the supervisor and waits until the server accepts
    /// connections; retries on a port another process took meanwhile.
    pub(crate) fn launch(&mut self, settings: &str) -> Result<(), DevError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.port.store(free_port()?, Ordering::Relaxed);
            let conf_path = self.data_dir.join("steward.conf");
            let text = format!(
                "port = {}\nunix_socket_directories = '{}'\n{settings}",
                self.port(),
                conf_quote(&self.data_dir.to_string_lossy())
            );
            fs::write(&conf_path, text).map_err(io_err("cannot write steward.conf"))?;
            self.chown(&conf_path)?;
            let log_from = self.log_len();
            {
                let mut sup = self.lock();
                if sup.child.is_none() {
                    self.spawn_supervisor(&mut sup)?;
                } else {
                    send(&mut sup, "start")?;
                }
            }
            match self.wait_ready(log_from) {
                Ok(()) => break,
                Err(e @ DevError::Start { .. }) if attempt < PORT_ATTEMPTS => {
                    let log = self.log_since(log_from);
                    if !(log.contains("could not bind") || log.contains("already in use")) {
                        return Err(e);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        let version = self.psql("postgres", "SHOW server_version_num")?;
        self.version_num = version.trim().parse().map_err(|_| DevError::Invalid {
            what: "server_version_num",
            value: version.trim().to_string(),
            why: "expected an integer such as 150004",
        })?;
        Ok(())
    }

    /// TCP port on 127.0.0.1 (also the Unix socket's suffix).
    pub fn port(&self) -> u16 {
        self.port.load(Ordering::Relaxed)
    }

    /// Directory of the PostgreSQL programs used (`initdb`, `psql`, ...).
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// The temporary directory holding the data directory; removed at the end.
    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server log (stdout and stderr of the postmaster).
    pub(crate) fn log_path(&self) -> PathBuf {
        self.data_dir.join("server.log")
    }

    /// The last `lines` lines of the server log, for error messages.
    pub(crate) fn log_tail(&self, lines: usize) -> String {
        let text = fs::read(self.log_path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The CA certificate clients must trust (`sslrootcert`), when started with `ssl`.
    pub fn ssl_ca_path(&self) -> Option<&Path> {
        self.ssl_ca.as_deref()
    }

    /// The server's version as in `server_version_num`, e.g. 150004.
    pub fn server_version_num(&self) -> u32 {
        self.version_num
    }

    /// The server's major version, e.g. 15.
    pub fn major(&self) -> u32 {
        self.version_num / 10_000
    }

    /// `postgres://postgres@127.0.0.1:PORT/DB` for the bootstrap superuser `postgres`.
    pub fn url(&self, db: &str) -> String {
        let mut path = String::new();
        for b in db.bytes() {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                path.push(b as char);
            } else {
                path.push_str(&format!("%{b:02X}"));
            }
        }
        format!("postgres://postgres@127.0.0.1:{}/{path}", self.port())
    }

    /// Creates database `name` (owned by `postgres`).
    pub fn create_database(&self, name: &str) -> Result<(), DevError> {
        check_identifier("database name", name)?;
        self.psql(
            "postgres",
            &format!("CREATE DATABASE {}", quote_ident(name)),
        )?;
        Ok(())
    }

    /// Runs SQL (any number of statements) in `db` as `postgres` with
    /// `psql -v ON_ERROR_STOP=1`, unaligned and without headers (`-At`), so
    /// `SELECT count(*) ...` returns `"22\n"`. Errors carry psql's stderr.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, DevError> {
        self.psql_conninfo(&self.conninfo(db, "postgres"), sql)
    }

    /// Creates schema, seed data and noise tables of the Odoo fixture in `db`.
    pub fn load_odoo_fixture(&self, db: &str) -> Result<(), DevError> {
        for sql in [ODOO_SCHEMA, ODOO_SEED, ODOO_NOISE] {
            self.psql(db, sql)?;
        }
        Ok(())
    }

    /// Fast shutdown, then start again on the same port; blocks until ready.
    pub fn restart(&self) -> Result<(), DevError> {
        self.stop_inner()?;
        let log_from = self.log_len();
        send(&mut self.lock(), "start")?;
        self.wait_ready(log_from)
    }

    /// Fast shutdown, then start again on `port` (which must be free, e.g.
    /// another stopped cluster's): a service address moving to another
    /// server, as after a failover. Blocks until ready.
    pub fn restart_on_port(&self, port: u16) -> Result<(), DevError> {
        self.stop_inner()?;
        let conf_path = self.data_dir.join("steward.conf");
        let text = fs::read_to_string(&conf_path).map_err(io_err("cannot read steward.conf"))?;
        let text: String = text
            .lines()
            .map(|line| {
                if line.starts_with("port = ") {
                    format!("port = {port}\n")
                } else {
                    format!("{line}\n")
                }
            })
            .collect();
        fs::write(&conf_path, text).map_err(io_err("cannot write steward.conf"))?;
        self.port.store(port, Ordering::Relaxed);
        let log_from = self.log_len();
        send(&mut self.lock(), "start")?;
        self.wait_ready(log_from)
    }

    /// Fast shutdown; the directory stays until the cluster is dropped or the
    /// process exits. Idempotent; `restart` starts it again.
    pub fn stop(&self) {
        if let Err(e) = self.stop_inner() {
            tracing::warn!("stopping the dev cluster in {}: {e}", self.root.display());
        }
    }

    /// Writes `pg_hba.conf` as `lines`, then the lines earlier calls added
    /// (tests sharing the cluster each add their roles' rules; the first
    /// matching line wins, so the newest rule for a role counts), then the
    /// default trust lines, and reloads the server. A file the server cannot
    /// parse is not installed.
    pub fn set_hba(&self, lines: &[&str]) -> Result<(), DevError> {
        // Read-modify-write of one file by tests running in parallel.
        static HBA: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _serial = HBA
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for line in lines {
            if line.contains(['\n', '\r', '\0']) {
                return Err(DevError::Invalid {
                    what: "pg_hba.conf line",
                    value: line.to_string(),
                    why: "pass one line per slice element",
                });
            }
        }
        let path = self.data_dir.join("pg_hba.conf");
        let previous = fs::read(&path).map_err(io_err("cannot read pg_hba.conf"))?;
        const HEADER: &str = "# set by DevCluster::set_hba\n";
        let previous_text = String::from_utf8_lossy(&previous);
        let earlier: Vec<&str> = previous_text
            .strip_prefix(HEADER)
            .and_then(|t| t.strip_suffix(DEFAULT_HBA))
            .map(|t| t.lines().filter(|l| !lines.contains(l)).collect())
            .unwrap_or_default();
        let mut text = String::from(HEADER);
        for line in lines.iter().chain(earlier.iter()) {
            text.push_str(line);
            text.push('\n');
        }
        text.push_str(DEFAULT_HBA);
        fs::write(&path, text).map_err(io_err("cannot write pg_hba.conf"))?;
        // pg_hba_file_rules parses the file on disk, so it shows errors before the reload.
        let errors = self.psql(
            "postgres",
            "SELECT 'line ' || line_number || ': ' || error FROM pg_hba_file_rules WHERE error IS NOT NULL",
        );
        match errors {
            Ok(e) if e.trim().is_empty() => {}
            other => {
                let restore = fs::write(&path, previous);
                let msg = match other {
                    Ok(e) => e.trim().to_string(),
                    Err(e) => e.to_string(),
                };
                restore.map_err(io_err("cannot restore pg_hba.conf"))?;
                return Err(DevError::Hba(msg));
            }
        }
        let log_from = self.log_len();
        self.psql("postgres", "SELECT pg_reload_conf()")?;
        // The reload is asynchronous: wait until the postmaster has logged it, so
        // the caller's next connection sees the new rules.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.log_since(log_from).contains("received SIGHUP") {
            if Instant::now() > deadline {
                return Err(self.timeout("the server to reload pg_hba.conf", 10));
            }
            std::thread::sleep(POLL);
        }
        std::thread::sleep(Duration::from_millis(100));
        Ok(())
    }

    // ---- internals ------------------------------------------------------

    fn lock(&self) -> std::sync::MutexGuard<'_, Supervisor> {
        // A panic while holding the lock leaves nothing half-done that matters here.
        self.supervisor
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn conninfo(&self, db: &str, user: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={} dbname={}",
            self.port(),
            conninfo_quote(user),
            conninfo_quote(db)
        )
    }

    fn psql_conninfo(&self, conninfo: &str, sql: &str) -> Result<String, DevError> {
        let mut cmd = self.command(&self.psql);
        cmd.args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-f",
            "-",
            "-d",
        ])
        .arg(conninfo)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(io_err("cannot run psql"))?;
        let input = child.stdin.take();
        let sql = sql.to_owned();
        // Written from a thread: psql may fill its output pipe before it has read all input.
        let writer = std::thread::spawn(move || {
            if let Some(mut stdin) = input {
                // An early exit of psql (ON_ERROR_STOP) closes the pipe; its stderr says why.
                let _ = stdin.write_all(sql.as_bytes());
            }
        });
        let out = child
            .wait_with_output()
            .map_err(io_err("cannot wait for psql"))?;
        let _ = writer.join();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(DevError::Command {
                command: format!("psql -d \"{conninfo}\""),
                status: out.status.to_string(),
                output: String::from_utf8_lossy(&out.stderr).trim_end().to_string(),
            })
        }
    }

    /// A command with none of the caller's PG* variables, which could point it
    /// at another server (PGHOST, PGPORT, PGSERVICE, ...), run from our directory.
    fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                cmd.env_remove(key);
            }
        }
        cmd.env("PGCLIENTENCODING", "UTF8")
            .env("PGCONNECT_TIMEOUT", "10")
            .current_dir(&self.root);
        cmd
    }

    /// A command that runs as the server's OS user.
    pub(crate) fn server_command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = self.command(program);
        if let Some(ids) = self.run_as {
            cmd.uid(ids.uid.as_raw()).gid(ids.gid.as_raw());
        }
        cmd
    }

    pub(crate) fn chown(&self, path: &Path) -> Result<(), DevError> {
        if let Some(ids) = self.run_as {
            nix::unistd::chown(path, Some(ids.uid), Some(ids.gid)).map_err(|e| DevError::Io {
                what: format!("cannot chown {} to postgres", path.display()),
                source: e.into(),
            })?;
        }
        Ok(())
    }

    fn initdb(&self) -> Result<(), DevError> {
        let mut cmd = self.server_command(self.bin_dir.join("initdb"));
        cmd.arg("-D")
            .arg(&self.data_dir)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .stdin(Stdio::null());
        run(cmd, "initdb")
    }

    /// A throwaway CA and a server certificate for localhost/127.0.0.1 signed by it
    /// (rustls rejects a self-signed CA certificate used as the server's own).
    fn make_certificates(&self) -> Result<PathBuf, DevError> {
        let tls = self.root.join("tls");
        fs::create_dir(&tls).map_err(io_err("cannot create the tls directory"))?;
        let cnf = tls.join("openssl.cnf");
        fs::write(
            &cnf,
            "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = steward-dev\n\
             [ca_ext]\nbasicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\n\
             subjectKeyIdentifier = hash\n\
             [leaf_ext]\nbasicConstraints = critical,CA:FALSE\n\
             keyUsage = critical,digitalSignature,keyEncipherment\nextendedKeyUsage = serverAuth\n\
             subjectAltName = DNS:localhost,IP:127.0.0.1\n\
             subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n",
        )
        .map_err(io_err("cannot write openssl.cnf"))?;
        let ca_key = tls.join("ca.key");
        let ca_crt = tls.join("ca.crt");
        let csr = tls.join("server.csr");
        let key = self.data_dir.join("server.key");
        let crt = self.data_dir.join("server.crt");
        let ec = "ec_paramgen_curve:prime256v1";
        let openssl = |args: &[&dyn AsRef<OsStr>]| -> Result<(), DevError> {
            let mut cmd = self.command("openssl");
            cmd.args(args.iter().map(std::convert::AsRef::as_ref))
                .stdin(Stdio::null());
            run(cmd, "openssl (install it with: apt-get install openssl)")
        };
        openssl(&[
            &"req",
            &"-x509",
            &"-config",
            &cnf,
            &"-extensions",
            &"ca_ext",
            &"-newkey",
            &"ec",
            &"-pkeyopt",
            &ec,
            &"-nodes",
            &"-days",
            &"7",
            &"-subj",
            &"/CN=steward dev CA",
            &"-keyout",
            &ca_key,
            &"-out",
            &ca_crt,
        ])?;
        openssl(&[
            &"req",
            &"-new",
            &"-config",
            &cnf,
            &"-newkey",
            &"ec",
            &"-pkeyopt",
            &ec,
            &"-nodes",
            &"-subj",
            &"/CN=localhost",
            &"-keyout",
            &key,
            &"-out",
            &csr,
        ])?;
        openssl(&[
            &"x509",
            &"-req",
            &"-in",
            &csr,
            &"-CA",
            &ca_crt,
            &"-CAkey",
            &ca_key,
            &"-set_serial",
            &"2",
            &"-days",
            &"7",
            &"-extfile",
            &cnf,
            &"-extensions",
            &"leaf_ext",
            &"-out",
            &crt,
        ])?;
        // The server refuses a key file that others can read.
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600))
            .map_err(io_err("cannot chmod server.key"))?;
        for path in [&tls, &key, &crt, &ca_crt] {
            self.chown(path)?;
        }
        let mut conf = OpenOptions::new()
            .append(true)
            .open(self.data_dir.join("postgresql.conf"))
            .map_err(io_err("cannot open postgresql.conf"))?;
        conf.write_all(b"ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n")
            .map_err(io_err("cannot write postgresql.conf"))?;
        Ok(ca_crt)
    }

    fn spawn_supervisor(&self, sup: &mut Supervisor) -> Result<(), DevError> {
        let log_path = self.log_path();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io_err("cannot create the server log"))?;
        self.chown(&log_path)?;
        let log2 = log
            .try_clone()
            .map_err(io_err("cannot duplicate the server log handle"))?;
        let mut cmd = self.server_command("/bin/sh");
        cmd.arg("-c")
            .arg(SUPERVISOR_SCRIPT)
            .arg("steward-pg-supervisor")
            .arg(&self.root)
            .arg(self.bin_dir.join("postgres"))
            .arg("-D")
            .arg(&self.data_dir)
            .stdin(Stdio::piped())
            .stdout(log)
            .stderr(log2)
            // Its own process group: a Ctrl-C meant for the test run must not kill
            // the supervisor before it can clean up (it gets end-of-file instead).
            .process_group(0);
        let mut child = cmd
            .spawn()
            .map_err(io_err("cannot start the dev cluster supervisor (/bin/sh)"))?;
        sup.stdin = child.stdin.take();
        sup.child = Some(child);
        Ok(())
    }

    fn wait_ready(&self, log_from: u64) -> Result<(), DevError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let pid_file = self.data_dir.join("postmaster.pid");
        loop {
            if self.psql("postgres", "SELECT 1").is_ok() {
                return Ok(());
            }
            if let Some(child) = self.lock().child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(self.start_error(format!("the supervisor exited ({status})")));
                }
            }
            // The postmaster keeps postmaster.pid while it runs; without it, a
            // fatal message since the start means it gave up.
            let log = self.log_since(log_from);
            if !pid_file.exists() && (log.contains("FATAL") || log.contains("PANIC")) {
                return Err(self.start_error("the server exited".to_string()));
            }
            if Instant::now() > deadline {
                return Err(self.timeout(
                    &format!("PostgreSQL on port {} to accept connections", self.port()),
                    READY_TIMEOUT.as_secs(),
                ));
            }
            std::thread::sleep(POLL);
        }
    }

    pub(crate) fn stop_inner(&self) -> Result<(), DevError> {
        {
            let mut sup = self.lock();
            if sup.stdin.is_none() {
                return Ok(());
            }
            send(&mut sup, "stop")?;
        }
        let pid_file = self.data_dir.join("postmaster.pid");
        let deadline = Instant::now() + STOP_TIMEOUT;
        while pid_file.exists() {
            if Instant::now() > deadline {
                return Err(self.timeout("PostgreSQL to shut down", STOP_TIMEOUT.as_secs()));
            }
            std::thread::sleep(POLL);
        }
        Ok(())
    }

    fn log_len(&self) -> u64 {
        fs::metadata(self.log_path()).map(|m| m.len()).unwrap_or(0)
    }

    fn log_since(&self, offset: u64) -> String {
        let mut text = Vec::new();
        if let Ok(mut file) = File::open(self.log_path()) {
            if file.seek(SeekFrom::Start(offset)).is_ok() {
                let _ = file.read_to_end(&mut text);
            }
        }
        String::from_utf8_lossy(&text).into_owned()
    }

    fn start_error(&self, reason: String) -> DevError {
        DevError::Start {
            dir: self.data_dir.display().to_string(),
            reason,
            log: self.log_path().display().to_string(),
            log_tail: self.log_tail(30),
        }
    }

    fn timeout(&self, what: &str, secs: u64) -> DevError {
        DevError::Timeout {
            what: what.to_string(),
            secs,
            log: self.log_path().display().to_string(),
            log_tail: self.log_tail(30),
        }
    }
}

impl Drop for DevCluster {
    fn drop(&mut self) {
        let sup = self
            .supervisor
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // End-of-file makes the supervisor stop the server and remove the directory.
        drop(sup.stdin.take());
        if let Some(mut child) = sup.child.take() {
            let deadline = Instant::now() + STOP_TIMEOUT;
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(POLL);
            }
        }
        // Covers a failed start (no supervisor yet) and a supervisor that hung.
        if self.root.exists() {
            let _ = fs::remove_dir_all(&self.root);
        }
    }
}

fn send(sup: &mut Supervisor, cmd: &str) -> Result<(), DevError> {
    let stdin = sup.stdin.as_mut().ok_or(DevError::SupervisorGone)?;
    stdin
        .write_all(format!("{cmd}\n").as_bytes())
        .and_then(|_| stdin.flush())
        .map_err(|_| DevError::SupervisorGone)
}

pub(crate) fn run(mut cmd: Command, name: &str) -> Result<(), DevError> {
    let out = cmd.output().map_err(io_err(format!("cannot run {name}")))?;
    if out.status.success() {
        return Ok(());
    }
    let mut output = String::from_utf8_lossy(&out.stderr).into_owned();
    output.push_str(&String::from_utf8_lossy(&out.stdout));
    Err(DevError::Command {
        command: name.to_string(),
        status: out.status.to_string(),
        output: output.trim_end().to_string(),
    })
}

pub(crate) fn settings_text(opts: &DevClusterOptions) -> Result<String, DevError> {
    let mut settings: Vec<(String, String)> = [
        ("listen_addresses", "127.0.0.1"),
        ("wal_level", "logical"),
        ("max_replication_slots", "20"),
        ("max_wal_senders", "20"),
        ("wal_sender_timeout", "60s"),
        ("shared_buffers", "32MB"),
        ("max_connections", "100"),
        ("fsync", if opts.fsync { "on" } else { "off" }),
        ("timezone", "UTC"),
        ("log_line_prefix", "%m [%p] %q%u@%d "),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for (key, value) in &opts.extra_settings {
        if key.is_empty()
            || !key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
        {
            return Err(DevError::Invalid {
                what: "setting name",
                value: key.clone(),
                why: "use a PostgreSQL parameter name such as wal_level",
            });
        }
        if value.contains(['\n', '\r', '\0']) {
            return Err(DevError::Invalid {
                what: "setting value",
                value: value.clone(),
                why: "values must be on one line",
            });
        }
        settings.push((key.clone(), value.clone()));
    }
    Ok(settings
        .iter()
        .map(|(k, v)| format!("{k} = '{}'\n", conf_quote(v)))
        .collect())
}

/// Server binaries: STEWARD_PG_BINDIR, else PostgreSQL STEWARD_PG_MAJOR (see
/// [`crate::pgbin::postgres_bin_dir`]), else the newest
/// /usr/lib/postgresql/*/bin, else `pg_config --bindir`.
pub fn find_bin_dir() -> Result<PathBuf, DevError> {
    let bindir = std::env::var_os("STEWARD_PG_BINDIR").filter(|d| !d.is_empty());
    if bindir.is_none() {
        if let Some(major) = std::env::var_os("STEWARD_PG_MAJOR").filter(|m| !m.is_empty()) {
            let text = major.to_string_lossy();
            let major = text.trim().parse().map_err(|_| DevError::Invalid {
                what: "STEWARD_PG_MAJOR",
                value: text.to_string(),
                why: "expected a PostgreSQL major version such as 17",
            })?;
            return crate::pgbin::postgres_bin_dir(major);
        }
    }
    find_bin_dir_in(bindir, Path::new("/usr/lib/postgresql"), pg_config)
}

fn pg_config() -> Option<PathBuf> {
    {
        Command::new("pg_config")
            .arg("--bindir")
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
    }
}

/// What an installation found by searching must hold.
const NEEDED_BINARIES: [&str; 3] = ["initdb", "postgres", "psql"];
/// What STEWARD_PG_BINDIR must hold: psql may come from elsewhere ([`psql_for`]).
const SERVER_BINARIES: [&str; 2] = ["initdb", "postgres"];

fn find_bin_dir_in(
    env: Option<OsString>,
    versions_root: &Path,
    pg_config: impl FnOnce() -> Option<PathBuf>,
) -> Result<PathBuf, DevError> {
    let complete = |dir: &Path| NEEDED_BINARIES.iter().all(|b| dir.join(b).is_file());
    if let Some(dir) = env.filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        if let Some(missing) = SERVER_BINARIES.iter().find(|b| !dir.join(b).is_file()) {
            return Err(DevError::BadBinDir {
                dir: dir.display().to_string(),
                missing: missing.to_string(),
            });
        }
        return Ok(dir);
    }
    let mut versions: Vec<(Vec<u32>, PathBuf)> = fs::read_dir(versions_root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let version: Option<Vec<u32>> = name.split('.').map(|p| p.parse().ok()).collect();
            Some((version?, entry.path().join("bin")))
        })
        .filter(|(_, bin)| complete(bin))
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    if let Some(bin) = pg_config().filter(|b| complete(b)) {
        return Ok(bin);
    }
    Err(DevError::BinariesNotFound {
        searched: format!(
            "STEWARD_PG_BINDIR (unset), {}/*/bin, pg_config --bindir",
            versions_root.display()
        ),
    })
}

/// `psql` of `bin_dir`, else of the default installation, else from PATH:
/// any psql of 10 or later talks to every server steward supports.
fn psql_for(bin_dir: &Path) -> PathBuf {
    let own = bin_dir.join("psql");
    if own.is_file() {
        return own;
    }
    find_bin_dir_in(None, Path::new("/usr/lib/postgresql"), pg_config)
        .map(|dir| dir.join("psql"))
        .unwrap_or_else(|_| PathBuf::from("psql"))
}

fn free_port() -> Result<u16, DevError> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .map_err(io_err("cannot find a free TCP port on 127.0.0.1"))?;
    let port = listener
        .local_addr()
        .map_err(io_err("cannot find a free TCP port on 127.0.0.1"))?
        .port();
    Ok(port)
}

fn check_identifier(what: &'static str, name: &str) -> Result<(), DevError> {
    if name.is_empty() || name.len() > 63 || name.contains('\0') {
        return Err(DevError::Invalid {
            what,
            value: name.to_string(),
            why: "must be 1 to 63 bytes without NUL",
        });
    }
    Ok(())
}

fn conf_quote(value: &str) -> String {
    value.replace('\\', "\\\\").replace('\'', "''")
}

fn conninfo_quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::OnceLock;

    fn cluster() -> &'static DevCluster {
        static CLUSTER: OnceLock<DevCluster> = OnceLock::new();
        CLUSTER.get_or_init(|| {
            DevCluster::start(DevClusterOptions {
                fsync: false,
                ..Default::default()
            })
            .expect("dev cluster starts")
        })
    }

    fn fresh_db() -> String {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!("cluster_t{}", N.fetch_add(1, Ordering::SeqCst));
        cluster().create_database(&name).expect("create database");
        name
    }

    async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        Ok(client)
    }

    #[tokio::test]
    async fn starts_with_logical_wal_and_url_connects() {
        let c = cluster();
        assert!(c.server_version_num() >= 100_000);
        assert!(c.port() > 0);
        assert!(c.bin_dir().join("postgres").is_file());
        let db = fresh_db();
        let client = connect(&c.url(&db)).await.expect("connect");
        let row = client
            .query_one(
                "SELECT current_setting('wal_level'), current_database(), current_user",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "logical");
        assert_eq!(row.get::<_, String>(1), db);
        assert_eq!(row.get::<_, String>(2), "postgres");
        assert!(c.log_path().is_file());
    }

    #[test]
    fn fixture_loads_with_noise_tables() {
        let c = cluster();
        let db = fresh_db();
        c.load_odoo_fixture(&db).expect("fixture loads");
        let out = c
            .psql(
                &db,
                "SELECT count(*) FROM product_template; SELECT count(*) FROM stock_move",
            )
            .unwrap();
        assert_eq!(out, "22\n5\n");
        let enc = c.psql(&db, "SHOW server_encoding").unwrap();
        assert_eq!(enc.trim(), "UTF8");
    }

    #[test]
    fn psql_errors_carry_the_server_message() {
        let c = cluster();
        let db = fresh_db();
        let err = c
            .psql(&db, "SELECT 1; SELECT * FROM no_such_table; SELECT 2")
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("no_such_table"), "{msg}");
        let err = c.create_database("").unwrap_err();
        assert!(err.to_string().contains("database name"), "{err}");
    }

    #[test]
    fn quotes_odd_database_names() {
        let c = cluster();
        let name = "odd \"name\" 'x'=y";
        c.create_database(name).unwrap();
        assert_eq!(
            c.psql(name, "SELECT current_database()").unwrap().trim(),
            name
        );
        assert!(c.url(name).ends_with("/odd%20%22name%22%20%27x%27%3Dy"));
    }

    #[tokio::test]
    async fn set_hba_rejects_a_role_and_refuses_bad_files() {
        let c = cluster();
        let db = fresh_db();
        c.psql(&db, "CREATE ROLE hba_blocked LOGIN").unwrap();
        c.set_hba(&["host all hba_blocked 127.0.0.1/32 reject"])
            .unwrap();
        let url = format!("postgres://hba_blocked@127.0.0.1:{}/{db}", c.port());
        let err = connect(&url).await.expect_err("rejected");
        let msg = err.as_db_error().map(|e| e.message().to_string());
        assert!(msg.unwrap_or_default().contains("pg_hba.conf"), "{err:?}");
        connect(&c.url(&db)).await.expect("postgres still trusted");
        let err = c.set_hba(&["host all all nonsense"]).unwrap_err();
        assert!(matches!(err, DevError::Hba(_)), "{err}");
        assert!(c.set_hba(&["a\nb"]).is_err());
        // The bad file was not installed: the reject line is still in force.
        assert!(connect(&url).await.is_err());
    }

    #[test]
    fn restart_keeps_port_and_data_and_stop_is_idempotent() {
        let c = DevCluster::start(DevClusterOptions {
            fsync: false,
            extra_settings: vec![("max_connections".into(), "20".into())],
            ssl: false,
        })
        .unwrap();
        let port = c.port();
        c.create_database("keep").unwrap();
        c.psql("keep", "CREATE TABLE t(x int); INSERT INTO t VALUES (7)")
            .unwrap();
        c.restart().unwrap();
        assert_eq!(c.port(), port);
        assert_eq!(c.psql("keep", "SELECT x FROM t").unwrap(), "7\n");
        assert_eq!(c.psql("keep", "SHOW max_connections").unwrap().trim(), "20");
        c.stop();
        c.stop();
        assert!(c.psql("keep", "SELECT 1").is_err());
        c.restart().unwrap();
        assert_eq!(c.psql("keep", "SELECT x FROM t").unwrap(), "7\n");
        let root = c.root.clone();
        drop(c);
        assert!(!root.exists(), "drop removes {}", root.display());
    }

    #[test]
    fn serves_tls_with_a_verifiable_certificate() {
        let c = DevCluster::start(DevClusterOptions {
            fsync: false,
            ssl: true,
            ..Default::default()
        })
        .unwrap();
        let ca = c.ssl_ca_path().expect("ca path").to_path_buf();
        let conninfo = format!(
            "host=localhost port={} user=postgres dbname=postgres sslmode=verify-full sslrootcert={}",
            c.port(),
            ca.display()
        );
        let out = c
            .psql_conninfo(
                &conninfo,
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            )
            .unwrap();
        assert_eq!(out.trim(), "t");
    }

    #[test]
    fn failed_start_reports_the_log() {
        let err = DevCluster::start(DevClusterOptions {
            fsync: false,
            extra_settings: vec![("shared_buffers".into(), "not-a-size".into())],
            ssl: false,
        })
        .expect_err("bad setting fails");
        let msg = err.to_string();
        assert!(msg.contains("did not start"), "{msg}");
        assert!(msg.contains("shared_buffers"), "{msg}");
        assert!(DevCluster::start(DevClusterOptions {
            extra_settings: vec![("bad name".into(), "1".into())],
            ..Default::default()
        })
        .is_err());
    }

    #[test]
    fn bin_dir_lookup() {
        let empty = tempfile::tempdir().unwrap();
        let err = find_bin_dir_in(None, empty.path(), || None).unwrap_err();
        assert!(err.to_string().starts_with(INSTALL_HINT), "{err}");
        let err = find_bin_dir_in(Some(empty.path().into()), empty.path(), || None).unwrap_err();
        assert!(err.to_string().contains("STEWARD_PG_BINDIR"), "{err}");
        // The newest complete version wins; an incomplete one is skipped.
        for (version, complete) in [("9.6", true), ("14", true), ("16", false)] {
            let bin = empty.path().join(version).join("bin");
            fs::create_dir_all(&bin).unwrap();
            let names: &[&str] = if complete {
                &NEEDED_BINARIES
            } else {
                &["psql"]
            };
            for name in names {
                fs::write(bin.join(name), "").unwrap();
            }
        }
        let found = find_bin_dir_in(None, empty.path(), || None).unwrap();
        assert_eq!(found, empty.path().join("14").join("bin"));
        let env = empty.path().join("9.6").join("bin");
        let found = find_bin_dir_in(Some(env.clone().into()), empty.path(), || None).unwrap();
        assert_eq!(found, env);
    }

    /// Run by `cleanup_after_sigkill` in a child process: starts a cluster,
    /// prints its directory and waits to be killed.
    #[test]
    #[ignore = "helper for cleanup_after_sigkill"]
    fn exit_helper() {
        if std::env::var_os("STEWARD_CLUSTER_EXIT_HELPER").is_none() {
            return;
        }
        let c = DevCluster::start(DevClusterOptions {
            fsync: false,
            ..Default::default()
        })
        .unwrap();
        println!("STEWARD_TEST_ROOT={}", c.root.display());
        std::mem::forget(c);
        std::thread::sleep(Duration::from_secs(120));
    }

    #[test]
    fn cleanup_after_sigkill() {
        use std::io::BufRead;
        let exe = std::env::current_exe().unwrap();
        let mut child = Command::new(exe)
            .args([
                "--exact",
                "cluster::tests::exit_helper",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("STEWARD_CLUSTER_EXIT_HELPER", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut root = None;
        for line in io::BufReader::new(stdout).lines() {
            let line = line.unwrap();
            // The harness prints "test ... " on the same line first.
            if let Some((_, dir)) = line.split_once("STEWARD_TEST_ROOT=") {
                root = Some(PathBuf::from(dir.trim()));
                break;
            }
        }
        let root = root.expect("helper printed its directory");
        assert!(root.join("data").join("postmaster.pid").exists());
        let pid_text = fs::read_to_string(root.join("data").join("postmaster.pid")).unwrap();
        let pid: i32 = pid_text.lines().next().unwrap().trim().parse().unwrap();
        child.kill().unwrap(); // SIGKILL: no destructor, no atexit
        child.wait().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while root.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(!root.exists(), "{} still exists", root.display());
        let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
        assert!(!alive, "postmaster {pid} still running");
    }
}
