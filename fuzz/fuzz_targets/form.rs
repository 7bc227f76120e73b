//! Fuzzes the token request parser: `parse_form` on the whole input, and `parse` with the input
//! split at its first newline into an `Authorization` value and a body (a header value cannot
//! hold a newline, so every split is a request some client could send).
//!
//! Oracles beyond "no panic": an accepted form has distinct, non-empty names and, re-encoded,
//! parses back to the same pairs; `parse` is deterministic; a keyed request names a client id.
#![no_main]

use libfuzzer_sys::fuzz_target;
use percent_encoding::{NON_ALPHANUMERIC, percent_encode};
use token_sidecar::token::request::{KeyContext, Keyer, Parsed, parse, parse_form};

const HMAC_KEY: [u8; 32] = [7; 32];
const AT: KeyContext<'static> = KeyContext {
    route: "default",
    path: "/oauth/token",
    query: None,
    host: None,
};

fuzz_target!(|data: &[u8]| {
    if let Ok(params) = parse_form(data) {
        let mut body = String::new();
        for (i, (name, value)) in params.iter().enumerate() {
            assert!(!name.is_empty(), "empty name accepted");
            assert!(
                params[..i].iter().all(|(n, _)| n != name),
                "duplicate name accepted"
            );
            if i > 0 {
                body.push('&');
            }
            body.extend(percent_encode(name.as_bytes(), NON_ALPHANUMERIC));
            body.push('=');
            body.extend(percent_encode(value.as_bytes(), NON_ALPHANUMERIC));
        }
        let again = parse_form(body.as_bytes()).expect("a re-encoded form parses");
        assert_eq!(again[..], params[..], "re-encoding changed the form");
    }

    let (authorization, body) = match data.iter().position(|&b| b == b'\n') {
        Some(at) => (Some(&data[..at]), &data[at + 1..]),
        None => (None, data),
    };
    let first = parse(&Keyer::new(&HMAC_KEY), &AT, authorization, body);
    let second = parse(&Keyer::new(&HMAC_KEY), &AT, authorization, body);
    match (&first, &second) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "parse is not deterministic"),
        (Err(_), Err(_)) => {}
        _ => panic!("parse is not deterministic"),
    }
    if let Ok(Parsed::Keyed { client_id, .. }) = first
    {
        assert!(!client_id.is_empty(), "keyed without a client id");
    }
});
