//! Reading and writing JSON as Go does: key folding, number forms, escaping, parse errors.

use std::collections::BTreeMap;

use super::*;

#[test]
fn maps_are_sorted_and_structs_keep_their_order() {
    let map = Value::Map(BTreeMap::from([
        ("type".to_string(), Value::Str("bridge".into())),
        ("mtu".to_string(), Value::Int(1450)),
        ("ipMasq".to_string(), Value::Bool(false)),
    ]));
    assert_eq!(marshal(&map), r#"{"ipMasq":false,"mtu":1450,"type":"bridge"}"#);
    let st = Value::Struct(vec![("dst", Value::Str("10.0.0.0/8".into())), ("gw", Value::Str("10.0.0.1".into()))]);
    assert_eq!(marshal(&st), r#"{"dst":"10.0.0.0/8","gw":"10.0.0.1"}"#);
}

#[test]
fn floats_are_formatted_like_go() {
    for (f, go) in [
        (1450.0, "1450"),
        (0.5, "0.5"),
        (-0.0, "-0"),
        (1e20, "100000000000000000000"),
        (1e21, "1e+21"),
        (1.5e300, "1.5e+300"),
        (0.000001, "0.000001"),
        (1e-7, "1e-7"),
        (-2.5e-10, "-2.5e-10"),
        (12345678901234567890.0, "12345678901234567000"),
    ] {
        assert_eq!(format_float(f), go, "{f:e}");
    }
}

#[test]
fn strings_are_escaped_like_go() {
    let v = Value::Str("a\"b\\c\n\t\u{1}<>&\u{2028}é\u{8}\u{c}".into());
    assert_eq!(marshal(&v), r#""a\"b\\c\n\t\u0001\u003c\u003e\u0026\u2028é\b\f""#);
}

#[test]
fn indent_matches_marshal_indent() {
    let v = Value::Struct(vec![
        ("code", Value::Int(7)),
        ("list", Value::Array(vec![Value::Int(1), Value::Map(BTreeMap::new())])),
        ("empty", Value::Array(vec![])),
    ]);
    assert_eq!(
        marshal_indent(&v, "    "),
        "{\n    \"code\": 7,\n    \"list\": [\n        1,\n        {}\n    ],\n    \"empty\": []\n}"
    );
}

#[test]
fn numbers_read_into_interface_become_floats_and_last_key_wins() {
    let json = parse(br#"{"a": 1, "b": [1.0, 1e2, 18446744073709551616], "a": {"x": null}}"#).unwrap();
    let Value::Map(map) = json.into_value() else { panic!("not a map") };
    assert_eq!(marshal(&Value::Map(map)), r#"{"a":{"x":null},"b":[1,100,18446744073709552000]}"#);
}

#[test]
fn parse_errors() {
    assert_eq!(parse(b"").unwrap_err(), "unexpected end of JSON input");
    assert_eq!(parse(b"{\"a\":").unwrap_err(), "unexpected end of JSON input");
    assert!(parse(b"{} x").is_err());
    assert_eq!(parse(b"\"\xff\"").unwrap(), Json::Str("\u{fffd}".into()));
}

#[test]
fn keys_fold_like_go() {
    assert!(key_matches("SubnetFile", "subnetFile"));
    assert!(key_matches("ſubnetfile", "subnetFile"));
    assert!(!key_matches("subnet_file", "subnetFile"));
}
