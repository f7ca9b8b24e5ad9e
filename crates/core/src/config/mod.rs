//! Configuration: one TOML file, parsed loosely in `raw`, then checked into
//! the typed [`Config`] below. Every problem is reported at once, each naming
//! the dotted key, what is wrong and what would be valid. The keys a target's
//! type adds are checked by that type (see [`TargetTypes`]), which lives with
//! its sink in the sinks crate.

mod delivery;
pub(crate) mod governance;
mod raw;
mod target_types;

pub use delivery::{DeliveryPolicy, Window};
pub use governance::{EntityGovernance, GovernanceConfig};
pub use steward_postgres::{
    Secret, SecretOrigin, SourceConfig, SourceHost, SslMode, TargetSessionAttrs,
};
pub use target_types::{TargetContext, TargetSettings, TargetTypes, Unchecked};

/// Reading TOML tables while collecting every problem: the building blocks of
/// core's own sections, for the target types' checks (see [`TargetTypes`]).
pub mod check {
    pub use super::raw::pgurl::{parse_pg_url, PgUrl};
    pub use super::raw::reader::{check_sql_ident, join, type_name, Errors, Reader};
    pub use super::raw::{
        check_sslrootcert, existing_file, optional_secret, resolve, secret_from_env,
        secret_from_file,
    };
}

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// A checked configuration. Built only by [`Config::load`], [`Config::parse_with`] and
/// [`Config::parse`].
#[derive(Clone, Debug)]
pub struct Config {
    /// `[source]`: the Odoo database, its replication slot and publication.
    pub source: SourceConfig,
    /// `[state]`: where and how steward keeps its state.
    pub state: StateConfig,
    /// In the order they appear in the file, then the hidden entities
    /// governance adds (child tables, `ir_model_data`; see
    /// [`EntityGovernance::is_hidden`]).
    pub entities: Vec<EntityConfig>,
    /// In the order they appear in the file.
    pub targets: Vec<TargetConfig>,
    /// `[metrics]`: the Prometheus and health listener.
    pub metrics: MetricsConfig,
    /// `[daemon]`: process-wide settings.
    pub daemon: DaemonConfig,
    /// `[control]`: the control API's Unix socket.
    pub control: ControlConfig,
    /// `[console]`: who may use the stewardship console.
    pub console: ConsoleConfig,
    /// Lifecycle gates, rules, business keys, references, policies (see `governance`).
    pub governance: governance::GovernanceConfig,
}

/// The position of an entity in [`Config::entities`]. Vectors built
/// parallel to it (per-entity governance, targets, ranks) are indexed by it
/// too: `Vec<T>` implements `Index<EntityIndex>`. Serialized as the bare
/// number (large transactions stage it on disk).
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct EntityIndex(pub usize);

/// The position of a target in [`Config::targets`]; `Vec<T>` implements
/// `Index<TargetIndex>` for the vectors built parallel to it.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct TargetIndex(pub usize);

/// The bare number, as `usize` prints: `config_fingerprint` digests the
/// `Debug` text of the governance settings (a child's entity among them),
/// and a different text would re-evaluate every record of the entity.
impl std::fmt::Debug for EntityIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.0, f)
    }
}

impl std::fmt::Debug for TargetIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.0, f)
    }
}

impl EntityIndex {
    /// The elements of a vector built parallel to [`Config::entities`], with their index.
    pub(crate) fn enumerate<T>(items: &[T]) -> impl Iterator<Item = (EntityIndex, &T)> {
        items.iter().enumerate().map(|(i, x)| (EntityIndex(i), x))
    }
}

impl TargetIndex {
    /// The elements of a vector built parallel to [`Config::targets`], with their index.
    pub(crate) fn enumerate<T>(items: &[T]) -> impl Iterator<Item = (TargetIndex, &T)> {
        items.iter().enumerate().map(|(i, x)| (TargetIndex(i), x))
    }
}

impl<T> std::ops::Index<EntityIndex> for Vec<T> {
    type Output = T;
    fn index(&self, entity: EntityIndex) -> &T {
        &self[entity.0]
    }
}

impl<T> std::ops::IndexMut<EntityIndex> for Vec<T> {
    fn index_mut(&mut self, entity: EntityIndex) -> &mut T {
        &mut self[entity.0]
    }
}

impl<T> std::ops::Index<TargetIndex> for Vec<T> {
    type Output = T;
    fn index(&self, target: TargetIndex) -> &T {
        &self[target.0]
    }
}

impl<T> std::ops::IndexMut<TargetIndex> for Vec<T> {
    fn index_mut(&mut self, target: TargetIndex) -> &mut T {
        &mut self[target.0]
    }
}

/// `[state]`: the state file and how received changes are grouped into its commits.
#[derive(Clone, Debug)]
pub struct StateConfig {
    /// The redb file holding checkpoints, outboxes, dead letters and audit.
    pub path: PathBuf,
    /// Most events gathered into one durable redb commit.
    pub commit_max_events: usize,
    /// Longest a received transaction waits to be grouped with later ones
    /// while more keep arriving; a quiet stream commits at once.
    pub commit_max_delay: Duration,
}

/// Where an entity field's value comes from: a column, or a path into a json/jsonb column.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldSource {
    /// The source table's column.
    pub column: String,
    /// Keys to follow inside the column's JSON value; empty for a plain column.
    pub(crate) path: Vec<String>,
}

/// One field of an entity's document (`entities.NAME.fields`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldConfig {
    /// The field's name in the delivered document.
    pub name: String,
    /// Where the value comes from.
    pub source: FieldSource,
    /// Used when `source` is null or missing (e.g. a translation's fallback language).
    pub fallback: Option<FieldSource>,
}

/// `[entities.NAME]`: a kind of record (product, partner, ...) read from one
/// source table and delivered as documents.
#[derive(Clone, Debug)]
pub struct EntityConfig {
    /// `NAME`: lowercase letters, digits and `_`, starting with a letter, at most 63 bytes.
    pub name: String,
    /// The source table's schema (`public` unless `table` names one).
    pub schema: String,
    /// The source table's name, without the schema.
    pub table: String,
    /// Key columns, in order. Default: `["id"]`.
    pub key: Vec<String>,
    /// In the order they appear in the file.
    pub fields: Vec<FieldConfig>,
}

impl EntityConfig {
    /// `schema.table`, unquoted: for messages and lookups, not for SQL.
    pub fn qualified_table(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }
}

/// `[targets.NAME]`: a system steward delivers events to, and how.
#[derive(Clone, Debug)]
pub struct TargetConfig {
    /// `NAME`: lowercase letters, digits, `_` and `-`, starting with a letter, at most 63 bytes.
    pub name: String,
    /// Names of the entities this target receives.
    pub entities: Vec<String>,
    /// Most events sent in one delivery (1 to 10 000, default 500).
    pub batch_max_events: usize,
    /// How long a batch smaller than `batch_max_events` waits for more
    /// events on a free lane while another batch is in flight (with
    /// nothing in flight it goes at once); zero sends at once always.
    pub batch_linger: Duration,
    /// First retry delay; doubles per failure up to `retry_max`, with jitter.
    pub retry_initial: Duration,
    /// Longest delay between two attempts; at least `retry_initial`.
    pub retry_max: Duration,
    /// Dead letters, rate limits and batch windows.
    pub delivery: DeliveryPolicy,
    /// What a target gets when steward first sees it (see `source::snapshot`).
    pub initial: InitialSync,
    /// `type = "..."`: which sink delivers to this target.
    pub type_name: String,
    /// The keys the type adds, as its [`TargetTypes`] checked them.
    pub settings: Arc<dyn TargetSettings>,
}

/// `targets.NAME.initial`: whether a new target first receives every
/// configured row (a consistent snapshot) or only changes from now on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum InitialSync {
    /// Every configured row first, then changes (the default).
    #[default]
    Snapshot,
    /// Only changes made after the target was added.
    None,
}

/// `[metrics]`: the listener serving `/metrics`, `/healthz` and `/readyz`.
#[derive(Clone, Debug)]
pub struct MetricsConfig {
    /// Address of the Prometheus / health listener (default 127.0.0.1:9187);
    /// `None` (written `listen = ""`) disables it.
    pub listen: Option<std::net::SocketAddr>,
    /// `/readyz` fails when a target's oldest undelivered event is older than this.
    pub ready_max_target_stall: Duration,
}

/// `[console]`: the stewardship console's settings.
#[derive(Clone, Debug)]
pub struct ConsoleConfig {
    /// `users_file`: the console's users (role, argon2id password hash) and
    /// read-only API tokens; `users.toml` next to the configuration file by
    /// default. Managed with `steward user` and `steward token`.
    pub users_file: PathBuf,
    /// `listen`: where the web console is served; `None` (the default)
    /// serves none. A bare port means loopback (`127.0.0.1:PORT`); any
    /// other address than a loopback one needs TLS.
    pub listen: Option<std::net::SocketAddr>,
    /// `tls_cert` and `tls_key`: PEM files; with them the console speaks
    /// HTTPS only.
    pub tls: Option<ConsoleTls>,
}

/// `[console] tls_cert` and `tls_key`: the console's certificate chain and
/// private key, PEM files read when the daemon starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsoleTls {
    /// The certificate chain (leaf first).
    pub cert: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// `[daemon]`: settings of the running process.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// How long SIGTERM / SIGINT / a reload may take to drain before steward gives up (exit 1).
    pub shutdown_timeout: Duration,
}

/// `[control]`: the Unix socket the daemon serves its control API on.
#[derive(Clone, Debug, Default)]
pub struct ControlConfig {
    /// `socket`: where the socket is created; `None` for the default,
    /// `<state path>.sock` (see [`Config::control_socket`]).
    pub socket: Option<PathBuf>,
    /// `group`: the group allowed to use the socket (mode 0660); `None`
    /// leaves it to the daemon's user alone (mode 0600).
    pub group: Option<String>,
}

impl Config {
    /// The control API's socket: `control.socket`, or the state file's path
    /// with `.sock` appended.
    pub fn control_socket(&self) -> PathBuf {
        if let Some(path) = &self.control.socket {
            return path.clone();
        }
        let mut name = self.state.path.clone().into_os_string();
        name.push(".sock");
        PathBuf::from(name)
    }
}

/// One problem found in a configuration file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted key, e.g. `targets.wms.url`; empty for file-level problems.
    pub key: String,
    /// What is wrong and what would be valid.
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

/// Every problem found in one configuration file.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{} in {}:\n{}", if .errors.len() == 1 { "1 configuration error".to_string() } else { format!("{} configuration errors", .errors.len()) }, .path.display(), .errors.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
pub struct ConfigErrors {
    pub(crate) path: PathBuf,
    /// In the order they were found; never empty.
    pub errors: Vec<ConfigError>,
}

impl Config {
    /// Reads and checks the file, each target's own keys with `types`.
    /// Relative paths inside it (state.path, password_file, ...) are resolved
    /// against the file's directory.
    pub fn load(path: &Path, types: &dyn TargetTypes) -> Result<Config, ConfigErrors> {
        raw::load(path, types)
    }

    /// Checks configuration text; `base_dir` resolves relative paths.
    pub fn parse_with(
        text: &str,
        path: &Path,
        base_dir: &Path,
        types: &dyn TargetTypes,
    ) -> Result<Config, ConfigErrors> {
        raw::parse(text, path, base_dir, Some(types))
    }

    /// Checks everything but the keys each target's type adds, which are
    /// accepted as written and not kept ([`Unchecked`]): for tests of what
    /// core does with a configuration. No sink can be built from the result.
    pub fn parse(text: &str, path: &Path, base_dir: &Path) -> Result<Config, ConfigErrors> {
        raw::parse(text, path, base_dir, None)
    }

    /// The entity named `name`, if configured.
    pub fn entity(&self, name: &str) -> Option<&EntityConfig> {
        self.entities.iter().find(|e| e.name == name)
    }

    /// The target named `name`, if configured.
    pub fn target(&self, name: &str) -> Option<&TargetConfig> {
        self.targets.iter().find(|t| t.name == name)
    }

    /// Every entity with its index, in the order of [`Config::entities`].
    pub fn iter_entities(&self) -> impl Iterator<Item = (EntityIndex, &EntityConfig)> {
        EntityIndex::enumerate(&self.entities)
    }

    /// Every target with its index, in the order of [`Config::targets`].
    pub fn iter_targets(&self) -> impl Iterator<Item = (TargetIndex, &TargetConfig)> {
        TargetIndex::enumerate(&self.targets)
    }

    /// The position of the entity named `name` in [`Config::entities`].
    pub fn entity_index(&self, name: &str) -> Option<EntityIndex> {
        self.entities
            .iter()
            .position(|e| e.name == name)
            .map(EntityIndex)
    }

    /// The position of the target named `name` in [`Config::targets`].
    pub fn target_index(&self, name: &str) -> Option<TargetIndex> {
        self.targets
            .iter()
            .position(|t| t.name == name)
            .map(TargetIndex)
    }
}
