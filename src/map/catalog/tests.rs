//! Unit tests of `map::catalog`.

use super::*;

fn mappings(src: &str) -> Mappings {
    Mappings::parse("m.toml", src).unwrap()
}

fn table(cols: &[&str], identity: ReplicaIdentity) -> TableInfo {
    TableInfo {
        oid: 1,
        relkind: 'r',
        persistence: 'p',
        columns: cols
            .iter()
            .map(|c| ColumnInfo {
                name: c.to_string(),
                generated: Generated::No,
            })
            .collect(),
        replica_identity: identity,
        partition_of: None,
    }
}

fn posts_snapshot(identity: ReplicaIdentity) -> CatalogSnapshot {
    let mut s = CatalogSnapshot {
        server_version_num: 160000,
        ..Default::default()
    };
    s.tables.insert(
        TableName::parse("posts").unwrap(),
        table(&["id", "author_id", "title"], identity),
    );
    let mut tables = BTreeMap::new();
    tables.insert(
        TableName::parse("posts").unwrap(),
        PublishedTable::default(),
    );
    s.publication = Some(PublicationInfo {
        oid: 1,
        all_tables: false,
        insert: true,
        update: true,
        delete: true,
        truncate: true,
        via_partition_root: true,
        publish_generated_stored: false,
        tables,
    });
    s
}

const POSTS: &str =
    "[[table]]\nname = \"posts\"\nkeys = [\"post:{id}\", \"author:{author_id}:posts\"]\n";

fn errors(f: &[Finding]) -> Vec<&str> {
    f.iter()
        .filter(|f| f.severity >= Severity::Broken)
        .map(|f| f.message.as_str())
        .collect()
}

#[test]
fn clean_under_full_identity() {
    let f = check_catalog(
        &mappings(POSTS),
        &posts_snapshot(ReplicaIdentity::Full),
        "cache-invalidator",
    );
    assert!(f.is_empty(), "{f:?}");
}

#[test]
fn identity_refusal_names_table_columns_and_fixes() {
    let f = check_catalog(
        &mappings(POSTS),
        &posts_snapshot(ReplicaIdentity::Columns(vec!["id".into()])),
        "cache-invalidator",
    );
    let e = errors(&f);
    assert_eq!(e.len(), 1, "{f:?}");
    assert!(
        e[0].starts_with(
            "m.toml:2:8: table public.posts: the rule renders old values of column(s) author_id"
        ),
        "{}",
        e[0]
    );
    assert!(e[0].contains("only (id)"));
    assert!(e[0].contains("setup --replica-identity-full"));
    assert!(e[0].contains("REPLICA IDENTITY USING INDEX"));
    assert!(e[0].contains("assume_unchanged"));
    assert!(e[0].contains("narrow `on`"));
}

#[test]
fn identity_fixes_are_accepted() {
    let id = || posts_snapshot(ReplicaIdentity::Columns(vec!["id".into()]));
    for fix in [
        "assume_unchanged = [\"author_id\"]\n",
        "on = [\"insert\"]\n",
    ] {
        let f = check_catalog(&mappings(&format!("{POSTS}{fix}")), &id(), "x");
        assert!(errors(&f).is_empty(), "{fix}: {f:?}");
    }
}

#[test]
fn unknown_table_and_column_suggest() {
    let m = mappings("[[table]]\nname = \"post\"\nkeys = [\"p:{id}\"]\n[[table]]\nname = \"posts\"\nkeys = [\"p:{auther_id}\"]\n");
    let f = check_catalog(&m, &posts_snapshot(ReplicaIdentity::Full), "x");
    let e = errors(&f);
    assert!(e[0].starts_with("m.toml:2:8: table public.post does not exist: did you mean public.posts? (names are schema-qualified and case-sensitive"), "{}", e[0]);
    assert!(f.iter().all(|f| f.severity == Severity::Broken), "{f:?}");
    let broken = broken_tables(&m, &posts_snapshot(ReplicaIdentity::Full));
    assert_eq!(broken.len(), 2, "{broken:?}");
    assert_eq!(
        broken[&TableName::parse("posts").unwrap()],
        "column(s) auther_id no longer exist"
    );
    assert_eq!(
        broken[&TableName::parse("post").unwrap()],
        "the table does not exist"
    );
    assert_eq!(e[1], "m.toml:5:8: table public.posts has no column `auther_id`: did you mean `author_id`?; its columns: id, author_id, title");
}

#[test]
fn a_materialized_view_is_a_warning_not_an_error() {
    let mut s = posts_snapshot(ReplicaIdentity::Columns(vec![]));
    s.tables.values_mut().next().unwrap().relkind = 'm';
    s.publication = None;
    let f = check_catalog(&mappings(POSTS), &s, "x");
    assert!(errors(&f).is_empty(), "{f:?}");
    assert!(f.iter().any(|x| x
        .message
        .contains("is a materialized view: it has no row events")));
}

#[test]
fn refresh_columns_are_checked() {
    let m = mappings(
        "[[table]]\nname = \"posts\"\nrefresh = [{ key = \"post:{id}\", columns = [\"id\", \"titel\"] }]\n",
    );
    let f = check_catalog(&m, &posts_snapshot(ReplicaIdentity::Full), "x");
    assert_eq!(
        errors(&f),
        ["m.toml:2:8: table public.posts has no column `titel`: did you mean `title`?; its columns: id, author_id, title"]
    );
    // The refresh key needs old values like any key: a moved row unlinks the old key.
    let m = mappings(
        "[[table]]\nname = \"posts\"\nrefresh = [{ key = \"author:{author_id}:latest\" }]\n",
    );
    let f = check_catalog(
        &m,
        &posts_snapshot(ReplicaIdentity::Columns(vec!["id".into()])),
        "x",
    );
    assert!(
        errors(&f)[0].contains("old values of column(s) author_id"),
        "{f:?}"
    );
    // Every column, one of them named like the reserved field.
    let mut s = posts_snapshot(ReplicaIdentity::Full);
    s.tables.values_mut().next().unwrap().columns[2].name = "_lsn".into();
    let m = mappings("[[table]]\nname = \"posts\"\nrefresh = [{ key = \"post:{id}\" }]\n");
    assert!(errors(&check_catalog(&m, &s, "x"))[0].contains("reserve"));
}

#[test]
fn relkind_unlogged_generated() {
    let mut s = posts_snapshot(ReplicaIdentity::Full);
    let t = s.tables.values_mut().next().unwrap();
    t.relkind = 'v';
    let f = check_catalog(&mappings(POSTS), &s, "x");
    assert!(errors(&f)[0].contains("is a view (relkind 'v')"));

    let mut s = posts_snapshot(ReplicaIdentity::Full);
    let t = s.tables.values_mut().next().unwrap();
    t.persistence = 'u';
    t.columns[1].generated = Generated::Stored;
    let e = check_catalog(&mappings(POSTS), &s, "x");
    let e = errors(&e);
    assert!(e[0].contains("is UNLOGGED"));
    assert!(e[1].contains("column `author_id` of public.posts is generated"));
    assert!(e[1].contains("not published before PostgreSQL 18"));
    // 18 publishes a stored generated column only when asked to.
    s.server_version_num = 180000;
    let e = check_catalog(&mappings(POSTS), &s, "x");
    let e = errors(&e);
    assert_eq!(e.len(), 2, "{e:?}");
    assert!(e[1].contains("publish_generated_columns = stored"));
    s.publication.as_mut().unwrap().publish_generated_stored = true;
    assert_eq!(errors(&check_catalog(&mappings(POSTS), &s, "x")).len(), 1);
    // ... or when the column list names it.
    let publication = s.publication.as_mut().unwrap();
    publication.publish_generated_stored = false;
    publication.tables.values_mut().next().unwrap().column_list =
        Some(vec!["id".into(), "author_id".into(), "title".into()]);
    assert_eq!(errors(&check_catalog(&mappings(POSTS), &s, "x")).len(), 1);
    // A virtual generated column never.
    s.publication.as_mut().unwrap().publish_generated_stored = true;
    s.tables.values_mut().next().unwrap().columns[1].generated = Generated::Virtual;
    let e = check_catalog(&mappings(POSTS), &s, "x");
    assert!(errors(&e)[1].contains("virtual generated columns are never published"));
}

#[test]
fn publication_problems() {
    let mut s = posts_snapshot(ReplicaIdentity::Full);
    {
        let p = s.publication.as_mut().unwrap();
        p.delete = false;
        let pt = p.tables.values_mut().next().unwrap();
        pt.row_filter = Some("published".into());
        pt.column_list = Some(vec!["id".into(), "title".into()]);
    }
    let f = check_catalog(&mappings(POSTS), &s, "x");
    let e = errors(&f);
    assert!(e[0].contains("does not publish deletes"), "{e:?}");
    assert!(e[1].contains("row filter on public.posts (WHERE published)"));
    assert!(e[2].contains("hides column(s) author_id"));
}

#[test]
fn drift_names_what_the_publication_hides() {
    let m = mappings(POSTS);
    let posts = BTreeSet::from([TableName::parse("posts").unwrap()]);
    let mut s = posts_snapshot(ReplicaIdentity::Full);
    assert!(publication_drift(&m, &s, "p").is_empty());
    assert!(hidden_tables(&m, &s).is_empty());
    s.publication.as_mut().unwrap().update = false;
    let d = publication_drift(&m, &s, "p");
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(hidden_tables(&m, &s), posts);
    assert!(
        d[0].starts_with(
            "the publication does not publish updates, which the rule for public.posts fires on"
        ),
        "{d:?}"
    );
    s.publication.as_mut().unwrap().tables.clear();
    assert!(publication_drift(&m, &s, "p")
        .iter()
        .any(|l| l.contains("public.posts is not in the publication")));
    assert_eq!(hidden_tables(&m, &s), posts);
    s.publication = None;
    assert!(publication_drift(&m, &s, "p")[0].starts_with("publication \"p\" does not exist"));
    assert_eq!(hidden_tables(&m, &s), posts);
}

#[test]
fn partitions() {
    let mut s = posts_snapshot(ReplicaIdentity::Full);
    s.tables.values_mut().next().unwrap().relkind = 'p';
    s.publication.as_mut().unwrap().via_partition_root = false;
    assert!(
        errors(&check_catalog(&mappings(POSTS), &s, "x"))[0].contains("publish_via_partition_root")
    );

    let mut s = posts_snapshot(ReplicaIdentity::Full);
    s.tables.values_mut().next().unwrap().partition_of =
        Some(TableName::parse("all_posts").unwrap());
    assert!(errors(&check_catalog(&mappings(POSTS), &s, "x"))[0]
        .contains("is a partition of public.all_posts"));
}

#[test]
fn server_warnings() {
    let mut s = posts_snapshot(ReplicaIdentity::Full);
    s.max_slot_wal_keep_size_mb = Some(-1);
    s.synchronous_standby_names = Some("FIRST 1 (\"*\")".into());
    let f = check_catalog(&mappings(POSTS), &s, "cache-invalidator");
    assert_eq!(f.len(), 2);
    assert!(f.iter().all(|f| f.severity == Severity::Warning));
    assert!(sync_names_match(
        "ANY 1 (a, cache-invalidator)",
        "cache-invalidator"
    ));
    assert!(!sync_names_match("a, b", "cache-invalidator"));
}
