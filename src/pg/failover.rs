//! Failover slots (PostgreSQL 17+): whether our logical slot is
//! failover-enabled (synchronized to standbys that set
//! `sync_replication_slots = on`), whether a standby holds a synchronized
//! copy, and whether the primary's `synchronized_standby_slots` names the
//! physical slots of its standbys (without it a standby can be promoted
//! ahead of the logical slot, and the changes in between are never decoded).
//!
//! [`read`] and [`read_standby`] fill the facts with SQL; [`findings`] is pure.
//! What happens on a promotion, per version, is in docs/operations.md
//! ("PostgreSQL failover").

use tokio_postgres::Client;

use super::PgError;
use crate::map::catalog::{Finding, Severity};

/// The first version with failover slots (`CREATE_REPLICATION_SLOT ... (FAILOVER)`,
/// `pg_replication_slots.failover` and `.synced`, slot synchronization).
pub const FAILOVER_SLOTS_MIN_VERSION: u32 = 170000;

/// Whether a server of this `server_version_num` can create failover slots.
pub fn supported(server_version_num: u32) -> bool {
    server_version_num >= FAILOVER_SLOTS_MIN_VERSION
}

/// The failover facts of the primary (or of whatever server the URL reached).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FailoverFacts {
    /// `server_version_num`.
    pub server_version_num: u32,
    /// `pg_is_in_recovery()`.
    pub in_recovery: bool,
    /// `pg_replication_slots.failover` of our slot (`None`: no slot, or before 17).
    pub slot_failover: Option<bool>,
    /// `pg_replication_slots.synced` of our slot (`None`: no slot, or before 17).
    pub slot_synced: Option<bool>,
    /// `synchronized_standby_slots` (`None` before 17), as set.
    pub synchronized_standby_slots: Option<String>,
    /// Physical replication slots (those of standbys), sorted.
    pub physical_slots: Vec<String>,
}

/// Reads the facts over SQL. Columns new in 17 are read through `to_jsonb`
/// of the row, so the same statement runs on every version (NULL before 17).
pub async fn read(client: &Client, slot: &str) -> Result<FailoverFacts, PgError> {
    let what = || format!("reading the failover state of replication slot {slot:?}");
    let row = client
        .query_one(
            "SELECT current_setting('server_version_num')::int4, pg_is_in_recovery(), \
                    (SELECT (to_jsonb(s) ->> 'failover')::bool FROM pg_replication_slots s WHERE s.slot_name = $1), \
                    (SELECT (to_jsonb(s) ->> 'synced')::bool FROM pg_replication_slots s WHERE s.slot_name = $1), \
                    current_setting('synchronized_standby_slots', true), \
                    ARRAY(SELECT slot_name::text FROM pg_replication_slots \
                          WHERE slot_type = 'physical' ORDER BY slot_name)",
            &[&slot],
        )
        .await
        .map_err(|e| PgError::query(what(), e))?;
    let version: i32 = row.get(0);
    Ok(FailoverFacts {
        server_version_num: u32::try_from(version).unwrap_or(0),
        in_recovery: row.get(1),
        slot_failover: row.get(2),
        slot_synced: row.get(3),
        synchronized_standby_slots: row.get(4),
        physical_slots: row.get(5),
    })
}

/// Our slot as a standby holds it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StandbySlot {
    /// `host:port` of the standby (the URL's other hosts).
    pub target: String,
    /// Whether the standby answered (and is in recovery: a standby).
    pub reachable: bool,
    /// Why it could not be read, when not reachable.
    pub error: Option<String>,
    /// Whether the slot exists there.
    pub slot_exists: bool,
    /// `synced`: a copy kept by slot synchronization (17+).
    pub synced: bool,
    /// Its `confirmed_flush_lsn` there.
    pub confirmed_flush_lsn: Option<String>,
}

/// [`StandbySlot::error`] of a server that is not in recovery.
pub const NOT_A_STANDBY: &str = "not in recovery: not a standby";

/// Reads our slot on a standby (connected with `client`).
pub async fn read_standby(client: &Client, target: &str, slot: &str) -> StandbySlot {
    let result = client
        .query_one(
            "SELECT pg_is_in_recovery(), \
                    EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1), \
                    coalesce((SELECT (to_jsonb(s) ->> 'synced')::bool FROM pg_replication_slots s WHERE s.slot_name = $1), false), \
                    (SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1)",
            &[&slot],
        )
        .await;
    match result {
        Ok(row) => StandbySlot {
            target: target.to_owned(),
            reachable: row.get::<_, bool>(0),
            error: (!row.get::<_, bool>(0)).then(|| NOT_A_STANDBY.to_owned()),
            slot_exists: row.get(1),
            synced: row.get(2),
            confirmed_flush_lsn: row.get(3),
        },
        Err(e) => StandbySlot {
            target: target.to_owned(),
            reachable: false,
            error: Some(PgError::query("reading the slot on the standby", e).to_string()),
            slot_exists: false,
            synced: false,
            confirmed_flush_lsn: None,
        },
    }
}

/// The names in a `synchronized_standby_slots` value (`'a, "B"'`), unquoted.
pub fn parse_slot_list(setting: &str) -> Vec<String> {
    setting
        .split(',')
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.strip_prefix('"')
                .and_then(|s| s.strip_suffix('"'))
                .map(|s| s.replace("\"\"", "\""))
                .unwrap_or_else(|| s.to_owned())
        })
        .collect()
}

/// What `check` says about failover, given the facts and `[postgres]
/// failover_slot`. Only warnings: none of this stops `run`.
pub fn findings(facts: &FailoverFacts, slot: &str, failover_slot: bool) -> Vec<Finding> {
    let mut out = Vec::new();
    let warn = |message: String| Finding {
        severity: Severity::Warning,
        message,
    };
    if facts.in_recovery {
        // check/status on a standby: the primary's settings are not visible here.
        return out;
    }
    if !supported(facts.server_version_num) {
        if !facts.physical_slots.is_empty() {
            out.push(warn(format!(
                "PostgreSQL {} does not synchronize logical slots to standbys: after a failover the worker recreates slot {slot:?} on the new primary and flushes every mapped table (PostgreSQL 17+ keeps the slot; see docs/operations.md \"PostgreSQL failover\")",
                facts.server_version_num / 10000
            )));
        }
        return out;
    }
    match facts.slot_failover {
        Some(false) if failover_slot => out.push(warn(format!(
            "replication slot {slot:?} is not failover-enabled: a promoted standby will not have it, and the worker then recreates it and flushes every mapped table; `cache-invalidator setup` enables it (ALTER_REPLICATION_SLOT {slot} (FAILOVER true), while no worker streams it)"
        ))),
        Some(true) => {
            let named = facts
                .synchronized_standby_slots
                .as_deref()
                .map(parse_slot_list)
                .unwrap_or_default();
            let missing: Vec<&str> = facts
                .physical_slots
                .iter()
                .filter(|p| !named.iter().any(|n| n == *p))
                .map(String::as_str)
                .collect();
            if !missing.is_empty() {
                out.push(warn(format!(
                    "synchronized_standby_slots does not name the physical slot(s) {}: the standby using one can be promoted ahead of slot {slot:?} (changes the worker saw would be missing there, and the cache would keep them); `ALTER SYSTEM SET synchronized_standby_slots = '{}'; SELECT pg_reload_conf();` on the primary",
                    missing.join(", "),
                    facts.physical_slots.join(", ")
                )));
            }
        }
        _ => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn primary(version: u32) -> FailoverFacts {
        FailoverFacts {
            server_version_num: version,
            physical_slots: vec!["standby_a".into(), "standby_b".into()],
            ..Default::default()
        }
    }

    #[test]
    fn before_17_a_failover_flushes_and_check_says_so_when_standbys_exist() {
        let f = findings(&primary(150010), "s", true);
        assert_eq!(f.len(), 1);
        assert!(f[0].message.contains("PostgreSQL 15 does not synchronize"));
        let alone = FailoverFacts {
            server_version_num: 150010,
            ..Default::default()
        };
        assert!(findings(&alone, "s", true).is_empty());
    }

    #[test]
    fn a_slot_without_failover_is_reported_unless_turned_off() {
        let mut facts = primary(180006);
        facts.slot_failover = Some(false);
        let f = findings(&facts, "s", true);
        assert_eq!(f.len(), 1);
        assert!(f[0].message.contains("is not failover-enabled"));
        assert!(findings(&facts, "s", false).is_empty());
    }

    #[test]
    fn synchronized_standby_slots_must_name_every_physical_slot() {
        let mut facts = primary(180006);
        facts.slot_failover = Some(true);
        facts.synchronized_standby_slots = Some(String::new());
        let f = findings(&facts, "s", true);
        assert_eq!(f.len(), 1, "{f:?}");
        assert!(f[0].message.contains("standby_a, standby_b"));
        facts.synchronized_standby_slots = Some("standby_a".into());
        let f = findings(&facts, "s", true);
        assert!(
            f[0].message.contains("physical slot(s) standby_b:"),
            "{f:?}"
        );
        facts.synchronized_standby_slots = Some("standby_b, \"standby_a\"".into());
        assert!(findings(&facts, "s", true).is_empty());
        // On a standby nothing of the primary's is visible.
        facts.synchronized_standby_slots = None;
        facts.in_recovery = true;
        assert!(findings(&facts, "s", true).is_empty());
    }

    #[test]
    fn slot_lists_parse_as_postgres_writes_them() {
        assert_eq!(parse_slot_list(" a ,\"B\",, c"), vec!["a", "B", "c"]);
        assert!(parse_slot_list("").is_empty());
    }
}
