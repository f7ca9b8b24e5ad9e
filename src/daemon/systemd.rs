//! The systemd notify protocol (`Type=notify`, `WatchdogSec=`), without a
//! crate: one datagram per state change to the socket named by
//! `$NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace).
//!
//! - `READY=1` once the store is open and the source is connected;
//! - `WATCHDOG=1` every `WATCHDOG_USEC / 2`, but only while the daemon's
//!   consume loop keeps turning (or it is waiting to reconnect), so a hung
//!   loop gets the service restarted;
//! - `STOPPING=1` when a shutdown starts; `RELOADING=1` during a reload.
//!
//! Outside systemd (`NOTIFY_SOCKET` unset) every call is a no-op.

use std::os::unix::net::UnixDatagram;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::monitor::now_micros;
use super::DaemonState;

/// Sends `state` (e.g. `READY=1`) to the service manager; false when there is none
/// or the datagram could not be sent (logged at debug: systemd would restart us anyway).
pub fn notify(state: &str) -> bool {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    let result = (|| -> std::io::Result<()> {
        let sock = UnixDatagram::unbound()?;
        let bytes = socket.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
        } else {
            sock.send_to(state.as_bytes(), &socket)?;
        }
        Ok(())
    })();
    match result {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!(error = %e, state, "cannot notify systemd");
            false
        }
    }
}

/// The watchdog interval systemd expects pings within, if it set one for us.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    // WATCHDOG_PID, when set, names the process meant to ping.
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Sends `READY=1` once the source is connected and the store open, then
/// pings the watchdog while the daemon's loop is alive. Runs until aborted.
pub fn spawn(state: Arc<DaemonState>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            return;
        }
        let watchdog = watchdog_interval();
        let mut ready_sent = false;
        let tick_every = watchdog
            .map(|w| (w / 2).min(Duration::from_secs(1)))
            .unwrap_or(Duration::from_millis(100));
        let mut tick = tokio::time::interval(tick_every);
        let mut last_ping = std::time::Instant::now();
        loop {
            tick.tick().await;
            let connected = state.connected.load(Ordering::Relaxed);
            if !ready_sent && connected && state.health.store_ok.load(Ordering::Relaxed) {
                ready_sent = notify("READY=1\nSTATUS=streaming");
            }
            let Some(w) = watchdog else {
                if ready_sent {
                    return;
                }
                continue;
            };
            // The consume loop stamps `loop_tick` every second while it runs;
            // while reconnecting (not connected) the loop is in a backoff sleep.
            let age = now_micros() - state.health.loop_tick.load(Ordering::Relaxed);
            let alive = !connected || age < i64::try_from(w.as_micros() / 2).unwrap_or(i64::MAX);
            if alive && last_ping.elapsed() >= w / 2 {
                notify("WATCHDOG=1");
                last_ping = std::time::Instant::now();
            }
        }
    })
}
