//! Tests of mapping parsing and validation: every error message, located.

use super::*;

fn err(src: &str) -> String {
    match Mappings::parse("m.toml", src) {
        Ok(_) => panic!("parsed: {src}"),
        Err(e) => e.to_string(),
    }
}

fn rule(src: &str) -> Rule {
    let m = Mappings::parse("m.toml", src).unwrap();
    m.rules()[0].clone()
}

const HEAD: &str = "[[table]]\nname = \"users\"\n";

#[test]
fn unknown_field_suggests_near_miss_and_lists_valid() {
    assert_eq!(
        err(&format!("{HEAD}kyes = [\"a\"]\n")),
        "m.toml:3:1: unknown field `kyes`: did you mean `keys`?; allowed fields: name, keys, tags, versions, patterns, channels, on, columns, assume_unchanged, mode, truncate, refresh"
    );
    assert_eq!(
        err(&format!("{HEAD}keys = [\"a\"]\n[table.truncate]\npaterns = [\"a\"]\n")),
        "m.toml:5:1: unknown field `paterns`: did you mean `patterns`?; allowed fields: keys, tags, versions, patterns, channels"
    );
    assert_eq!(
        err(&format!("{HEAD}channels = [{{ chanel = \"x\" }}]\n")),
        "m.toml:3:15: unknown field `chanel`: did you mean `channel`?; allowed fields: channel, message"
    );
    assert_eq!(
        err("[tabel]\n"),
        "m.toml:1:2: unknown field `tabel`: did you mean `table`?; allowed fields: table"
    );
}

#[test]
fn wrong_types_and_truncate_values() {
    assert_eq!(
        err(&format!("{HEAD}keys = \"a\"\n")),
        "m.toml:3:8: invalid type: string \"a\", expected a sequence"
    );
    assert_eq!(
        err(&format!("{HEAD}truncate = \"all\"\n")),
        "m.toml:3:12: truncate = \"all\" is not allowed: write truncate = \"none\" to disable it, or a [table.truncate] table with keys, tags, versions, patterns, channels"
    );
    assert!(err("[[table]]\nkeys = [\"a\"]\n").contains("missing field `name`"));
}

#[test]
fn template_errors_point_into_the_string() {
    assert_eq!(
        err(&format!("{HEAD}keys = [\"user:{{id\"]\n")),
        "m.toml:3:15: invalid template in `keys`: unclosed `{` at offset 5: close the placeholder with `}` or write `{{` for a literal brace"
    );
    assert_eq!(
        err(&format!("{HEAD}tags = [\"user:id}}\"]\n")),
        "m.toml:3:17: invalid template in `tags`: unmatched `}` at offset 7: write `}}` for a literal brace"
    );
    assert_eq!(
        err(&format!("{HEAD}versions = [\"user:{{}}\"]\n")),
        "m.toml:3:19: invalid template in `versions`: empty placeholder `{}` at offset 5: name a column, e.g. `{id}`"
    );
    assert_eq!(
        err(&format!("{HEAD}patterns = [\"\"]\n")),
        "m.toml:3:14: invalid template in `patterns`: empty template: write the key, e.g. \"user:{id}\""
    );
    assert_eq!(
        err(&format!("{HEAD}channels = [{{ channel = \"c\", message = {{ id = \"{{id\" }} }}]\n")),
        "m.toml:3:48: invalid template in `message`: unclosed `{` at offset 0: close the placeholder with `}` or write `{{` for a literal brace"
    );
}

#[test]
fn placeholders_in_truncate_are_refused() {
    assert_eq!(
        err(&format!("{HEAD}keys = [\"a:{{id}}\"]\n[table.truncate]\npatterns = [\"user:{{id}}:*\"]\n")),
        "m.toml:5:19: placeholder in `truncate.patterns`: a truncate has no row to render; write fixed names or patterns (e.g. \"user:*\")"
    );
    assert_eq!(
        err(&format!("{HEAD}keys = [\"a:{{id}}\"]\n[table.truncate]\nchannels = [{{ channel = \"c\", message = {{ id = \"{{id}}\" }} }}]\n")),
        "m.toml:5:48: placeholder in `truncate.channels.message`: a truncate has no row to render; write fixed names or patterns (e.g. \"user:*\")"
    );
}

#[test]
fn rule_level_errors() {
    assert_eq!(
        err(HEAD),
        "m.toml:2:8: rule for users invalidates nothing: give it keys, tags, versions, patterns, channels or refresh"
    );
    assert_eq!(
        err("[[table]]\nname = \"a.b.c\"\nkeys = [\"k\"]\n"),
        "m.toml:2:8: invalid table name \"a.b.c\": write \"table\" or \"schema.table\" (schema defaults to public)"
    );
    assert_eq!(
        err(&format!("{HEAD}keys = [\"k\"]\non = [\"insret\"]\n")),
        "m.toml:4:7: unknown operation \"insret\" in `on`: did you mean \"insert\"?; allowed: insert, update, delete"
    );
    assert_eq!(
        err(&format!("{HEAD}keys = [\"k\"]\non = [\"truncate\"]\n")),
        "m.toml:4:7: `truncate` is not an `on` value: a TRUNCATE always fires the rule's truncate invalidations; allowed: insert, update, delete"
    );
    assert_eq!(
        err(&format!("{HEAD}keys = [\"k\"]\non = []\n")),
        "m.toml:4:6: empty `on`: list at least one of \"insert\", \"update\", \"delete\" (or remove `on` for all three)"
    );
    assert_eq!(
        err(&format!("{HEAD}keys = [\"k\"]\nmode = \"soft\"\n")),
        "m.toml:4:8: unknown mode \"soft\"; allowed: \"delete\", \"tombstone\""
    );
    assert_eq!(
        err(&format!("{HEAD}keys = [\"k\"]\nmode = \"tombstones\"\n")),
        "m.toml:4:8: unknown mode \"tombstones\": did you mean \"tombstone\"?; allowed: \"delete\", \"tombstone\""
    );
    assert_eq!(
        err(&format!("{HEAD}keys = [\"k\"]\ncolumns = []\n")),
        "m.toml:4:11: empty `columns`: list the columns whose change fires an update, or remove `columns`"
    );
    assert_eq!(
        err(&format!("{HEAD}channels = [\"\"]\n")),
        "m.toml:3:13: empty channel name: name the pub/sub channel, e.g. \"cache:invalidate\""
    );
    assert_eq!(
        err("# nothing\n"),
        "m.toml:1:1: no [[table]] entries: a mapping file holds one or more [[table]] rules"
    );
}

#[test]
fn every_error_of_a_file_is_reported() {
    let e = err(&format!("{HEAD}keys = [\"{{\", \"}}\"]\non = [\"x\"]\n"));
    assert_eq!(e.lines().count(), 3, "{e}");
}

#[test]
fn parses_a_full_rule() {
    let r = rule(
        r#"[[table]]
name = "app.users"
keys = ["user:{id}:profile", "{{literal}}:{id}"]
tags = ["user:{id}"]
versions = ["user:{id}"]
patterns = ["feed:*:user:{id}"]
channels = ["plain", { channel = "cache:invalidate", message = { entity = "user", id = "{id}", n = 1, list = ["{name}"] } }]
on = ["update", "delete"]
columns = ["name"]
assume_unchanged = ["tenant_id"]
mode = "delete"
"#,
    );
    assert_eq!(r.table.to_string(), "app.users");
    assert_eq!(r.location.to_string(), "m.toml:2:8");
    assert_eq!(r.columns, ["id", "name"]);
    assert!(!r.on.insert && r.on.update && r.on.delete);
    assert_eq!(r.changed_columns.as_deref(), Some(&["name".to_owned()][..]));
    assert_eq!(r.assume_unchanged, ["tenant_id"]);
    assert_eq!(r.channels.len(), 2);
    assert_eq!(r.truncate_source, TruncateSource::Derived);
    assert_eq!(r.mode, Mode::Delete);
}

#[test]
fn mode_tombstone_is_accepted() {
    let r = rule(&format!(
        "{HEAD}keys = [\"user:{{id}}\"]\nmode = \"tombstone\"\n"
    ));
    assert_eq!(r.mode, Mode::Tombstone);
    assert_eq!(rule(&format!("{HEAD}keys = [\"k\"]\n")).mode, Mode::Delete);
}

#[test]
fn schema_defaults_to_public() {
    assert_eq!(
        rule(&format!("{HEAD}keys = [\"k\"]\n")).table.to_string(),
        "public.users"
    );
}

#[test]
fn derived_truncate_replaces_placeholders_with_stars() {
    let r = rule(&format!(
        "{HEAD}keys = [\"user:{{id}}:profile\", \"users:all\", \"odd[1]:{{id}}\"]\ntags = [\"user:{{id}}\"]\nversions = [\"user:{{id}}:{{name}}\", \"users\"]\npatterns = [\"feed:*:user:{{id}}\"]\nchannels = [\"c\"]\n"
    ));
    let t = &r.truncate;
    assert_eq!(t.keys, ["users:all"]);
    assert_eq!(
        t.patterns,
        ["user:*:profile", "odd\\[1\\]:*", "feed:*:user:*"]
    );
    assert_eq!(t.tag_patterns, ["user:*"]);
    assert_eq!(t.version_patterns, ["user:*:*"]);
    assert_eq!(t.versions, ["users"]);
    assert_eq!(
        t.channels,
        [TruncateChannel {
            channel: "c".into(),
            message: None
        }]
    );
}

#[test]
fn explicit_and_disabled_truncate() {
    let r = rule(&format!(
        "{HEAD}keys = [\"user:{{id}}\"]\n[table.truncate]\npatterns = [\"user:*\"]\ntags = [\"users\"]\nchannels = [{{ channel = \"c\", message = {{ all = true, k = \"{{{{x}}}}\" }} }}]\n"
    ));
    assert_eq!(r.truncate_source, TruncateSource::Explicit);
    assert_eq!(r.truncate.patterns, ["user:*"]);
    assert_eq!(r.truncate.tags, ["users"]);
    assert_eq!(
        r.truncate.channels[0].message,
        Some(serde_json::json!({"all": true, "k": "{x}"}))
    );
    let r = rule(&format!(
        "{HEAD}keys = [\"user:{{id}}\"]\ntruncate = \"none\"\n"
    ));
    assert_eq!(r.truncate_source, TruncateSource::None);
    assert!(r.truncate.is_empty());
}

#[test]
fn several_files_and_rules_per_table() {
    let a = "[[table]]\nname = \"users\"\nkeys = [\"a:{id}\"]\n[[table]]\nname = \"users\"\ntags = [\"b:{id}\"]\n";
    let b = "[[table]]\nname = \"posts\"\nkeys = [\"p:{id}\"]\n";
    let m = Mappings::from_sources([(Path::new("a.toml"), a), (Path::new("b.toml"), b)]).unwrap();
    let users = TableName::parse("users").unwrap();
    assert_eq!(m.rules_for(&users).count(), 2);
    assert_eq!(m.tables().len(), 2);
    let e = Mappings::from_sources([
        (Path::new("a.toml"), "x"),
        (Path::new("b.toml"), "[[table]]\n"),
    ])
    .unwrap_err()
    .to_string();
    assert!(e.starts_with("a.toml:1:2: "), "{e}");
    assert!(e.contains("\nb.toml:1:1: missing field `name`"), "{e}");
}

#[test]
fn identity_rule() {
    use identity::{check_rule, ReplicaIdentity};
    let pk = ReplicaIdentity::Columns(vec!["id".into()]);
    let posts =
        "[[table]]\nname = \"posts\"\nkeys = [\"post:{id}\", \"author:{author_id}:posts\"]\n";
    let e = check_rule(&rule(posts), &pk).unwrap();
    assert_eq!(e.columns, ["author_id"]);
    let msg = e.to_string();
    assert!(msg.starts_with("m.toml:2:8: table public.posts: the rule renders old values of column(s) author_id on update/delete, but the table's replica identity carries only (id)"), "{msg}");
    assert!(msg.contains("`cache-invalidator setup --replica-identity-full`"));
    assert!(msg.contains("`ALTER TABLE \"public\".\"posts\" REPLICA IDENTITY USING INDEX <a unique index covering author_id>;`"));
    assert!(msg.contains("add author_id to `assume_unchanged`"));
    assert!(msg.contains("narrow `on` to [\"insert\"]"));
    assert!(check_rule(&rule(posts), &ReplicaIdentity::Full).is_none());
    assert!(check_rule(&rule(&format!("{posts}on = [\"insert\"]\n")), &pk).is_none());
    assert!(check_rule(
        &rule(&format!("{posts}assume_unchanged = [\"author_id\"]\n")),
        &pk
    )
    .is_none());
    let nothing = check_rule(&rule(posts), &ReplicaIdentity::Columns(vec![])).unwrap();
    assert_eq!(nothing.columns, ["id", "author_id"]);
    assert!(nothing
        .to_string()
        .contains("carries no columns (REPLICA IDENTITY NOTHING"));
}

#[test]
fn refresh_entries() {
    let r = rule(&format!(
        "{HEAD}refresh = [{{ key = \"user:{{id}}:profile\", columns = [\"id\", \"name\"], ttl_s = 300 }}, {{ key = \"u:{{id}}\", format = \"hash\" }}]\n"
    ));
    assert_eq!(r.refresh.len(), 2);
    assert_eq!(
        r.refresh[0].columns.as_deref(),
        Some(&["id".to_owned(), "name".to_owned()][..])
    );
    assert_eq!(r.refresh[0].format, RefreshFormat::Json);
    assert_eq!(r.refresh[0].ttl_s, Some(300));
    assert_eq!(
        (
            r.refresh[1].format,
            r.refresh[1].columns.clone(),
            r.refresh[1].ttl_s
        ),
        (RefreshFormat::Hash, None, None)
    );
    assert_eq!(r.columns, ["id"], "the key's placeholders are rule columns");
    assert_eq!(
        r.invalidation_columns(),
        [true],
        "a moved row needs the old key"
    );
    // The derived truncate unlinks every refreshed key.
    assert_eq!(r.truncate.patterns, ["user:*:profile", "u:*"]);
}

#[test]
fn refresh_errors_are_located() {
    let e = err(&format!(
        "{HEAD}refresh = [{{ key = \"user:{{id}}\", format = \"jsno\" }}]\n"
    ));
    assert_eq!(e, "m.toml:3:42: unknown refresh format \"jsno\": did you mean \"json\"?; allowed: \"json\", \"hash\"");
    let e = err(&format!(
        "{HEAD}refresh = [{{ key = \"user:{{id}}\", ttl_s = 0 }}]\n"
    ));
    assert!(
        e.starts_with("m.toml:3:41: ttl_s = 0: a TTL is at least 1 second"),
        "{e}"
    );
    let e = err(&format!("{HEAD}refresh = [{{ key = \"user\" }}]\n"));
    assert!(e.contains("`refresh.key` has no placeholder"), "{e}");
    let e = err(&format!(
        "{HEAD}refresh = [{{ key = \"u:{{id}}\", columns = [\"id\", \"_lsn\"] }}]\n"
    ));
    assert!(e.contains("`_lsn` is reserved"), "{e}");
    let e = err(&format!(
        "{HEAD}refresh = [{{ key = \"u:{{id}}\", colums = [\"id\"] }}]\n"
    ));
    assert!(e.contains("unknown field `colums`"), "{e}");
    let e = err(&format!("{HEAD}refresh = [{{ key = \"u:{{id\" }}]\n"));
    assert!(e.contains("invalid template in `refresh.key`"), "{e}");
}
