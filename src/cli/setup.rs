//! `cache-invalidator setup [--replica-identity-full]`: prepares PostgreSQL
//! for the worker, idempotently, printing every statement it runs.
//!
//! Order matters:
//! 1. refuse mapped tables that do not exist, are not tables, or have no
//!    usable replica identity (publishing them would make PostgreSQL reject
//!    the application's UPDATE/DELETE) unless `--replica-identity-full` fixes them;
//! 2. with `--replica-identity-full`, `REPLICA IDENTITY FULL` where rules need
//!    old values (under `lock_timeout`, retried);
//! 3. the publication (`FOR TABLE ...`, never `FOR ALL TABLES`,
//!    `publish_via_partition_root = true`) BEFORE the slot, so the slot
//!    decodes with it from its first LSN; missing mapped tables added;
//! 4. the slot (`pgoutput`) under a statement timeout, logging the PIDs of the
//!    transactions it waits for; a slot whose WAL was lost is recreated; on
//!    PostgreSQL 17+ failover-enabled (`[postgres] failover_slot`, default
//!    true), and an existing slot without failover is altered to have it;
//! 5. durable flush markers: `flush:all` after creating the slot,
//!    `flush:table:<t>` after adding a table to an existing publication+slot;
//! 6. the SQL API (schema `cache_invalidator`, see [`super::sql_api`]) when
//!    missing or changed, `mapped_tables` when the mappings changed, `EXECUTE`
//!    for the roles of `--grant-execute`, and with `--ddl-trigger` the DDL
//!    event triggers (superuser only: otherwise `setup` says so and fails
//!    after everything else is done).
//!
//! A second run finds everything in place, runs no statement and emits no marker.
//! `setup --print-sql` prints step 6 without connecting.
//!
//! Why this file is long (~900 lines): the steps above are one ordered
//! conversation on one SQL connection, methods of one `Setup` value that
//! carries the connection, the plan it prints and the markers owed; each step
//! reads what the previous one did (a publication created before the slot, a
//! marker owed only after both). Split by step, every file would take the
//! whole `Setup` state and the order would no longer be readable in one place.
//! The catalog reads it relies on live in `pg::catalog`, the SQL API text in
//! `cli/sql_api.rs`.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_postgres::Client;

use crate::config::EnvOverrides;
use crate::error::{Because, BoxError, CliError};
use crate::map::identity;
use crate::map::{Mappings, TableName};
use crate::pg::catalog::{self, TableFacts};
use crate::pg::failover;
use crate::pg::PgError;
use crate::plan::planner::MESSAGE_PREFIX;
use crate::quote::{quote_ident, quote_literal};
use crate::source::ConnectionSettings;

/// `lock_timeout` for `ALTER TABLE ... REPLICA IDENTITY FULL`.
const LOCK_TIMEOUT: &str = "5s";
/// Attempts of `ALTER TABLE` when the lock is not granted in time.
const ALTER_ATTEMPTS: u32 = 3;
/// The first wait between those attempts (then `retry::Backoff` doubles it).
const ALTER_BACKOFF: Duration = Duration::from_secs(1);
/// `statement_timeout` of the slot creation (it waits for running transactions).
const SLOT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long peeking the slot for a publication gap may take.
const PEEK_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a slot to recreate may stay in use before its walsender is terminated.
const DROP_WAIT: Duration = Duration::from_secs(5);
/// How often the waiting slot creation logs the transactions it waits for.
const BLOCKER_POLL: Duration = Duration::from_secs(1);

/// A mapped table as `setup` sees it.
struct Target {
    name: TableName,
    facts: TableFacts,
}

/// What `setup` does beyond the publication and the slot.
#[derive(Debug, Clone, Default)]
pub struct SetupOptions {
    /// `--replica-identity-full`: REPLICA IDENTITY FULL where rules need old values.
    pub replica_identity_full: bool,
    /// `--ddl-trigger`: install the DDL event triggers (superuser only).
    pub ddl_trigger: bool,
    /// `--grant-execute ROLE`: roles that may call the SQL API.
    pub grant_execute: Vec<String>,
}

/// Runs `setup`.
pub async fn run(config_path: &Path, options: &SetupOptions) -> Result<(), CliError> {
    run_with_env(config_path, options, &EnvOverrides::from_env()).await
}

/// `setup --print-sql`: the SQL API statements for the config's mappings,
/// printed without connecting.
pub fn print_sql(config_path: &Path, options: &SetupOptions) -> Result<(), CliError> {
    let checked = super::check::check_offline(config_path, &EnvOverrides::from_env())?;
    print!(
        "{}",
        super::sql_api::print_sql(
            checked.mappings.tables(),
            &options.grant_execute,
            options.ddl_trigger
        )
    );
    Ok(())
}

/// Runs `setup` with explicit environment overrides (the demo passes none).
pub async fn run_with_env(
    config_path: &Path,
    options: &SetupOptions,
    env: &EnvOverrides,
) -> Result<(), CliError> {
    let replica_identity_full = options.replica_identity_full;
    let checked = super::check::check_offline(config_path, env)?;
    let pg = &checked.config.postgres;
    let settings =
        ConnectionSettings::parse(&pg.url, pg.password.as_ref().map(|p| p.expose().to_owned()))
            .map_err(CliError::runtime)?;
    let sql = crate::pg::connect(&settings)
        .await
        .map_err(CliError::runtime)?;
    let mut setup = Setup {
        url: sql.url().to_owned(),
        client: sql.into_client(),
        settings,
        failover_slot: pg.failover_slot,
        ran: 0,
    };
    let created = setup
        .execute(
            &checked.mappings,
            &pg.publication,
            &pg.slot,
            replica_identity_full,
        )
        .await
        .map_err(with_privilege_hint)?;
    if created {
        // The flush:all marker covers everything cached before the slot; record
        // the Redis it is meant for, so the worker's first start does not flush
        // a second time (guarantee 6 then only fires when Redis really changed).
        if let Err(why) = store_identity(&setup.client, &checked.config).await {
            let why = crate::error::chain(why.as_ref()).join(": ");
            println!("note: could not record the Redis identity ({why}); the worker's first start will flush once more");
        }
    }
    let not_installed = setup
        .sql_api(&checked.mappings, options)
        .await
        .map_err(with_privilege_hint)?;
    if setup.ran == 0 && not_installed.is_none() {
        println!(
            "nothing to do: publication {:?} has every mapped table, slot {:?} exists and the SQL API is current",
            pg.publication, pg.slot
        );
    }
    setup.advise_emit_message().await;
    match not_installed {
        Some(why) => Err(CliError::runtime(why)),
        None => Ok(()),
    }
}

/// A statement the setup user may not run (SQLSTATE 42501,
/// `insufficient_privilege`) fails with what to do first: PostgreSQL's error
/// names the object, not the role that would have the privilege.
fn with_privilege_hint(err: CliError) -> CliError {
    match err {
        CliError::Runtime(e)
            if e.downcast_ref::<PgError>().and_then(PgError::sqlstate) == Some("42501") =>
        {
            CliError::runtime(Because::new(
                "setup's user lacks a privilege for this step: run setup as the owner of the mapped \
                 tables with CREATE on the database (publication, SQL API) and REPLICATION (slot), \
                 or as a superuser; docs/operations.md, \"Privileges\", lists what each statement needs",
                e,
            ))
        }
        other => other,
    }
}

struct Setup {
    client: Client,
    /// The server, masked, for messages.
    url: String,
    /// Where `client` connected: for the second connections (a replication
    /// one, one watching what the slot creation waits for).
    settings: ConnectionSettings,
    /// `[postgres] failover_slot`: create (or make) the slot failover-enabled on 17+.
    failover_slot: bool,
    /// Statements run that changed something (0: a no-op run).
    ran: usize,
}

impl Setup {
    /// Prints and runs one statement.
    async fn exec(&mut self, sql: &str) -> Result<(), PgError> {
        println!("{sql};");
        self.client
            .batch_execute(sql)
            .await
            .map_err(|e| PgError::query(sql, e))?;
        self.ran += 1;
        Ok(())
    }

    async fn execute(
        &mut self,
        mappings: &Mappings,
        publication: &str,
        slot: &str,
        replica_identity_full: bool,
    ) -> Result<bool, CliError> {
        // What no statement of setup can fix: refuse before changing anything.
        let blockers: Vec<String> = crate::preflight::server_prerequisites(&self.client, &self.url)
            .await
            .into_iter()
            .map(|(f, _)| f.to_string())
            .collect();
        if !blockers.is_empty() {
            return Err(CliError::invalid(format!(
                "cannot set up:\n{}\nNothing was changed.",
                blockers.join("\n")
            )));
        }
        // Materialized views have no row events: nothing to publish, no
        // identity; only their truncate invalidations fire (REFRESH, flush).
        let targets: Vec<Target> = self
            .targets(mappings)
            .await?
            .into_iter()
            .filter(|t| t.facts.info.relkind != 'm')
            .collect();

        // 1. Replica identities PostgreSQL would refuse to publish.
        let unusable: Vec<&Target> = targets
            .iter()
            .filter(|t| !t.facts.has_usable_identity())
            .collect();
        if !unusable.is_empty() && !replica_identity_full {
            let names: Vec<String> = unusable.iter().map(|t| t.name.to_string()).collect();
            return Err(CliError::invalid(format!(
                "refusing to publish {}: no usable replica identity (REPLICA IDENTITY NOTHING, or DEFAULT without a primary key). \
                 Once a table is in a publication that publishes updates and deletes, PostgreSQL rejects every UPDATE and DELETE on it \
                 without one, which would break the application. Fix: add a primary key, or `ALTER TABLE ... REPLICA IDENTITY USING INDEX <unique index>`, \
                 or rerun with `setup --replica-identity-full`. Nothing was changed.",
                names.join(", ")
            )));
        }

        // 2. REPLICA IDENTITY FULL where rules need old values (or no identity is usable).
        let needs_full: Vec<&Target> = targets
            .iter()
            .filter(|t| {
                !t.facts.has_usable_identity()
                    || !identity::check_table(mappings, &t.name, &t.facts.info.replica_identity)
                        .is_empty()
            })
            .collect();
        if replica_identity_full {
            let names: Vec<TableName> = needs_full.iter().map(|t| t.name.clone()).collect();
            for t in &names {
                self.set_identity_full(t).await?;
            }
        } else {
            for t in &needs_full {
                for e in identity::check_table(mappings, &t.name, &t.facts.info.replica_identity) {
                    eprintln!("warning: {e}");
                }
            }
        }

        // 3. The publication, before the slot.
        let server_version = catalog::server_version_num(&self.client)
            .await
            .map_err(CliError::runtime)?;
        let existing = catalog::publication(&self.client, publication, server_version)
            .await
            .map_err(CliError::runtime)?;
        // Tables whose changes the publication may have hidden: flushed
        // once it is repaired (the window's changes were never sent).
        let mut repaired: BTreeSet<TableName> = BTreeSet::new();
        let publication_sql = quote_ident(publication);
        let mut publication_created = false;
        match existing {
            None => {
                if targets.is_empty() {
                    return Err(CliError::invalid(
                        "cannot create the publication: none of the mapped tables exists (see the warnings above). Nothing was changed.",
                    ));
                }
                let list: Vec<String> = targets.iter().map(|t| qualified(&t.name)).collect();
                self.exec(&format!(
                    "CREATE PUBLICATION {publication_sql} FOR TABLE {} WITH (publish_via_partition_root = true)",
                    list.join(", ")
                ))
                .await
                .map_err(CliError::runtime)?;
                publication_created = true;
            }
            Some(p) => {
                repaired = self
                    .repair_publication(mappings, &targets, publication, &p)
                    .await?;
            }
        }

        // 4. The slot, and 5. the markers.
        let created = self
            .ensure_slot(slot, publication, publication_created)
            .await?;
        if created {
            self.emit("flush:all").await?;
        } else {
            for t in &repaired {
                self.emit(&format!("flush:table:{t}")).await?;
            }
        }
        Ok(created)
    }

    /// Step 6: the SQL API, `mapped_tables`, grants and (asked for) the DDL
    /// triggers, each only when missing or changed. Returns what could not be
    /// installed that the options asked for, and why (setup then fails after
    /// doing everything else); an API that could not be installed without
    /// being asked for explicitly is a warning.
    async fn sql_api(
        &mut self,
        mappings: &Mappings,
        options: &SetupOptions,
    ) -> Result<Option<BoxError>, CliError> {
        use super::sql_api as api;
        let asked = options.ddl_trigger || !options.grant_execute.is_empty();
        let stamp: Option<String> = self
            .client
            .query_opt(api::INSTALLED_STAMP_SQL, &[])
            .await
            .map_err(|e| CliError::runtime(PgError::query(api::INSTALLED_STAMP_SQL, e)))?
            .and_then(|r| r.get(0));
        if stamp.as_deref() != Some(api::api_stamp().as_str()) {
            println!("-- the SQL API: cache_invalidator.invalidate(...) and flush_table(...) (see docs/operations.md)");
            if let Err(e) = self.transaction(&api::api_statements()).await {
                let why = Because::new(
                    "the SQL API (schema cache_invalidator) was not installed: the setup user needs CREATE on the database, \
                     or apply `cache-invalidator setup --print-sql` as a user who has it",
                    e,
                );
                if asked {
                    return Ok(Some(why.into()));
                }
                eprintln!("warning: {}", crate::error::chain(&why).join(": "));
                return Ok(None);
            }
        }
        let readable: bool = self
            .client
            .query_one(api::CAN_READ_MAPPED_SQL, &[])
            .await
            .map_err(|e| CliError::runtime(PgError::query(api::CAN_READ_MAPPED_SQL, e)))?
            .get(0);
        let installed: Vec<String> = if readable {
            self.client
                .query(api::MAPPED_TABLES_SQL, &[])
                .await
                .map_err(|e| CliError::runtime(PgError::query(api::MAPPED_TABLES_SQL, e)))?
                .iter()
                .map(|r| r.get(0))
                .collect()
        } else {
            Vec::new()
        };
        let tables = mappings.tables();
        let wanted: Vec<String> = tables.iter().map(|t| t.to_string()).collect();
        if !readable {
            eprintln!(
                "warning: cache_invalidator.mapped_tables is not readable by the setup user: it was not compared with the mappings; \
                 run `setup` as the role that installed the SQL API (its owner) to update it"
            );
        } else if installed != wanted {
            self.transaction(&api::mapped_tables_statements(tables))
                .await
                .map_err(CliError::runtime)?;
        }
        for role in &options.grant_execute {
            let sql = "SELECT has_schema_privilege($1, 'cache_invalidator', 'USAGE')                        AND has_function_privilege($1, 'cache_invalidator.invalidate(text[], text[], text[], text[], jsonb)', 'EXECUTE')                        AND has_function_privilege($1, 'cache_invalidator.flush_table(regclass)', 'EXECUTE')";
            let granted: bool = self
                .client
                .query_one(sql, &[role])
                .await
                .map_err(|e| {
                    CliError::invalid(Because::new(
                        format!("--grant-execute {role:?}: cannot read its privileges; name an existing role"),
                        PgError::query("checking the role's privileges", e),
                    ))
                })?
                .get(0);
            if !granted {
                for s in api::grant_statements(role) {
                    self.exec(&s).await.map_err(CliError::runtime)?;
                }
            }
        }
        if !options.ddl_trigger {
            return Ok(None);
        }
        let installed: bool = self
            .client
            .query_one(api::TRIGGERS_INSTALLED_SQL, &[])
            .await
            .map_err(|e| CliError::runtime(PgError::query(api::TRIGGERS_INSTALLED_SQL, e)))?
            .get(0);
        if installed {
            return Ok(None);
        }
        let superuser: bool = self
            .client
            .query_one(
                "SELECT rolsuper FROM pg_roles WHERE rolname = current_user",
                &[],
            )
            .await
            .map_err(|e| CliError::runtime(PgError::query("SELECT rolsuper", e)))?
            .get(0);
        if !superuser {
            let why = "the DDL event triggers were not installed: CREATE EVENT TRIGGER needs a superuser and the setup user is not one.                        Everything else is set up; DDL on mapped tables is not tracked until a superuser runs                        `cache-invalidator setup --ddl-trigger` (or applies the trigger statements of `setup --print-sql --ddl-trigger`)";
            eprintln!("error: {why}");
            return Ok(Some(why.into()));
        }
        println!("-- DDL event triggers: a rewrite, retype, partition change or drop of a mapped table emits flush:table:<t>");
        self.transaction(&api::trigger_statements())
            .await
            .map_err(CliError::runtime)?;
        Ok(None)
    }

    /// Prints and runs statements in one transaction (rolled back on error).
    async fn transaction(&mut self, statements: &[String]) -> Result<(), PgError> {
        self.exec("BEGIN").await?;
        for s in statements {
            if let Err(e) = self.exec(s).await {
                let _ = self.client.batch_execute("ROLLBACK").await;
                println!("ROLLBACK;");
                return Err(e);
            }
        }
        self.exec("COMMIT").await
    }

    /// Brings an existing publication back to what the mappings need: the
    /// publish actions, `publish_via_partition_root` for partitioned tables,
    /// mapped tables that are missing, and no row filter or column list on a
    /// mapped table. Returns the tables whose changes it may have hidden.
    async fn repair_publication(
        &mut self,
        mappings: &Mappings,
        targets: &[Target],
        publication: &str,
        p: &crate::map::catalog::PublicationInfo,
    ) -> Result<BTreeSet<TableName>, CliError> {
        let publication_sql = quote_ident(publication);
        let mut hidden: BTreeSet<TableName> = BTreeSet::new();
        // Publish actions: every mapped table whose rules fire on a missing one.
        let missing_truncate = !p.truncate;
        let mut missing_actions = false;
        for t in targets {
            for rule in mappings.rules().iter().filter(|r| r.table == t.name) {
                let needs = (rule.on.insert && !p.insert)
                    || (rule.on.update && !p.update)
                    || (rule.on.delete && !p.delete)
                    || missing_truncate;
                if needs {
                    missing_actions = true;
                    hidden.insert(t.name.clone());
                }
            }
        }
        if missing_actions {
            self.exec(&format!(
                "ALTER PUBLICATION {publication_sql} SET (publish = 'insert, update, delete, truncate')"
            ))
            .await
            .map_err(CliError::runtime)?;
        }
        let partitioned: Vec<&Target> = targets
            .iter()
            .filter(|t| t.facts.info.relkind == 'p')
            .collect();
        if !p.via_partition_root && !partitioned.is_empty() {
            self.exec(&format!(
                "ALTER PUBLICATION {publication_sql} SET (publish_via_partition_root = true)"
            ))
            .await
            .map_err(CliError::runtime)?;
            hidden.extend(partitioned.iter().map(|t| t.name.clone()));
        }
        let members = catalog::publication_member_oids(&self.client, publication)
            .await
            .map_err(CliError::runtime)?;
        for t in targets {
            let published = p.all_tables
                || members.contains(&t.facts.info.oid)
                || p.tables.contains_key(&t.name);
            let narrowed = p
                .tables
                .get(&t.name)
                .map(|pt| pt.row_filter.is_some() || pt.column_list.is_some())
                .unwrap_or(false);
            if narrowed && members.contains(&t.facts.info.oid) {
                // A row filter or column list hides changes: publish the whole table.
                self.exec(&format!(
                    "ALTER PUBLICATION {publication_sql} DROP TABLE {}",
                    qualified(&t.name)
                ))
                .await
                .map_err(CliError::runtime)?;
            } else if published {
                continue;
            }
            self.exec(&format!(
                "ALTER PUBLICATION {publication_sql} ADD TABLE {}",
                qualified(&t.name)
            ))
            .await
            .map_err(CliError::runtime)?;
            hidden.insert(t.name.clone());
        }
        if !hidden.is_empty() {
            let list: Vec<String> = hidden.iter().map(|t| t.to_string()).collect();
            println!(
                "-- repaired the publication: the changes of {} may have been hidden meanwhile; their flush markers follow",
                list.join(", ")
            );
        }
        Ok(hidden)
    }

    /// Every mapped table, refusing those that do not exist or are not tables.
    async fn targets(&self, mappings: &Mappings) -> Result<Vec<Target>, CliError> {
        let mut out = Vec::new();
        let mut problems = Vec::new();
        let names: BTreeSet<&TableName> = mappings.tables();
        for name in names {
            match catalog::table_facts(&self.client, name)
                .await
                .map_err(CliError::runtime)?
            {
                // Dropped (or misspelled): nothing to publish. The others
                // are set up; `check` fails and `run` invalidates it by fallback.
                None => eprintln!(
                    "warning: mapped table {name} does not exist: skipped (fix the mapping or create the table, then rerun setup; `cache-invalidator check` shows details)"
                ),
                Some(f) if !matches!(f.info.relkind, 'r' | 'p' | 'm') => problems.push(format!(
                    "{name} is not a table (relkind '{}')",
                    f.info.relkind
                )),
                Some(TableFacts {
                    info:
                        crate::map::catalog::TableInfo {
                            partition_of: Some(parent),
                            ..
                        },
                    ..
                }) => problems.push(format!(
                    "{name} is a partition of {parent}: the publication publishes via the partition root, so its changes arrive as {parent}; map {parent} instead"
                )),
                Some(facts) => out.push(Target {
                    name: name.clone(),
                    facts,
                }),
            }
        }
        if !problems.is_empty() {
            return Err(CliError::invalid(format!(
                "cannot set up: {}; run `cache-invalidator check` for details. Nothing was changed.",
                problems.join("; ")
            )));
        }
        Ok(out)
    }

    /// `ALTER TABLE ... REPLICA IDENTITY FULL` under `lock_timeout`, retried.
    async fn set_identity_full(&mut self, table: &TableName) -> Result<(), CliError> {
        println!(
            "-- {table}: REPLICA IDENTITY FULL makes PostgreSQL log the whole old row of every UPDATE and DELETE \
             on it (more WAL, proportional to row size), so rules can render old values"
        );
        self.exec(&format!(
            "SET lock_timeout = {}",
            quote_literal(LOCK_TIMEOUT)
        ))
        .await
        .map_err(CliError::runtime)?;
        let sql = format!("ALTER TABLE {} REPLICA IDENTITY FULL", qualified(table));
        let mut attempt = 1;
        let mut backoff = crate::retry::Backoff::between(ALTER_BACKOFF, ALTER_BACKOFF * 4);
        let result = loop {
            match self.exec(&sql).await {
                Ok(()) => break Ok(()),
                Err(e) if e.sqlstate() == Some("55P03") && attempt < ALTER_ATTEMPTS => {
                    let delay = backoff.next_delay();
                    tracing::warn!(table = %table, attempt, retry_in_ms = delay.as_millis() as u64, "lock not granted within lock_timeout; retrying");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err(e) => break Err(e),
            }
        };
        let reset = self.exec("RESET lock_timeout").await;
        result.map_err(|e| {
            let why = if e.sqlstate() == Some("55P03") {
                format!("{table} is busy (long transactions hold locks on it): retry `setup --replica-identity-full` when it is quieter")
            } else {
                format!("setting REPLICA IDENTITY FULL on {table} failed: rerun `setup --replica-identity-full` once the cause is fixed")
            };
            CliError::runtime(Because::new(why, e))
        })?;
        reset.map_err(CliError::runtime)
    }

    /// Creates the slot when it is missing, lost, or cannot decode past a gap
    /// in the publication (dropped, then recreated: PostgreSQL cannot decode
    /// the changes made while it did not exist); returns whether it did.
    async fn ensure_slot(
        &mut self,
        slot: &str,
        publication: &str,
        publication_created: bool,
    ) -> Result<bool, CliError> {
        if let Some(s) = catalog::slot(&self.client, slot)
            .await
            .map_err(CliError::runtime)?
        {
            let db = catalog::current_database(&self.client)
                .await
                .map_err(CliError::runtime)?;
            if s.slot_type != "logical" || s.plugin.as_deref() != Some("pgoutput") {
                return Err(CliError::invalid(format!(
                    "replication slot {slot:?} exists but is a {} slot with plugin {:?}, not a logical pgoutput slot; \
                     choose another [postgres] slot name or drop it (`SELECT pg_drop_replication_slot('{slot}')`)",
                    s.slot_type,
                    s.plugin.unwrap_or_default()
                )));
            }
            if s.database.as_deref() != Some(db.as_str()) {
                return Err(CliError::invalid(format!(
                    "replication slot {slot:?} belongs to database {:?}, not {db:?}; choose another [postgres] slot name",
                    s.database.unwrap_or_default()
                )));
            }
            let why = if s.wal_status.as_deref() == Some("lost") {
                if s.active {
                    return Err(CliError::Runtime(
                        format!("replication slot {slot:?} lost its WAL but is still in use by PID {}: stop that worker, then rerun `setup`", s.active_pid.unwrap_or(0)).into(),
                    ));
                }
                "lost WAL it needed (wal_status = 'lost')".to_string()
            } else if publication_created {
                format!("streamed publication {publication:?}, which did not exist: changes made meanwhile were never sent, and the slot cannot decode past that gap")
            } else if let Some(e) = self.undecodable_gap(slot, publication).await {
                format!("cannot decode past a gap in publication {publication:?} (dropped and recreated: {e}); changes made meanwhile were never sent")
            } else {
                self.ensure_failover(slot).await?;
                return Ok(false);
            };
            eprintln!("warning: replication slot {slot:?} {why}; recreating it and flushing every mapped table (flush:all)");
            println!("-- replication slot {slot:?} {why}: recreated, with a full flush marker");
            self.drop_slot(slot).await?;
        }
        self.create_slot(slot).await?;
        Ok(true)
    }

    /// Recommends, as comments (never applied: it needs a superuser and
    /// would break other tools that emit messages), revoking
    /// `pg_logical_emit_message` from `PUBLIC` while `PUBLIC` may execute it,
    /// with the grant back to this role: the worker's (heartbeat, the flush
    /// markers of its publication watch) and the owner of the SQL API's
    /// functions when setup runs as the config's role (docs/security.md).
    async fn advise_emit_message(&self) {
        let Ok(rows) = self
            .client
            .query(
                "SELECT p.oid::regprocedure::text, quote_ident(current_user) FROM pg_proc p \
                 WHERE p.proname = 'pg_logical_emit_message' \
                   AND p.pronamespace = 'pg_catalog'::regnamespace \
                   AND has_function_privilege('public', p.oid, 'EXECUTE') ORDER BY 1",
                &[],
            )
            .await
        else {
            return;
        };
        let Some(role) = rows.first().map(|r| r.get::<_, String>(1)) else {
            return;
        };
        let functions: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        let functions = functions.join(", ");
        println!("-- recommended (docs/security.md): any role may emit messages under the cache-invalidator prefix, which invalidate keys or flush every mapped table; unless other tools emit logical messages, run as a superuser:");
        println!("--   REVOKE EXECUTE ON FUNCTION {functions} FROM PUBLIC;");
        println!("--   GRANT EXECUTE ON FUNCTION {functions} TO {role};  -- the worker's role (heartbeat, flush markers) and the SQL API's owner, if another");
    }

    /// Whether the slot fails to decode its pending changes because the
    /// publication did not exist for part of them: peeks (never consumes) up
    /// to one change. `Some(server message)` when it fails that way; `None`
    /// when it decodes, or when it cannot be told (the slot is in use by a
    /// streaming worker, or the peek is slow: then it says so).
    async fn undecodable_gap(&self, slot: &str, publication: &str) -> Option<String> {
        let sql = format!(
            "SET LOCAL statement_timeout = '{}s'; SELECT count(*) FROM pg_logical_slot_peek_binary_changes({}, NULL, 1, \
             'proto_version', '1', 'publication_names', {})",
            PEEK_TIMEOUT.as_secs(),
            quote_literal(slot),
            quote_literal(publication)
        );
        let result = self
            .client
            .batch_execute(&format!("BEGIN; {sql}; COMMIT"))
            .await;
        let _ = self.client.batch_execute("ROLLBACK").await;
        match result {
            Ok(()) => None,
            Err(e) => {
                let e = PgError::query("peeking the slot", e);
                match e.sqlstate() {
                    Some("42704") => Some(e.to_string()),
                    Some("55006") => None,
                    _ => {
                        eprintln!("warning: could not verify that slot {slot:?} decodes past its pending changes ({e}); if the worker fails with `publication ... does not exist`, drop the slot and rerun setup");
                        None
                    }
                }
            }
        }
    }

    /// Drops the slot; a walsender still holding it (a worker failing on the
    /// gap, which reconnects at once) is given a few seconds, then terminated.
    async fn drop_slot(&mut self, slot: &str) -> Result<(), CliError> {
        let sql = format!("SELECT pg_drop_replication_slot({})", quote_literal(slot));
        println!("{sql};");
        let started = std::time::Instant::now();
        loop {
            match self.client.batch_execute(&sql).await {
                Ok(()) => {
                    self.ran += 1;
                    return Ok(());
                }
                Err(e) => {
                    let e = PgError::query(sql.as_str(), e);
                    if e.sqlstate() != Some("55006") || started.elapsed() > DROP_WAIT * 3 {
                        return Err(CliError::runtime(e));
                    }
                }
            }
            if started.elapsed() > DROP_WAIT {
                let pid = catalog::slot(&self.client, slot)
                    .await
                    .map_err(CliError::runtime)?
                    .and_then(|s| s.active_pid);
                if let Some(pid) = pid {
                    println!("-- slot {slot:?} is in use by PID {pid}: terminating that walsender");
                    let _ = self
                        .client
                        .execute("SELECT pg_terminate_backend($1)", &[&pid])
                        .await;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// On PostgreSQL 17+ with `failover_slot`, makes an existing slot that is
    /// not failover-enabled one (`ALTER_REPLICATION_SLOT ... (FAILOVER true)`,
    /// a replication command). A worker streaming the slot holds it: then
    /// only a warning says to rerun `setup` while it is stopped.
    async fn ensure_failover(&mut self, slot: &str) -> Result<(), CliError> {
        if !self.failover_slot {
            return Ok(());
        }
        let facts = failover::read(&self.client, slot)
            .await
            .map_err(CliError::runtime)?;
        if !failover::supported(facts.server_version_num) || facts.slot_failover != Some(false) {
            return Ok(());
        }
        let cmd = format!(
            "ALTER_REPLICATION_SLOT {} ( FAILOVER true )",
            quote_ident(slot)
        );
        println!("-- on a replication connection:\n{cmd};");
        let result = async {
            let mut conn = crate::source::connect(&self.settings).await?;
            let r = conn.simple_query(&cmd, Some(slot), None).await;
            conn.close().await;
            r
        }
        .await;
        match result {
            Ok(_) => self.ran += 1,
            Err(e @ crate::source::SourceError::SlotActive { .. }) => eprintln!(
                "warning: replication slot {slot:?} stays without failover: {e}; rerun `setup` while no worker streams it"
            ),
            Err(e) => return Err(CliError::runtime(e)),
        }
        Ok(())
    }

    /// `pg_create_logical_replication_slot` under a statement timeout; a second
    /// connection logs the transactions it waits for.
    async fn create_slot(&mut self, slot: &str) -> Result<(), CliError> {
        let own_pid: i32 = self
            .client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .map_err(|e| CliError::runtime(PgError::query("SELECT pg_backend_pid()", e)))?
            .get(0);
        self.exec(&format!(
            "SET statement_timeout = {}",
            quote_literal(&format!("{}s", SLOT_TIMEOUT.as_secs()))
        ))
        .await
        .map_err(CliError::runtime)?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let watcher = tokio::spawn(watch_blockers(
            self.settings.clone(),
            own_pid,
            Arc::clone(&seen),
        ));
        let version = catalog::server_version_num(&self.client)
            .await
            .map_err(CliError::runtime)?;
        let failover = self.failover_slot && failover::supported(version);
        let result = if failover {
            println!(
                "-- failover-enabled (PostgreSQL 17+): standbys with sync_replication_slots = on keep a copy a promotion resumes from"
            );
            println!(
                "SELECT pg_create_logical_replication_slot({}, 'pgoutput', false, false, true);",
                quote_literal(slot)
            );
            self.client
                .execute(
                    "SELECT pg_create_logical_replication_slot($1, 'pgoutput', false, false, true)",
                    &[&slot],
                )
                .await
        } else {
            if !self.failover_slot {
                println!("-- failover_slot = false: the slot is not synchronized to standbys; a failover recreates it with a full flush");
            } else {
                println!(
                    "-- PostgreSQL {} has no failover slots (17+): a failover recreates the slot with a full flush",
                    version / 10000
                );
            }
            println!(
                "SELECT pg_create_logical_replication_slot({}, 'pgoutput');",
                quote_literal(slot)
            );
            self.client
                .execute(
                    "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                    &[&slot],
                )
                .await
        };
        watcher.abort();
        let blockers: Vec<i32> = seen.lock().map(|v| v.clone()).unwrap_or_default();
        let reset = self.exec("RESET statement_timeout").await;
        match result {
            Ok(_) => self.ran += 1,
            Err(e) => {
                let e = PgError::query("creating the replication slot", e);
                let why = if e.sqlstate() == Some("57014") {
                    format!(
                        "slot creation waited {}s for running transactions to finish{}: end or commit them and rerun `setup`",
                        SLOT_TIMEOUT.as_secs(),
                        if blockers.is_empty() {
                            String::new()
                        } else {
                            format!(" (PIDs {blockers:?})")
                        }
                    )
                } else {
                    "the user needs the REPLICATION attribute (or superuser) and wal_level = logical with a free max_replication_slots entry".into()
                };
                return Err(CliError::runtime(Because::new(
                    format!("cannot create replication slot {slot:?}: {why}"),
                    e,
                )));
            }
        }
        reset.map_err(CliError::runtime)
    }

    /// Emits a durable (transactional) flush marker the worker acts on.
    async fn emit(&mut self, content: &str) -> Result<(), CliError> {
        self.exec(&format!(
            "SELECT pg_logical_emit_message(true, {}, {})",
            quote_literal(MESSAGE_PREFIX),
            quote_literal(content)
        ))
        .await
        .map_err(CliError::runtime)
    }
}

/// Stores `cache-invalidator:<slot>:identity` for the configured Redis.
async fn store_identity(client: &Client, config: &crate::config::Config) -> Result<(), BoxError> {
    use crate::sink::{identity, ApplySink};
    let row = client
        .query_one(
            "SELECT system_identifier::text, (SELECT timeline_id FROM pg_control_checkpoint())::int8 FROM pg_control_system()",
            &[],
        )
        .await
        .map_err(|e| PgError::query("reading the system identifier and timeline", e))?;
    let pg_system_id: String = row.get(0);
    let timeline: i64 = row.get(1);
    let options = config.sink_options();
    let sink = crate::sink::Sink::connect(&options, config.redis.target.seeds()).await?;
    let current = identity::Identity {
        redis_run_id: sink.redis_run_id().await?,
        pg_system_id,
        pg_timeline: u32::try_from(timeline).unwrap_or(0),
    };
    let key = identity::identity_key(&config.postgres.slot);
    sink.store_identity(&key, &current).await?;
    println!("-- Redis: SET {key} (the Redis this slot's flush marker is meant for; written by setup, not SQL)");
    Ok(())
}

/// Polls `pg_stat_activity` from a second connection while the slot creation
/// waits, logging the backends whose transactions it waits for and
/// recording their PIDs in `seen`. Runs until aborted.
async fn watch_blockers(settings: ConnectionSettings, own_pid: i32, seen: Arc<Mutex<Vec<i32>>>) {
    tokio::time::sleep(BLOCKER_POLL).await;
    let sql = match crate::pg::connect(&settings).await {
        Ok(sql) => sql,
        Err(e) => {
            tracing::warn!(error = %e, "cannot open a second connection to show what the slot creation waits for");
            return;
        }
    };
    loop {
        match sql.blocking_transactions(own_pid).await {
            Ok(blocking) => {
                for b in blocking {
                    tracing::warn!(pid = b.pid, application_name = %b.application_name, state = %b.state, xact_seconds = b.xact_seconds,
                        "slot creation waits for this transaction to end");
                    if let Ok(mut seen) = seen.lock() {
                        if !seen.contains(&b.pid) {
                            seen.push(b.pid);
                        }
                    }
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "pg_stat_activity poll failed");
            }
        }
        tokio::time::sleep(BLOCKER_POLL).await;
    }
}

/// `"schema"."table"`.
fn qualified(t: &TableName) -> String {
    format!("{}.{}", quote_ident(&t.schema), quote_ident(&t.name))
}
