//! Least privilege: the exact Redis ACL the worker needs, derived from what
//! the sink sends, and the channels the mappings publish to.
//!
//! The commands, and why each one is there (`src/sink/` is the source of
//! truth; a test runs the sink under exactly this rule):
//!
//! | command | sent by |
//! | --- | --- |
//! | `UNLINK` | keys, pattern matches, repaired keys; inside the tag-pop script |
//! | `EXISTS` | tag sets, checked before the tag-pop script (only sets that exist get it) |
//! | `EVALSHA`, `SCRIPT LOAD` | the tag-pop and tombstone scripts, and the version-bump script on a cluster (loaded on start and on NOSCRIPT) |
//! | `SPOP`, `INCR` | inside those scripts (scripts run with the caller's permissions); `INCR` also bumps existing version keys |
//! | `SCAN` | the one pattern pass per batch |
//! | `PUBLISH` | `channels`, restricted to the mapped channels by `&` rules |
//! | `INFO` | the identity guard (`run_id`) |
//! | `GET`, `SET` | the identity key `cache-invalidator:<slot>:identity`; `SET key 2 NX` creates missing version keys |
//! | `WAIT` | `wait_replicas > 0` |
//! | `SELECT` | a database other than 0 in the URL |
//! | `PING` | liveness checks |
//! | `HELLO`, `AUTH` | authentication |
//!
//! Not granted: `CLIENT SETINFO`, which the redis crate sends on connect with
//! its reply ignored (Redis 7.0 does not know it, so `+client|setinfo` would
//! make the rule invalid there; refused, it only shows in `ACL LOG`).
//!
//! Keys are `~*`: tag members are arbitrary application keys, so no narrower
//! key pattern is correct.

use crate::map::Mappings;

/// The commands the worker sends to Redis, as ACL `+` rules, in the order
/// of [`redis_acl_rule`].
pub const REDIS_WORKER_COMMANDS: &[&str] = &[
    "unlink",
    "exists",
    "evalsha",
    "script|load",
    "spop",
    "incr",
    "scan",
    "publish",
    "ping",
    "select",
    "info",
    "wait",
    "get",
    "set",
    "hello",
    "auth",
];

/// The ACL rules for the worker's Redis user, for
/// `ACL SETUSER <user> on ><password> <rule>`: every key, exactly the mapped pub/sub channels
/// (`resetchannels` then one `&` per channel, glob characters escaped), and
/// exactly [`REDIS_WORKER_COMMANDS`].
///
/// ```
/// let rule = cache_invalidator::security::redis_acl_rule(&["cache:invalidate".into()]);
/// assert!(rule.starts_with("~* resetchannels &cache:invalidate -@all +unlink "));
/// ```
pub fn redis_acl_rule(channels: &[String]) -> String {
    let mut out = String::from("~* resetchannels");
    let mut seen: Vec<&String> = Vec::new();
    for c in channels {
        if seen.contains(&c) {
            continue;
        }
        seen.push(c);
        out.push_str(" &");
        for ch in c.chars() {
            if matches!(ch, '*' | '?' | '[' | ']' | '\\') {
                out.push('\\');
            }
            out.push(ch);
        }
    }
    out.push_str(" -@all");
    for cmd in REDIS_WORKER_COMMANDS {
        out.push_str(" +");
        out.push_str(cmd);
    }
    out
}

/// Every channel the mappings publish to (row-level and truncate messages), sorted.
pub fn mapped_channels(mappings: &Mappings) -> Vec<String> {
    let mut out: Vec<String> = mappings
        .rules()
        .iter()
        .flat_map(|r| {
            r.channels
                .iter()
                .map(|c| c.channel.clone())
                .chain(r.truncate.channels.iter().map(|c| c.channel.clone()))
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_lists_channels_once_escaped_and_exactly_the_commands() {
        let rule = redis_acl_rule(&["a".into(), "odd*[x]".into(), "a".into()]);
        assert_eq!(
            rule,
            "~* resetchannels &a &odd\\*\\[x\\] -@all +unlink +exists +evalsha +script|load +spop +incr +scan +publish +ping +select +info +wait +get +set +hello +auth"
        );
        assert_eq!(redis_acl_rule(&[]), rule.replace(" &a &odd\\*\\[x\\]", ""));
    }

    #[test]
    fn channels_come_from_rules_and_truncates() {
        let m = Mappings::parse(
            "m.toml",
            "[[table]]\nname = \"users\"\nkeys = [\"u:{id}\"]\nchannels = [\"c1\", \"c2\"]\n[table.truncate]\nchannels = [\"c3\"]\n",
        )
        .unwrap();
        assert_eq!(mapped_channels(&m), ["c1", "c2", "c3"]);
    }
}
