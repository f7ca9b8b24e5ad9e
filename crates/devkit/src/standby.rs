//! A physical streaming standby of a dev cluster, for failover tests.
//!
//! The base backup is a copy of the primary's data directory taken while
//! the primary is shut down cleanly (the npm builds have no
//! `pg_basebackup`), without its replication slots, as `pg_basebackup`
//! would leave them out. The standby follows the primary through a physical
//! slot, so the primary keeps the WAL it has not received yet.

use std::fs;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::cluster::{io_err, settings_text, DevCluster, DevClusterOptions, DevError};

/// Files of a data directory the copy leaves out: the running server's own,
/// and the cluster's log.
const NOT_COPIED: [&str; 4] = [
    "postmaster.pid",
    "postmaster.opts",
    "server.log",
    "standby.signal",
];

impl DevCluster {
    /// Starts a hot standby streaming from this cluster, with the same
    /// binaries. The primary is shut down for the copy and started again
    /// on its port (its clients are disconnected). The standby gets its own
    /// port; `opts.extra_settings` apply to it (for example
    /// `sync_replication_slots`), `opts.ssl` is ignored (it inherits the
    /// primary's certificates and settings).
    ///
    /// On the standby: `primary_conninfo` names `dbname=postgres` (slot
    /// synchronisation needs a database), `primary_slot_name` is the
    /// physical slot [`DevCluster::standby_slot`] returns and
    /// `hot_standby_feedback` is on.
    pub fn start_standby(&self, opts: DevClusterOptions) -> Result<DevCluster, DevError> {
        let mut standby = DevCluster::new(self.bin_dir().to_path_buf())?;
        let slot = standby_slot_name(&standby);
        // Reserved now, so the WAL from the copy's checkpoint on stays.
        self.psql(
            "postgres",
            &format!("SELECT pg_create_physical_replication_slot('{slot}', true)"),
        )?;
        self.stop_inner()?;
        let copied = self.copy_data_dir(standby.data_dir());
        let restarted = self.restart();
        copied?;
        restarted?;

        fs::write(standby.data_dir().join("standby.signal"), "")
            .map_err(io_err("cannot write standby.signal"))?;
        standby.chown(&standby.data_dir().join("standby.signal"))?;
        let mut settings = settings_text(&opts)?;
        settings.push_str(&format!(
            "primary_conninfo = 'host=127.0.0.1 port={} user=postgres dbname=postgres application_name={slot}'\n\
             primary_slot_name = '{slot}'\n\
             hot_standby = on\n\
             hot_standby_feedback = on\n",
            self.port()
        ));
        standby.launch(&settings)?;
        Ok(standby)
    }

    /// On a standby from [`DevCluster::start_standby`]: the name of the
    /// physical slot it uses on its primary.
    pub fn standby_slot(&self) -> String {
        standby_slot_name(self)
    }

    /// Whether the server is a standby (`pg_is_in_recovery()`).
    pub fn is_in_recovery(&self) -> Result<bool, DevError> {
        Ok(self.psql("postgres", "SELECT pg_is_in_recovery()")?.trim() == "t")
    }

    /// Promotes a standby to primary and waits until it accepts writes.
    pub fn promote(&self) -> Result<(), DevError> {
        self.psql("postgres", "SELECT pg_promote(true, 60)")?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.is_in_recovery()? {
            if Instant::now() > deadline {
                return Err(DevError::Timeout {
                    what: "the standby to leave recovery".to_string(),
                    secs: 60,
                    log: self.log_path().display().to_string(),
                    log_tail: self.log_tail(30),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Waits until `standby` has replayed everything this primary has
    /// written so far.
    pub fn wait_for_standby(&self, standby: &DevCluster) -> Result<(), DevError> {
        let target = self.psql("postgres", "SELECT pg_current_wal_lsn()")?;
        let target = target.trim();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let caught_up = standby.psql(
                "postgres",
                &format!("SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn"),
            )?;
            if caught_up.trim() == "t" {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(DevError::Timeout {
                    what: format!("the standby to replay up to {target}"),
                    secs: 60,
                    log: standby.log_path().display().to_string(),
                    log_tail: standby.log_tail(30),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Copies the (stopped) data directory to `to` as the server's OS user,
    /// then empties `pg_replslot`: a base backup carries no slots.
    fn copy_data_dir(&self, to: &Path) -> Result<(), DevError> {
        let mut cmd = self.server_command("cp");
        cmd.arg("-a")
            .arg(self.data_dir())
            .arg(to)
            .stdin(Stdio::null());
        crate::cluster::run(cmd, "cp -a (copy of the primary's data directory)")?;
        for name in NOT_COPIED {
            let _ = fs::remove_file(to.join(name));
        }
        let slots = to.join("pg_replslot");
        for entry in fs::read_dir(&slots).map_err(io_err("cannot list pg_replslot"))? {
            let entry = entry.map_err(io_err("cannot list pg_replslot"))?;
            fs::remove_dir_all(entry.path())
                .map_err(io_err(format!("cannot remove {}", entry.path().display())))?;
        }
        Ok(())
    }
}

/// Unique per standby: derived from its temporary directory's name.
fn standby_slot_name(standby: &DevCluster) -> String {
    let suffix: String = standby
        .root()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    format!("standby_{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standby_follows_and_promotes() {
        follow_and_promote(
            DevCluster::start(DevClusterOptions {
                fsync: false,
                ..Default::default()
            })
            .unwrap(),
        );
    }

    /// The npm builds stream too (their walreceiver loads libpq through the links).
    #[test]
    fn standby_of_an_npm_build_follows_and_promotes() {
        follow_and_promote(
            DevCluster::start_major(
                17,
                DevClusterOptions {
                    fsync: false,
                    ..Default::default()
                },
            )
            .unwrap(),
        );
    }

    fn follow_and_promote(primary: DevCluster) {
        primary.create_database("ha").unwrap();
        primary
            .psql("ha", "CREATE TABLE t(x int); INSERT INTO t VALUES (1)")
            .unwrap();
        primary
            .psql(
                "ha",
                "SELECT pg_create_logical_replication_slot('logical_one', 'pgoutput')",
            )
            .unwrap();
        let standby = primary
            .start_standby(DevClusterOptions {
                fsync: false,
                ..Default::default()
            })
            .unwrap();
        assert_ne!(standby.port(), primary.port());
        assert!(standby.is_in_recovery().unwrap());
        assert!(!primary.is_in_recovery().unwrap());
        // The primary came back on its port and streams to the standby.
        primary.psql("ha", "INSERT INTO t VALUES (2)").unwrap();
        primary.wait_for_standby(&standby).unwrap();
        assert_eq!(standby.psql("ha", "SELECT sum(x) FROM t").unwrap(), "3\n");
        let active = primary
            .psql(
                "postgres",
                &format!(
                    "SELECT active FROM pg_replication_slots WHERE slot_name = '{}'",
                    standby.standby_slot()
                ),
            )
            .unwrap();
        assert_eq!(active.trim(), "t");
        // Like a base backup, the copy has none of the primary's slots.
        assert_eq!(
            standby
                .psql("postgres", "SELECT count(*) FROM pg_replication_slots")
                .unwrap(),
            "0\n"
        );
        primary.stop();
        standby.promote().unwrap();
        assert!(!standby.is_in_recovery().unwrap());
        standby.psql("ha", "INSERT INTO t VALUES (4)").unwrap();
        assert_eq!(standby.psql("ha", "SELECT sum(x) FROM t").unwrap(), "7\n");
        // The service address moves to the new primary.
        standby.restart_on_port(primary.port()).unwrap();
        assert_eq!(standby.port(), primary.port());
        assert_eq!(standby.psql("ha", "SELECT sum(x) FROM t").unwrap(), "7\n");
    }
}
