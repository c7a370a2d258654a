//! The closed label sets: every value of a `kind`, `reason`, `outcome`,
//! `target` or `role` label is a variant here, so [`super::Metrics`] creates its series up
//! front and indexes them by enum.

/// The kinds of Redis invalidation, the `kind` label of [`super::names::INVALIDATIONS_TOTAL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InvalidationKind {
    /// Keys unlinked (`keys = [...]`).
    Keys,
    /// Tag sets emptied (`tags = [...]`).
    Tags,
    /// Version keys bumped (`versions = [...]`).
    Versions,
    /// Patterns matched by a SCAN pass (`patterns = [...]`).
    Patterns,
    /// Messages published (`channels = [...]`).
    Publish,
}

impl InvalidationKind {
    /// Every kind, in label order.
    pub const ALL: [InvalidationKind; 5] = [
        InvalidationKind::Keys,
        InvalidationKind::Tags,
        InvalidationKind::Versions,
        InvalidationKind::Patterns,
        InvalidationKind::Publish,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            InvalidationKind::Keys => "keys",
            InvalidationKind::Tags => "tags",
            InvalidationKind::Versions => "versions",
            InvalidationKind::Patterns => "patterns",
            InvalidationKind::Publish => "publish",
        }
    }
}

/// Why a mapped table runs in fallback (its truncate invalidations on each
/// of its changes): its mapping no longer fits the schema. The `reason`
/// label of [`super::names::BROKEN_TABLES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BrokenReason {
    /// The mapped table does not exist (dropped), found at start.
    MissingTable,
    /// A column the mapping reads is gone (dropped or renamed), found at
    /// start or when a Relation message shows it.
    MissingColumn,
}

impl BrokenReason {
    /// Every reason, in label order.
    pub const ALL: [BrokenReason; 2] = [BrokenReason::MissingTable, BrokenReason::MissingColumn];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            BrokenReason::MissingTable => "missing_table",
            BrokenReason::MissingColumn => "missing_column",
        }
    }
}

/// What became of a key a `refresh` rule wanted to set, the `outcome` label
/// of [`super::names::REFRESHES_TOTAL`] (docs/pre-warm.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefreshOutcome {
    /// Set to the new row.
    Set,
    /// Left as it was: Redis held a newer version (a replay after a crash).
    Kept,
    /// Unlinked instead: the value needs a column the change did not carry
    /// (unchanged TOAST) or the relation no longer has.
    UnlinkedFallback,
    /// Unlinked instead: the value is larger than `max_refresh_bytes`.
    TooLarge,
}

impl RefreshOutcome {
    /// Every outcome, in label order.
    pub const ALL: [RefreshOutcome; 4] = [
        RefreshOutcome::Set,
        RefreshOutcome::Kept,
        RefreshOutcome::UnlinkedFallback,
        RefreshOutcome::TooLarge,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RefreshOutcome::Set => "set",
            RefreshOutcome::Kept => "kept",
            RefreshOutcome::UnlinkedFallback => "unlinked_fallback",
            RefreshOutcome::TooLarge => "too_large",
        }
    }
}

/// Why the worker fired truncate invalidations wholesale, the `reason` label of
/// [`super::names::FLUSHES_TOTAL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FlushReason {
    /// A `flush:all` marker came through the stream (slot created or recreated).
    MarkerAll,
    /// A `flush:table:<t>` marker came through the stream (table added to the publication).
    MarkerTable,
    /// Redis's or PostgreSQL's identity changed (Redis restored, replica promoted).
    IdentityChanged,
    /// A TRUNCATE of a mapped table.
    Truncate,
    /// A message under our prefix the worker could not understand (a malformed
    /// declared invalidation, an unknown payload version).
    MalformedMessage,
    /// PostgreSQL 18+ skipped changes because the publication did not exist
    /// at their point in the WAL (dropped, then recreated).
    PublicationGap,
}

impl FlushReason {
    /// Every reason, in label order.
    pub const ALL: [FlushReason; 6] = [
        FlushReason::MarkerAll,
        FlushReason::MarkerTable,
        FlushReason::IdentityChanged,
        FlushReason::Truncate,
        FlushReason::MalformedMessage,
        FlushReason::PublicationGap,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            FlushReason::MarkerAll => "marker_all",
            FlushReason::MarkerTable => "marker_table",
            FlushReason::IdentityChanged => "identity_changed",
            FlushReason::Truncate => "truncate",
            FlushReason::MalformedMessage => "malformed_message",
            FlushReason::PublicationGap => "publication_gap",
        }
    }
}

/// A connection the worker re-establishes, the `target` label of [`super::names::RECONNECTS_TOTAL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// The replication (or SQL) connection to PostgreSQL.
    Postgres,
    /// The Redis connection.
    Redis,
}

impl Target {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Target::Postgres => "postgres",
            Target::Redis => "redis",
        }
    }
}

/// Whether this process streams the slot (`active`) or waits for it (`standby`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Streams the slot.
    Active,
    /// Another worker holds the slot; this one retries until it can take over.
    Standby,
}

impl Role {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Active => "active",
            Role::Standby => "standby",
        }
    }
}
