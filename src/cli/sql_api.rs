//! The SQL API `setup` installs in the database (schema `cache_invalidator`),
//! as statements: pure text, printed by `setup` as it runs them and by
//! `setup --print-sql` for migration tools.
//!
//! - `cache_invalidator.invalidate(keys, tags, versions, patterns, channels)`
//!   emits one transactional logical decoding message `invalidate:v1:<json>`
//!   (the payload of [`crate::plan::declared`]); the worker applies it after
//!   the commit, with the transaction's row changes. Sizes are checked here,
//!   inside the caller's transaction, with the limits the worker's parser
//!   enforces, so a bad call aborts the caller's transaction, not the worker.
//! - `cache_invalidator.flush_table(regclass)` emits `flush:table:<t>`.
//! - `cache_invalidator.mapped_tables` (written by `setup` from the mappings)
//!   and `cache_invalidator.mapped_relations` (those tables and their
//!   partitions by OID, kept by `sync_mapped_relations()`) tell the DDL event
//!   triggers what is mapped; `setup --ddl-trigger` creates the triggers
//!   (superuser only) on `on_ddl_command_end()` and `on_sql_drop()`.
//!
//! Least privilege: every function is `SECURITY DEFINER` with a pinned
//! `search_path`, `EXECUTE` is revoked from `PUBLIC` and granted to the roles
//! named with `setup --grant-execute ROLE` (plus `USAGE` on the schema). See
//! `docs/security.md` and `docs/operations.md`.

use crate::map::TableName;
use crate::plan::declared::{
    INVALIDATE_PREFIX, MAX_ENTRIES, MAX_ENTRY_BYTES, MAX_PAYLOAD_BYTES, VERSION,
};
use crate::plan::planner::MESSAGE_PREFIX;
use crate::quote::{quote_ident, quote_literal};

/// The schema of the API.
pub const SCHEMA: &str = "cache_invalidator";
/// The event trigger on `ddl_command_end`.
pub const DDL_TRIGGER: &str = "cache_invalidator_ddl";
/// The event trigger on `sql_drop`.
pub const DROP_TRIGGER: &str = "cache_invalidator_drop";
/// The signatures `--grant-execute` grants `EXECUTE` on.
pub const CALLABLE: [&str; 2] = [
    "cache_invalidator.invalidate(text[], text[], text[], text[], jsonb)",
    "cache_invalidator.flush_table(regclass)",
];

/// The statements that install (or update) the API, in order, meant to run
/// in one transaction. The last one stamps the schema with [`api_stamp`].
pub fn api_statements() -> Vec<String> {
    let mut out = api_body();
    out.push(format!(
        "COMMENT ON SCHEMA {SCHEMA} IS {}",
        quote_literal(&api_stamp())
    ));
    out
}

/// What `setup` writes as the schema's comment: the API version and a hash
/// of its statements, so a second run that finds it unchanged runs nothing.
pub fn api_stamp() -> String {
    format!(
        "cache-invalidator SQL API {VERSION} ({:016x}); installed by `cache-invalidator setup`",
        fnv1a(api_body().concat().as_bytes())
    )
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// `pg_logical_emit_message` of a text expression, as UTF-8 bytes whatever
/// the database encoding (the worker reads the content as UTF-8).
fn emit(expr: &str) -> String {
    format!(
        "PERFORM pg_catalog.pg_logical_emit_message(true, {}, pg_catalog.convert_to({expr}, 'UTF8'))",
        quote_literal(MESSAGE_PREFIX)
    )
}

fn api_body() -> Vec<String> {
    let prefix = quote_literal(&format!("{INVALIDATE_PREFIX}{VERSION}:"));
    let emit_payload = emit("payload");
    let emit_flush = emit("'flush:table:' || target");
    let emit_flush_t = emit("'flush:table:' || t");
    let definer = "LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp";
    vec![
        format!("CREATE SCHEMA IF NOT EXISTS {SCHEMA}"),
        format!("REVOKE ALL ON SCHEMA {SCHEMA} FROM PUBLIC"),
        format!(
            "CREATE TABLE IF NOT EXISTS {SCHEMA}.mapped_tables (\n    \
                schema_name text NOT NULL,\n    \
                table_name text NOT NULL,\n    \
                PRIMARY KEY (schema_name, table_name)\n)"
        ),
        format!(
            "COMMENT ON TABLE {SCHEMA}.mapped_tables IS 'The tables the cache-invalidator mappings name, written by `cache-invalidator setup`: DDL on them emits flush:table:<schema.table> when the event triggers are installed'"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {SCHEMA}.mapped_relations (\n    \
                relid oid PRIMARY KEY,\n    \
                mapped text NOT NULL\n)"
        ),
        format!(
            "COMMENT ON TABLE {SCHEMA}.mapped_relations IS 'The mapped tables and their partitions by OID (a renamed table keeps its mapped name), kept by {SCHEMA}.sync_mapped_relations()'"
        ),
        format!(
            r#"CREATE OR REPLACE FUNCTION {SCHEMA}.invalidate(
    keys text[] DEFAULT '{{}}',
    tags text[] DEFAULT '{{}}',
    versions text[] DEFAULT '{{}}',
    patterns text[] DEFAULT '{{}}',
    channels jsonb DEFAULT '[]'
) RETURNS void
{definer}
AS $fn$
DECLARE
    entries int;
    everything text[];
    ch jsonb;
    payload text;
BEGIN
    keys := coalesce(keys, '{{}}');
    tags := coalesce(tags, '{{}}');
    versions := coalesce(versions, '{{}}');
    patterns := coalesce(patterns, '{{}}');
    channels := coalesce(channels, '[]');
    IF jsonb_typeof(channels) <> 'array' THEN
        RAISE EXCEPTION 'cache_invalidator.invalidate: channels must be a JSON array of {{"channel": ..., "message": ...}} objects, not a JSON %', jsonb_typeof(channels)
            USING ERRCODE = '22023';
    END IF;
    entries := cardinality(keys) + cardinality(tags) + cardinality(versions) + cardinality(patterns) + jsonb_array_length(channels);
    IF entries = 0 THEN
        RETURN;
    END IF;
    IF entries > {MAX_ENTRIES} THEN
        RAISE EXCEPTION 'cache_invalidator.invalidate: % entries in one call, over the limit of {MAX_ENTRIES}', entries
            USING ERRCODE = '54000',
                  HINT = 'Invalidate a tag or a pattern instead of many keys, or split the call.';
    END IF;
    everything := keys || tags || versions || patterns;
    IF array_position(everything, NULL) IS NOT NULL OR '' = ANY (everything) THEN
        RAISE EXCEPTION 'cache_invalidator.invalidate: keys, tags, versions and patterns must not contain NULL or empty strings'
            USING ERRCODE = '22004';
    END IF;
    IF EXISTS (SELECT 1 FROM unnest(everything) AS e WHERE octet_length(e) > {MAX_ENTRY_BYTES}) THEN
        RAISE EXCEPTION 'cache_invalidator.invalidate: an entry is longer than {MAX_ENTRY_BYTES} bytes'
            USING ERRCODE = '54000';
    END IF;
    FOR ch IN SELECT value FROM jsonb_array_elements(channels) LOOP
        IF jsonb_typeof(ch) IS DISTINCT FROM 'object'
           OR jsonb_typeof(ch -> 'channel') IS DISTINCT FROM 'string'
           OR (ch ->> 'channel') = ''
           OR EXISTS (SELECT 1 FROM jsonb_object_keys(ch) AS k WHERE k NOT IN ('channel', 'message')) THEN
            RAISE EXCEPTION 'cache_invalidator.invalidate: each entry of channels must be {{"channel": "<name>"}} or {{"channel": "<name>", "message": <text or JSON>}}, not %', ch
                USING ERRCODE = '22023';
        END IF;
        IF octet_length(ch ->> 'channel') > {MAX_ENTRY_BYTES}
           OR octet_length(coalesce(ch ->> 'message', '')) > {MAX_ENTRY_BYTES} THEN
            RAISE EXCEPTION 'cache_invalidator.invalidate: a channel name or message is longer than {MAX_ENTRY_BYTES} bytes'
                USING ERRCODE = '54000';
        END IF;
    END LOOP;
    payload := {prefix} || jsonb_build_object(
        'keys', to_jsonb(keys), 'tags', to_jsonb(tags), 'versions', to_jsonb(versions),
        'patterns', to_jsonb(patterns), 'channels', channels)::text;
    IF octet_length(payload) > {MAX_PAYLOAD_BYTES} THEN
        RAISE EXCEPTION 'cache_invalidator.invalidate: the message would be % bytes, over the limit of {MAX_PAYLOAD_BYTES}', octet_length(payload)
            USING ERRCODE = '54000',
                  HINT = 'Invalidate a tag or a pattern instead of many keys, or split the call.';
    END IF;
    {emit_payload};
END
$fn$"#
        ),
        format!(
            "COMMENT ON FUNCTION {SCHEMA}.invalidate(text[], text[], text[], text[], jsonb) IS 'Declares invalidations in the current transaction: cache-invalidator applies them after the commit (never on rollback). Keys and patterns are used as given, tags and versions get the worker''s tag_prefix and version_prefix.'"
        ),
        format!(
            r#"CREATE OR REPLACE FUNCTION {SCHEMA}.flush_table(tab regclass) RETURNS void
{definer}
AS $fn$
DECLARE
    target text;
BEGIN
    SELECT mapped INTO target FROM {SCHEMA}.mapped_relations WHERE relid = tab;
    IF target IS NULL THEN
        SELECT n.nspname || '.' || c.relname INTO target
        FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
        WHERE c.oid = tab;
    END IF;
    IF target IS NULL THEN
        RAISE EXCEPTION 'cache_invalidator.flush_table: no relation with OID %', tab::oid
            USING ERRCODE = '42P01';
    END IF;
    {emit_flush};
END
$fn$"#
        ),
        format!(
            "COMMENT ON FUNCTION {SCHEMA}.flush_table(regclass) IS 'Fires the truncate invalidations of a mapped table (its partitions name it) after the commit of the current transaction.'"
        ),
        format!(
            r#"CREATE OR REPLACE FUNCTION {SCHEMA}.sync_mapped_relations() RETURNS void
{definer}
AS $fn$
BEGIN
    DELETE FROM {SCHEMA}.mapped_relations AS r
    WHERE NOT EXISTS (SELECT 1 FROM pg_class AS c WHERE c.oid = r.relid)
       OR NOT EXISTS (SELECT 1 FROM {SCHEMA}.mapped_tables AS m WHERE m.schema_name || '.' || m.table_name = r.mapped);
    INSERT INTO {SCHEMA}.mapped_relations (relid, mapped)
    SELECT DISTINCT ON (t.relid) t.relid, m.schema_name || '.' || m.table_name
    FROM {SCHEMA}.mapped_tables AS m
    JOIN pg_namespace AS n ON n.nspname = m.schema_name
    JOIN pg_class AS c ON c.relnamespace = n.oid AND c.relname = m.table_name
    CROSS JOIN LATERAL (
        SELECT c.oid AS relid
        UNION
        SELECT p.relid FROM pg_partition_tree(c.oid) AS p WHERE c.relkind = 'p'
    ) AS t
    ORDER BY t.relid
    ON CONFLICT (relid) DO NOTHING;
END
$fn$"#
        ),
        format!(
            r#"CREATE OR REPLACE FUNCTION {SCHEMA}.on_ddl_command_end() RETURNS event_trigger
{definer}
AS $fn$
DECLARE
    t text;
BEGIN
    FOR t IN
        SELECT DISTINCT r.mapped
        FROM pg_event_trigger_ddl_commands() AS d
        JOIN {SCHEMA}.mapped_relations AS r ON r.relid = d.objid
        WHERE d.classid = 'pg_class'::regclass
          AND d.command_tag IN ('ALTER TABLE', 'REFRESH MATERIALIZED VIEW', 'ALTER MATERIALIZED VIEW')
        ORDER BY 1
    LOOP
        {emit_flush_t};
    END LOOP;
    -- New partitions of mapped tables (CREATE TABLE ... PARTITION OF, ATTACH).
    PERFORM {SCHEMA}.sync_mapped_relations();
END
$fn$"#
        ),
        format!(
            r#"CREATE OR REPLACE FUNCTION {SCHEMA}.on_sql_drop() RETURNS event_trigger
{definer}
AS $fn$
DECLARE
    t text;
BEGIN
    -- Dropping the API itself (DROP SCHEMA cache_invalidator CASCADE) must not fail.
    IF to_regclass('{SCHEMA}.mapped_relations') IS NULL THEN
        RETURN;
    END IF;
    FOR t IN
        SELECT DISTINCT r.mapped
        FROM pg_event_trigger_dropped_objects() AS d
        JOIN {SCHEMA}.mapped_relations AS r ON r.relid = d.objid
        WHERE d.classid = 'pg_class'::regclass AND d.objsubid = 0
        ORDER BY 1
    LOOP
        {emit_flush_t};
    END LOOP;
    DELETE FROM {SCHEMA}.mapped_relations
    WHERE relid IN (SELECT objid FROM pg_event_trigger_dropped_objects() WHERE classid = 'pg_class'::regclass AND objsubid = 0);
END
$fn$"#
        ),
        format!("REVOKE ALL ON FUNCTION {SCHEMA}.invalidate(text[], text[], text[], text[], jsonb), {SCHEMA}.flush_table(regclass), {SCHEMA}.sync_mapped_relations(), {SCHEMA}.on_ddl_command_end(), {SCHEMA}.on_sql_drop() FROM PUBLIC"),
        format!("REVOKE ALL ON TABLE {SCHEMA}.mapped_tables, {SCHEMA}.mapped_relations FROM PUBLIC"),
    ]
}

/// Rewrites `mapped_tables` to exactly `tables` and re-derives `mapped_relations`.
pub fn mapped_tables_statements<'a>(
    tables: impl IntoIterator<Item = &'a TableName>,
) -> Vec<String> {
    let values: Vec<String> = tables
        .into_iter()
        .map(|t| format!("({}, {})", quote_literal(&t.schema), quote_literal(&t.name)))
        .collect();
    let mut out = vec![format!("DELETE FROM {SCHEMA}.mapped_tables")];
    if !values.is_empty() {
        out.push(format!(
            "INSERT INTO {SCHEMA}.mapped_tables (schema_name, table_name) VALUES {}",
            values.join(", ")
        ));
    }
    out.push(format!("SELECT {SCHEMA}.sync_mapped_relations()"));
    out
}

/// `USAGE` on the schema and `EXECUTE` on [`CALLABLE`] for one role.
pub fn grant_statements(role: &str) -> Vec<String> {
    let role = quote_ident(role);
    vec![
        format!("GRANT USAGE ON SCHEMA {SCHEMA} TO {role}"),
        format!(
            "GRANT EXECUTE ON FUNCTION {} TO {role}",
            CALLABLE.join(", ")
        ),
    ]
}

/// The two event triggers (`CREATE EVENT TRIGGER` needs superuser).
pub fn trigger_statements() -> Vec<String> {
    vec![
        format!("DROP EVENT TRIGGER IF EXISTS {DDL_TRIGGER}"),
        format!(
            "CREATE EVENT TRIGGER {DDL_TRIGGER} ON ddl_command_end \
             WHEN TAG IN ('ALTER TABLE', 'CREATE TABLE', 'REFRESH MATERIALIZED VIEW', 'ALTER MATERIALIZED VIEW') \
             EXECUTE FUNCTION {SCHEMA}.on_ddl_command_end()"
        ),
        format!("DROP EVENT TRIGGER IF EXISTS {DROP_TRIGGER}"),
        format!(
            "CREATE EVENT TRIGGER {DROP_TRIGGER} ON sql_drop EXECUTE FUNCTION {SCHEMA}.on_sql_drop()"
        ),
    ]
}

/// Whether both event triggers exist and are enabled (the query returns one boolean).
pub const TRIGGERS_INSTALLED_SQL: &str = "SELECT count(*) = 2 FROM pg_catalog.pg_event_trigger \
     WHERE evtname IN ('cache_invalidator_ddl', 'cache_invalidator_drop') AND evtenabled <> 'D'";

/// The installed API's stamp (NULL when the schema is missing or has no comment).
pub const INSTALLED_STAMP_SQL: &str = "SELECT pg_catalog.obj_description(n.oid, 'pg_namespace') \
     FROM pg_catalog.pg_namespace AS n WHERE n.nspname = 'cache_invalidator'";

/// Whether the current user may read `mapped_tables` (its owner may; the
/// schema is closed to `PUBLIC`).
pub const CAN_READ_MAPPED_SQL: &str = "SELECT has_schema_privilege('cache_invalidator', 'USAGE') \
     AND has_table_privilege('cache_invalidator.mapped_tables', 'SELECT')";

/// `mapped_tables` as `schema.table` names, sorted.
pub const MAPPED_TABLES_SQL: &str =
    "SELECT schema_name || '.' || table_name FROM cache_invalidator.mapped_tables ORDER BY 1";

/// Everything `setup --print-sql` prints: one transaction installing the API
/// and naming the mapped tables, the grants, and with `ddl_trigger` the triggers.
pub fn print_sql<'a>(
    tables: impl IntoIterator<Item = &'a TableName>,
    roles: &[String],
    ddl_trigger: bool,
) -> String {
    let mut out = String::from(
        "-- cache-invalidator SQL API (`cache-invalidator setup --print-sql`): apply as one migration.\n\
         -- `setup` runs the same statements itself, idempotently.\nBEGIN;\n",
    );
    let mut stmts = api_statements();
    stmts.extend(mapped_tables_statements(tables));
    for r in roles {
        stmts.extend(grant_statements(r));
    }
    for s in stmts {
        out.push_str(&s);
        out.push_str(";\n");
    }
    out.push_str("COMMIT;\n");
    if ddl_trigger {
        out.push_str("-- DDL event triggers (superuser only):\n");
        for s in trigger_statements() {
            out.push_str(&s);
            out.push_str(";\n");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limits_are_the_parsers() {
        let sql = api_statements().join("\n");
        for n in [MAX_ENTRIES, MAX_ENTRY_BYTES, MAX_PAYLOAD_BYTES] {
            assert!(sql.contains(&format!("> {n}")), "{n} missing");
        }
        assert!(sql.contains("'invalidate:v1:'"));
        assert!(sql.contains("pg_logical_emit_message(true, 'cache-invalidator'"));
        // Every function runs as its owner with a pinned search_path.
        assert_eq!(
            sql.matches("CREATE OR REPLACE FUNCTION").count(),
            sql.matches("SECURITY DEFINER SET search_path = pg_catalog, pg_temp")
                .count()
        );
    }

    #[test]
    fn the_stamp_changes_with_the_statements() {
        assert_eq!(api_stamp(), api_stamp());
        assert!(api_stamp().starts_with("cache-invalidator SQL API v1 ("));
        assert_ne!(fnv1a(b"a"), fnv1a(b"b"));
        assert!(api_statements()
            .last()
            .is_some_and(|s| s.contains(&api_stamp())));
    }

    #[test]
    fn print_sql_is_one_transaction_with_grants_and_triggers() {
        let t = TableName::parse("public.users").unwrap();
        let out = print_sql([&t], &["app \"rw\"".to_owned()], true);
        assert!(out.starts_with("-- cache-invalidator SQL API"));
        assert!(out.contains("BEGIN;\nCREATE SCHEMA IF NOT EXISTS cache_invalidator;\n"));
        assert!(out.contains("VALUES ('public', 'users');\n"));
        assert!(out.contains("GRANT USAGE ON SCHEMA cache_invalidator TO \"app \"\"rw\"\"\";\n"));
        assert!(out.contains("COMMIT;\n-- DDL event triggers"));
        assert!(out
            .trim_end()
            .ends_with("EXECUTE FUNCTION cache_invalidator.on_sql_drop();"));
        assert!(!print_sql([&t], &[], false).contains("EVENT TRIGGER"));
    }
}
