//! The keys of `[targets.NAME]` with `type = "nats"`: servers, credentials,
//! the subject template, envelope and the JetStream stream.

use std::path::PathBuf;
use std::time::Duration;

use steward_core::config::check::{existing_file, optional_secret, Errors, Reader};
use steward_core::config::{Secret, TargetContext};

use crate::config::{envelope, HOUR_MS};
use crate::envelope::Envelope;

pub(crate) const KEYS: &[&str] = &[
    "url",
    "subject",
    "envelope",
    "stream",
    "create_stream",
    "stream_subjects",
    "duplicate_window_ms",
    "token_file",
    "token_env",
    "user",
    "password_file",
    "password_env",
    "creds_file",
    "timeout_ms",
    "connect_timeout_ms",
];

/// Built by `check` only, so the sink can rely on its rules.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub(crate) struct NatsTargetConfig {
    /// One or more `nats://host:port` server addresses.
    pub(crate) servers: Vec<String>,
    pub(crate) auth: NatsAuth,
    /// E.g. `steward.{entity}.{op}`; placeholders `{entity}`, `{op}`, `{key}`, `{target}`.
    pub(crate) subject: String,
    pub(crate) envelope: Envelope,
    pub(crate) stream: Option<String>,
    pub(crate) create_stream: bool,
    pub(crate) stream_subjects: Vec<String>,
    pub(crate) duplicate_window: Duration,
    pub(crate) timeout: Duration,
    pub(crate) connect_timeout: Duration,
}

#[derive(Clone, Debug)]
pub(crate) enum NatsAuth {
    None,
    Token(Secret),
    UserPassword(String, Secret),
    CredsFile(PathBuf),
}

/// Subject tokens: the template may use these placeholders only.
const SUBJECT_PLACEHOLDERS: &[&str] = &["{entity}", "{op}", "{key}", "{target}"];

pub(crate) fn check_subject(template: &str) -> Result<(), String> {
    if template.is_empty() || template.chars().any(char::is_whitespace) {
        return Err(
            "must be a non-empty subject without spaces, e.g. steward.{entity}.{op}".into(),
        );
    }
    let mut rest = template;
    while let Some(i) = rest.find('{') {
        let tail = &rest[i..];
        match SUBJECT_PLACEHOLDERS.iter().find(|p| tail.starts_with(**p)) {
            Some(p) => rest = &tail[p.len()..],
            None => {
                return Err(format!(
                    "has an unknown placeholder at `{}`; valid: {}",
                    tail.chars().take(12).collect::<String>(),
                    SUBJECT_PLACEHOLDERS.join(", ")
                ))
            }
        }
    }
    if template
        .split('.')
        .any(|t| t.is_empty() || t == "*" || t == ">")
    {
        return Err(
            "must be a concrete subject: no empty tokens (..) and no wildcards (* or >)".into(),
        );
    }
    Ok(())
}

pub(crate) fn check(
    target: &TargetContext,
    r: &Reader,
    errs: &mut Errors,
) -> Option<NatsTargetConfig> {
    let base_dir = target.base_dir;
    let servers = r
        .required_string(
            "url",
            "the NATS server(s), e.g. url = \"nats://nats1:4222,nats://nats2:4222\"",
            errs,
        )
        .and_then(|u| {
            let list: Vec<String> = u.split(',').map(|s| s.trim().to_string()).collect();
            let bad = list.iter().find(|s| {
                !(s.starts_with("nats://") || s.starts_with("tls://"))
                    || url::Url::parse(s).is_err()
            });
            if let Some(bad) = bad {
                errs.add(
                    &r.key("url"),
                    format!(
                        "`{bad}` is not a NATS server URL; use nats://HOST:PORT (or tls://), \
                         several separated by commas"
                    ),
                );
                return None;
            }
            if list
                .iter()
                .any(|s| url::Url::parse(s).is_ok_and(|u| u.password().is_some()))
            {
                errs.add(
                    &r.key("url"),
                    "contains a password; use user with password_file or password_env",
                );
                return None;
            }
            Some(list)
        });
    let subject = match r.string("subject", errs) {
        None if r.has("subject") => None,
        s => {
            let s = s.unwrap_or("steward.{entity}.{op}");
            match check_subject(s) {
                Ok(()) => Some(s.to_string()),
                Err(m) => {
                    errs.add(&r.key("subject"), m);
                    None
                }
            }
        }
    };
    let envelope = envelope(r, errs);
    let stream = match r.string("stream", errs) {
        None if r.has("stream") => None,
        None => Some(None),
        Some(s)
            if !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') =>
        {
            Some(Some(s.to_string()))
        }
        Some(s) => {
            errs.add(
                &r.key("stream"),
                format!("`{s}` is not a valid stream name; use letters, digits, _ and -"),
            );
            None
        }
    };
    let create_stream = r.bool("create_stream", false, errs);
    if create_stream == Some(true) && stream == Some(None) {
        errs.add(
            &r.key("create_stream"),
            "needs stream = \"NAME\" (e.g. stream = \"STEWARD\")",
        );
    }
    let stream_subjects = match r.string_list("stream_subjects", errs) {
        None if r.has("stream_subjects") => None,
        None => Some(vec!["steward.>".to_string()]),
        Some(l) if l.is_empty() => {
            errs.add(
                &r.key("stream_subjects"),
                "is empty; list at least one subject filter, e.g. [\"steward.>\"]",
            );
            None
        }
        Some(l) => Some(l.iter().map(std::string::ToString::to_string).collect()),
    };
    let duplicate_window = r.int(
        "duplicate_window_ms",
        120_000,
        1_000,
        7 * 24 * HOUR_MS,
        "milliseconds",
        errs,
    );
    let token = optional_secret(r, "token", base_dir, errs);
    let password = optional_secret(r, "password", base_dir, errs);
    let user = r.string("user", errs);
    let creds = existing_file(r, "creds_file", base_dir, errs);
    let auth = match (token, user, password, creds) {
        (Some(None), None, Some(None), Some(None)) => Some(NatsAuth::None),
        (Some(Some(t)), None, Some(None), Some(None)) => Some(NatsAuth::Token(t)),
        (Some(None), Some(u), Some(Some(p)), Some(None)) => {
            Some(NatsAuth::UserPassword(u.to_string(), p))
        }
        (Some(None), None, Some(None), Some(Some(c))) => Some(NatsAuth::CredsFile(c)),
        (Some(_), Some(_), Some(None), Some(_)) => {
            errs.add(
                &r.key("password_file"),
                "missing; user needs password_file or password_env",
            );
            None
        }
        (Some(_), None, Some(Some(_)), Some(_)) => {
            errs.add(&r.key("user"), "missing; a password needs user");
            None
        }
        (Some(_), _, Some(_), Some(_)) => {
            errs.add(
                &r.key("token_file"),
                "give only one kind of credentials: a token, user + password, or creds_file",
            );
            None
        }
        _ => None,
    };
    let timeout = r.int("timeout_ms", 10_000, 1, HOUR_MS, "milliseconds", errs);
    let connect_timeout = r.int(
        "connect_timeout_ms",
        5_000,
        1,
        HOUR_MS,
        "milliseconds",
        errs,
    );
    Some(NatsTargetConfig {
        servers: servers?,
        auth: auth?,
        subject: subject?,
        envelope: envelope?,
        stream: stream?,
        create_stream: create_stream?,
        stream_subjects: stream_subjects?,
        duplicate_window: Duration::from_millis(duplicate_window?),
        timeout: Duration::from_millis(timeout?),
        connect_timeout: Duration::from_millis(connect_timeout?),
    })
}
