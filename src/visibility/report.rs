//! What `check` and `status` say about `[postgres] replicas`: for each one,
//! whether it is reachable, a standby (`pg_is_in_recovery()`) of this very
//! primary (same `system_identifier` in `pg_control_system()`), its replay
//! position and its lag. `check` refuses a replica that is not a standby of
//! the primary: waiting for it would protect nothing.

use serde::Serialize;

use std::time::Duration;

use crate::lsn::Lsn;

/// How long connecting to a replica, and then its one query, may take: a
/// server that accepts the connection and never answers is reported like an
/// unreachable one instead of holding `check`, `status` and `run`'s start-up
/// (`connect_timeout` bounds only the TCP connection).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// One replica as `check` and `status` report it. Field names are stable
/// (`status --json`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ReplicaReport {
    /// `host:port` (or socket path); never the password.
    pub replica: String,
    /// Whether a connection and the queries succeeded.
    pub reachable: bool,
    /// `pg_is_in_recovery()` on the replica.
    pub in_recovery: Option<bool>,
    /// Whether its `system_identifier` equals the primary's.
    pub same_system: Option<bool>,
    /// `pg_last_wal_replay_lsn()`.
    pub replay_lsn: Option<String>,
    /// The primary's current WAL position minus the replay position.
    pub lag_bytes: Option<i64>,
    /// Seconds since the last replayed transaction while replay is behind
    /// what the replica received; 0 when it replayed everything.
    pub lag_seconds: Option<f64>,
    /// What is wrong, when something is (`null` when healthy).
    pub problem: Option<String>,
}

impl ReplicaReport {
    /// Whether `check` must refuse it: reachable but not a standby of the primary.
    pub fn is_wrong_server(&self) -> bool {
        self.reachable && (self.in_recovery == Some(false) || self.same_system == Some(false))
    }

    /// One line for humans.
    pub fn render(&self) -> String {
        match (&self.problem, &self.replay_lsn) {
            (Some(p), _) => format!("replica {}: {p}", self.replica),
            (None, Some(lsn)) => format!(
                "replica {}: standby of this primary, replayed {lsn}, lag {} bytes / {:.3} s",
                self.replica,
                self.lag_bytes.unwrap_or(0),
                self.lag_seconds.unwrap_or(0.0)
            ),
            (None, None) => format!("replica {}: no replay position yet", self.replica),
        }
    }
}

/// Inspects every replica URL against the primary behind `primary`.
/// `password` (from `password_file`) is used for URLs without their own.
pub async fn inspect_all(
    primary: &tokio_postgres::Client,
    replicas: &[String],
    password: Option<&str>,
) -> Vec<ReplicaReport> {
    let system: Option<String> = primary
        .query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        )
        .await
        .ok()
        .and_then(|r| r.try_get(0).ok());
    let current: Option<Lsn> = crate::pg::catalog::current_wal_lsn(primary)
        .await
        .ok()
        .flatten();
    let mut out = Vec::with_capacity(replicas.len());
    for url in replicas {
        out.push(inspect(url, password, system.as_deref(), current).await);
    }
    out
}

async fn inspect(
    url: &str,
    password: Option<&str>,
    primary_system: Option<&str>,
    primary_current: Option<Lsn>,
) -> ReplicaReport {
    let parsed = crate::source::ConnectionSettings::parse(url, None);
    let (name, own_password) = match &parsed {
        Ok(s) => (s.target(), s.password.is_some()),
        Err(_) => (crate::source::conninfo::mask_connection_string(url), false),
    };
    let mut report = ReplicaReport {
        replica: name,
        reachable: false,
        in_recovery: None,
        same_system: None,
        replay_lsn: None,
        lag_bytes: None,
        lag_seconds: None,
        problem: None,
    };
    let password = if own_password { None } else { password };
    let no_answer = || format!("no answer within {ANSWER_TIMEOUT:?}");
    let unreachable = |why: String| Some(format!("unreachable ({why}): not waited for while down"));
    let sql =
        match tokio::time::timeout(ANSWER_TIMEOUT, crate::pg::connect_url(url, password)).await {
            Ok(Ok(sql)) => sql,
            Ok(Err(e)) => {
                report.problem = unreachable(e.to_string());
                return report;
            }
            Err(_) => {
                report.problem = unreachable(no_answer());
                return report;
            }
        };
    let query = sql.client().query_one(
        "SELECT (SELECT system_identifier::text FROM pg_control_system()), pg_is_in_recovery(), \
             pg_last_wal_replay_lsn()::text, \
             CASE WHEN pg_last_wal_receive_lsn() IS NULL \
                    OR pg_last_wal_replay_lsn() >= pg_last_wal_receive_lsn() THEN 0::float8 \
                  ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8 END",
        &[],
    );
    let row = match tokio::time::timeout(ANSWER_TIMEOUT, query).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            report.problem = Some(format!(
                "cannot read its replay position: {}",
                crate::pg::describe(&e)
            ));
            return report;
        }
        Err(_) => {
            report.problem = Some(format!("cannot read its replay position: {}", no_answer()));
            return report;
        }
    };
    report.reachable = true;
    let system: Option<String> = row.try_get(0).ok().flatten();
    report.in_recovery = row.try_get(1).ok();
    report.replay_lsn = row.try_get(2).ok().flatten();
    report.lag_seconds = row.try_get(3).ok().flatten();
    report.same_system = match (system.as_deref(), primary_system) {
        (Some(a), Some(b)) => Some(a == b),
        _ => None,
    };
    let replay: Option<Lsn> = report.replay_lsn.as_deref().and_then(|s| s.parse().ok());
    if let (Some(cur), Some(rep)) = (primary_current, replay) {
        report.lag_bytes = Some(i64::try_from(cur.0.saturating_sub(rep.0)).unwrap_or(i64::MAX));
    }
    if report.in_recovery == Some(false) {
        report.problem = Some(
            "not a standby (pg_is_in_recovery() is false): a primary or a promoted server; list read replicas of this primary only"
                .into(),
        );
    } else if report.same_system == Some(false) {
        report.problem = Some(format!(
            "a standby of another cluster (system_identifier {} differs from the primary's {}): list replicas of this primary only",
            system.unwrap_or_default(),
            primary_system.unwrap_or_default()
        ));
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> ReplicaReport {
        ReplicaReport {
            replica: "10.0.0.6:5432".into(),
            reachable: true,
            in_recovery: Some(true),
            same_system: Some(true),
            replay_lsn: Some("0/3000060".into()),
            lag_bytes: Some(0),
            lag_seconds: Some(0.0),
            problem: None,
        }
    }

    #[test]
    fn only_a_reachable_server_that_is_no_standby_of_the_primary_is_refused() {
        assert!(!report().is_wrong_server());
        let promoted = ReplicaReport {
            in_recovery: Some(false),
            ..report()
        };
        assert!(promoted.is_wrong_server());
        let other_cluster = ReplicaReport {
            same_system: Some(false),
            ..report()
        };
        assert!(other_cluster.is_wrong_server());
        let down = ReplicaReport {
            reachable: false,
            in_recovery: None,
            same_system: None,
            ..report()
        };
        assert!(
            !down.is_wrong_server(),
            "unreachable: a warning, not a refusal"
        );
    }
}
