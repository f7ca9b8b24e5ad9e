//! A string that never prints, and where it came from.

use std::fmt;
use std::path::PathBuf;

/// A secret value (password, token, header). `Debug` and `Display` print `***`.
///
/// A secret read from a file or an environment variable remembers where:
/// connections read it again each time they are opened,
/// so a rotated password is picked up without a restart.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    value: String,
    /// Boxed: most secrets have one, and configs hold many secrets.
    origin: Option<Box<SecretOrigin>>,
}

/// Where a secret is read from, with the configuration key that names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretOrigin {
    /// The whole file, minus one trailing newline.
    File {
        /// Configuration key that names the file, e.g. `source.password_file`.
        key: String,
        /// The file.
        path: PathBuf,
    },
    /// An environment variable.
    Env {
        /// Configuration key that names the variable, e.g. `source.password_env`.
        key: String,
        /// The variable's name.
        name: String,
    },
}

impl Secret {
    /// A secret given inline, with no origin to re-read.
    pub fn new(value: impl Into<String>) -> Self {
        Secret {
            value: value.into(),
            origin: None,
        }
    }

    /// `value`, as read just now from `origin`.
    pub fn with_origin(value: impl Into<String>, origin: SecretOrigin) -> Self {
        Secret {
            value: value.into(),
            origin: Some(Box::new(origin)),
        }
    }

    /// The value itself: call only where it leaves for the wire.
    pub fn expose(&self) -> &str {
        &self.value
    }

    /// The configuration key the secret came from (e.g.
    /// `targets.wms.bearer_token_env`), if it was read from a file or the
    /// environment.
    pub fn key(&self) -> Option<&str> {
        match self.origin.as_deref() {
            Some(SecretOrigin::File { key, .. } | SecretOrigin::Env { key, .. }) => Some(key),
            None => None,
        }
    }

    /// The secret as its file or variable holds it now (the loaded value for
    /// a secret without an origin). The error names the key and the file,
    /// never the value.
    pub(crate) fn current(&self) -> Result<Secret, String> {
        let value = match self.origin.as_deref() {
            None => return Ok(self.clone()),
            Some(SecretOrigin::File { key, path }) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("{key}: cannot read `{}`: {e}", path.display()))?;
                let value = text
                    .strip_suffix('\n')
                    .map(|t| t.strip_suffix('\r').unwrap_or(t))
                    .unwrap_or(&text);
                if value.is_empty() {
                    return Err(format!("{key}: `{}` is empty", path.display()));
                }
                value.to_string()
            }
            Some(SecretOrigin::Env { key, name }) => match std::env::var(name) {
                Ok(v) if !v.is_empty() => v,
                _ => {
                    return Err(format!(
                        "{key}: environment variable {name} is unset or empty"
                    ))
                }
            },
        };
        Ok(Secret {
            value,
            origin: self.origin.clone(),
        })
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_from_a_file_is_read_again_and_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pgpass");
        std::fs::write(&path, "first\n").unwrap();
        let origin = SecretOrigin::File {
            key: "source.password_file".into(),
            path: path.clone(),
        };
        let s = Secret::with_origin("first", origin);
        assert_eq!(s.key(), Some("source.password_file"));
        std::fs::write(&path, "second\r\n").unwrap();
        assert_eq!(s.current().unwrap().expose(), "second");
        assert_eq!(format!("{s:?} {s}"), "Secret(***) ***");
        std::fs::remove_file(&path).unwrap();
        let e = s.current().unwrap_err();
        assert!(e.starts_with("source.password_file: cannot read"), "{e}");
        assert!(!e.contains("first") && !e.contains("second"), "{e}");
        assert_eq!(Secret::new("x").current().unwrap().expose(), "x");
    }
}
