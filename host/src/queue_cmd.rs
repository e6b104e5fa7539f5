//! `altroute queue list | show ID | retry ID|--all | bounce ID`: the queue of a running
//! relay, through its admin endpoint (`GET /queue`, `GET /queue/ID`,
//! `POST /queue[/ID]/retry`, `POST /queue/ID/bounce`; see [`crate::admin`]).
//!
//! The endpoint and token come from `--admin URL --token T` or from the relay's
//! configuration (`-c altroute.toml`: `[admin].listen` and `[admin].token`);
//! `$ALTROUTE_ADMIN_TOKEN` also sets the token. `--json` prints the endpoint's JSON
//! answer unchanged (one object per line, stable field names, see docs/operations.md),
//! for scripts.
//!
//! Exit codes: 0 done; 1 refused (unknown id, malformed id, message being delivered,
//! bad token); 2 error (endpoint unreachable, configuration unreadable, server error).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::config::Config;
use crate::reload::{AdminArgs, admin_request};

/// `altroute queue ...`.
#[derive(Debug, clap::Args)]
pub struct QueueArgs {
    #[command(subcommand)]
    command: QueueCommand,
    /// The relay configuration, read for `[admin].listen` and `[admin].token` when
    /// `--admin` is not given.
    #[arg(
        short,
        long,
        global = true,
        default_value = "/etc/altroute/altroute.toml"
    )]
    config: PathBuf,
    /// The admin endpoint, e.g. http://127.0.0.1:8025 (instead of reading `-c`).
    #[arg(long, global = true)]
    admin: Option<String>,
    /// Bearer token ([admin].token). Defaults to $ALTROUTE_ADMIN_TOKEN, then the
    /// configuration's.
    #[arg(long, global = true)]
    token: Option<String>,
    /// Who you are, for the relay's log of retries and bounces (`cli:<who>`). Defaults
    /// to $SUDO_USER, else $USER.
    #[arg(long, global = true)]
    who: Option<String>,
    /// Print the endpoint's JSON answer instead of text.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, clap::Subcommand)]
enum QueueCommand {
    /// Every queued message: id, state, attempts, next attempt, last error.
    List,
    /// One message with the state of each recipient.
    Show {
        /// Queue id (as `queue list` prints it).
        id: String,
    },
    /// Make deferred recipients due now (one message, or `--all`).
    Retry {
        /// Queue id.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// Every message in the queue.
        #[arg(long)]
        all: bool,
    },
    /// Bounce every open recipient of a message; a DSN goes to the sender.
    Bounce {
        /// Queue id.
        id: String,
    },
}

/// Where to send requests: `--admin`/`--token`, else the configuration file.
fn endpoint(args: &QueueArgs) -> Result<AdminArgs> {
    let env_token = std::env::var("ALTROUTE_ADMIN_TOKEN").ok();
    if let Some(admin) = &args.admin {
        return Ok(AdminArgs {
            admin: admin.clone(),
            token: args.token.clone().or(env_token),
            who: args.who.clone(),
        });
    }
    let config =
        Config::load(&args.config).context("no --admin given: [admin] of the configuration")?;
    Ok(AdminArgs {
        admin: format!("http://{}", config.admin.listen),
        token: args.token.clone().or(env_token).or(config.admin.token),
        who: args.who.clone(),
    })
}

/// Runs the command; returns the exit code (see the module docs).
pub fn run(args: QueueArgs) -> Result<i32> {
    let (method, path) = match request_line(&args.command) {
        Ok(r) => r,
        // Refused like an unknown id: exit code 1.
        Err(invalid) => {
            eprintln!("altroute: {invalid}");
            return Ok(1);
        }
    };
    let target = endpoint(&args)?;
    let (status, body) = admin_request(&target, method, &path, b"")?;
    let value: Value = serde_json::from_str(body.trim())
        .with_context(|| format!("the admin endpoint answered {status} with non-JSON: {body}"))?;
    if status >= 500 {
        bail!("the relay failed: {}", error_text(&value));
    }
    if args.json {
        crate::outln!("{value}")?;
    }
    if status != 200 {
        if !args.json {
            eprintln!("altroute: {}", error_text(&value));
        }
        return Ok(1);
    }
    if !args.json {
        match &args.command {
            QueueCommand::List => print_list(&value)?,
            QueueCommand::Show { .. } => print_show(&value)?,
            QueueCommand::Retry { .. } => print_retry(&value)?,
            QueueCommand::Bounce { .. } => print_bounce(&value)?,
        }
    }
    Ok(0)
}

/// The method and path of `command`; `Err` for an id that is not one.
fn request_line(command: &QueueCommand) -> std::result::Result<(&'static str, String), String> {
    Ok(match command {
        QueueCommand::List => ("GET", "/queue".to_string()),
        QueueCommand::Show { id } => ("GET", format!("/queue/{}", path_segment(id)?)),
        QueueCommand::Retry { all: true, .. } => ("POST", "/queue/retry".to_string()),
        QueueCommand::Retry { id, .. } => {
            let id = id.as_deref().unwrap_or_default();
            ("POST", format!("/queue/{}/retry", path_segment(id)?))
        }
        QueueCommand::Bounce { id } => ("POST", format!("/queue/{}/bounce", path_segment(id)?)),
    })
}

/// Ids are lowercase hex; anything else would change the request path, so refuse it here
/// (the relay would answer 400 for a well-formed path with a bad id).
fn path_segment(id: &str) -> std::result::Result<&str, String> {
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(format!("invalid queue id {id:?}"));
    }
    Ok(id)
}

fn error_text(v: &Value) -> String {
    v.get("error")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| v.to_string())
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("-")
}

fn n(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

/// A time field: UTC date and time, `-` when absent, `now` for 0 (pending).
fn t(v: &Value, key: &str) -> String {
    match v.get(key).and_then(Value::as_u64) {
        None => "-".to_string(),
        Some(0) => "now".to_string(),
        Some(ts) => utc(ts),
    }
}

/// `2026-11-25 14:30:00Z` from Unix seconds (proleptic Gregorian calendar).
pub fn utc(ts: u64) -> String {
    let days = i64::try_from(ts / 86_400).unwrap_or(0);
    let secs = ts % 86_400;
    let (year, month, day) = crate::civil::civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

fn print_list(v: &Value) -> std::io::Result<()> {
    let empty = Vec::new();
    let messages = v
        .get("messages")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    if messages.is_empty() {
        return crate::outln!("queue is empty");
    }
    crate::outln!(
        "{:<23}  {:<9} {:>8}  {:<20}  {:>8}  SENDER (RECIPIENTS OPEN/ALL)",
        "ID",
        "STATE",
        "ATTEMPTS",
        "NEXT ATTEMPT",
        "SIZE"
    )?;
    for m in messages {
        let state = if m.get("in_flight").and_then(Value::as_bool) == Some(true) {
            "active"
        } else {
            s(m, "state")
        };
        let sender = match s(m, "sender") {
            "" => "<>",
            other => other,
        };
        crate::outln!(
            "{:<23}  {:<9} {:>8}  {:<20}  {:>8}  {} ({}/{})",
            s(m, "id"),
            state,
            n(m, "attempts"),
            t(m, "next_attempt"),
            n(m, "size"),
            sender,
            n(m, "open_recipients"),
            n(m, "recipients"),
        )?;
        if let Some(err) = m.get("last_error").and_then(Value::as_str) {
            crate::outln!("{:<23}  last error: {err}", "")?;
        }
    }
    crate::outln!("{} message(s)", messages.len())
}

fn print_show(v: &Value) -> std::io::Result<()> {
    let sender = match s(v, "sender") {
        "" => "<>",
        other => other,
    };
    crate::outln!("id:           {}", s(v, "id"))?;
    crate::outln!("sender:       {sender}")?;
    crate::outln!("message-id:   {}", s(v, "message_id"))?;
    crate::outln!("size:         {} bytes", n(v, "size"))?;
    crate::outln!("received:     {}", t(v, "received_at"))?;
    crate::outln!("expires:      {}", t(v, "expires_at"))?;
    crate::outln!("state:        {}", s(v, "state"))?;
    crate::outln!(
        "in flight:    {}",
        v.get("in_flight").and_then(Value::as_bool) == Some(true)
    )?;
    crate::outln!(
        "requiretls:   {}",
        v.get("requiretls").and_then(Value::as_bool) == Some(true)
    )?;
    crate::outln!("next attempt: {}", t(v, "next_attempt"))?;
    crate::outln!("recipients:")?;
    let empty = Vec::new();
    for r in v
        .get("recipients")
        .and_then(Value::as_array)
        .unwrap_or(&empty)
    {
        crate::outln!(
            "  {}  {}  attempts={}  next={}",
            s(r, "address"),
            s(r, "state"),
            n(r, "attempts"),
            t(r, "next_attempt")
        )?;
        if let Some(via) = r.get("via").and_then(Value::as_str) {
            crate::outln!("    via: {via}")?;
        }
        if let Some(err) = r.get("last_error").and_then(Value::as_str) {
            crate::outln!("    last error: {err}")?;
        }
    }
    Ok(())
}

fn print_retry(v: &Value) -> std::io::Result<()> {
    match v.get("id").and_then(Value::as_str) {
        Some(id) => crate::outln!("{id}: {} recipient(s) due now", n(v, "retried")),
        None => crate::outln!("{} recipient(s) due now", n(v, "retried")),
    }
}

fn print_bounce(v: &Value) -> std::io::Result<()> {
    let bounced: Vec<&str> = v
        .get("bounced")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    crate::outln!(
        "{}: bounced {} recipient(s){}",
        s(v, "id"),
        bounced.len(),
        if bounced.is_empty() {
            String::new()
        } else {
            format!(": {}", bounced.join(", "))
        }
    )?;
    match v.get("dsn").and_then(Value::as_str) {
        Some(dsn) => crate::outln!("DSN to the sender queued as {dsn}")?,
        None => crate::outln!("no DSN (null sender or nothing to bounce)")?,
    }
    if v.get("removed").and_then(Value::as_bool) == Some(true) {
        crate::outln!("message removed from the queue")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00Z");
        assert_eq!(utc(1_700_000_000), "2023-11-14 22:13:20Z");
    }
}
