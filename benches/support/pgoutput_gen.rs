//! Synthetic pgoutput (proto_version 1) payloads for the micro-benchmarks:
//! the byte layout PostgreSQL's walsender sends (checked against the captured
//! fixtures in `tests/fixtures/pgoutput/` by the decode bench's first case).
#![allow(dead_code)]

/// Relation OID of the synthetic `public.items`.
pub const ITEMS_OID: u32 = 16_400;

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

/// Begin.
pub fn begin(final_lsn: u64, xid: u32) -> Vec<u8> {
    let mut b = vec![b'B'];
    b.extend_from_slice(&final_lsn.to_be_bytes());
    b.extend_from_slice(&0i64.to_be_bytes());
    b.extend_from_slice(&xid.to_be_bytes());
    b
}

/// Commit.
pub fn commit(commit_lsn: u64, end_lsn: u64) -> Vec<u8> {
    let mut b = vec![b'C', 0];
    b.extend_from_slice(&commit_lsn.to_be_bytes());
    b.extend_from_slice(&end_lsn.to_be_bytes());
    b.extend_from_slice(&0i64.to_be_bytes());
    b
}

/// Relation message of `public.<table>(id bigint key, owner_id int, v int)`.
pub fn items_relation(table: &str) -> Vec<u8> {
    let mut b = vec![b'R'];
    b.extend_from_slice(&ITEMS_OID.to_be_bytes());
    cstr(&mut b, "public");
    cstr(&mut b, table);
    b.push(b'd');
    b.extend_from_slice(&3i16.to_be_bytes());
    for (flags, name, oid) in [(1u8, "id", 20u32), (0, "owner_id", 23), (0, "v", 23)] {
        b.push(flags);
        cstr(&mut b, name);
        b.extend_from_slice(&oid.to_be_bytes());
        b.extend_from_slice(&(-1i32).to_be_bytes());
    }
    b
}

fn text_col(b: &mut Vec<u8>, s: &str) {
    b.push(b't');
    b.extend_from_slice(&i32::try_from(s.len()).unwrap().to_be_bytes());
    b.extend_from_slice(s.as_bytes());
}

/// UPDATE items SET v = v WHERE id = `id` (default identity: new row only).
pub fn items_update(id: u64, owner: u64, v: u64) -> Vec<u8> {
    let mut b = vec![b'U'];
    b.extend_from_slice(&ITEMS_OID.to_be_bytes());
    b.push(b'N');
    b.extend_from_slice(&3i16.to_be_bytes());
    text_col(&mut b, &id.to_string());
    text_col(&mut b, &owner.to_string());
    text_col(&mut b, &v.to_string());
    b
}

/// One transaction updating `n` rows of `table` (laid out like items):
/// (WAL position, payload) pairs.
pub fn items_transaction(table: &str, n: u64) -> Vec<(u64, Vec<u8>)> {
    let mut out = vec![
        (0x1000, begin(0x1000 + n * 0x48, 1000)),
        (0x1000, items_relation(table)),
    ];
    for i in 0..n {
        out.push((0x1000 + i * 0x48, items_update(i + 1, (i + 1) % 1000, 7)));
    }
    out.push((
        0x1000 + n * 0x48,
        commit(0x1000 + n * 0x48, 0x1000 + n * 0x48 + 0x30),
    ));
    out
}
