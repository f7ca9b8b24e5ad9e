//! Per-target delivery policy: when to give up on an event (dead letters),
//! how fast to send (rate limits) and when to send (realtime or batch windows).

use std::time::Duration;

/// How a target's events are delivered, beyond batching and retry delays.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeliveryPolicy {
    /// Attempts of a retryable failure before its events are dead-lettered; 0: never.
    pub max_attempts: u32,
    /// Age (from commit time) of the oldest event of a failing batch after which
    /// its events are dead-lettered; `None`: never.
    pub max_age: Option<Duration>,
    /// Most requests per second; `None`: unlimited.
    pub rate_limit_requests_per_sec: Option<u32>,
    /// Most events per second; `None`: unlimited.
    pub rate_limit_events_per_sec: Option<u32>,
    /// The target's window (`mode`, `every`, `at`), for entities without their own.
    pub(crate) window: Window,
    /// Per-entity overrides of `window`, from `[targets.NAME.windows]`.
    pub(crate) entity_windows: Vec<(String, Window)>,
    /// Most batches in flight to the target at once (1..=64); batches in
    /// flight never share a key.
    pub max_in_flight: usize,
    /// `reconcile = { every | at }`: when the target is reconciled
    /// (`daemon::reconcile`), for entities without their own schedule;
    /// `None`: only on request.
    pub reconcile: Option<Window>,
    /// Per-entity schedules, from `reconcile.entities`.
    pub entity_reconcile: Vec<(String, Window)>,
    /// `reconcile.deep`: scheduled runs compare with the rows the target
    /// actually holds (PostgreSQL targets only).
    pub reconcile_deep: bool,
}

impl Default for DeliveryPolicy {
    fn default() -> Self {
        DeliveryPolicy {
            max_attempts: 0,
            max_age: None,
            rate_limit_requests_per_sec: None,
            rate_limit_events_per_sec: None,
            window: Window::Realtime,
            entity_windows: Vec::new(),
            max_in_flight: 1,
            reconcile: None,
            entity_reconcile: Vec::new(),
            reconcile_deep: false,
        }
    }
}

impl DeliveryPolicy {
    /// When `entity` is reconciled on schedule, if it is.
    pub fn reconcile_of(&self, entity: &str) -> Option<Window> {
        self.entity_reconcile
            .iter()
            .find(|(e, _)| e == entity)
            .map(|(_, w)| *w)
            .or(self.reconcile)
    }

    /// The window that applies to `entity`.
    pub fn window_of(&self, entity: &str) -> &Window {
        self.entity_windows
            .iter()
            .find(|(e, _)| e == entity)
            .map_or(&self.window, |(_, w)| w)
    }
}

/// When events are delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Window {
    /// As soon as possible (after batching).
    Realtime,
    /// Held, coalesced to the latest event per key, and delivered when the
    /// UTC clock passes a multiple of this period (counted from the Unix epoch,
    /// so restarts do not shift the schedule).
    Every(Duration),
    /// Held and coalesced like `Every`, delivered daily at this many seconds after UTC midnight.
    DailyAt(u32),
}

impl Window {
    /// The first opening strictly after `now` (Unix seconds); `None` for realtime.
    pub fn next_open_after(&self, now: i64) -> Option<i64> {
        match *self {
            Window::Realtime => None,
            Window::Every(period) => {
                let p = (period.as_secs() as i64).max(1);
                Some((now.div_euclid(p) + 1) * p)
            }
            Window::DailyAt(at) => {
                let day = 86_400;
                let candidate = now.div_euclid(day) * day + i64::from(at);
                Some(if candidate > now {
                    candidate
                } else {
                    candidate + day
                })
            }
        }
    }
}

/// Parses `30s`, `15m`, `4h`, `1d` (a positive integer and one unit).
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).ok_or_else(|| {
        format!("`{text}` has no unit; write e.g. \"30s\", \"15m\", \"4h\" or \"1d\"")
    })?;
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{text}` does not start with a number; write e.g. \"4h\""))?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "unknown unit `{unit}` in `{text}`; use s, m, h or d (e.g. \"4h\")"
            ))
        }
    };
    if n == 0 {
        return Err(format!(
            "`{text}` is zero; a window period must be positive"
        ));
    }
    n.checked_mul(secs)
        .filter(|s| *s <= 366 * 86_400)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("`{text}` is longer than a year"))
}

/// Parses `HH:MM` (UTC) into seconds after midnight.
pub(crate) fn parse_time_of_day(text: &str) -> Result<u32, String> {
    let bad = || format!("`{text}` is not a time of day; write HH:MM in UTC, e.g. \"02:00\"");
    let (h, m) = text.trim().split_once(':').ok_or_else(bad)?;
    let h: u32 = h.parse().map_err(|_| bad())?;
    let m: u32 = m.parse().map_err(|_| bad())?;
    if h > 23 || m > 59 {
        return Err(bad());
    }
    Ok(h * 3600 + m * 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_times_parse() {
        assert_eq!(parse_duration("4h"), Ok(Duration::from_secs(4 * 3600)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(2 * 86_400)));
        assert!(parse_duration("4").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("0m").is_err());
        assert!(parse_duration("3w").is_err());
        assert_eq!(parse_time_of_day("02:30"), Ok(2 * 3600 + 30 * 60));
        assert!(parse_time_of_day("24:00").is_err());
        assert!(parse_time_of_day("2").is_err());
    }

    #[test]
    fn windows_open_on_schedule() {
        let every = Window::Every(Duration::from_secs(3600));
        assert_eq!(every.next_open_after(0), Some(3600));
        assert_eq!(every.next_open_after(3599), Some(3600));
        assert_eq!(every.next_open_after(3600), Some(7200));
        let at = Window::DailyAt(2 * 3600);
        assert_eq!(at.next_open_after(0), Some(7200));
        assert_eq!(at.next_open_after(7200), Some(86_400 + 7200));
        assert_eq!(Window::Realtime.next_open_after(5), None);
    }
}
