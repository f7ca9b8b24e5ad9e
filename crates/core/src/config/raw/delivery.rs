//! Checks the delivery-policy keys of `[targets.NAME]`: dead-letter limits,
//! rate limits and batch windows (see `config::delivery`).

use toml::Value;

use super::reader::{join, type_name, Errors, Reader};
use crate::config::delivery::{parse_duration, parse_time_of_day, DeliveryPolicy, Window};

/// The keys this module reads in `[targets.NAME]`.
pub(super) const DELIVERY_KEYS: &[&str] = &[
    "max_attempts",
    "max_age_ms",
    "rate_limit_requests_per_sec",
    "rate_limit_events_per_sec",
    "mode",
    "every",
    "at",
    "windows",
    "max_in_flight",
    "reconcile",
];
/// Keys of `reconcile = { ... }`.
const RECONCILE_KEYS: &[&str] = &["every", "at", "entities", "deep"];
/// Keys of one `[targets.NAME.windows]` entry.
pub(super) const WINDOW_KEYS: &[&str] = &["mode", "every", "at"];

const DAY_MS: u64 = 86_400_000;
/// Upper bound of `max_in_flight`: each batch in flight has its own
/// connection to the target and its events in memory.
const MAX_IN_FLIGHT: u64 = 64;
/// `max_in_flight` of a PostgreSQL target when unset: each batch is a
/// transaction whose server-side work and WAL flush take longer than
/// steward's part, so a second connection writes while the first waits,
/// and batches in flight never share a key, so neither waits on the
/// other's rows. More lanes were faster still but cost steward more memory
/// than the 64 MiB goal allows (README, Benchmarks).
const POSTGRES_MAX_IN_FLIGHT: u64 = 2;

/// Reads the policy; `entities` are the target's entities when they are
/// valid, `target_type` its declared type.
pub(super) fn check_delivery(
    r: &Reader,
    entities: Option<&[String]>,
    target_type: Option<&str>,
    errs: &mut Errors,
) -> Option<DeliveryPolicy> {
    let max_attempts = r.int(
        "max_attempts",
        0,
        0,
        1_000_000,
        "attempts, 0 = unlimited",
        errs,
    );
    let max_age = r.int(
        "max_age_ms",
        0,
        0,
        365 * DAY_MS,
        "milliseconds, 0 = unlimited",
        errs,
    );
    let rps = r.int(
        "rate_limit_requests_per_sec",
        0,
        0,
        1_000_000,
        "requests per second, 0 = unlimited",
        errs,
    );
    let eps = r.int(
        "rate_limit_events_per_sec",
        0,
        0,
        10_000_000,
        "events per second, 0 = unlimited",
        errs,
    );
    let max_in_flight = r.int(
        "max_in_flight",
        if target_type == Some("postgres") {
            POSTGRES_MAX_IN_FLIGHT
        } else {
            1
        },
        1,
        MAX_IN_FLIGHT,
        "batches in flight at once",
        errs,
    );
    let window = check_window(r, errs);

    let mut entity_windows = Some(Vec::new());
    if let Some(table) = r.table("windows", errs) {
        for (entity, value) in table {
            let key = join(&r.key("windows"), entity);
            if let Some(list) = entities {
                if !list.iter().any(|e| e == entity) {
                    errs.add(
                        &key,
                        format!(
                            "entity `{entity}` is not delivered to this target; its entities: {}",
                            list.join(", ")
                        ),
                    );
                    entity_windows = None;
                    continue;
                }
            }
            let Value::Table(t) = value else {
                errs.add(
                    &key,
                    format!(
                        "expected a table such as {{ every = \"4h\" }}, {{ at = \"02:00\" }} or \
                         {{ mode = \"realtime\" }}, found {}",
                        type_name(value)
                    ),
                );
                entity_windows = None;
                continue;
            };
            let er = Reader::new(&key, t, WINDOW_KEYS, errs);
            // An entry without `mode` but with `every`/`at` means a window.
            match (check_window(&er, errs), entity_windows.as_mut()) {
                (Some(w), Some(list)) => list.push((entity.clone(), w)),
                _ => entity_windows = None,
            }
        }
    } else if r.has("windows") {
        entity_windows = None;
    }

    let reconcile = check_reconcile(r, entities, errs);
    let nonzero = |v: u64| (v > 0).then(|| u32::try_from(v).unwrap_or(u32::MAX));
    let (reconcile, entity_reconcile, reconcile_deep) = reconcile?;
    Some(DeliveryPolicy {
        reconcile,
        entity_reconcile,
        reconcile_deep,
        max_attempts: u32::try_from(max_attempts?).ok()?,
        max_age: max_age.map(|v| (v > 0).then(|| std::time::Duration::from_millis(v)))?,
        rate_limit_requests_per_sec: nonzero(rps?),
        rate_limit_events_per_sec: nonzero(eps?),
        window: window?,
        entity_windows: entity_windows?,
        max_in_flight: usize::try_from(max_in_flight?).ok()?,
    })
}

/// `reconcile = { every = "24h" }` or `{ at = "03:00" }`, with per-entity
/// schedules in `entities = { product = { every = "6h" } }`, and whether
/// the scheduled runs are deep (`deep = true`).
#[allow(clippy::type_complexity)]
fn check_reconcile(
    r: &Reader,
    entities: Option<&[String]>,
    errs: &mut Errors,
) -> Option<(Option<Window>, Vec<(String, Window)>, bool)> {
    if !r.has("reconcile") {
        return Some((None, Vec::new(), false));
    }
    let table = r.table("reconcile", errs)?;
    let key = r.key("reconcile");
    let rr = Reader::new(&key, table, RECONCILE_KEYS, errs);
    let deep = rr.bool("deep", false, errs);
    let schedule = |reader: &Reader, errs: &mut Errors| -> Option<Option<Window>> {
        match check_window(reader, errs)? {
            Window::Realtime => Some(None),
            w => Some(Some(w)),
        }
    };
    let window = schedule(&rr, errs);
    let mut per_entity = Some(Vec::new());
    if let Some(t) = rr.table("entities", errs) {
        for (entity, value) in t {
            let ekey = join(&rr.key("entities"), entity);
            if let Some(list) = entities {
                if !list.iter().any(|e| e == entity) {
                    errs.add(
                        &ekey,
                        format!(
                            "entity `{entity}` is not delivered to this target; its entities: {}",
                            list.join(", ")
                        ),
                    );
                    per_entity = None;
                    continue;
                }
            }
            let Value::Table(et) = value else {
                errs.add(
                    &ekey,
                    format!(
                        "expected a table such as {{ every = \"24h\" }} or {{ at = \"03:00\" }}, found {}",
                        type_name(value)
                    ),
                );
                per_entity = None;
                continue;
            };
            let er = Reader::new(&ekey, et, &["every", "at"], errs);
            match (schedule(&er, errs), per_entity.as_mut()) {
                (Some(Some(w)), Some(list)) => list.push((entity.clone(), w)),
                (Some(None), Some(_)) => {
                    errs.add(&ekey, "give `every` or `at`".to_string());
                    per_entity = None;
                }
                _ => per_entity = None,
            }
        }
    }
    Some((window?, per_entity?, deep?))
}

/// `mode`, `every` and `at` of one table: realtime unless a window is given.
fn check_window(r: &Reader, errs: &mut Errors) -> Option<Window> {
    let mode = r.string("mode", errs);
    if r.has("mode") && mode.is_none() {
        return None;
    }
    let every = r.string("every", errs);
    let at = r.string("at", errs);
    if (r.has("every") && every.is_none()) || (r.has("at") && at.is_none()) {
        return None;
    }
    let window = match (every, at) {
        (Some(_), Some(_)) => {
            errs.add(
                &r.key("at"),
                "give either `every` or `at`, not both".to_string(),
            );
            return None;
        }
        (Some(e), None) => match parse_duration(e) {
            Ok(d) => Some(Window::Every(d)),
            Err(m) => {
                errs.add(&r.key("every"), m);
                return None;
            }
        },
        (None, Some(a)) => match parse_time_of_day(a) {
            Ok(s) => Some(Window::DailyAt(s)),
            Err(m) => {
                errs.add(&r.key("at"), m);
                return None;
            }
        },
        (None, None) => None,
    };
    match (mode, window) {
        (None | Some("realtime"), None) => Some(Window::Realtime),
        (None | Some("window"), Some(w)) => Some(w),
        (Some("realtime"), Some(_)) => {
            errs.add(
                &r.key("mode"),
                "is \"realtime\" but `every` or `at` is set; use mode = \"window\" or drop them",
            );
            None
        }
        (Some("window"), None) => {
            errs.add(
                &r.key("mode"),
                "is \"window\" but neither `every` (e.g. \"4h\") nor `at` (e.g. \"02:00\", UTC) is set",
            );
            None
        }
        (Some(other), _) => {
            errs.add(
                &r.key("mode"),
                format!("unknown mode `{other}`; use \"realtime\" or \"window\""),
            );
            None
        }
    }
}
