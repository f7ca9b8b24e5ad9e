//! Configuration: one TOML file, parsed loosely in `raw`, then checked into
//! the typed [`Config`] below. Every problem is reported at once, each naming
//! the dotted key, what is wrong and what would be valid.

mod raw;
mod secret;

pub use secret::Secret;

use std::path::{Path, PathBuf};
use std::time::Duration;

/// A checked configuration. Built only by [`Config::load`] / [`Config::parse`].
#[derive(Clone, Debug)]
pub struct Config {
    pub source: SourceConfig,
    pub state: StateConfig,
    /// In the order they appear in the file.
    pub entities: Vec<EntityConfig>,
    /// In the order they appear in the file.
    pub targets: Vec<TargetConfig>,
    pub metrics: MetricsConfig,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyFull,
}

#[derive(Clone, Debug)]
pub struct SourceConfig {
    /// The URL as written, minus any password, for messages.
    pub url_display: String,
    /// A host name, an IP address, or a directory holding the server's Unix socket.
    pub host: String,
    pub port: u16,
    pub user: String,
    pub dbname: String,
    pub password: Option<Secret>,
    pub sslmode: SslMode,
    /// PEM file with the CA certificates to trust instead of the system's.
    pub sslrootcert: Option<PathBuf>,
    pub connect_timeout: Duration,
    pub slot: String,
    pub publication: String,
    /// How often a standby status update is sent while streaming.
    pub status_interval: Duration,
    /// Create the publication when it does not exist (otherwise: error).
    pub create_publication: bool,
}

#[derive(Clone, Debug)]
pub struct StateConfig {
    /// The redb file holding checkpoints, outboxes, dead letters and audit.
    pub path: PathBuf,
    /// Most events gathered into one durable redb commit.
    pub commit_max_events: usize,
    /// Longest a received transaction waits to be grouped with later ones.
    pub commit_max_delay: Duration,
}

/// Where an entity field's value comes from: a column, or a path into a json/jsonb column.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldSource {
    pub column: String,
    /// Keys to follow inside the column's JSON value; empty for a plain column.
    pub path: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldConfig {
    /// The field's name in the delivered document.
    pub name: String,
    pub source: FieldSource,
    /// Used when `source` is null or missing (e.g. a translation's fallback language).
    pub fallback: Option<FieldSource>,
}

#[derive(Clone, Debug)]
pub struct EntityConfig {
    pub name: String,
    pub schema: String,
    pub table: String,
    /// Key columns, in order. Default: `["id"]`.
    pub key: Vec<String>,
    /// In the order they appear in the file.
    pub fields: Vec<FieldConfig>,
}

impl EntityConfig {
    pub fn qualified_table(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }
}

#[derive(Clone, Debug)]
pub struct TargetConfig {
    pub name: String,
    /// Names of the entities this target receives.
    pub entities: Vec<String>,
    pub batch_max_events: usize,
    pub batch_linger: Duration,
    /// First retry delay; doubles per failure up to `retry_max`, with jitter.
    pub retry_initial: Duration,
    pub retry_max: Duration,
    pub kind: TargetKind,
    /// What a target gets when steward first sees it (see `source::snapshot`).
    pub initial: InitialSync,
}

/// `targets.NAME.initial`: whether a new target first receives every
/// configured row (a consistent snapshot) or only changes from now on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum InitialSync {
    #[default]
    Snapshot,
    None,
}

#[derive(Clone, Debug)]
pub enum TargetKind {
    Http(HttpTargetConfig),
}

#[derive(Clone, Debug)]
pub struct HttpTargetConfig {
    pub url: url::Url,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    /// Extra request headers; values may be secrets (read from files or the environment).
    pub headers: Vec<(String, Secret)>,
}

#[derive(Clone, Debug)]
pub struct MetricsConfig {
    /// Address of the Prometheus / health listener; `None` disables it.
    pub listen: Option<std::net::SocketAddr>,
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
    pub path: PathBuf,
    pub errors: Vec<ConfigError>,
}

impl Config {
    /// Reads and checks the file. Relative paths inside it (state.path,
    /// password_file, ...) are resolved against the file's directory.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        raw::load(path)
    }

    /// Checks configuration text; `base_dir` resolves relative paths.
    pub fn parse(text: &str, path: &Path, base_dir: &Path) -> Result<Config, ConfigErrors> {
        raw::parse(text, path, base_dir)
    }

    pub fn entity(&self, name: &str) -> Option<&EntityConfig> {
        self.entities.iter().find(|e| e.name == name)
    }

    pub fn target(&self, name: &str) -> Option<&TargetConfig> {
        self.targets.iter().find(|t| t.name == name)
    }
}
