//! The WebSocket endpoint (`/ws`): protocol types, channel names, sessions and the
//! registry of open connections.

pub mod channel;
pub mod protocol;
pub mod registry;
pub mod session;
