//! Reads the live catalog into a [`CatalogSnapshot`] (what
//! [`crate::map::catalog::check_catalog`] checks) and the slot facts `status`
//! and `setup` need. Read-only SQL; PostgreSQL 14 and later (row filters and
//! column lists exist from 15 on and are read only there).

use std::collections::{BTreeMap, BTreeSet};

use tokio_postgres::{Client, Row};

use super::PgError;
use crate::lsn::Lsn;
use crate::map::catalog::{
    CatalogSnapshot, ColumnInfo, Generated, PublicationInfo, PublishedTable, TableInfo,
};
use crate::map::identity::ReplicaIdentity;
use crate::map::TableName;

/// First server version with publication row filters and column lists.
const PG15: u32 = 150000;
/// `pg_publication.pubgencols` (`publish_generated_columns`) exists from 18 on.
const PG18: u32 = 180000;

/// `server_version_num`.
pub async fn server_version_num(client: &Client) -> Result<u32, PgError> {
    let row = client
        .query_one("SELECT current_setting('server_version_num')::int4", &[])
        .await
        .map_err(|e| PgError::query("reading server_version_num", e))?;
    let v: i32 = row.get(0);
    Ok(u32::try_from(v).unwrap_or(0))
}

/// A mapped table as the catalog has it, plus the raw `relreplident`.
#[derive(Debug, Clone)]
pub struct TableFacts {
    /// What the checks use.
    pub info: TableInfo,
    /// `relreplident`: `d` default, `n` nothing, `f` full, `i` index.
    pub relreplident: char,
}

impl TableFacts {
    /// Whether PostgreSQL accepts UPDATE/DELETE on this table once it is
    /// published: FULL, or an identity with columns (a primary key for DEFAULT,
    /// an index for USING INDEX).
    pub fn has_usable_identity(&self) -> bool {
        match &self.info.replica_identity {
            ReplicaIdentity::Full => true,
            ReplicaIdentity::Columns(c) => !c.is_empty(),
        }
    }
}

/// A table name from a row whose first two columns are its schema and name.
fn table_name(r: &Row) -> TableName {
    TableName {
        schema: r.get(0),
        name: r.get(1),
    }
}

fn first_char(s: &str) -> char {
    s.chars().next().unwrap_or('?')
}

/// Reads one table (`None` when it does not exist).
pub async fn table_facts(
    client: &Client,
    table: &TableName,
) -> Result<Option<TableFacts>, PgError> {
    let what = || format!("reading the catalog entry of {table}");
    let Some(row) = client
        .query_opt(
            "SELECT c.oid, c.relkind::text, c.relpersistence::text, c.relreplident::text, c.relispartition \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(|e| PgError::query(what(), e))?
    else {
        return Ok(None);
    };
    let oid: u32 = row.get(0);
    let relkind = first_char(row.get::<_, &str>(1));
    let persistence = first_char(row.get::<_, &str>(2));
    let relreplident = first_char(row.get::<_, &str>(3));
    let is_partition: bool = row.get(4);

    let columns = client
        .query(
            "SELECT attname::text, attgenerated::text FROM pg_attribute \
             WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[&oid],
        )
        .await
        .map_err(|e| PgError::query(what(), e))?
        .iter()
        .map(|r| ColumnInfo {
            name: r.get(0),
            generated: Generated::from_attgenerated(r.get(1)),
        })
        .collect();

    let replica_identity = match relreplident {
        'f' => ReplicaIdentity::Full,
        'n' => ReplicaIdentity::Columns(Vec::new()),
        kind => {
            let primary = kind == 'd';
            let cols = client
                .query(
                    "SELECT a.attname::text FROM pg_index i \
                     CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord) \
                     JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
                     WHERE i.indrelid = $1 AND CASE WHEN $2 THEN i.indisprimary ELSE i.indisreplident END \
                     ORDER BY k.ord",
                    &[&oid, &primary],
                )
                .await
                .map_err(|e| PgError::query(what(), e))?
                .iter()
                .map(|r| r.get::<_, String>(0))
                .collect();
            ReplicaIdentity::Columns(cols)
        }
    };

    let partition_of = if is_partition {
        client
            .query_opt(
                "SELECT pn.nspname::text, pc.relname::text FROM pg_inherits i \
                 JOIN pg_class pc ON pc.oid = i.inhparent \
                 JOIN pg_namespace pn ON pn.oid = pc.relnamespace WHERE i.inhrelid = $1",
                &[&oid],
            )
            .await
            .map_err(|e| PgError::query(what(), e))?
            .map(|r| table_name(&r))
    } else {
        None
    };

    Ok(Some(TableFacts {
        info: TableInfo {
            oid,
            relkind,
            persistence,
            columns,
            replica_identity,
            partition_of,
        },
        relreplident,
    }))
}

/// The publication `name`, `None` when it does not exist. Tables come from
/// `pg_publication_tables` (what is published, partitions expanded as the
/// publication does) and `pg_publication_rel` (what was added explicitly,
/// with row filters and column lists on PostgreSQL 15+).
pub async fn publication(
    client: &Client,
    name: &str,
    server_version_num: u32,
) -> Result<Option<PublicationInfo>, PgError> {
    let what = || format!("reading publication {name:?}");
    let Some(row) = client
        .query_opt(
            if server_version_num >= PG18 {
                "SELECT oid, puballtables, pubinsert, pubupdate, pubdelete, pubtruncate, pubviaroot, \
                 pubgencols = 's' FROM pg_publication WHERE pubname = $1"
            } else {
                "SELECT oid, puballtables, pubinsert, pubupdate, pubdelete, pubtruncate, pubviaroot, \
                 false FROM pg_publication WHERE pubname = $1"
            },
            &[&name],
        )
        .await
        .map_err(|e| PgError::query(what(), e))?
    else {
        return Ok(None);
    };
    let oid: u32 = row.get(0);
    let mut tables = BTreeMap::new();
    for r in client
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
            &[&name],
        )
        .await
        .map_err(|e| PgError::query(what(), e))?
    {
        tables.insert(
            table_name(&r),
            PublishedTable::default(),
        );
    }
    let rel_sql = if server_version_num >= PG15 {
        "SELECT n.nspname::text, c.relname::text, pg_get_expr(pr.prqual, pr.prrelid), \
         CASE WHEN pr.prattrs IS NULL THEN NULL ELSE ARRAY( \
           SELECT a.attname::text FROM unnest(pr.prattrs::int2[]) AS k(attnum) \
           JOIN pg_attribute a ON a.attrelid = pr.prrelid AND a.attnum = k.attnum) END \
         FROM pg_publication_rel pr JOIN pg_class c ON c.oid = pr.prrelid \
         JOIN pg_namespace n ON n.oid = c.relnamespace WHERE pr.prpubid = $1"
    } else {
        "SELECT n.nspname::text, c.relname::text, NULL::text, NULL::text[] \
         FROM pg_publication_rel pr JOIN pg_class c ON c.oid = pr.prrelid \
         JOIN pg_namespace n ON n.oid = c.relnamespace WHERE pr.prpubid = $1"
    };
    for r in client
        .query(rel_sql, &[&oid])
        .await
        .map_err(|e| PgError::query(what(), e))?
    {
        tables.insert(
            table_name(&r),
            PublishedTable {
                row_filter: r.get(2),
                column_list: r.get(3),
            },
        );
    }
    Ok(Some(PublicationInfo {
        oid,
        all_tables: row.get(1),
        insert: row.get(2),
        update: row.get(3),
        delete: row.get(4),
        truncate: row.get(5),
        via_partition_root: row.get(6),
        publish_generated_stored: row.get(7),
        tables,
    }))
}

/// Tables explicitly in the publication (`pg_publication_rel`), by OID: what
/// `ALTER PUBLICATION ... ADD TABLE` would refuse as already a member.
pub async fn publication_member_oids(
    client: &Client,
    name: &str,
) -> Result<BTreeSet<u32>, PgError> {
    Ok(client
        .query(
            "SELECT pr.prrelid FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid \
             WHERE p.pubname = $1",
            &[&name],
        )
        .await
        .map_err(|e| PgError::query(format!("reading the tables of publication {name:?}"), e))?
        .iter()
        .map(|r| r.get::<_, u32>(0))
        .collect())
}

/// Fills the snapshot [`crate::map::catalog::check_catalog`] checks: every
/// table the mappings name that exists, the other tables (for "did you
/// mean"), the publication, `max_slot_wal_keep_size`, `synchronous_standby_names`.
pub async fn snapshot(
    client: &Client,
    mapped: &[TableName],
    publication_name: &str,
) -> Result<CatalogSnapshot, PgError> {
    let server_version_num = server_version_num(client).await?;
    // Concurrent futures on one client share its pipeline: the queries go
    // out together instead of one round trip after another (a worker's
    // start-up waits for this).
    let (facts, other_tables, publication, settings) = tokio::try_join!(
        futures_util::future::try_join_all(mapped.iter().map(|t| table_facts(client, t))),
        unmapped_tables(client),
        publication(client, publication_name, server_version_num),
        async {
            client
                .query_one(
                    "SELECT (SELECT setting::int8 FROM pg_settings WHERE name = 'max_slot_wal_keep_size'), \
                            current_setting('synchronous_standby_names', true)",
                    &[],
                )
                .await
                .map_err(|e| PgError::query("reading server settings", e))
        },
    )?;
    let tables: BTreeMap<TableName, TableInfo> = mapped
        .iter()
        .zip(facts)
        .filter_map(|(t, f)| f.map(|f| (t.clone(), f.info)))
        .collect();
    let other_tables = other_tables
        .into_iter()
        .filter(|t| !tables.contains_key(t))
        .collect();
    Ok(CatalogSnapshot {
        server_version_num,
        tables,
        other_tables,
        publication,
        max_slot_wal_keep_size_mb: settings.get(0),
        synchronous_standby_names: settings.get(1),
    })
}

/// Every user table, view and foreign table (at most 10,000), for "did you
/// mean" hints on mapped tables that do not exist.
async fn unmapped_tables(client: &Client) -> Result<Vec<TableName>, PgError> {
    Ok(client
        .query(
            "SELECT n.nspname::text, c.relname::text FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') \
               AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
               AND n.nspname NOT LIKE 'pg\\_toast%' \
             ORDER BY 1, 2 LIMIT 10000",
            &[],
        )
        .await
        .map_err(|e| PgError::query("listing tables", e))?
        .iter()
        .map(table_name)
        .collect())
}

/// A replication slot as `pg_replication_slots` shows it, with the server's
/// current WAL position and the distances `status` reports. The default is
/// the slot that does not exist: nothing known, inactive.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotFacts {
    /// `plugin` (`pgoutput` for ours).
    pub plugin: Option<String>,
    /// `slot_type`: `logical` or `physical`.
    pub slot_type: String,
    /// `database` the slot belongs to.
    pub database: Option<String>,
    /// `active`: a walsender streams it.
    pub active: bool,
    /// `active_pid`: that walsender's PID.
    pub active_pid: Option<i32>,
    /// `confirmed_flush_lsn`: what the worker acknowledged.
    pub confirmed_flush_lsn: Option<String>,
    /// `restart_lsn`: the oldest WAL the slot retains.
    pub restart_lsn: Option<String>,
    /// `wal_status`: `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    /// `safe_wal_size`: bytes that can still be written before the slot is in danger (`None`: unlimited).
    pub safe_wal_size: Option<i64>,
    /// `pg_current_wal_lsn()` (or the replay position on a standby).
    pub current_lsn: String,
    /// `current - confirmed_flush_lsn` in bytes.
    pub lag_bytes: Option<i64>,
    /// `current - restart_lsn` in bytes.
    pub retained_wal_bytes: Option<i64>,
    /// Who the active walsender streams to (`None` when the slot is inactive).
    pub client: Option<StreamingClient>,
}

/// The client an active walsender serves, from its `pg_stat_replication`
/// row: the worker's own identity. A role without `pg_read_all_stats` sees
/// these only for its own sessions (the others read as `None`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StreamingClient {
    /// `application_name` the client set (`[postgres] url`'s, by default
    /// `cache-invalidator`).
    pub application_name: Option<String>,
    /// `client_addr` (`None` over a Unix socket).
    pub client_addr: Option<String>,
    /// `client_hostname` (only with `log_hostname = on`).
    pub client_hostname: Option<String>,
    /// `client_port` (-1 over a Unix socket).
    pub client_port: Option<i32>,
    /// `backend_start`: when the client connected.
    pub backend_start: Option<String>,
}

/// The server's current WAL position: `pg_current_wal_lsn()`, or on a
/// standby the replay position (`None` while a standby has replayed nothing).
/// The one reader of it: the slot's distances, `status` without a slot and
/// the read replicas' lag are measured from it.
pub async fn current_wal_lsn(client: &Client) -> Result<Option<Lsn>, PgError> {
    let row = client
        .query_one(
            "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
                          ELSE pg_current_wal_lsn() END)::text",
            &[],
        )
        .await
        .map_err(|e| PgError::query("reading the server's current WAL position", e))?;
    Ok(row.get::<_, Option<String>>(0).and_then(|s| s.parse().ok()))
}

/// The slot `name`, `None` when it does not exist. Its distances are
/// measured from the server's WAL position read after the slot, which its
/// positions only ever trail: they are never negative (on a primary), however
/// fast the slot moves.
pub async fn slot(client: &Client, name: &str) -> Result<Option<SlotFacts>, PgError> {
    let what = || format!("reading replication slot {name:?}");
    let Some(r) = client
        .query_opt(
            "SELECT s.plugin::text, s.slot_type, s.database::text, s.active, s.active_pid, \
                    s.confirmed_flush_lsn::text, s.restart_lsn::text, s.wal_status, s.safe_wal_size, \
                    r.pid IS NOT NULL, r.application_name, \
                    host(r.client_addr), r.client_hostname, r.client_port, r.backend_start::text \
             FROM pg_replication_slots s \
             LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid \
             WHERE s.slot_name = $1",
            &[&name],
        )
        .await
        .map_err(|e| PgError::query(what(), e))?
    else {
        return Ok(None);
    };
    let current = current_wal_lsn(client).await?;
    let confirmed_flush_lsn: Option<String> = r.get(5);
    let restart_lsn: Option<String> = r.get(6);
    // `current - lsn` in bytes, as PostgreSQL's `(pg_lsn - pg_lsn)::int8`.
    let distance = |lsn: &Option<String>| {
        let lsn: Lsn = lsn.as_deref()?.parse().ok()?;
        i64::try_from(i128::from(current?.0) - i128::from(lsn.0)).ok()
    };
    Ok(Some(SlotFacts {
        plugin: r.get(0),
        slot_type: r.get(1),
        database: r.get(2),
        active: r.get(3),
        active_pid: r.get(4),
        lag_bytes: distance(&confirmed_flush_lsn),
        retained_wal_bytes: distance(&restart_lsn),
        confirmed_flush_lsn,
        restart_lsn,
        wal_status: r.get(7),
        safe_wal_size: r.get(8),
        current_lsn: current.map(|l| l.to_string()).unwrap_or_default(),
        client: r.get::<_, bool>(9).then(|| StreamingClient {
            application_name: r.get(10),
            client_addr: r.get(11),
            client_hostname: r.get(12),
            client_port: r.get(13),
            backend_start: r.get(14),
        }),
    }))
}

/// The current database's name.
pub async fn current_database(client: &Client) -> Result<String, PgError> {
    let row = client
        .query_one("SELECT current_database()::text", &[])
        .await
        .map_err(|e| PgError::query("reading current_database()", e))?;
    Ok(row.get(0))
}
