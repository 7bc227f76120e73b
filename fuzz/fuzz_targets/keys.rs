//! Differential fuzzing of the cache key: two requests that get the same key must carry the same
//! credentials and the same parameters (up to the canonicalisation the key promises: parameter
//! order, scope as a set, how bytes were escaped). A violation hands one client's token to
//! another.
//!
//! Input: request A, a NUL byte, then request B. Each request is `[context 0x1f] basic\nbody`. The
//! optional context is `route 0x1e path [0x1e query [0x1e host]]` (UTF-8; the default route's
//! token path when absent), so two requests sent to different places must get different keys too.
//! When `basic` is
//! not empty it is base64-encoded by the harness into `Authorization: Basic ...` (so the fuzzer
//! works on the decoded bytes), otherwise the request authenticates in its body. When B starts
//! with 0x01 it is instead a list of 3-byte edits (position, little-endian u16; new byte) applied
//! to a copy of A: aliasing bugs live between near-identical requests, and a literal B rarely
//! lands one byte away from A by mutation alone.
#![no_main]

use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use percent_encoding::percent_decode;
use token_sidecar::token::request::{CacheKey, KeyContext, Keyer, Parsed, parse, parse_form};

const HMAC_KEY: [u8; 32] = [7; 32];
/// Where the request went (route, path, query, host), then what the provider sees,
/// independently decoded: client id, secret, other parameters sorted.
type Model = (
    (String, String, Option<String>, Option<String>),
    String,
    String,
    Vec<(String, String)>,
);

/// Splits off the optional context; `None` when it is not UTF-8.
fn context(request: &[u8]) -> Option<(KeyContext<'_>, &[u8])> {
    let Some(at) = request.iter().position(|&b| b == 0x1f) else {
        let default = KeyContext {
            route: "default",
            path: "/oauth/token",
            query: None,
            host: None,
        };
        return Some((default, request));
    };
    let text = std::str::from_utf8(&request[..at]).ok()?;
    let mut fields = text.split('\u{1e}');
    let context = KeyContext {
        route: fields.next().unwrap_or(""),
        path: fields.next().unwrap_or(""),
        query: fields.next(),
        host: fields.next(),
    };
    Some((context, &request[at + 1..]))
}

/// Decodes one form component the RFC 6749 §2.3.1 way: `+` is a space, `%XX` a byte, UTF-8.
fn decode(raw: &[u8]) -> String {
    let spaced: Vec<u8> = raw
        .iter()
        .map(|&b| if b == b'+' { b' ' } else { b })
        .collect();
    percent_decode(&spaced)
        .decode_utf8()
        .expect("parse accepted it")
        .into_owned()
}

/// The credentials and parameters of a request `parse` keyed, decoded without its help.
fn model(at: &KeyContext<'_>, basic: Option<&[u8]>, body: &[u8]) -> Model {
    let params = parse_form(body).expect("parse accepted the body");
    let find = |name: &str| {
        params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.to_string())
    };
    let (id, secret) = match basic {
        Some(raw) => {
            let colon = raw
                .iter()
                .position(|&b| b == b':')
                .expect("parse found a colon");
            (decode(&raw[..colon]), decode(&raw[colon + 1..]))
        }
        None => (find("client_id").unwrap(), find("client_secret").unwrap()),
    };
    let mut rest: Vec<(String, String)> = params
        .iter()
        .filter(|(n, _)| n != "client_id" && n != "client_secret")
        .map(|(n, v)| {
            let v = if n == "scope" {
                let mut scopes: Vec<&str> = v.split(' ').filter(|s| !s.is_empty()).collect();
                scopes.sort_unstable();
                scopes.dedup();
                scopes.join(" ")
            } else {
                v.to_string()
            };
            (n.to_string(), v)
        })
        .collect();
    rest.sort();
    let place = (
        at.route.to_owned(),
        at.path.to_owned(),
        at.query.map(str::to_owned),
        at.host.map(str::to_owned),
    );
    (place, id, secret, rest)
}

fn keyed(request: &[u8]) -> Option<(CacheKey, Model)> {
    let (at, request) = context(request)?;
    let (basic, body) = match request.iter().position(|&b| b == b'\n') {
        Some(at) if at > 0 => (Some(&request[..at]), &request[at + 1..]),
        Some(at) => (None, &request[at + 1..]),
        None => (None, request),
    };
    let header = basic.map(|raw| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    });
    match parse(&Keyer::new(&HMAC_KEY), &at, header.as_deref().map(str::as_bytes), body) {
        Ok(Parsed::Keyed { key, .. }) => Some((key, model(&at, basic, body))),
        _ => None,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(split) = data.iter().position(|&b| b == 0) else {
        return;
    };
    let (a, tail) = (&data[..split], &data[split + 1..]);
    let b = match tail.split_first() {
        Some((1, edits)) if !a.is_empty() => {
            let mut b = a.to_vec();
            for edit in edits.chunks_exact(3) {
                let at = usize::from(u16::from_le_bytes([edit[0], edit[1]])) % b.len();
                b[at] = edit[2];
            }
            b
        }
        _ => tail.to_vec(),
    };
    let (Some((key_a, model_a)), Some((key_b, model_b))) = (keyed(a), keyed(&b)) else {
        return;
    };
    if key_a == key_b {
        assert_eq!(
            model_a, model_b,
            "one cache key for two different credential sets"
        );
    }
});
