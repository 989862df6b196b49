//! `livesync`: the command line on top of livesync-client.
//!   livesync tail public.items --since 0 --json
//!   livesync presence board:1
//!   livesync write public.items update '{"id":1}' '{"title":"x"}'

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use livesync_client::{Client, Config, Event, Outcome};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(name = "livesync", version, about = "livesync from the command line")]
struct Cli {
    /// The bridge's WebSocket URL.
    #[arg(
        long,
        env = "LIVESYNC_URL",
        default_value = "ws://127.0.0.1:8080/ws",
        global = true
    )]
    url: String,
    /// The JWT to send in hello (when the bridge has a key).
    #[arg(long, env = "LIVESYNC_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// Names this client across runs: with mutation ids, what makes writes idempotent.
    #[arg(
        long,
        env = "LIVESYNC_CLIENT_ID",
        default_value = "livesync-cli",
        global = true
    )]
    client_id: String,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print a table's changes as they arrive.
    Tail {
        /// `schema.table`
        table: String,
        /// Resume after this position (0: everything still in the log).
        #[arg(long)]
        since: Option<i64>,
        /// `{"column","op","value"}` as JSON, or `column op value` (value as JSON, else text).
        #[arg(long)]
        filter: Option<String>,
        /// One JSON object per change.
        #[arg(long)]
        json: bool,
    },
    /// Join a room and show its members live.
    Presence {
        room: String,
        /// Our presence state (JSON).
        #[arg(long, default_value = "{}")]
        state: String,
        #[arg(long)]
        json: bool,
    },
    /// Send one mutation (queued on disk first; earlier queued ones go before it).
    Write {
        table: String,
        /// insert, update, upsert or delete
        op: String,
        /// The primary key, as JSON: '{"id":1}'
        key: String,
        /// The new values, as JSON (not for delete).
        values: Option<String>,
        #[arg(long)]
        base_version: Option<i64>,
        /// The queue file [default: $XDG_STATE_HOME/livesync/<client-id>.queue].
        #[arg(long, env = "LIVESYNC_QUEUE")]
        queue: Option<PathBuf>,
    },
    /// Replay the queue file's pending writes and wait for their results.
    Flush {
        #[arg(long, env = "LIVESYNC_QUEUE")]
        queue: Option<PathBuf>,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let mut config = Config::new(&cli.url, &cli.client_id);
    config.token = cli.token.clone();
    match cli.command {
        Cmd::Tail {
            table,
            since,
            filter,
            json,
        } => {
            let filter = filter.as_deref().map(parse_filter).transpose()?;
            tail(config, &table, since, filter, json).await
        }
        Cmd::Presence { room, state, json } => {
            let state = serde_json::from_str(&state).context("--state is not JSON")?;
            presence(config, &room, state, json).await
        }
        Cmd::Write {
            table,
            op,
            key,
            values,
            base_version,
            queue,
        } => {
            config.queue_path = Some(queue_path(queue, &cli.client_id)?);
            let key = serde_json::from_str(&key).context("the key is not JSON")?;
            let values = values
                .map(|v| serde_json::from_str(&v).context("the values are not JSON"))
                .transpose()?;
            write(config, Some((table, op, key, values, base_version))).await
        }
        Cmd::Flush { queue } => {
            config.queue_path = Some(queue_path(queue, &cli.client_id)?);
            write(config, None).await
        }
    }
}

fn queue_path(given: Option<PathBuf>, client_id: &str) -> Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p);
    }
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .context("no XDG_STATE_HOME or HOME for the queue file; pass --queue")?;
    let safe: String = client_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    Ok(base.join("livesync").join(format!("{safe}.queue")))
}

fn parse_filter(text: &str) -> Result<Value> {
    if let Ok(v @ Value::Object(_)) = serde_json::from_str(text) {
        return Ok(v);
    }
    let mut parts = text.splitn(3, ' ');
    let (Some(column), Some(op), Some(value)) = (parts.next(), parts.next(), parts.next()) else {
        bail!("--filter: JSON {{\"column\",\"op\",\"value\"}} or `column op value`");
    };
    let value = serde_json::from_str(value).unwrap_or_else(|_| json!(value));
    Ok(json!({"column": column, "op": op, "value": value}))
}

async fn tail(
    config: Config,
    table: &str,
    since: Option<i64>,
    filter: Option<Value>,
    as_json: bool,
) -> Result<()> {
    let (client, mut events) = Client::start(config)?;
    client.subscribe("tail", table, since, filter)?;
    while let Some(event) = events.recv().await {
        match event {
            Event::Changes { changes, .. } => {
                for c in changes {
                    if as_json {
                        println!("{c}");
                    } else {
                        println!("{}", human_change(&c));
                    }
                }
            }
            Event::ResyncRequired { message, .. } => {
                bail!("resync required: {message} (the position is outside the retained log; tail without --since)")
            }
            Event::Error(e) => {
                // An error about our subscription (not found, forbidden...) ends the tail.
                if e["id"] == "tail" {
                    return Err(error_from(&e));
                }
                eprintln!("livesync: {e}");
            }
            Event::Disconnected { reason } => {
                eprintln!("livesync: disconnected ({reason}); reconnecting")
            }
            _ => {}
        }
    }
    Ok(())
}

/// A protocol `error` message as the CLI's error.
fn error_from(e: &Value) -> anyhow::Error {
    anyhow::anyhow!(
        "{}: {}",
        e["code"].as_str().unwrap_or("error"),
        e["message"].as_str().unwrap_or("")
    )
}

fn human_change(c: &Value) -> String {
    let mut cols = Vec::new();
    for (column, d) in c["delta"].as_object().into_iter().flatten() {
        match (d.get("old"), d.get("new")) {
            (Some(o), Some(n)) => cols.push(format!("{column}: {o} -> {n}")),
            (None, Some(n)) => cols.push(format!("{column}={n}")),
            (Some(o), None) => cols.push(format!("{column} was {o}")),
            _ => cols.push(format!("{column}: {d}")),
        }
    }
    format!(
        "{} {} {} v{} by {}: {}",
        c["position"],
        c["op"].as_str().unwrap_or("?"),
        c["key"],
        c["version"],
        c["actor"].as_str().unwrap_or("?"),
        cols.join(", ")
    )
}

async fn presence(config: Config, room: &str, state: Value, as_json: bool) -> Result<()> {
    let (client, mut events) = Client::start(config)?;
    client.join(room, state)?;
    while let Some(event) = events.recv().await {
        match event {
            Event::Presence { room, members } => {
                if as_json {
                    println!("{}", json!({"room": room, "members": members}));
                } else {
                    let users: Vec<String> = members
                        .iter()
                        .map(|m| {
                            format!(
                                "{} ({})",
                                m["user"].as_str().unwrap_or("?"),
                                m["connection"].as_str().unwrap_or("?")
                            )
                        })
                        .collect();
                    println!("{room}: {} here: {}", members.len(), users.join(", "));
                }
            }
            Event::Broadcast(b) => println!("{b}"),
            Event::Error(e) => {
                if e["code"] == "forbidden"
                    || e["code"] == "bad_request"
                    || e["code"] == "too_large"
                {
                    return Err(error_from(&e));
                }
                eprintln!("livesync: {e}");
            }
            Event::Disconnected { reason } => {
                eprintln!("livesync: disconnected ({reason}); reconnecting")
            }
            _ => {}
        }
    }
    Ok(())
}

type NewWrite = (String, String, Value, Option<Value>, Option<i64>);

/// Queues `new` (if any), then waits until the queue is empty: earlier runs' pending
/// writes are replayed first. Prints each result as a JSON line; exits 2 if any was
/// rejected or a conflict.
async fn write(config: Config, new: Option<NewWrite>) -> Result<()> {
    let (client, mut events) = Client::start(config)?;
    if let Some((table, op, key, values, base_version)) = new {
        let id = client.write(&table, &op, key, values, base_version)?;
        eprintln!("livesync: queued mutation {id}");
    }
    let mut failed = false;
    {
        let flushed = client.flush();
        tokio::pin!(flushed);
        loop {
            tokio::select! {
                _ = &mut flushed => break,
                Some(event) = events.recv() => match event {
                    Event::WriteSettled { mutation, result, outcome } => {
                        failed |= matches!(outcome, Outcome::RolledBack { .. });
                        println!("{}", json!({"mutation_id": mutation.mutation_id, "table": mutation.table, "result": result}));
                    }
                    Event::Disconnected { reason } => eprintln!("livesync: not connected ({reason}); the write stays queued, retrying"),
                    Event::Error(e) => eprintln!("livesync: {e}"),
                    _ => {}
                }
            }
        }
    }
    // Results that arrived with the last one.
    while let Ok(event) = events.try_recv() {
        if let Event::WriteSettled {
            mutation,
            result,
            outcome,
        } = event
        {
            failed |= matches!(outcome, Outcome::RolledBack { .. });
            println!(
                "{}",
                json!({"mutation_id": mutation.mutation_id, "table": mutation.table, "result": result})
            );
        }
    }
    tokio::time::timeout(Duration::from_secs(2), client.close())
        .await
        .ok();
    if failed {
        std::process::exit(2);
    }
    Ok(())
}
