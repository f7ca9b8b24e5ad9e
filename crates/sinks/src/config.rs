//! Loading the configuration: core's checks plus each target type's own.
//!
//! Core checks what every target has; the keys a `type` adds to
//! `[targets.NAME]` are checked by that type's `config` module next to its
//! sink (`http::config`, ...), called through `SinkTypes` while core walks
//! the file, so that every problem of the file is reported at once, each
//! under its dotted key. A new target type is one more module and one more
//! entry in `TYPES`.

use std::any::Any;
use std::path::Path;
use std::sync::Arc;

use steward_core::config::check::{Errors, Reader};
use steward_core::config::{
    Config, ConfigErrors, TargetConfig, TargetContext, TargetSettings, TargetTypes,
};

use crate::envelope::Envelope;
use crate::{file, http, nats, postgres};

#[cfg(test)]
mod tests;

pub(crate) const HOUR_MS: u64 = 3_600_000;

/// Reads and checks the file, with every target type's settings. Relative
/// paths inside it are resolved against the file's directory.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    Config::load(path, &SinkTypes)
}

/// Checks configuration text; `base_dir` resolves relative paths.
pub fn parse(text: &str, path: &Path, base_dir: &Path) -> Result<Config, ConfigErrors> {
    Config::parse_with(text, path, base_dir, &SinkTypes)
}

/// A target's type-specific settings, as its type's `check` left them.
#[derive(Debug)]
pub(crate) enum SinkConfig {
    Http(http::HttpTargetConfig),
    Postgres(postgres::PostgresTargetConfig),
    Nats(nats::NatsTargetConfig),
    File(file::FileTargetConfig),
}

impl TargetSettings for SinkConfig {}

impl SinkConfig {
    /// The settings [`load`] checked for `target`; `None` when the
    /// configuration was checked without them (`Config::parse`).
    pub(crate) fn of(target: &TargetConfig) -> Option<&SinkConfig> {
        let settings: &dyn Any = target.settings.as_ref();
        settings.downcast_ref()
    }
}

/// One target type: its name, the keys it adds to `[targets.NAME]` (its
/// address first) and its check.
struct SinkType {
    name: &'static str,
    keys: &'static [&'static str],
    check: fn(&TargetContext, &Reader, &mut Errors) -> Option<SinkConfig>,
}

/// Every target type, in the order messages list them.
const TYPES: &[SinkType] = &[
    SinkType {
        name: "http",
        keys: http::config::KEYS,
        check: |t, r, errs| http::config::check(t, r, errs).map(SinkConfig::Http),
    },
    SinkType {
        name: "postgres",
        keys: postgres::config::KEYS,
        check: |t, r, errs| postgres::config::check(t, r, errs).map(SinkConfig::Postgres),
    },
    SinkType {
        name: "nats",
        keys: nats::config::KEYS,
        check: |t, r, errs| nats::config::check(t, r, errs).map(SinkConfig::Nats),
    },
    SinkType {
        name: "file",
        keys: file::config::KEYS,
        check: |t, r, errs| file::config::check(t, r, errs).map(SinkConfig::File),
    },
];

const TYPE_NAMES: &[&str] = &{
    let mut names = [""; TYPES.len()];
    let mut i = 0;
    while i < TYPES.len() {
        names[i] = TYPES[i].name;
        i += 1;
    }
    names
};

/// The target types of this crate, for `Config::load`.
pub(crate) struct SinkTypes;

impl TargetTypes for SinkTypes {
    fn names(&self) -> &[&'static str] {
        TYPE_NAMES
    }

    fn keys(&self, type_name: &str) -> Option<&'static [&'static str]> {
        TYPES.iter().find(|t| t.name == type_name).map(|t| t.keys)
    }

    fn check(
        &self,
        target: &TargetContext,
        r: &Reader,
        errs: &mut Errors,
    ) -> Option<Arc<dyn TargetSettings>> {
        let sink = TYPES.iter().find(|t| t.name == target.type_name)?;
        (sink.check)(target, r, errs).map(|s| Arc::new(s) as _)
    }
}

/// The `envelope` key of the HTTP, NATS and file targets.
pub(crate) fn envelope(r: &Reader, errs: &mut Errors) -> Option<Envelope> {
    match r.string("envelope", errs) {
        None if r.has("envelope") => None,
        None | Some("cloudevents") => Some(Envelope::CloudEvents),
        Some("debezium") => Some(Envelope::Debezium),
        Some(other) => {
            errs.add(
                &r.key("envelope"),
                format!("unknown envelope `{other}`; valid: cloudevents, debezium"),
            );
            None
        }
    }
}
