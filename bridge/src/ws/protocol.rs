//! The WebSocket protocol, version 1: every message in one place (docs/protocol.md
//! describes them for client authors). Client messages are JSON objects with a
//! `type`; unknown fields are refused so a typo is an error, not a silent default.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::hub::FilterSpec;
use crate::pg::PgError;

pub const PROTOCOL_VERSION: u32 = 1;

/// A message from a client.
#[derive(Debug)]
pub enum ClientMessage {
    Hello(Hello),
    Subscribe(Subscribe),
    Unsubscribe(Unsubscribe),
    Snapshot(SnapshotRequest),
    Write(WriteRequest),
    WriteBatch(WriteBatchRequest),
    Ping(Ping),
    Join(JoinRequest),
    Presence(PresenceUpdate),
    Leave(LeaveRequest),
    Broadcast(BroadcastRequest),
}

/// `join`: enter a room (or replace one's state in it).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    pub id: Option<Value>,
    pub room: String,
    pub state: Option<Value>,
}

/// `presence`: one's new state in a room.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PresenceUpdate {
    pub id: Option<Value>,
    pub room: String,
    pub state: Value,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaveRequest {
    pub id: Option<Value>,
    pub room: String,
}

/// `broadcast`: an ephemeral event to a room's other members.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BroadcastRequest {
    pub id: Option<Value>,
    pub room: String,
    pub event: String,
    #[serde(default)]
    pub payload: Value,
    #[serde(default)]
    pub echo: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    pub client_id: String,
    pub token: Option<String>,
    pub protocol: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subscribe {
    pub id: Value,
    pub channel: String,
    pub filter: Option<FilterSpec>,
    pub since: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Unsubscribe {
    pub id: Value,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    pub id: Value,
    pub channel: String,
    pub filter: Option<FilterSpec>,
}

/// One mutation, as `write` carries it and `write_batch` lists them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mutation {
    pub table: String,
    pub op: String,
    pub key: Value,
    pub values: Option<Value>,
    pub base_version: Option<i64>,
    pub base_values: Option<Value>,
    pub mutation_id: i64,
    pub hlc: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct WriteRequest {
    pub id: Value,
    #[serde(flatten)]
    pub mutation: Mutation,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteBatchRequest {
    pub id: Value,
    pub mutations: Vec<Mutation>,
    #[serde(default)]
    pub all_or_nothing: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ping {
    pub id: Option<Value>,
}

impl ClientMessage {
    /// Parses one text frame. The error is a `bad_request` message for the client,
    /// with the request's `id` when one could be read.
    pub fn parse(text: &str) -> Result<ClientMessage, (Option<Value>, String)> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| (None, format!("not JSON: {e}")))?;
        let Value::Object(mut object) = value else {
            return Err((None, "a message must be a JSON object".into()));
        };
        let id = object.get("id").cloned();
        let kind = match object.remove("type") {
            Some(Value::String(kind)) => kind,
            _ => return Err((id, "a message needs a string \"type\"".into())),
        };
        if let Some(id) = &id {
            if !matches!(id, Value::String(_) | Value::Number(_)) {
                return Err((None, "\"id\" must be a string or a number".into()));
            }
        }
        fn from<T: for<'de> Deserialize<'de>>(object: Map<String, Value>) -> Result<T, String> {
            serde_json::from_value(Value::Object(object)).map_err(|e| e.to_string())
        }
        let parsed = match kind.as_str() {
            "hello" => from(object).map(ClientMessage::Hello),
            "subscribe" => from(object).map(ClientMessage::Subscribe),
            "unsubscribe" => from(object).map(ClientMessage::Unsubscribe),
            "snapshot" => from(object).map(ClientMessage::Snapshot),
            "write" => {
                // flatten and deny_unknown_fields do not mix: check the id apart.
                let id = object.remove("id");
                from::<Mutation>(object).and_then(|mutation| {
                    Ok(ClientMessage::Write(WriteRequest {
                        id: id.ok_or("missing field `id`")?,
                        mutation,
                    }))
                })
            }
            "write_batch" => from(object).map(ClientMessage::WriteBatch),
            "ping" => from(object).map(ClientMessage::Ping),
            "join" => from(object).map(ClientMessage::Join),
            "presence" => from(object).map(ClientMessage::Presence),
            "leave" => from(object).map(ClientMessage::Leave),
            "broadcast" => from(object).map(ClientMessage::Broadcast),
            other => Err(format!("unknown message type {other:?}")),
        };
        parsed.map_err(|e| (id, format!("invalid {kind}: {e}")))
    }
}

/// Stable error codes (docs/protocol.md "Errors").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    TooLarge,
    RateLimited,
    ResyncRequired,
    Unavailable,
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::ResyncRequired => "resync_required",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }

    /// The code for a database error, by SQLSTATE.
    pub fn for_sqlstate(state: &str) -> ErrorCode {
        match state {
            "42501" => ErrorCode::Forbidden,
            "LS001" => ErrorCode::ResyncRequired,
            "42P01" | "LS002" | "LS006" | "42704" | "3F000" => ErrorCode::NotFound,
            "54000" | "54001" => ErrorCode::TooLarge,
            "40001" | "40P01" | "55P03" | "57014" => ErrorCode::Unavailable,
            s if s.starts_with("08") || s.starts_with("57P") || s == "53300" => {
                ErrorCode::Unavailable
            }
            s if s.starts_with("22") || s.starts_with("23") || s.starts_with("42") => {
                ErrorCode::BadRequest
            }
            "LS003" | "LS004" | "LS005" | "LS007" | "LS008" | "0A000" => ErrorCode::BadRequest,
            _ => ErrorCode::Internal,
        }
    }
}

/// An `error` message.
#[derive(Debug, Serialize)]
pub struct ErrorMessage {
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
    pub code: ErrorCode,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sqlstate: Option<String>,
}

impl ErrorMessage {
    pub fn new(id: Option<Value>, code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorMessage {
            kind: "error",
            id,
            code,
            message: message.into(),
            sqlstate: None,
        }
    }

    /// A database error: its SQLSTATE decides the code; the server's message is kept.
    /// Anything else (connection failures) is `unavailable`, with no internals.
    pub fn from_db(id: Option<Value>, error: &PgError) -> Self {
        if let (PgError::Role(_), Some(state), Some(message)) =
            (error, error.sqlstate(), error.db_message())
        {
            return ErrorMessage {
                kind: "error",
                id,
                code: ErrorCode::Forbidden,
                message: format!("cannot run as the connection's role: {message}"),
                sqlstate: Some(state.to_string()),
            };
        }
        match (error.sqlstate(), error.db_message()) {
            (Some(state), Some(message)) => ErrorMessage {
                kind: "error",
                id,
                code: ErrorCode::for_sqlstate(state),
                message,
                sqlstate: Some(state.to_string()),
            },
            _ if error.is_connection() => ErrorMessage::new(
                id,
                ErrorCode::Unavailable,
                "the database is unavailable; retry",
            ),
            _ => ErrorMessage::new(id, ErrorCode::Internal, "internal error"),
        }
    }

    /// The error about the request with `id` (when it had none yet).
    pub fn with_id(mut self, id: Option<Value>) -> Self {
        if self.id.is_none() {
            self.id = id;
        }
        self
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("an error message serialises")
    }
}

/// Messages the server sends besides `changes` (built in the hub) and `error`.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage<'a> {
    Welcome {
        session: &'a str,
        node: &'a str,
        /// The client id the client's writes are recorded with (and its echoes carry):
        /// with auth on, scoped by the token's subject.
        client_id: &'a str,
        position: i64,
        heartbeat_ms: u64,
        protocol: u32,
    },
    Subscribed {
        id: &'a Value,
        channel: &'a str,
        position: i64,
    },
    Unsubscribed {
        id: &'a Value,
    },
    /// The answer to `leave`.
    Left {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a Value>,
        room: &'a str,
    },
    WriteResult {
        id: &'a Value,
        #[serde(flatten)]
        result: &'a Map<String, Value>,
    },
    WriteBatchResult {
        id: &'a Value,
        results: &'a Value,
    },
    Pong {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a Value>,
    },
    /// The server is going away: connect again (elsewhere) and resume.
    Reconnect {
        reason: &'a str,
        retry_after_ms: u64,
    },
}

impl ServerMessage<'_> {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a server message serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_client_message() {
        assert!(matches!(
            ClientMessage::parse(r#"{"type":"hello","client_id":"c","protocol":1}"#),
            Ok(ClientMessage::Hello(_))
        ));
        let Ok(ClientMessage::Subscribe(s)) = ClientMessage::parse(
            r#"{"type":"subscribe","id":1,"channel":"table:public.t","filter":{"column":"m","op":"eq","value":3},"since":5}"#,
        ) else {
            panic!()
        };
        assert_eq!(s.since, Some(5));
        let Ok(ClientMessage::Write(w)) = ClientMessage::parse(
            r#"{"type":"write","id":"w1","table":"public.t","op":"insert","key":{"id":1},"values":{"id":1},"mutation_id":7}"#,
        ) else {
            panic!()
        };
        assert_eq!(w.mutation.mutation_id, 7);
        assert!(matches!(
            ClientMessage::parse(r#"{"type":"ping"}"#),
            Ok(ClientMessage::Ping(_))
        ));
    }

    #[test]
    fn malformed_messages_say_why_and_keep_the_id() {
        assert!(ClientMessage::parse("nope").is_err());
        assert!(ClientMessage::parse("[1]").is_err());
        let (id, message) =
            ClientMessage::parse(r#"{"type":"subscribe","id":4,"chanel":"x"}"#).unwrap_err();
        assert_eq!(id, Some(Value::from(4)));
        assert!(message.contains("chanel"), "{message}");
        let (_, message) = ClientMessage::parse(r#"{"type":"write","id":1,"table":"t","op":"insert","key":{},"mutation_id":1,"extra":1}"#).unwrap_err();
        assert!(message.contains("extra"), "{message}");
        let (_, message) = ClientMessage::parse(r#"{"type":"dance","id":1}"#).unwrap_err();
        assert!(message.contains("unknown message type"));
        assert!(ClientMessage::parse(r#"{"type":"ping","id":{"x":1}}"#).is_err());
    }

    #[test]
    fn sqlstates_map_to_codes() {
        assert_eq!(ErrorCode::for_sqlstate("42501"), ErrorCode::Forbidden);
        assert_eq!(ErrorCode::for_sqlstate("LS001"), ErrorCode::ResyncRequired);
        assert_eq!(ErrorCode::for_sqlstate("LS002"), ErrorCode::NotFound);
        assert_eq!(ErrorCode::for_sqlstate("22P02"), ErrorCode::BadRequest);
        assert_eq!(ErrorCode::for_sqlstate("54000"), ErrorCode::TooLarge);
        assert_eq!(ErrorCode::for_sqlstate("57P01"), ErrorCode::Unavailable);
        assert_eq!(ErrorCode::for_sqlstate("XX000"), ErrorCode::Internal);
    }
}
