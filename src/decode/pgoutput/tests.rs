//! Unit tests of `decode::pgoutput`.

use super::*;

fn err(payload: &[u8]) -> DecodeError {
    parse(payload).expect_err("must not parse")
}

#[test]
fn empty_payload_is_an_error() {
    assert_eq!(
        err(b"").to_string(),
        "malformed pgoutput empty message: message tag truncated at byte 0"
    );
}

#[test]
fn truncated_tuple_names_type_offset_and_lsn() {
    // Insert into 16398, 'N', 1 column, 't', length 5, but only 2 bytes.
    let mut p = b"I\x00\x00\x40\x0eN\x00\x01t\x00\x00\x00\x05ab".to_vec();
    let e = err(&p).at("0/16B3748".parse().unwrap());
    assert_eq!(
        e.to_string(),
        "malformed pgoutput Insert message at LSN 0/16B3748: tuple truncated at byte 13"
    );
    assert_eq!(e.kind(), MessageKind::Insert);
    p.extend_from_slice(b"cde");
    assert!(matches!(
        parse(&p),
        Ok(Message::Insert {
            relation: 16398,
            ..
        })
    ));
}

#[test]
fn stream_and_two_phase_tags_are_unsupported() {
    for tag in [b'S', b'E', b'c', b'A', b'b', b'P', b'K', b'r', b'p'] {
        let e = err(&[tag, 0, 0, 0, 1]);
        assert_eq!(e.reason(), &Reason::Unsupported, "tag {}", char::from(tag));
        assert!(e.to_string().starts_with("unsupported pgoutput "), "{e}");
    }
    assert_eq!(
        err(b"Sxxxx").to_string(),
        "unsupported pgoutput Stream Start message: streaming and two-phase messages are never \
         requested (no `streaming`, no `two_phase`); is something else consuming this slot with other options?"
    );
}

#[test]
fn unknown_tag() {
    assert_eq!(
        err(b"z").to_string(),
        "pgoutput unknown (tag 0x7a) message: not a pgoutput protocol v1 message"
    );
}

#[test]
fn binary_values_are_refused() {
    let e = err(b"I\x00\x00\x40\x0eN\x00\x02nb\x00\x00\x00\x01x");
    assert_eq!(
        e.reason(),
        &Reason::BinaryValue {
            column: 1,
            offset: 9
        }
    );
}

#[test]
fn negative_lengths_are_refused_not_cast() {
    let e = err(b"I\x00\x00\x40\x0eN\x00\x01t\xff\xff\xff\xff");
    assert_eq!(
        e.reason(),
        &Reason::NegativeLength {
            what: "value length",
            value: -1,
            offset: 9
        }
    );
    let e = err(b"T\x80\x00\x00\x00\x00");
    assert!(matches!(
        e.reason(),
        Reason::NegativeLength {
            what: "relation count",
            ..
        }
    ));
}

#[test]
fn huge_counts_do_not_reserve_memory() {
    // 2^31-1 relations announced, none sent: an error, not an allocation failure.
    let e = err(b"T\x7f\xff\xff\xff\x00");
    assert_eq!(
        e.reason(),
        &Reason::Truncated {
            what: "relation OID",
            offset: 6
        }
    );
    let e = err(b"I\x00\x00\x40\x0eN\x7f\xff");
    assert_eq!(
        e.reason(),
        &Reason::Truncated {
            what: "tuple",
            offset: 8
        }
    );
}

#[test]
fn invalid_utf8_in_a_name() {
    let e = err(b"Y\x00\x00\x00\x01public\x00\xff\xfe\x00");
    assert_eq!(
        e.to_string(),
        "malformed pgoutput Type message: invalid UTF-8 in type name at byte 12 (is the database encoding UTF8?)"
    );
}

#[test]
fn unterminated_string() {
    let e = err(b"Y\x00\x00\x00\x01public");
    assert_eq!(
        e.reason(),
        &Reason::Truncated {
            what: "type namespace",
            offset: 5
        }
    );
}

#[test]
fn trailing_bytes_are_refused() {
    let e = err(b"Y\x00\x00\x00\x01\x00t\x00!!");
    assert_eq!(
        e.reason(),
        &Reason::TrailingBytes {
            offset: 8,
            count: 2
        }
    );
}

#[test]
fn bad_old_tuple_tag() {
    let e = err(b"U\x00\x00\x40\x0eX");
    assert_eq!(
        e.to_string(),
        "malformed pgoutput Update message: bad tuple tag 'X' at byte 5, expected 'K', 'O' or 'N'"
    );
    let e = err(b"D\x00\x00\x40\x0eN\x00\x00");
    assert!(matches!(e.reason(), Reason::BadTag { found: b'N', .. }));
}

#[test]
fn update_with_old_key_then_new() {
    let msg = parse(b"U\x00\x00\x40\x0eK\x00\x02t\x00\x00\x00\x011nN\x00\x02t\x00\x00\x00\x012u")
        .unwrap();
    assert_eq!(
        msg,
        Message::Update {
            relation: 16398,
            old: Some(OldTuple::Key(vec![
                TupleValue::Text("1".into()),
                TupleValue::Null
            ])),
            new: vec![TupleValue::Text("2".into()), TupleValue::UnchangedToast],
        }
    );
}

#[test]
fn truncate_with_options_and_several_relations() {
    let msg = parse(b"T\x00\x00\x00\x02\x03\x00\x00\x40\x0e\x00\x00\x40\x15").unwrap();
    assert_eq!(
        msg,
        Message::Truncate {
            options: 3,
            relations: vec![16398, 16405]
        }
    );
}
