//! `steward user ...` and `steward token ...`: the console's users and
//! read-only API tokens, in `[console] users_file`. The file is edited
//! directly (it is not the state file), so these work whether or not the
//! daemon runs; each change is logged with the Unix user who made it.

use std::io::{BufRead, IsTerminal};
use std::path::Path;

use anyhow::Context;
use clap::Subcommand;

use super::out::outln;
use crate::console::users::{Role, Users};

#[derive(Subcommand, Debug)]
pub(super) enum UserAction {
    /// Add a user (or with --replace change one's role and password); asks for the password twice.
    Add {
        #[arg(short, long, value_name = "FILE")]
        config: std::path::PathBuf,
        name: String,
        /// viewer: reads; steward: also releases quarantined records; operator: also dead letters, flush, reset.
        #[arg(long, value_name = "ROLE")]
        role: Role,
        /// Read the password from the first line of standard input instead of asking.
        #[arg(long)]
        password_stdin: bool,
        /// Change an existing user's role and password.
        #[arg(long)]
        replace: bool,
    },
    /// Remove a user.
    Remove {
        #[arg(short, long, value_name = "FILE")]
        config: std::path::PathBuf,
        name: String,
    },
    /// Every user and role.
    List {
        #[arg(short, long, value_name = "FILE")]
        config: std::path::PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub(super) enum TokenAction {
    /// Make a read-only API token for a tool; it is printed once and cannot be shown again.
    Add {
        #[arg(short, long, value_name = "FILE")]
        config: std::path::PathBuf,
        name: String,
    },
    /// Revoke a token.
    Remove {
        #[arg(short, long, value_name = "FILE")]
        config: std::path::PathBuf,
        name: String,
    },
    /// Every token's name and when it was made.
    List {
        #[arg(short, long, value_name = "FILE")]
        config: std::path::PathBuf,
        #[arg(long)]
        json: bool,
    },
}

pub(super) fn user(action: UserAction) -> anyhow::Result<()> {
    match action {
        UserAction::Add {
            config,
            name,
            role,
            password_stdin,
            replace,
        } => {
            let path = users_file(&config)?;
            let mut users = Users::load(&path)?;
            let existed = users.users.contains_key(&name);
            let password = if password_stdin {
                read_stdin_line()?
            } else {
                ask_password(&name)?
            };
            users.add_user(&name, role, &password, replace)?;
            users.save(&path)?;
            let verb = if existed { "changed" } else { "added" };
            tracing::info!(user = %name, %role, by = %os_user(), file = %path.display(), "console user {verb}");
            outln!("user {name} {verb} ({role}) in {}", path.display());
        }
        UserAction::Remove { config, name } => {
            let path = users_file(&config)?;
            let mut users = Users::load(&path)?;
            if users.users.remove(&name).is_none() {
                anyhow::bail!("no user {name} in {}", path.display());
            }
            users.save(&path)?;
            tracing::info!(user = %name, by = %os_user(), file = %path.display(), "console user removed");
            outln!("user {name} removed from {}", path.display());
        }
        UserAction::List { config, json } => {
            let users = Users::load(&users_file(&config)?)?;
            let rows = users.users.iter().map(|(n, u)| (n.as_str(), u.role.name()));
            print_list(
                rows,
                "role",
                json,
                "no users; add one with `steward user add -c FILE NAME --role ROLE`",
            )?;
        }
    }
    Ok(())
}

pub(super) fn token(action: TokenAction) -> anyhow::Result<()> {
    match action {
        TokenAction::Add { config, name } => {
            let path = users_file(&config)?;
            let mut users = Users::load(&path)?;
            let token = users.add_token(&name)?;
            users.save(&path)?;
            tracing::info!(token = %name, by = %os_user(), file = %path.display(), "API token made");
            eprintln!("token {name} (read-only); it is shown this once:");
            outln!("{token}");
        }
        TokenAction::Remove { config, name } => {
            let path = users_file(&config)?;
            let mut users = Users::load(&path)?;
            if users.tokens.remove(&name).is_none() {
                anyhow::bail!("no token {name} in {}", path.display());
            }
            users.save(&path)?;
            tracing::info!(token = %name, by = %os_user(), file = %path.display(), "API token revoked");
            outln!("token {name} revoked");
        }
        TokenAction::List { config, json } => {
            let users = Users::load(&users_file(&config)?)?;
            let rows = users
                .tokens
                .iter()
                .map(|(n, t)| (n.as_str(), t.created.as_str()));
            print_list(rows, "created", json, "no tokens")?;
        }
    }
    Ok(())
}

/// Names with one more column: a table, or JSON objects `{"name", column}`.
fn print_list<'a>(
    rows: impl Iterator<Item = (&'a str, &'a str)>,
    column: &str,
    json: bool,
    empty: &str,
) -> anyhow::Result<()> {
    let rows: Vec<(&str, &str)> = rows.collect();
    if json {
        let list: Vec<serde_json::Value> = rows
            .iter()
            .map(|(name, value)| serde_json::json!({ "name": name, column: value }))
            .collect();
        outln!("{}", serde_json::to_string_pretty(&list)?);
    } else if rows.is_empty() {
        outln!("{empty}");
    } else {
        outln!("{:<32} {}", "NAME", column.to_uppercase());
        for (name, value) in rows {
            outln!("{name:<32} {value}");
        }
    }
    Ok(())
}

fn users_file(config: &Path) -> anyhow::Result<std::path::PathBuf> {
    let config = steward_sinks::config::load(config).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(config.console.users_file)
}

fn read_stdin_line() -> anyhow::Result<String> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("cannot read the password from standard input")?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

fn ask_password(name: &str) -> anyhow::Result<String> {
    if !std::io::stdin().is_terminal() {
        anyhow::bail!(
            "standard input is not a terminal: pass --password-stdin to read the password from it"
        );
    }
    let first = rpassword::prompt_password(format!("password for {name}: "))
        .context("cannot read the password")?;
    let second = rpassword::prompt_password("again: ").context("cannot read the password")?;
    if first != second {
        anyhow::bail!("the two passwords differ");
    }
    Ok(first)
}

/// The Unix user running the command, for the log.
fn os_user() -> String {
    crate::daemon::govern::user_name(nix::unistd::getuid().as_raw())
}
