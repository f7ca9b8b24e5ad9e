//! The `source.url` connection URL, in libpq's URI form:
//! `postgres[ql]://USER@HOST[:PORT][,HOST[:PORT]...]/DBNAME[?param=value&...]`.
//!
//! Parsed by hand rather than with the `url` crate because libpq's rules differ
//! from WHATWG URLs: the host may be a percent-encoded Unix socket directory
//! (`%2Fvar%2Frun%2Fpostgresql`) or come from a `host=` parameter, and the
//! host part may be empty.

use std::time::Duration;

use super::reader::Errors;
use crate::config::{SourceHost, SslMode, TargetSessionAttrs};

const SUPPORTED_PARAMS: &str = "sslmode, sslrootcert, connect_timeout, host, target_session_attrs";
const EXAMPLE: &str = "postgres://steward@localhost:5432/odoo?sslmode=prefer";
pub(crate) const DEFAULT_PORT: u16 = 5432;

/// The checked parts of a connection URL.
#[derive(Debug, PartialEq, Eq)]
pub struct PgUrl {
    /// The URL as written; it holds no password (a password is an error).
    pub display: String,
    /// A host name, an IP address, or (starting with `/`) a socket directory;
    /// the first one when the URL lists several.
    pub host: String,
    /// 5432 unless written.
    pub port: u16,
    /// The hosts listed after the first (`h1:p1,h2:p2`), tried in order.
    pub other_hosts: Vec<SourceHost>,
    /// From the `target_session_attrs` parameter; [`TargetSessionAttrs::Any`] unless written.
    pub target_session_attrs: TargetSessionAttrs,
    /// The role to log in as.
    pub user: String,
    /// The database to connect to.
    pub dbname: String,
    /// From the `sslmode` parameter; [`SslMode::Prefer`] unless written.
    pub sslmode: SslMode,
    /// As written; resolved against the config file's directory by the caller.
    pub(crate) sslrootcert: Option<String>,
    /// From the `connect_timeout` parameter (seconds).
    pub connect_timeout: Option<Duration>,
}

/// Decodes `%XX` escapes; `what` names the URL part in the error.
fn percent_decode(s: &str, what: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok());
            match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                Some(b) => out.push(b),
                None => {
                    return Err(format!(
                        "the {what} has an invalid percent-escape; write % as %25 and \
                         escapes as %XX with two hex digits"
                    ))
                }
            }
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map_err(|_| format!("the {what} is not valid UTF-8 after percent-decoding"))
}

fn parse_sslmode(value: &str) -> Option<SslMode> {
    match value {
        "disable" => Some(SslMode::Disable),
        "prefer" => Some(SslMode::Prefer),
        "require" => Some(SslMode::Require),
        "verify-full" => Some(SslMode::VerifyFull),
        _ => None,
    }
}

/// A host name or IP address as libpq would accept it (socket paths are checked apart).
fn valid_host_name(host: &str) -> bool {
    !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | ':'))
}

/// One `HOST[:PORT]` of the URL's host list; problems are pushed to `problems`.
fn parse_host_port(hostport: &str, problems: &mut Vec<String>) -> (Option<String>, u16) {
    let (raw_host, raw_port) = if let Some(after_bracket) = hostport.strip_prefix('[') {
        match after_bracket.split_once(']') {
            Some((h, tail)) => match tail.strip_prefix(':') {
                Some(p) => (h, Some(p)),
                None if tail.is_empty() => (h, None),
                None => {
                    problems.push(format!(
                        "unexpected `{tail}` after the IPv6 address; write [ADDRESS]:PORT"
                    ));
                    (h, None)
                }
            },
            None => {
                problems.push("an IPv6 address opened with [ is not closed with ]".into());
                ("", None)
            }
        }
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    let host = match percent_decode(raw_host, "host") {
        Ok(h) if !h.is_empty() => Some(h),
        Ok(_) => None,
        Err(e) => {
            problems.push(e);
            None
        }
    };
    let mut port = DEFAULT_PORT;
    if let Some(p) = raw_port.filter(|p| !p.is_empty()) {
        match p.parse::<u16>() {
            Ok(n) if n > 0 => port = n,
            _ => problems.push(format!("port `{p}` is not a port number (1 to 65535)")),
        }
    }
    (host, port)
}

/// Checks `text`; every problem is recorded under `key` and yields `None`.
/// Never puts a password into a message.
pub fn parse_pg_url(text: &str, key: &str, errs: &mut Errors) -> Option<PgUrl> {
    let mut problems: Vec<String> = Vec::new();

    let Some(rest) = text
        .strip_prefix("postgres://")
        .or_else(|| text.strip_prefix("postgresql://"))
    else {
        let hint = if text.contains('=') && !text.contains("://") {
            " (key=value connection strings are not supported here)"
        } else {
            ""
        };
        errs.add(
            key,
            format!(
                "must be a URL starting with postgres:// or postgresql://{hint}, e.g. {EXAMPLE}"
            ),
        );
        return None;
    };
    let scheme = &text[..text.len() - rest.len()];

    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match before_query.find('/') {
        Some(i) => (&before_query[..i], &before_query[i + 1..]),
        None => (before_query, ""),
    };
    // The last '@' separates user info from the host, as in libpq.
    let (userinfo, hostport) = match authority.rfind('@') {
        Some(i) => (Some(&authority[..i]), &authority[i + 1..]),
        None => (None, authority),
    };

    let mut display_userinfo = String::new();
    let mut user = None;
    if let Some(userinfo) = userinfo {
        let (raw_user, password) = match userinfo.split_once(':') {
            Some((u, p)) => (u, Some(p)),
            None => (userinfo, None),
        };
        if password.is_some() {
            problems.push(
                "contains a password; secrets must not live in config files: remove it from \
                 the URL and set source.password_file or source.password_env"
                    .into(),
            );
        }
        display_userinfo = format!("{raw_user}@");
        match percent_decode(raw_user, "user name") {
            Ok(u) if !u.is_empty() => user = Some(u),
            Ok(_) => {}
            Err(e) => problems.push(e),
        }
    }
    // Rebuilt without the password, should one be there (it is an error anyway).
    let display = match userinfo {
        Some(info) => format!("{scheme}{display_userinfo}{}", &rest[info.len() + 1..]),
        None => text.to_string(),
    };

    // Hosts and ports: `h1[:p1],h2[:p2],...`, each possibly an [IPv6] address.
    let mut hosts: Vec<(Option<String>, u16)> = Vec::new();
    for hostport in hostport.split(',') {
        hosts.push(parse_host_port(hostport, &mut problems));
    }
    let dbname = match percent_decode(path, "database name") {
        Ok(d) if !d.is_empty() => Some(d),
        Ok(_) => None,
        Err(e) => {
            problems.push(e);
            None
        }
    };

    // Query parameters.
    let mut sslmode = SslMode::Prefer;
    let mut sslrootcert = None;
    let mut connect_timeout = None;
    let mut target_session_attrs = TargetSessionAttrs::Any;
    let mut seen: Vec<String> = Vec::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let Some((raw_name, raw_value)) = pair.split_once('=') else {
            let name = percent_decode(pair, "parameter name").unwrap_or_default();
            problems.push(format!("parameter `{name}` has no value; write NAME=VALUE"));
            continue;
        };
        let name = match percent_decode(raw_name, "parameter name") {
            Ok(n) => n,
            Err(e) => {
                problems.push(e);
                continue;
            }
        };
        if name == "password" {
            problems.push(
                "parameter password: secrets must not live in config files; remove it and \
                 set source.password_file or source.password_env"
                    .into(),
            );
            continue;
        }
        let value = match percent_decode(raw_value, &format!("value of parameter {name}")) {
            Ok(v) => v,
            Err(e) => {
                problems.push(e);
                continue;
            }
        };
        if seen.contains(&name) {
            problems.push(format!(
                "parameter {name} is given more than once; keep one"
            ));
            continue;
        }
        seen.push(name.clone());
        match name.as_str() {
            "sslmode" => match parse_sslmode(&value) {
                Some(m) => sslmode = m,
                None => problems.push(format!(
                    "parameter sslmode: `{value}` is not supported; valid: disable, prefer, \
                     require, verify-full"
                )),
            },
            "sslrootcert" if value.is_empty() => problems.push(
                "parameter sslrootcert is empty; give the path of a PEM file of CA certificates"
                    .into(),
            ),
            "sslrootcert" => sslrootcert = Some(value),
            "connect_timeout" => match value.parse::<u64>() {
                Ok(s) if (1..=3600).contains(&s) => connect_timeout = Some(Duration::from_secs(s)),
                _ => problems.push(format!(
                    "parameter connect_timeout: `{value}` is not a whole number of seconds \
                     between 1 and 3600"
                )),
            },
            "host" if value.is_empty() => problems.push(
                "parameter host is empty; give a host name or a socket directory such as \
                 /var/run/postgresql"
                    .into(),
            ),
            "host" if value.contains(',') => problems.push(
                "parameter host lists several hosts; write them in the URL instead: \
                 postgres://USER@HOST1:PORT1,HOST2:PORT2/DB"
                    .into(),
            ),
            "host" if hosts.len() > 1 => problems
                .push("parameter host cannot be combined with several hosts in the URL".into()),
            "host" => hosts[0].0 = Some(value),
            "target_session_attrs" => match TargetSessionAttrs::parse(&value) {
                Some(t) => target_session_attrs = t,
                None => problems.push(format!(
                    "parameter target_session_attrs: `{value}` is not supported; valid: any, \
                     read-write, primary, standby"
                )),
            },
            _ => problems.push(format!(
                "unsupported parameter `{name}`; supported parameters: {SUPPORTED_PARAMS}"
            )),
        }
    }

    for (host, _) in &hosts {
        match host {
            None => problems.push(format!(
                "add a host: postgres://USER@HOST/DB, or ?host=/var/run/postgresql for a Unix \
                 socket (e.g. {EXAMPLE})"
            )),
            Some(h) if h.starts_with('/') => {}
            Some(h) if !valid_host_name(h) => problems.push(format!(
                "host `{h}` is neither a host name, an IP address, nor an absolute socket directory"
            )),
            Some(_) => {}
        }
    }
    if user.is_none() {
        problems.push("add a user: postgres://USER@host/db".into());
    }
    if dbname.is_none() {
        problems.push("add a database name: postgres://user@host/DBNAME".into());
    }

    if !problems.is_empty() {
        for p in problems {
            errs.add(key, p);
        }
        return None;
    }
    let mut hosts = hosts
        .into_iter()
        .map(|(host, port)| host.map(|host| SourceHost { host, port }));
    let first = hosts.next()??;
    let other_hosts = hosts.collect::<Option<Vec<_>>>()?;
    Some(PgUrl {
        display,
        host: first.host,
        port: first.port,
        other_hosts,
        target_session_attrs,
        user: user?,
        dbname: dbname?,
        sslmode,
        sslrootcert,
        connect_timeout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> PgUrl {
        let mut errs = Errors::default();
        let url = parse_pg_url(text, "source.url", &mut errs);
        assert!(errs.is_empty(), "{:?}", errs.into_vec());
        url.expect("parsed")
    }

    fn bad(text: &str) -> Vec<String> {
        let mut errs = Errors::default();
        assert!(parse_pg_url(text, "source.url", &mut errs).is_none());
        let errs = errs.into_vec();
        assert!(!errs.is_empty());
        assert!(errs.iter().all(|e| e.key == "source.url"));
        errs.into_iter().map(|e| e.message).collect()
    }

    fn has(msgs: &[String], fragment: &str) -> bool {
        msgs.iter().any(|m| m.contains(fragment))
    }

    #[test]
    fn full_url() {
        let u = ok("postgres://steward@db.example:6543/odoo?sslmode=verify-full&sslrootcert=ca.pem&connect_timeout=7");
        assert_eq!(u.host, "db.example");
        assert_eq!(u.port, 6543);
        assert_eq!(u.user, "steward");
        assert_eq!(u.dbname, "odoo");
        assert_eq!(u.sslmode, SslMode::VerifyFull);
        assert_eq!(u.sslrootcert.as_deref(), Some("ca.pem"));
        assert_eq!(u.connect_timeout, Some(Duration::from_secs(7)));
    }

    #[test]
    fn defaults() {
        let u = ok("postgresql://steward@localhost/odoo");
        assert_eq!(u.port, 5432);
        assert_eq!(u.sslmode, SslMode::Prefer);
        assert_eq!(u.sslrootcert, None);
        assert_eq!(u.connect_timeout, None);
        assert_eq!(u.display, "postgresql://steward@localhost/odoo");
    }

    #[test]
    fn percent_decoding_and_sockets() {
        let u = ok("postgres://st%40ward@%2Fvar%2Frun%2Fpostgresql/my%20db");
        assert_eq!(u.user, "st@ward");
        assert_eq!(u.host, "/var/run/postgresql");
        assert_eq!(u.dbname, "my db");
        let u = ok("postgres://steward@/odoo?host=/run/postgresql");
        assert_eq!(u.host, "/run/postgresql");
        let u = ok("postgres://steward@localhost/odoo?host=%2Ftmp");
        assert_eq!(u.host, "/tmp", "the host parameter overrides the URL host");
        assert!(has(
            &bad("postgres://steward@localhost/od%zzoo"),
            "percent-escape"
        ));
    }

    #[test]
    fn ipv6() {
        let u = ok("postgres://steward@[::1]:5433/odoo");
        assert_eq!(u.host, "::1");
        assert_eq!(u.port, 5433);
        assert!(has(&bad("postgres://steward@[::1/odoo"), "not closed"));
    }

    #[test]
    fn password_is_rejected_without_echo() {
        let msgs = bad("postgres://steward:hunter2@localhost/odoo");
        assert!(has(&msgs, "password_file"));
        assert!(!msgs.iter().any(|m| m.contains("hunter2")));
        let msgs = bad("postgres://steward@localhost/odoo?password=hunter2");
        assert!(has(&msgs, "password_env"));
        assert!(!msgs.iter().any(|m| m.contains("hunter2")));
    }

    #[test]
    fn missing_parts() {
        assert!(has(
            &bad("postgres://localhost/odoo"),
            "add a user: postgres://USER@host/db"
        ));
        assert!(has(
            &bad("postgres://steward@localhost"),
            "add a database name"
        ));
        assert!(has(&bad("postgres://steward@/odoo"), "add a host"));
        assert!(has(&bad("mysql://x@y/z"), "postgres://"));
        assert!(has(&bad("host=localhost dbname=odoo"), "key=value"));
    }

    #[test]
    fn bad_params() {
        assert!(has(
            &bad("postgres://s@h/d?sslmode=allow"),
            "disable, prefer, require, verify-full"
        ));
        assert!(has(
            &bad("postgres://s@h/d?connect_timeout=0"),
            "between 1 and 3600"
        ));
        assert!(has(
            &bad("postgres://s@h/d?application_name=x"),
            "supported parameters: sslmode"
        ));
        assert!(has(&bad("postgres://s@h/d?sslmode"), "has no value"));
        assert!(has(
            &bad("postgres://s@h/d?sslmode=require&sslmode=disable"),
            "more than once"
        ));
        assert!(has(&bad("postgres://s@h:99999/d"), "not a port number"));
        assert!(has(
            &bad("postgres://s@h/d?target_session_attrs=prefer-standby"),
            "any, read-write, primary, standby"
        ));
        assert!(has(
            &bad("postgres://s@h/d?host=a,b"),
            "write them in the URL"
        ));
        assert!(has(&bad("postgres://s@a,/d"), "add a host"));
    }

    #[test]
    fn several_hosts() {
        let u =
            ok("postgres://steward@db1:5433,[::1]:5434,db3/odoo?target_session_attrs=read-write");
        assert_eq!((u.host.as_str(), u.port), ("db1", 5433));
        assert_eq!(
            u.other_hosts,
            vec![
                SourceHost {
                    host: "::1".into(),
                    port: 5434
                },
                SourceHost {
                    host: "db3".into(),
                    port: 5432
                },
            ]
        );
        assert_eq!(u.target_session_attrs, TargetSessionAttrs::ReadWrite);
        let u = ok("postgres://steward@db1/odoo");
        assert!(u.other_hosts.is_empty());
        assert_eq!(u.target_session_attrs, TargetSessionAttrs::Any);
    }

    #[test]
    fn all_problems_at_once() {
        let msgs = bad("postgres://localhost?sslmode=nope");
        assert_eq!(msgs.len(), 3, "{msgs:?}");
    }
}
