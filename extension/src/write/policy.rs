//! How a column both sides changed is settled, and the table-level rules for
//! operations that race (see `livesync.set_policy` and `livesync.set_conflict_rules`).

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    Lww,
    ServerWins,
    ClientWins,
    Max,
    Min,
    Sum,
    Union,
    Append,
    Concat,
    Manual,
}

impl Policy {
    /// Policies are validated when they are set, so an unknown name here means the
    /// catalog was edited by hand; such a column is treated as `manual`, which
    /// never changes data on a guess.
    pub fn from_name(name: &str) -> Policy {
        match name {
            "lww" => Policy::Lww,
            "server_wins" => Policy::ServerWins,
            "client_wins" => Policy::ClientWins,
            "max" => Policy::Max,
            "min" => Policy::Min,
            "sum" => Policy::Sum,
            "union" => Policy::Union,
            "append" => Policy::Append,
            "concat" => Policy::Concat,
            _ => Policy::Manual,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Policy::Lww => "lww",
            Policy::ServerWins => "server_wins",
            Policy::ClientWins => "client_wins",
            Policy::Max => "max",
            Policy::Min => "min",
            Policy::Sum => "sum",
            Policy::Union => "union",
            Policy::Append => "append",
            Policy::Concat => "concat",
            Policy::Manual => "manual",
        }
    }
}

/// `insert` of a key that already exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExistingInsert {
    /// Merge into the stored row as an update whose base is unknown.
    Merge,
    Reject,
}

/// A delete and an update of the same row from the same base.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeleteRace {
    DeleteWins,
    UpdateWins,
}
