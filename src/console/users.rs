//! Who may use the console and the read-only API: users with a role and an
//! argon2id password hash, and API tokens for tools, kept in one TOML file
//! (`[console] users_file`, managed with `steward user` and `steward token`).
//!
//! ```toml
//! [users.alice]
//! role = "steward"
//! password = "$argon2id$v=19$m=19456,t=2,p=1$..."
//!
//! [tokens.mes-lookup]
//! hash = "blake3:9f2c..."
//! created = "2026-12-03T18:40:00Z"
//! ```
//!
//! A token is 32 random bytes; only its BLAKE3 hash is kept, which is enough
//! for a secret that long (a password needs argon2id because people choose
//! guessable ones). The file is refused when other users may read it or
//! anyone but its owner may write it.

use std::collections::BTreeMap;
use std::fmt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::OnceLock;

use anyhow::Context;
use argon2::password_hash::{phc::PasswordHash, PasswordHasher, PasswordVerifier};
use argon2::Argon2;
use base64::Engine;
use serde::{Deserialize, Serialize};

/// What a user may do; each role may do what the roles before it may.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads every page (with each target's redaction applied).
    Viewer,
    /// Also releases and re-evaluates quarantined records.
    Steward,
    /// Also replays and drops dead letters, opens batch windows, resets targets.
    Operator,
}

impl Role {
    /// The roles, weakest first.
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Steward, Role::Operator];

    /// The role's name as written in the file and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Steward => "steward",
            Role::Operator => "operator",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Role {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Role> {
        Role::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| anyhow::anyhow!("unknown role {s:?}: viewer, steward or operator"))
    }
}

/// One console user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// What the user may do.
    pub role: Role,
    /// The password's argon2id hash in PHC string form.
    pub password: String,
}

/// One read-only API token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Token {
    /// `blake3:` and the hex BLAKE3 hash of the token.
    pub hash: String,
    /// RFC 3339 UTC, when it was made.
    pub created: String,
}

/// The users file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Users {
    /// By name.
    #[serde(default)]
    pub users: BTreeMap<String, User>,
    /// By name.
    #[serde(default)]
    pub tokens: BTreeMap<String, Token>,
}

/// The shortest password accepted.
pub const MIN_PASSWORD_CHARS: usize = 12;
/// What a token starts with, so that a leaked one is recognisable.
const TOKEN_PREFIX: &str = "stw_";

const HEADER: &str = "# steward console users and API tokens: managed with `steward user` and\n\
                      # `steward token`. Passwords are argon2id hashes, tokens BLAKE3 hashes.\n\n";

impl Users {
    /// Reads the file; a missing file is an empty one.
    pub fn load(path: &Path) -> anyhow::Result<Users> {
        let meta = match std::fs::metadata(path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Users::default()),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o026 != 0 {
            anyhow::bail!(
                "{} has mode {mode:04o}: password hashes must not be readable by other users or \
                 writable by anyone but the owner; run chmod 640 {}",
                path.display(),
                path.display()
            );
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let users: Users = toml::from_str(&text)
            .with_context(|| format!("{} is not a users file", path.display()))?;
        for name in users.users.keys().chain(users.tokens.keys()) {
            check_name(name).with_context(|| format!("in {}", path.display()))?;
        }
        for (name, user) in &users.users {
            PasswordHash::new(&user.password).map_err(|e| {
                anyhow::anyhow!("{}: user {name}: not a password hash: {e}", path.display())
            })?;
        }
        Ok(users)
    }

    /// Writes the file through a temporary file and a rename. An existing
    /// file keeps its owner, group and mode (so the daemon's group can still
    /// read it after root changed it); a new one is 0640 with the owner and
    /// group of its directory.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let (mode, uid, gid) = match std::fs::metadata(path) {
            Ok(meta) => (meta.permissions().mode() & 0o777, meta.uid(), meta.gid()),
            Err(_) => {
                let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
                let dir = std::fs::metadata(dir.unwrap_or(Path::new(".")))
                    .with_context(|| format!("cannot create {}", path.display()))?;
                (0o640, dir.uid(), dir.gid())
            }
        };
        let mut text = String::from(HEADER);
        text.push_str(&toml::to_string(self).context("cannot write the users file")?);
        let tmp = tmp_path(path);
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let _ = std::fs::remove_file(&tmp);
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
            if nix::unistd::geteuid().is_root() {
                std::os::unix::fs::fchown(&file, Some(uid), Some(gid))?;
            }
            file.set_permissions(std::fs::Permissions::from_mode(mode))?;
            drop(file);
            std::fs::rename(&tmp, path)
        };
        write().with_context(|| format!("cannot write {}", path.display()))
    }

    /// Adds a user, or with `replace` changes an existing one's role and password.
    pub fn add_user(
        &mut self,
        name: &str,
        role: Role,
        password: &str,
        replace: bool,
    ) -> anyhow::Result<()> {
        check_name(name)?;
        if !replace && self.users.contains_key(name) {
            anyhow::bail!("user {name} exists; add --replace to change its role and password");
        }
        if password.chars().count() < MIN_PASSWORD_CHARS {
            anyhow::bail!("the password is too short: at least {MIN_PASSWORD_CHARS} characters");
        }
        if password.eq_ignore_ascii_case(name) {
            anyhow::bail!("the password must not be the user's name");
        }
        let hash = Argon2::default()
            .hash_password(password.as_bytes())
            .map_err(|e| anyhow::anyhow!("cannot hash the password: {e}"))?
            .to_string();
        self.users.insert(
            name.to_string(),
            User {
                role,
                password: hash,
            },
        );
        Ok(())
    }

    /// The user's role when `password` is theirs. An unknown name costs as
    /// much time as a wrong password, so timing does not tell which names exist.
    pub fn verify(&self, name: &str, password: &str) -> Option<Role> {
        let (stored, role) = match self.users.get(name) {
            Some(user) => (user.password.as_str(), Some(user.role)),
            None => (dummy_hash(), None),
        };
        let hash = PasswordHash::new(stored).ok()?;
        let matches = Argon2::default()
            .verify_password(password.as_bytes(), &hash)
            .is_ok();
        if matches {
            role
        } else {
            None
        }
    }

    /// Makes a token named `name` and returns it; only its hash is kept.
    pub fn add_token(&mut self, name: &str) -> anyhow::Result<String> {
        check_name(name)?;
        if self.tokens.contains_key(name) {
            anyhow::bail!("token {name} exists; remove it first to make a new one");
        }
        let secret: [u8; 32] = rand::random();
        let token = format!(
            "{TOKEN_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
        );
        self.tokens.insert(
            name.to_string(),
            Token {
                hash: token_hash(&token),
                created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            },
        );
        Ok(token)
    }

    /// The name of the token `token` is, if any.
    pub fn verify_token(&self, token: &str) -> Option<&str> {
        if !token.starts_with(TOKEN_PREFIX) {
            return None;
        }
        let presented = blake3::hash(token.as_bytes());
        self.tokens.iter().find_map(|(name, t)| {
            let stored = t.hash.strip_prefix("blake3:")?;
            let stored = blake3::Hash::from_hex(stored).ok()?;
            // blake3::Hash compares in constant time.
            (stored == presented).then_some(name.as_str())
        })
    }
}

fn token_hash(token: &str) -> String {
    format!("blake3:{}", blake3::hash(token.as_bytes()).to_hex())
}

/// A valid hash of a password nobody has, verified against when the name is unknown.
fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| {
        Argon2::default()
            .hash_password(b"no user has this password")
            .map(|h| h.to_string())
            .unwrap_or_default()
    })
}

/// Names as they appear in audit records and log lines: short, no spaces
/// or quotes.
fn check_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'));
    if ok {
        Ok(())
    } else {
        anyhow::bail!("invalid name {name:?}: 1 to 64 characters, letters, digits and . _ - @ only")
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(".tmp");
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_logs_in_with_their_password_only() {
        let mut users = Users::default();
        users
            .add_user("alice", Role::Steward, "correct horse battery", false)
            .unwrap();
        assert_eq!(
            users.verify("alice", "correct horse battery"),
            Some(Role::Steward)
        );
        assert_eq!(users.verify("alice", "correct horse batterY"), None);
        assert_eq!(users.verify("bob", "correct horse battery"), None);
        assert!(users.users["alice"].password.starts_with("$argon2id$"));
    }

    #[test]
    fn weak_passwords_duplicate_and_odd_names_are_refused() {
        let mut users = Users::default();
        let e = users.add_user("alice", Role::Viewer, "short", false);
        assert!(e.unwrap_err().to_string().contains("at least 12"));
        let e = users.add_user("alice.example", Role::Viewer, "ALICE.EXAMPLE", false);
        assert!(e.unwrap_err().to_string().contains("name"));
        let e = users.add_user("al ice", Role::Viewer, "long enough password", false);
        assert!(e.unwrap_err().to_string().contains("invalid name"));
        users
            .add_user("alice", Role::Viewer, "long enough password", false)
            .unwrap();
        let e = users.add_user("alice", Role::Operator, "another long password", false);
        assert!(e.unwrap_err().to_string().contains("--replace"));
        users
            .add_user("alice", Role::Operator, "another long password", true)
            .unwrap();
        assert_eq!(
            users.verify("alice", "another long password"),
            Some(Role::Operator)
        );
        assert_eq!(users.verify("alice", "long enough password"), None);
    }

    #[test]
    fn a_token_is_shown_once_and_only_its_hash_is_kept() {
        let mut users = Users::default();
        let token = users.add_token("mes-lookup").unwrap();
        assert!(token.starts_with("stw_") && token.len() > 40, "{token}");
        assert!(!users.tokens["mes-lookup"].hash.contains(&token[4..]));
        assert_eq!(users.verify_token(&token), Some("mes-lookup"));
        let mut wrong = token.clone();
        wrong.pop();
        wrong.push('x');
        assert_eq!(users.verify_token(&wrong), None);
        assert_eq!(users.verify_token(""), None);
        assert!(users.add_token("mes-lookup").is_err());
    }

    #[test]
    fn roles_are_ordered_and_parse_by_name() {
        assert!(Role::Viewer < Role::Steward && Role::Steward < Role::Operator);
        for role in Role::ALL {
            assert_eq!(role.name().parse::<Role>().unwrap(), role);
        }
        assert!("admin".parse::<Role>().is_err());
    }

    #[test]
    fn the_file_round_trips_and_keeps_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.toml");
        assert_eq!(Users::load(&path).unwrap(), Users::default());
        let mut users = Users::default();
        users
            .add_user("alice", Role::Operator, "correct horse battery", false)
            .unwrap();
        let token = users.add_token("mes").unwrap();
        users.save(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        let back = Users::load(&path).unwrap();
        assert_eq!(back, users);
        assert_eq!(back.verify_token(&token), Some("mes"));
        assert!(std::fs::read_to_string(&path)
            .unwrap()
            .starts_with("# steward console users"));

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        back.save(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "an existing file keeps its mode");
    }

    #[test]
    fn a_file_others_may_read_or_a_damaged_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.toml");
        let mut users = Users::default();
        users
            .add_user("alice", Role::Viewer, "correct horse battery", false)
            .unwrap();
        users.save(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Users::load(&path).unwrap_err().to_string();
        assert!(e.contains("0644") && e.contains("chmod 640"), "{e}");

        std::fs::write(
            &path,
            "[users.alice]\nrole = \"viewer\"\npassword = \"plain\"\n",
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = format!("{:#}", Users::load(&path).unwrap_err());
        assert!(e.contains("not a password hash"), "{e}");

        std::fs::write(&path, "[users.alice]\nrole = \"admin\"\npassword = \"x\"\n").unwrap();
        let e = format!("{:#}", Users::load(&path).unwrap_err());
        assert!(e.contains("not a users file"), "{e}");
    }
}
