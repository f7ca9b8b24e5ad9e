//! Reading loosely typed TOML tables while collecting every problem.
//!
//! serde stops at the first error, which would make a user fix a config file
//! one complaint at a time. Instead each table is walked by hand: a wrong key
//! or value records a [`ConfigError`] and the walk goes on, so one run of
//! `steward check` shows everything that is wrong.

use toml::{Table, Value};

use crate::config::ConfigError;

/// Problems found so far, in the order they were found.
#[derive(Debug, Default)]
pub struct Errors {
    list: Vec<ConfigError>,
}

impl Errors {
    /// Records `message` (what is wrong, what would be valid) under the dotted `key`.
    pub fn add(&mut self, key: &str, message: impl Into<String>) {
        self.list.push(ConfigError {
            key: key.to_string(),
            message: message.into(),
        });
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub(crate) fn into_vec(self) -> Vec<ConfigError> {
        self.list
    }
}

/// A key as it would be written in TOML: bare when possible, quoted otherwise,
/// so that `headers."X Bad"` in a message can be found in the file.
pub(crate) fn key_part(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        key.to_string()
    } else {
        format!("{key:?}")
    }
}

/// `prefix.key`, with `key` quoted if TOML needs it.
pub fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key_part(key)
    } else {
        format!("{prefix}.{}", key_part(key))
    }
}

/// "a string", "an integer", ...: for "expected X, found Y" messages. Values
/// themselves are not echoed, as they might be secrets written in the wrong place.
pub fn type_name(value: &Value) -> &'static str {
    match value {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a date/time",
        Value::Array(_) => "an array",
        Value::Table(_) => "a table",
    }
}

/// Levenshtein distance, for "did you mean" hints on misspelt keys.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The closest of `candidates` to `word`, if it is close enough to be a typo.
pub(crate) fn suggestion<'c>(word: &str, candidates: &[&'c str]) -> Option<&'c str> {
    let lower = word.to_ascii_lowercase();
    candidates
        .iter()
        .map(|c| (edit_distance(&lower, c), *c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// A TOML table being checked: known keys are read through the getters, and
/// every key outside `valid` is reported when the reader is created.
pub struct Reader<'a> {
    path: String,
    table: &'a Table,
}

impl<'a> Reader<'a> {
    /// A reader of `table`, found at the dotted `path`; records every key
    /// not in `valid`, with a "did you mean" hint for a likely typo.
    pub fn new(path: &str, table: &'a Table, valid: &[&str], errs: &mut Errors) -> Self {
        for key in table.keys() {
            if !valid.contains(&key.as_str()) {
                let hint = suggestion(key, valid)
                    .map(|s| format!(" (did you mean `{s}`?)"))
                    .unwrap_or_default();
                errs.add(
                    &join(path, key),
                    format!("unknown key{hint}; valid keys here: {}", valid.join(", ")),
                );
            }
        }
        Reader {
            path: path.to_string(),
            table,
        }
    }

    /// The dotted name of `key` in this table.
    pub fn key(&self, key: &str) -> String {
        join(&self.path, key)
    }

    pub(crate) fn get(&self, key: &str) -> Option<&'a Value> {
        self.table.get(key)
    }

    /// Whether `key` is present, whatever its type.
    pub fn has(&self, key: &str) -> bool {
        self.table.contains_key(key)
    }

    /// The string at `key`; `None` when absent or (after recording an error) of another type.
    pub fn string(&self, key: &str, errs: &mut Errors) -> Option<&'a str> {
        match self.table.get(key)? {
            Value::String(s) => Some(s),
            other => {
                errs.add(
                    &self.key(key),
                    format!("expected a string, found {}", type_name(other)),
                );
                None
            }
        }
    }

    /// Like [`Reader::string`], recording `missing` (what to write) when the key is absent.
    pub fn required_string(&self, key: &str, missing: &str, errs: &mut Errors) -> Option<&'a str> {
        if !self.has(key) {
            errs.add(&self.key(key), format!("missing; {missing}"));
            return None;
        }
        self.string(key, errs)
    }

    /// The boolean at `key`, `default` when absent; `None` (after recording
    /// an error) when of another type.
    pub fn bool(&self, key: &str, default: bool, errs: &mut Errors) -> Option<bool> {
        match self.table.get(key) {
            None => Some(default),
            Some(Value::Boolean(b)) => Some(*b),
            Some(other) => {
                errs.add(
                    &self.key(key),
                    format!("expected true or false, found {}", type_name(other)),
                );
                None
            }
        }
    }

    /// An integer in `lo..=hi` (in `unit`), `default` when absent; `None`
    /// (after recording an error) when out of range or of another type.
    pub fn int(
        &self,
        key: &str,
        default: u64,
        lo: u64,
        hi: u64,
        unit: &str,
        errs: &mut Errors,
    ) -> Option<u64> {
        let value = match self.table.get(key) {
            None => return Some(default),
            Some(Value::Integer(i)) => *i,
            Some(other) => {
                errs.add(
                    &self.key(key),
                    format!(
                        "expected an integer ({unit}) between {lo} and {hi}, found {}",
                        type_name(other)
                    ),
                );
                return None;
            }
        };
        match u64::try_from(value) {
            Ok(v) if (lo..=hi).contains(&v) => Some(v),
            _ => {
                errs.add(
                    &self.key(key),
                    format!("must be between {lo} and {hi} ({unit}), found {value}"),
                );
                None
            }
        }
    }

    /// The table at `key`; `None` when absent or (after recording an error) not a table.
    pub fn table(&self, key: &str, errs: &mut Errors) -> Option<&'a Table> {
        match self.table.get(key)? {
            Value::Table(t) => Some(t),
            other => {
                errs.add(
                    &self.key(key),
                    format!("expected a table, found {}", type_name(other)),
                );
                None
            }
        }
    }

    /// An array of strings; `None` when absent or (after recording errors) malformed.
    pub fn string_list(&self, key: &str, errs: &mut Errors) -> Option<Vec<&'a str>> {
        let items = match self.table.get(key)? {
            Value::Array(items) => items,
            other => {
                errs.add(
                    &self.key(key),
                    format!("expected an array of strings, found {}", type_name(other)),
                );
                return None;
            }
        };
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            match item {
                Value::String(s) => out.push(s.as_str()),
                other => {
                    errs.add(
                        &self.key(key),
                        format!(
                            "item {} must be a string, found {}",
                            i + 1,
                            type_name(other)
                        ),
                    );
                    ok = false;
                }
            }
        }
        ok.then_some(out)
    }
}

/// PostgreSQL truncates identifiers to 63 bytes (NAMEDATALEN - 1): a longer name
/// would silently refer to something else.
pub(crate) const MAX_IDENT: usize = 63;

/// A name PostgreSQL keeps as written when unquoted: lowercase letters, digits,
/// `_` and `$`, not starting with a digit or `$`, at most 63 bytes.
pub fn check_sql_ident(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let Some(first) = chars.next() else {
        return Err("is empty; expected a lowercase SQL identifier".into());
    };
    if name.len() > MAX_IDENT {
        return Err(format!(
            "`{name}` is {} bytes long; PostgreSQL identifiers are at most {MAX_IDENT} bytes",
            name.len()
        ));
    }
    let first_ok = first.is_ascii_lowercase() || first == '_';
    let rest_ok =
        chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '$');
    if first_ok && rest_ok {
        return Ok(());
    }
    let hint = if name != name.to_ascii_lowercase() {
        format!(
            " (PostgreSQL folds unquoted names to lowercase: write `{}`)",
            name.to_ascii_lowercase()
        )
    } else {
        String::new()
    };
    Err(format!(
        "`{name}` is not a valid SQL identifier{hint}; use lowercase letters, digits, _ and $, \
         starting with a letter or _"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_keys_only_when_needed() {
        assert_eq!(join("targets.wms", "url"), "targets.wms.url");
        assert_eq!(join("", "source"), "source");
        assert_eq!(join("h", "X Bad"), "h.\"X Bad\"");
        assert_eq!(join("h", ""), "h.\"\"");
    }

    #[test]
    fn suggests_close_keys_only() {
        let valid = ["batch_max_events", "batch_linger_ms", "url"];
        assert_eq!(
            suggestion("batch_max_event", &valid),
            Some("batch_max_events")
        );
        assert_eq!(suggestion("URL", &valid), Some("url"));
        assert_eq!(suggestion("completely_else", &valid), None);
    }

    #[test]
    fn reader_reports_unknown_keys_and_type_errors() {
        let table: Table = "a = 1\nb = \"x\"\nzz = true\n".parse().unwrap();
        let mut errs = Errors::default();
        let r = Reader::new("sec", &table, &["a", "b"], &mut errs);
        assert_eq!(r.string("a", &mut errs), None);
        assert_eq!(r.int("b", 5, 0, 10, "ms", &mut errs), None);
        assert_eq!(r.int("missing", 5, 0, 10, "ms", &mut errs), Some(5));
        let errs = errs.into_vec();
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert_eq!(errs[0].key, "sec.zz");
        assert!(errs[0].message.contains("valid keys here: a, b"));
        assert_eq!(errs[1].key, "sec.a");
        assert!(errs[1]
            .message
            .contains("expected a string, found an integer"));
        assert!(errs[2].message.contains("between 0 and 10"));
    }

    #[test]
    fn int_range_rejects_negative_and_large() {
        let table: Table = "a = -1\nb = 11\nc = 10\n".parse().unwrap();
        let mut errs = Errors::default();
        let r = Reader::new("s", &table, &["a", "b", "c"], &mut errs);
        assert_eq!(r.int("a", 0, 0, 10, "ms", &mut errs), None);
        assert_eq!(r.int("b", 0, 0, 10, "ms", &mut errs), None);
        assert_eq!(r.int("c", 0, 0, 10, "ms", &mut errs), Some(10));
        let errs = errs.into_vec();
        assert!(errs[0].message.contains("found -1"));
        assert!(errs[1].message.contains("found 11"));
    }

    #[test]
    fn sql_identifiers() {
        assert!(check_sql_ident("product_template").is_ok());
        assert!(check_sql_ident("_x$1").is_ok());
        assert!(check_sql_ident("").is_err());
        assert!(check_sql_ident("1abc").is_err());
        assert!(check_sql_ident("Product")
            .unwrap_err()
            .contains("write `product`"));
        assert!(check_sql_ident(&"a".repeat(64))
            .unwrap_err()
            .contains("63 bytes"));
        assert!(check_sql_ident(&"a".repeat(63)).is_ok());
    }
}
