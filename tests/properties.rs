//! Property tests of the pure logic on the token path: form and Basic parsing, cache-key
//! canonicalisation, `Retry-After` and backoff, and a cached token's clock and rendering.
//!
//! Each property states what must hold for every input, not for a handful of examples; the
//! strategies lean towards the inputs that break parsers (percent signs, plus signs, colons,
//! non-ASCII, boundary values) rather than uniform noise. Case counts are moderate so the file
//! runs in seconds in a debug build; `PROPTEST_CASES=100000 cargo test --test integration
//! properties::` runs a deeper pass. docs/RELIABILITY.md lists every property by name.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use http::HeaderValue;
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

use token_sidecar::config::{
    ClientConfig, Config, Limits, LogConfig, RouteConfig, TokenConfig, UpstreamUrl,
};
use token_sidecar::token::cooldown::{backoff, parse_retry_after};
use token_sidecar::token::lifetime::{Token, Validated};
use token_sidecar::token::request::{CacheKey, KeyContext, Keyer, Parsed, parse, parse_form};

/// `cases` unless `PROPTEST_CASES` asks for more (or fewer). Failures are not persisted to disk:
/// a shrunk counterexample belongs in a named regression test instead.
fn cases(cases: u32) -> ProptestConfig {
    let default = ProptestConfig::default();
    ProptestConfig {
        cases: if std::env::var_os("PROPTEST_CASES").is_some() {
            default.cases
        } else {
            cases
        },
        failure_persistence: None,
        ..default
    }
}

const HMAC_KEY: [u8; 32] = [0x5a; 32];
/// Where most generated requests are sent: the default route's token path, no query, no Host.
const AT: KeyContext<'static> = KeyContext {
    route: "default",
    path: "/oauth/token",
    query: None,
    host: None,
};

// ---------------------------------------------------------------------------------------------
// Encoding helpers: every way a client may legitimately spell the same form or Basic header.
// ---------------------------------------------------------------------------------------------

/// A stream of choices that cycles, so one generated vector drives many decisions and shrinks.
struct Choices<'a> {
    picks: &'a [u8],
    at: usize,
}

impl<'a> Choices<'a> {
    fn new(picks: &'a [u8]) -> Self {
        Choices { picks, at: 0 }
    }

    fn next(&mut self) -> u8 {
        if self.picks.is_empty() {
            return 0;
        }
        let pick = self.picks[self.at % self.picks.len()];
        self.at += 1;
        pick
    }
}

/// Form-encodes one component, choosing per byte between the literal byte (where a decoder reads
/// it back unchanged), `%XX`, `%xx`, and for a space `+` or `%20`. Bytes, not a `String`: one
/// byte of a UTF-8 sequence may be escaped while the next travels raw, which a decoder must
/// accept too.
fn encode(text: &str, choices: &mut Choices<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() * 3);
    for &byte in text.as_bytes() {
        let pick = choices.next() % 3;
        match byte {
            b' ' if pick == 0 => out.push(b'+'),
            // Always escaped: they delimit or escape form components.
            b'&' | b'=' | b'+' | b'%' | b' ' => escape(&mut out, byte, pick == 1),
            _ if pick == 0 => out.push(byte),
            _ => escape(&mut out, byte, pick == 1),
        }
    }
    out
}

fn escape(out: &mut Vec<u8>, byte: u8, upper: bool) {
    let hex = if upper {
        format!("%{byte:02X}")
    } else {
        format!("%{byte:02x}")
    };
    out.extend_from_slice(hex.as_bytes());
}

/// A form body from pairs, in the given order.
fn form(pairs: &[(String, String)], choices: &mut Choices<'_>) -> Vec<u8> {
    let mut body = Vec::new();
    for (i, (name, value)) in pairs.iter().enumerate() {
        if i > 0 {
            body.push(b'&');
        }
        body.extend(encode(name, choices));
        body.push(b'=');
        body.extend(encode(value, choices));
    }
    body
}

/// Reorders `items` by the random sort keys in `order` (a stable sort, so ties keep order).
fn shuffled<T: Clone>(items: &[T], order: &[u32]) -> Vec<T> {
    let mut indexed: Vec<(u32, usize)> = (0..items.len())
        .map(|i| (order.get(i).copied().unwrap_or(0), i))
        .collect();
    indexed.sort();
    indexed.into_iter().map(|(_, i)| items[i].clone()).collect()
}

/// `id:secret` as RFC 6749 §2.3.1 puts it in a Basic header: each part form-encoded (with any
/// mix of spellings), the id's colons always escaped.
fn basic_raw(id: &str, secret: &str, choices: &mut Choices<'_>) -> Vec<u8> {
    let mut raw = Vec::new();
    for byte in encode(id, choices) {
        if byte == b':' {
            raw.extend_from_slice(b"%3A");
        } else {
            raw.push(byte);
        }
    }
    raw.push(b':');
    raw.extend(encode(secret, choices));
    raw
}

/// A Basic header in one of the spellings a server must accept: scheme in any case, optional
/// whitespace around the base64.
fn basic_header(id_secret: &[u8], choices: &mut Choices<'_>) -> String {
    let scheme = ["Basic", "basic", "BASIC", "bAsIc"][usize::from(choices.next() % 4)];
    let pad = ["", " ", "\t", "  "];
    format!(
        "{scheme} {}{}{}",
        pad[usize::from(choices.next() % 4)],
        BASE64.encode(id_secret),
        pad[usize::from(choices.next() % 4)]
    )
}

/// The key and client id of a request that must be keyed; fails the property otherwise.
fn keyed(
    context: &KeyContext<'_>,
    auth: Option<&str>,
    body: &[u8],
) -> Result<(CacheKey, String), TestCaseError> {
    match parse(
        &Keyer::new(&HMAC_KEY),
        context,
        auth.map(str::as_bytes),
        body,
    ) {
        Ok(Parsed::Keyed { key, client_id, .. }) => Ok((key, client_id.into_owned())),
        other => Err(TestCaseError::fail(format!(
            "expected a keyed request, got {other:?} for auth {auth:?} body {:?}",
            String::from_utf8_lossy(body)
        ))),
    }
}

// ---------------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------------

/// The parts of a [`KeyContext`], owned: route, path, and optional query and Host, drawn from a
/// small alphabet so that collisions between two draws are frequent enough to test equality.
#[derive(Debug, Clone)]
struct ContextParts {
    route: String,
    path: String,
    query: Option<String>,
    host: Option<String>,
}

impl ContextParts {
    fn context(&self) -> KeyContext<'_> {
        KeyContext {
            route: &self.route,
            path: &self.path,
            query: self.query.as_deref(),
            host: self.host.as_deref(),
        }
    }
}

/// A context whose fields number `pair` and `pair + 1` (route, path, query, Host) are `head`
/// and `tail`.
fn adjacent_fields<'a>(pair: usize, head: &'a str, tail: &'a str) -> KeyContext<'a> {
    match pair {
        0 => KeyContext {
            route: head,
            path: tail,
            ..AT
        },
        1 => KeyContext {
            path: head,
            query: Some(tail),
            ..AT
        },
        _ => KeyContext {
            query: Some(head),
            host: Some(tail),
            ..AT
        },
    }
}

fn context_parts() -> impl Strategy<Value = ContextParts> {
    (
        "[ab]{1,2}",
        "/[ab/]{0,2}",
        proptest::option::of("[ab=&]{0,2}"),
        proptest::option::of("[ab:]{0,2}"),
    )
        .prop_map(|(route, path, query, host)| ContextParts {
            route,
            path,
            query,
            host,
        })
}

/// Parameter names a credential set may carry besides the ones `parse` interprets.
fn extra_name() -> impl Strategy<Value = String> {
    "[a-z_]{1,10}".prop_filter("reserved parameter", |n| {
        !matches!(
            n.as_str(),
            "grant_type"
                | "client_id"
                | "client_secret"
                | "scope"
                | "refresh_token"
                | "client_assertion"
                | "client_assertion_type"
        )
    })
}

/// Values with the characters that matter to a form decoder, plus anything at all.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9 %+=&:~._-]{0,12}",
        any::<String>().prop_map(|s| s.chars().take(12).collect()),
    ]
}

/// A scope token (RFC 6749 §3.3: %x21 / %x23-5B / %x5D-7E).
fn scope_token() -> impl Strategy<Value = String> {
    "[!#-\\[\\]-~]{1,8}"
}

/// One client's credentials and request parameters, as the provider would see them.
#[derive(Debug, Clone)]
struct Creds {
    /// No `:` (it could not travel in a Basic header unescaped), no `%` or `+` (a Basic header
    /// carrying them is keyed on its raw bytes, see `basic_with_escapes_...`).
    id: String,
    secret: String,
    scopes: BTreeSet<String>,
    extra: BTreeMap<String, String>,
}

fn creds() -> impl Strategy<Value = Creds> {
    (
        "[^:%+\u{0}-\u{1f}]{1,12}",
        "[^%+\u{0}-\u{1f}]{1,12}",
        prop::collection::btree_set(scope_token(), 0..5),
        prop::collection::btree_map(extra_name(), value(), 0..4),
    )
        .prop_map(|(id, secret, scopes, extra)| Creds {
            id,
            secret,
            scopes,
            extra,
        })
}

impl Creds {
    /// Parameters other than client authentication, with scope spelled from `choices`: any order,
    /// any repetition.
    fn params(&self, choices: &mut Choices<'_>) -> Vec<(String, String)> {
        let mut params = vec![("grant_type".to_owned(), "client_credentials".to_owned())];
        if !self.scopes.is_empty() {
            let mut spelled: Vec<&str> = Vec::new();
            for scope in &self.scopes {
                for _ in 0..=choices.next() % 3 {
                    spelled.push(scope);
                }
            }
            let order: Vec<u32> = spelled.iter().map(|_| u32::from(choices.next())).collect();
            params.push(("scope".to_owned(), shuffled(&spelled, &order).join(" ")));
        }
        params.extend(self.extra.iter().map(|(n, v)| (n.clone(), v.clone())));
        params
    }

    /// A request authenticating in the body.
    fn form_request(&self, picks: &[u8], order: &[u32]) -> Vec<u8> {
        let mut choices = Choices::new(picks);
        let mut params = self.params(&mut choices);
        params.push(("client_id".into(), self.id.clone()));
        params.push(("client_secret".into(), self.secret.clone()));
        form(&shuffled(&params, order), &mut choices)
    }

    /// A request authenticating with Basic, optionally repeating the client id in the body.
    fn basic_request(&self, picks: &[u8], order: &[u32], repeat_id: bool) -> (String, Vec<u8>) {
        let mut choices = Choices::new(picks);
        let mut params = self.params(&mut choices);
        if repeat_id {
            params.push(("client_id".into(), self.id.clone()));
        }
        let header = basic_header(
            format!("{}:{}", self.id, self.secret).as_bytes(),
            &mut choices,
        );
        (header, form(&shuffled(&params, order), &mut choices))
    }
}

fn picks() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..48)
}

fn order() -> impl Strategy<Value = Vec<u32>> {
    prop::collection::vec(any::<u32>(), 16)
}

/// Bytes biased towards what a form decoder and a Basic decoder find hard.
fn hostile_bytes() -> impl Strategy<Value = Vec<u8>> {
    let alphabet: &[u8] = b"%+=&:aZ09fFgG \t\r\n\x00\x7f\x80\xc3\xa9\xff\xed\xa0";
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..200),
        prop::collection::vec(prop::sample::select(alphabet.to_vec()), 0..200),
    ]
}

// ---------------------------------------------------------------------------------------------
// Form and Basic parsing
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(cases(512))]

    /// `parse_form` returns for every byte string, and what it accepts has non-empty names.
    #[test]
    fn parse_form_never_panics_and_accepts_only_nonempty_names(body in hostile_bytes()) {
        if let Ok(params) = parse_form(&body) {
            prop_assert!(params.iter().all(|(name, _)| !name.is_empty()));
        }
    }

    /// `parse` returns for every Authorization header and body, and a keyed answer always names a
    /// non-empty client id.
    #[test]
    fn parse_never_panics_on_arbitrary_authorization_and_body(
        auth in prop::option::of(hostile_bytes()),
        body in hostile_bytes(),
    ) {
        if let Ok(Parsed::Keyed { client_id, .. }) =
            parse(&Keyer::new(&HMAC_KEY), &AT, auth.as_deref(), &body)
        {
            prop_assert!(!client_id.is_empty());
            // A key means one thing: a keyed body never repeats a parameter (RFC 6749 §3.2).
            let params = parse_form(&body).unwrap();
            for (i, (name, _)) in params.iter().enumerate() {
                prop_assert!(params[..i].iter().all(|(n, _)| n != name), "duplicate {name:?}");
            }
        }
    }

    /// A well-formed Basic scheme around arbitrary decoded bytes: never a panic, and never a key
    /// without both a client id and a secret.
    #[test]
    fn basic_header_around_arbitrary_bytes_never_panics(decoded in hostile_bytes()) {
        let header = format!("Basic {}", BASE64.encode(&decoded));
        let result = parse(&Keyer::new(&HMAC_KEY), &AT, Some(header.as_bytes()), b"grant_type=client_credentials");
        if let Ok(Parsed::Keyed { client_id, .. }) = result {
            prop_assert!(!client_id.is_empty());
            let colon = decoded.iter().position(|&b| b == b':');
            prop_assert!(colon.is_some_and(|c| c + 1 < decoded.len()), "keyed without a secret");
        }
    }

    /// Any set of (name, value) pairs with distinct names, form-encoded with any mix of literal
    /// bytes, `%XX`, `%xx` and `+`, parses back to the same pairs in the same order.
    #[test]
    fn form_encoding_round_trips(
        pairs in prop::collection::btree_map("(?s).{1,10}", value(), 0..8),
        order in order(),
        picks in picks(),
    ) {
        let pairs: Vec<(String, String)> = shuffled(&pairs.into_iter().collect::<Vec<_>>(), &order);
        let body = form(&pairs, &mut Choices::new(&picks));
        let parsed = parse_form(&body)
            .map_err(|e| TestCaseError::fail(format!("{e:?} for {:?}", String::from_utf8_lossy(&body))))?;
        let parsed: Vec<(String, String)> =
            parsed.into_iter().map(|(n, v)| (n.into_owned(), v.into_owned())).collect();
        prop_assert_eq!(parsed, pairs, "body {:?}", String::from_utf8_lossy(&body));
    }

    /// Percent-encoded credentials in a Basic header (RFC 6749 §2.3.1) decode to the client id,
    /// including ids with an escaped colon.
    #[test]
    fn basic_header_round_trips_percent_encoded_credentials(
        id in "(?s).{1,12}",
        secret in "(?s).{1,12}",
        picks in picks(),
    ) {
        let mut choices = Choices::new(&picks);
        // The id's own colons must be escaped; the first raw colon separates id and secret.
        let header = basic_header(&basic_raw(&id, &secret, &mut choices), &mut choices);
        let (_, client_id) = keyed(&AT, Some(&header), b"grant_type=client_credentials")?;
        prop_assert_eq!(client_id, id);
    }
}

// ---------------------------------------------------------------------------------------------
// Cache-key canonicalisation
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(cases(256))]

    /// Equal credentials give equal keys whatever the parameter order, scope order and
    /// repetition, percent-encoding choices, and Basic scheme spelling.
    #[test]
    fn equal_credentials_give_equal_keys_across_spellings(
        creds in creds(),
        picks_a in picks(), order_a in order(),
        picks_b in picks(), order_b in order(),
    ) {
        let (a, id_a) = keyed(&AT, None, &creds.form_request(&picks_a, &order_a))?;
        let (b, id_b) = keyed(&AT, None, &creds.form_request(&picks_b, &order_b))?;
        prop_assert_eq!(a, b);
        prop_assert_eq!(&id_a, &creds.id);
        prop_assert_eq!(id_b, id_a);
    }

    /// Basic and body authentication with the same id and secret share a key, and repeating the
    /// id in the body beside Basic changes nothing.
    #[test]
    fn basic_and_form_authentication_share_a_key(
        creds in creds(),
        picks_a in picks(), order_a in order(),
        picks_b in picks(), order_b in order(),
        repeat_id in any::<bool>(),
    ) {
        let (form_key, _) = keyed(&AT, None, &creds.form_request(&picks_a, &order_a))?;
        let (header, body) = creds.basic_request(&picks_b, &order_b, repeat_id);
        let (basic_key, client_id) = keyed(&AT, Some(&header), &body)?;
        prop_assert_eq!(form_key, basic_key, "header {:?} body {:?}", header, body);
        prop_assert_eq!(client_id, creds.id);
    }

    /// A Basic header carrying `%` or `+` is keyed on its raw bytes (a provider may or may not
    /// decode them), so it never shares a key with a spelling that differs in those bytes.
    #[test]
    fn basic_with_escapes_is_keyed_on_its_raw_spelling(
        creds in creds(),
        picks_a in picks(), picks_b in picks(),
    ) {
        let mut ca = Choices::new(&picks_a);
        let mut cb = Choices::new(&picks_b);
        let raw_a = basic_raw(&creds.id, &creds.secret, &mut ca);
        let raw_b = basic_raw(&creds.id, &creds.secret, &mut cb);
        let body = b"grant_type=client_credentials";
        let (a, id_a) = keyed(&AT, Some(&basic_header(&raw_a, &mut ca)), body)?;
        let (b, id_b) = keyed(&AT, Some(&basic_header(&raw_b, &mut cb)), body)?;
        prop_assert_eq!(&id_a, &creds.id);
        prop_assert_eq!(&id_b, &creds.id);
        prop_assert_eq!(
            a == b,
            raw_a == raw_b,
            "{:?} vs {:?}",
            String::from_utf8_lossy(&raw_a),
            String::from_utf8_lossy(&raw_b)
        );
    }

    /// Two Basic headers whose decoded secrets differ (here in one character, spelled the same
    /// way) never share a key. The alphabet is small on purpose: multi-byte characters sharing a
    /// continuation byte, so a raw lead byte can sit before an escaped continuation. This found
    /// the raw Basic key being a lossy UTF-8 string (`app:\xc3%a9` and `app:\xc2%a9`, secrets
    /// é and ©, shared a key), fixed in 78d85fe.
    #[test]
    fn basic_credentials_that_differ_never_share_a_key(
        secret in "[aé©ĩ€ +%]{1,4}",
        at in any::<prop::sample::Index>(),
        replacement in prop::sample::select(vec!['a', 'é', '©', 'ĩ', '€', ' ', '+', '%']),
        picks in picks(),
    ) {
        let mut chars: Vec<char> = secret.chars().collect();
        let at = at.index(chars.len());
        prop_assume!(chars[at] != replacement);
        chars[at] = replacement;
        let other: String = chars.into_iter().collect();
        let body = b"grant_type=client_credentials";
        let key = |secret: &str| {
            let mut choices = Choices::new(&picks);
            let raw = basic_raw("app", secret, &mut choices);
            keyed(&AT, Some(&basic_header(&raw, &mut choices)), body)
        };
        prop_assert_ne!(key(&secret)?.0, key(&other)?.0, "secrets {:?} and {:?} share a key", secret, other);
    }

    /// A different secret gives a different key, by body or by Basic.
    #[test]
    fn different_secret_gives_different_key(
        creds in creds(),
        other in "[^%+\u{0}-\u{1f}]{1,12}",
        picks in picks(), order in order(), basic in any::<bool>(),
    ) {
        prop_assume!(other != creds.secret);
        let changed = Creds { secret: other, ..creds.clone() };
        let key = |c: &Creds| {
            if basic {
                let (h, b) = c.basic_request(&picks, &order, false);
                keyed(&AT, Some(&h), &b)
            } else {
                keyed(&AT, None, &c.form_request(&picks, &order))
            }
        };
        prop_assert_ne!(key(&creds)?.0, key(&changed)?.0);
    }

    /// A different client id gives a different key.
    #[test]
    fn different_client_id_gives_different_key(
        creds in creds(),
        other in "[^:%+\u{0}-\u{1f}]{1,12}",
        picks in picks(), order in order(),
    ) {
        prop_assume!(other != creds.id);
        let changed = Creds { id: other, ..creds.clone() };
        prop_assert_ne!(
            keyed(&AT, None, &creds.form_request(&picks, &order))?.0,
            keyed(&AT, None, &changed.form_request(&picks, &order))?.0
        );
    }

    /// Moving bytes between the client id and the secret changes the key (fields are framed).
    #[test]
    fn shifting_bytes_between_id_and_secret_changes_the_key(
        creds in creds(), shift in any::<prop::sample::Index>(), picks in picks(), order in order(),
    ) {
        let chars: Vec<char> = creds.secret.chars().collect();
        prop_assume!(chars.len() > 1);
        let shift = 1 + shift.index(chars.len() - 1);
        let moved: String = chars[..shift].iter().collect();
        let changed = Creds {
            id: format!("{}{moved}", creds.id),
            secret: chars[shift..].iter().collect(),
            ..creds.clone()
        };
        prop_assume!(!changed.id.contains(':'));
        prop_assert_ne!(
            keyed(&AT, None, &creds.form_request(&picks, &order))?.0,
            keyed(&AT, None, &changed.form_request(&picks, &order))?.0
        );
    }

    /// Changing the value of any other parameter, adding one or removing one, or asking for a
    /// different scope set gives a different key.
    #[test]
    fn any_other_parameter_difference_gives_different_key(
        creds in creds(),
        which in any::<prop::sample::Index>(),
        new_value in value(),
        extra_scope in scope_token(),
        kind in 0u8..4,
        picks in picks(), order in order(),
    ) {
        let mut changed = creds.clone();
        match kind {
            // Change one extra parameter's value (or add one if there is none).
            0 => {
                if creds.extra.is_empty() {
                    changed.extra.insert("audience".into(), new_value);
                } else {
                    let name = creds.extra.keys().nth(which.index(creds.extra.len())).unwrap().clone();
                    prop_assume!(creds.extra[&name] != new_value);
                    changed.extra.insert(name, new_value);
                }
            }
            // Remove one extra parameter (or add one).
            1 => {
                if creds.extra.is_empty() {
                    changed.extra.insert("resource".into(), String::new());
                } else {
                    let name = creds.extra.keys().nth(which.index(creds.extra.len())).unwrap().clone();
                    changed.extra.remove(&name);
                }
            }
            // Widen the scope set.
            2 => {
                prop_assume!(!creds.scopes.contains(&extra_scope));
                changed.scopes.insert(extra_scope);
            }
            // Narrow the scope set (or add one).
            _ => {
                if creds.scopes.is_empty() {
                    changed.scopes.insert(extra_scope);
                } else {
                    let scope = creds.scopes.iter().nth(which.index(creds.scopes.len())).unwrap().clone();
                    changed.scopes.remove(&scope);
                }
            }
        }
        prop_assert_ne!(
            keyed(&AT, None, &creds.form_request(&picks, &order))?.0,
            keyed(&AT, None, &changed.form_request(&picks, &order))?.0
        );
    }

    /// The same request sent to two different places (route, token path, query, preserved
    /// Host) gets two keys, and the same place always the same key.
    #[test]
    fn a_different_context_gives_a_different_key(
        creds in creds(), picks in picks(), order in order(),
        a in context_parts(), b in context_parts(),
    ) {
        let body = creds.form_request(&picks, &order);
        let (ca, cb) = (a.context(), b.context());
        let (ka, kb) = (keyed(&ca, None, &body)?.0, keyed(&cb, None, &body)?.0);
        prop_assert_eq!(ka == kb, ca == cb, "{:?} vs {:?}", ca, cb);
    }

    /// Moving a byte from the end of one field of the context to the start of the next never
    /// gives the same key: each field is framed on its own.
    #[test]
    fn context_field_boundaries_cannot_be_shifted(
        creds in creds(), picks in picks(), order in order(),
        text in "[a-z/?=&:]{2,24}", cut in any::<prop::sample::Index>(), pair in 0usize..3,
    ) {
        let body = creds.form_request(&picks, &order);
        // Two cuts one byte apart: `text[..at]` + `text[at..]` against `text[..at-1]` + `text[at-1..]`.
        let at = 1 + cut.index(text.len() - 1);
        let one = adjacent_fields(pair, &text[..at], &text[at..]);
        let other = adjacent_fields(pair, &text[..at - 1], &text[at - 1..]);
        prop_assert_ne!(keyed(&one, None, &body)?.0, keyed(&other, None, &body)?.0);
    }
}

// ---------------------------------------------------------------------------------------------
// Retry-After and backoff
// ---------------------------------------------------------------------------------------------

/// Any instant from 2001 to about 2190, with sub-second precision.
fn wall_clock() -> impl Strategy<Value = SystemTime> {
    (1_000_000_000u64..7_000_000_000, 0u32..1_000_000_000)
        .prop_map(|(secs, nanos)| UNIX_EPOCH + Duration::new(secs, nanos))
}

fn header(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).expect("test header values are visible ASCII")
}

proptest! {
    #![proptest_config(cases(1000))]

    /// delay-seconds round-trips for any u32 (and any u64), with or without leading zeros and
    /// surrounding whitespace.
    #[test]
    fn retry_after_delay_seconds_round_trip(
        seconds in prop_oneof![any::<u32>().prop_map(u64::from), any::<u64>()],
        zeros in 0usize..3, pad in "[ \t]{0,2}", now in wall_clock(),
    ) {
        let text = format!("{pad}{}{seconds}{pad}", "0".repeat(zeros));
        prop_assert_eq!(parse_retry_after(&header(&text), now), Some(Duration::from_secs(seconds)));
    }

    /// A future HTTP-date gives the time until it: exactly `date - now`, so within one second of
    /// the whole seconds asked for (the date format drops `now`'s fraction).
    #[test]
    fn retry_after_future_http_date_gives_the_seconds_until_it(
        now in wall_clock(), ahead in 1u64..100_000_000,
    ) {
        let date = now + Duration::from_secs(ahead);
        let got = parse_retry_after(&header(&httpdate::fmt_http_date(date)), now);
        let whole = UNIX_EPOCH + Duration::from_secs(date.duration_since(UNIX_EPOCH).unwrap().as_secs());
        prop_assert_eq!(got, Some(whole.duration_since(now).unwrap()));
        let secs = got.unwrap().as_secs();
        prop_assert!(secs.abs_diff(ahead) <= 1, "{} vs {}", secs, ahead);
    }

    /// A date now or in the past is not usable.
    #[test]
    fn retry_after_past_http_date_is_none(now in wall_clock(), ago in 0u64..1_000_000_000) {
        let date = now - Duration::from_secs(ago);
        prop_assert_eq!(parse_retry_after(&header(&httpdate::fmt_http_date(date)), now), None);
    }

    /// Garbage is not usable: no digits at all, signed or fractional numbers, numbers with units.
    #[test]
    fn retry_after_garbage_is_none(
        garbage in prop_oneof![
            "[^0-9\u{0}-\u{1f}\u{7f}-\u{10ffff}]{0,30}",
            "[-+][0-9]{1,5}",
            "[0-9]{1,5}[.,][0-9]{1,3}",
            "[0-9]{1,5} ?(s|ms|m|sec|seconds)",
            "[0-9]{1,3} [0-9]{1,3}",
            "0x[0-9a-f]{1,4}",
        ],
        now in wall_clock(),
    ) {
        prop_assert_eq!(parse_retry_after(&header(&garbage), now), None, "{:?}", garbage);
    }

    /// Any header bytes at any wall-clock time (before the epoch included): no panic, and a
    /// usable answer is never zero unless delay-seconds said so.
    #[test]
    fn retry_after_never_panics(
        bytes in hostile_bytes(),
        offset in any::<u32>(), before_epoch in any::<bool>(),
    ) {
        let Ok(value) = HeaderValue::from_bytes(&bytes) else { return Ok(()) };
        let offset = Duration::from_secs(u64::from(offset));
        let now = if before_epoch { UNIX_EPOCH - offset } else { UNIX_EPOCH + offset };
        if let Some(wait) = parse_retry_after(&value, now) {
            let digits = value.to_str().map(|t| t.trim().bytes().all(|b| b.is_ascii_digit())).unwrap_or(false);
            prop_assert!(!wait.is_zero() || digits);
        }
    }

    /// Backoff stays within `[1 ms, min(cap, base × 2^failures)]` and grows with the jitter unit.
    #[test]
    fn backoff_stays_within_its_ceiling(
        failures in any::<u32>(),
        base_ms in 0u64..10_000, cap_ms in 0u64..3_600_000,
        unit in 0.0f64..=1.0, other in 0.0f64..=1.0,
    ) {
        let base = Duration::from_millis(base_ms);
        let cap = Duration::from_millis(cap_ms);
        let got = backoff(failures, base, cap, unit);
        let ceiling = base.checked_mul(1u32 << failures.min(31)).unwrap_or(cap).min(cap);
        prop_assert!(got >= Duration::from_millis(1));
        prop_assert!(got <= ceiling.max(Duration::from_millis(1)));
        let (lo, hi) = if unit <= other { (unit, other) } else { (other, unit) };
        prop_assert!(backoff(failures, base, cap, lo) <= backoff(failures, base, cap, hi));
    }
}

// ---------------------------------------------------------------------------------------------
// Token lifetime and rendering
// ---------------------------------------------------------------------------------------------

/// A share in `[lo, hi]`, endpoints included on purpose.
fn share_between(lo: f64, hi: f64, unit: f64) -> f64 {
    lo + (hi - lo) * unit
}

fn unit() -> impl Strategy<Value = f64> {
    prop_oneof![Just(0.0), Just(1.0), 0.0f64..1.0]
}

/// Token settings anywhere inside what `validate()` accepts, boundaries included.
fn token_config() -> impl Strategy<Value = TokenConfig> {
    (
        unit(),
        unit(),
        unit(),
        prop_oneof![Just(0u64), 0u64..3_600_000_000_000],
        prop_oneof![Just(3u64), 3u64..2_000_000_000],
        any::<bool>(),
    )
        .prop_map(|(ratio, at, jitter, margin_ns, max_life, at_edge)| {
            let safety_margin_ratio = share_between(0.0, 0.5, ratio);
            // `validate()` allows refresh_at up to 1 - ratio + EPSILON: probe that edge too.
            let refresh_at = if at_edge {
                (1.0 - safety_margin_ratio + f64::EPSILON).min(1.0)
            } else {
                share_between(0.1, 1.0 - safety_margin_ratio, at)
            };
            TokenConfig {
                safety_margin_ratio,
                refresh_at,
                refresh_jitter: share_between(0.0, refresh_at - 0.05, jitter),
                safety_margin_max: Duration::from_nanos(margin_ns),
                max_lifetime: Duration::from_secs(max_life),
                ..TokenConfig::default()
            }
        })
}

/// Whether a whole configuration carrying `token` passes validation.
fn validates(token: &TokenConfig) -> Result<(), String> {
    let config = Config {
        admin: "127.0.0.1:0".parse().unwrap(),
        shutdown_grace: Duration::from_secs(1),
        workers: 0,
        log: LogConfig::default(),
        limits: Limits::default(),
        routes: vec![RouteConfig {
            name: "default".into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            path_prefix: "/".into(),
            strip_prefix: false,
            upstream: UpstreamUrl::parse("http://127.0.0.1:1").unwrap(),
            token_paths: vec!["/oauth/token".into()],
            preserve_host: false,
            token: token.clone(),
            client: ClientConfig::default(),
            inject: None,
        }],
        shared: None,
    };
    config.validate().map_err(|e| e.to_string())
}

fn token(body: &str, now: Instant, config: &TokenConfig, jitter: f64) -> Token {
    match Token::from_upstream(
        body.as_bytes(),
        HeaderValue::from_static("application/json"),
        now,
        config,
        jitter,
    ) {
        Ok(Validated::Token(token)) => token,
        other => panic!("expected a cacheable token for {body}, got {other:?}"),
    }
}

/// An upstream token body as members of raw JSON text, for exact rendering checks.
#[derive(Debug, Clone)]
struct Body {
    /// (key as written, key decoded, value as written); one member is `expires_in`.
    members: Vec<(String, String, String)>,
    expires_at: usize,
    /// Whitespace choices between tokens.
    gaps: Vec<u8>,
}

impl Body {
    fn text(&self) -> String {
        const GAPS: [&str; 4] = ["", " ", "\n", "\t  "];
        let mut gaps = Choices::new(&self.gaps);
        let mut gap = || GAPS[usize::from(gaps.next() % 4)];
        let mut out = format!("{}{{", gap());
        for (i, (written, _, value)) in self.members.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&format!(
                "{}{written}{}:{}{value}{}",
                gap(),
                gap(),
                gap(),
                gap()
            ));
        }
        out.push_str(&format!("{}}}{}", gap(), gap()));
        out
    }

    /// The exact bytes `render` must produce: keys re-serialised, every other value verbatim,
    /// `expires_in` replaced by `remaining`.
    fn rendered(&self, remaining: u64) -> String {
        let members: Vec<String> = self
            .members
            .iter()
            .enumerate()
            .map(|(i, (_, key, value))| {
                let key = serde_json::to_string(key).unwrap();
                if i == self.expires_at {
                    format!("{key}:{remaining}")
                } else {
                    format!("{key}:{value}")
                }
            })
            .collect();
        format!("{{{}}}", members.join(","))
    }
}

/// A JSON value as raw text: compact or pretty, scalars or nested.
fn json_value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(serde_json::Value::from),
        any::<String>().prop_map(serde_json::Value::from),
    ];
    let value = leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::btree_map("[a-z]{1,4}", inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    });
    (value, any::<bool>()).prop_map(|(v, pretty)| {
        if pretty {
            serde_json::to_string_pretty(&v).unwrap()
        } else {
            v.to_string()
        }
    })
}

/// A key written plainly or with `\u` escapes.
fn written_key(key: &str, escape: bool) -> String {
    if escape {
        let escaped: String = key
            .encode_utf16()
            .map(|unit| format!("\\u{unit:04x}"))
            .collect();
        format!("\"{escaped}\"")
    } else {
        serde_json::to_string(key).unwrap()
    }
}

/// A token body whose `expires_in` is `seconds` spelled as an integer, a fraction, an exponent
/// or a quoted string, at any position among any other members.
fn token_body(seconds: impl Strategy<Value = u64>) -> impl Strategy<Value = Body> {
    (
        seconds,
        0u8..4,
        "[ -~]{1,24}",
        prop::collection::btree_map("[a-z_]{1,10}", json_value(), 0..5),
        any::<prop::sample::Index>(),
        prop::collection::vec(any::<bool>(), 8),
        prop::collection::vec(any::<u8>(), 0..16),
    )
        .prop_map(
            |(seconds, spelling, access_token, others, position, escapes, gaps)| {
                let expires_in = match spelling {
                    0 => seconds.to_string(),
                    1 => format!("{seconds}.75"),
                    2 => format!("{seconds}e0"),
                    _ => format!("\"{seconds}\""),
                };
                let mut members: Vec<(String, String)> = others
                    .into_iter()
                    .filter(|(k, _)| k != "expires_in" && k != "access_token")
                    .collect();
                members.insert(
                    0,
                    (
                        "access_token".into(),
                        serde_json::to_string(&access_token).unwrap(),
                    ),
                );
                let expires_at = position.index(members.len() + 1);
                members.insert(expires_at, ("expires_in".into(), expires_in));
                let members = members
                    .into_iter()
                    .enumerate()
                    .map(|(i, (key, value))| (written_key(&key, escapes[i % 8]), key, value))
                    .collect();
                Body {
                    members,
                    expires_at,
                    gaps,
                }
            },
        )
}

/// Elapsed times from issue: sub-second, around the lifetime, and far past it.
fn elapsed(lifetime_s: u64) -> impl Strategy<Value = Vec<Duration>> {
    let span = lifetime_s.saturating_mul(2).max(1) * 1_000_000_000;
    prop::collection::vec(
        prop_oneof![
            0u64..2_000_000_000,
            0u64..span,
            Just(lifetime_s * 1_000_000_000),
        ]
        .prop_map(Duration::from_nanos),
        1..8,
    )
}

proptest! {
    #![proptest_config(cases(256))]

    /// For any valid configuration, expires_in in 3..=10^9 and jitter: expiry is issue time plus
    /// the (capped) lifetime; issue ≤ refresh_at ≤ serve_until ≤ expires_at (refresh_at within
    /// float rounding, see below); and servable/refresh_due flip exactly at their instants.
    #[test]
    fn lifetime_instants_are_ordered_for_any_valid_config(
        config in token_config(),
        expires_in in 3u64..=1_000_000_000,
        jitter in unit(),
    ) {
        validates(&config).map_err(TestCaseError::fail)?;
        let now = Instant::now();
        let body = format!(r#"{{"access_token":"a","expires_in":{expires_in}}}"#);
        let t = token(&body, now, &config, jitter);
        let lifetime = Duration::from_secs(expires_in).min(config.max_lifetime);
        let refresh_at = t.refresh_at.expect("client-credentials tokens refresh ahead");

        // Counted a second short: the provider's whole-second clock may have started earlier.
        prop_assert_eq!(t.expires_at, now + lifetime - Duration::from_secs(1));
        prop_assert!(t.remaining_secs(t.serve_until - Duration::from_nanos(1)) >= 1, "a served token says at least 1");
        prop_assert!(t.serve_until <= t.expires_at);
        prop_assert!(t.serve_until > now, "a fresh token is servable");
        prop_assert!(refresh_at >= now);
        prop_assert!(refresh_at <= t.expires_at);
        // `validate()` bounds refresh_at by 1 - safety_margin_ratio (+ EPSILON), which is what
        // makes this hold; both sides go through f64 seconds, and 100 000 cases at that edge
        // found no rounding that breaks it.
        prop_assert!(
            refresh_at <= t.serve_until,
            "refresh_at {:?} after serve_until {:?}",
            refresh_at - now,
            t.serve_until - now
        );
        prop_assert!(t.servable(now));
        prop_assert!(t.servable(t.serve_until - Duration::from_nanos(1)));
        prop_assert!(!t.servable(t.serve_until));
        prop_assert!(t.refresh_due(refresh_at));
        prop_assert!(refresh_at == now || !t.refresh_due(refresh_at - Duration::from_nanos(1)));
    }

    /// remaining_secs is the whole seconds left, rounded down: never more than what is left,
    /// non-increasing in time, zero from expiry on; servable and refresh_due never flip back.
    #[test]
    fn remaining_seconds_never_exceed_what_is_left_and_never_increase(
        config in token_config(),
        (expires_in, mut times) in (3u64..=1_000_000_000).prop_flat_map(|e| (Just(e), elapsed(e.min(100_000)))),
        jitter in unit(),
    ) {
        let now = Instant::now();
        let body = format!(r#"{{"access_token":"a","expires_in":{expires_in}}}"#);
        let t = token(&body, now, &config, jitter);
        prop_assert_eq!(t.remaining_secs(now), Duration::from_secs(expires_in).min(config.max_lifetime).as_secs() - 1);
        times.sort();
        let mut last = (u64::MAX, true, false);
        for elapsed in times {
            let at = now + elapsed;
            let left = t.expires_at.saturating_duration_since(at);
            let remaining = t.remaining_secs(at);
            prop_assert_eq!(remaining, left.as_secs(), "floor of what is left");
            prop_assert!(Duration::from_secs(remaining) <= left);
            prop_assert!(remaining <= last.0, "remaining went up");
            prop_assert!(t.servable(at) <= last.1, "servable again");
            prop_assert!(t.refresh_due(at) >= last.2, "refresh no longer due");
            if at >= t.expires_at {
                prop_assert_eq!(remaining, 0);
                prop_assert!(!t.servable(at));
            }
            last = (remaining, t.servable(at), t.refresh_due(at));
        }
    }

    /// render is valid JSON whose expires_in equals remaining_secs, whose other members equal the
    /// input's, byte for byte and in order, at any time (expired included).
    #[test]
    fn render_is_valid_json_with_remaining_seconds_and_the_other_fields_unchanged(
        body in token_body(3u64..=1_000_000_000),
        times in elapsed(100_000),
    ) {
        let config = TokenConfig::default();
        let now = Instant::now();
        let text = body.text();
        let t = token(&text, now, &config, 0.5);
        let input: serde_json::Value = serde_json::from_str(&text).unwrap();
        for elapsed in times {
            let at = now + elapsed;
            let rendered = t.pieces(at).concat();
            let remaining = t.remaining_secs(at);
            prop_assert_eq!(std::str::from_utf8(&rendered).unwrap(), body.rendered(remaining));
            let output: serde_json::Value = serde_json::from_slice(&rendered)
                .map_err(|e| TestCaseError::fail(format!("render is not JSON: {e}")))?;
            prop_assert_eq!(&output["expires_in"], &serde_json::Value::from(remaining));
            let (mut a, mut b) = (input.as_object().unwrap().clone(), output.as_object().unwrap().clone());
            a.remove("expires_in");
            b.remove("expires_in");
            prop_assert_eq!(a, b);
        }
    }

    /// Any JSON object at all: from_upstream never panics; when it returns a token, the rendering
    /// is valid JSON with a numeric expires_in.
    #[test]
    fn from_upstream_never_panics_and_tokens_render_as_json(
        body in prop_oneof![
            prop::collection::btree_map(
                prop_oneof!["[a-z_]{1,12}", Just("access_token".to_owned()), Just("expires_in".to_owned())],
                json_value(),
                0..6,
            )
            .prop_map(|m| {
                let members: Vec<String> = m.iter().map(|(k, v)| format!("{k:?}:{v}")).collect();
                format!("{{{}}}", members.join(","))
            }),
            token_body(prop_oneof![Just(0u64), Just(u64::MAX), any::<u64>()]).prop_map(|b| b.text()),
            hostile_bytes().prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        ],
        config in token_config(),
        jitter in any::<f64>(),
    ) {
        let now = Instant::now();
        let result = Token::from_upstream(
            body.as_bytes(),
            HeaderValue::from_static("application/json"),
            now,
            &config,
            jitter,
        );
        if let Ok(Validated::Token(t)) = result {
            let output: serde_json::Value = serde_json::from_slice(&t.pieces(now).concat())
                .map_err(|e| TestCaseError::fail(format!("render is not JSON: {e}")))?;
            prop_assert!(output["expires_in"].is_u64());
            prop_assert!(t.serve_until <= t.expires_at);
        }
    }
}

/// The shrunk counterexample of `basic_credentials_that_differ_never_share_a_key`, kept as a
/// regression test: the raw Basic key must be the exact bytes, not a lossy UTF-8 string.
#[test]
fn basic_secrets_differing_in_a_raw_lead_byte_get_different_keys() {
    let body = b"grant_type=client_credentials";
    let key = |raw: &[u8]| {
        let header = format!("Basic {}", BASE64.encode(raw));
        match parse(&Keyer::new(&HMAC_KEY), &AT, Some(header.as_bytes()), body) {
            Ok(Parsed::Keyed { key, client_id, .. }) => {
                assert_eq!(client_id, "app");
                key
            }
            other => panic!("expected a keyed request, got {other:?}"),
        }
    };
    // Both decode per RFC 6749 §2.3.1 (raw C3 + escaped A9 = "é"; raw C2 + escaped A9 = "©").
    assert_ne!(key(b"app:\xc3%a9"), key(b"app:\xc2%a9"));
}

// ---------------------------------------------------------------------------------------------
// Path normalisation: spellings of a path route alike.
// ---------------------------------------------------------------------------------------------

use token_sidecar::path::{covers, match_key, normalise};

/// Segments of a plain path: lower-case letters, digits and `-._~` (no segment is `.` or `..`).
fn segment() -> impl Strategy<Value = String> {
    "[a-z0-9][a-z0-9_~-]{0,7}"
}

/// One spelling of the path `/` + `segments`, driven by `picks`: repeated slashes, `.` segments,
/// `x/..` detours, percent-encoded unreserved characters, upper case, `;params` and a trailing
/// slash, each of which servers fold before they route.
fn spelling(segments: &[String], picks: &[u8]) -> String {
    let mut choose = Choices::new(picks);
    let mut out = String::new();
    for segment in segments {
        match choose.next() % 6 {
            0 => out.push_str("//"),
            1 => out.push_str("/./"),
            2 => out.push_str("/detour/../"),
            _ => out.push('/'),
        }
        for c in segment.chars() {
            match choose.next() % 5 {
                0 => out.push_str(&format!("%{:02X}", c as u8)),
                1 => out.push_str(&format!("%{:02x}", c as u8)),
                2 => out.push(c.to_ascii_uppercase()),
                _ => out.push(c),
            }
        }
        if choose.next().is_multiple_of(6) {
            out.push_str(";p=1");
        }
    }
    if out.is_empty() || choose.next().is_multiple_of(4) {
        out.push('/');
    }
    out
}

proptest! {
    #![proptest_config(cases(512))]

    /// Every spelling of a path has the path's own match key: a token path is recognised (and
    /// served by the token path) however it is spelled.
    #[test]
    fn every_spelling_of_a_path_has_its_match_key(
        segments in prop::collection::vec(segment(), 0..5),
        picks in prop::collection::vec(any::<u8>(), 1..64),
    ) {
        let plain = format!("/{}", segments.join("/"));
        let spelled = spelling(&segments, &picks);
        let normal = normalise(&spelled).unwrap();
        prop_assert_eq!(match_key(&normal), match_key(&plain), "{}", spelled);
    }

    /// No spelling reaches a route its plain path would not: a prefix covers a spelling exactly
    /// when it covers the plain path.
    #[test]
    fn no_spelling_reaches_a_different_route(
        segments in prop::collection::vec(segment(), 0..5),
        prefix_len in 0usize..4,
        other in segment(),
        picks in prop::collection::vec(any::<u8>(), 1..64),
    ) {
        let plain = format!("/{}", segments.join("/"));
        let spelled = spelling(&segments, &picks);
        let key = match_key(&normalise(&spelled).unwrap()).into_owned();
        let mut prefixes = vec!["/".to_owned(), format!("/{other}")];
        let n = prefix_len.min(segments.len());
        if n > 0 {
            prefixes.push(format!("/{}", segments[..n].join("/")));
        }
        for prefix in prefixes {
            prop_assert_eq!(covers(&prefix, &key), covers(&prefix, &match_key(&plain)), "{} {}", prefix, spelled);
        }
    }

    /// For any path the normal form is a fixed point and has no `//`, `.` or `..` segment and no
    /// encoded slash; or the path is refused.
    #[test]
    fn the_normal_form_is_normal(path in "/[a-zA-Z0-9%./;_~-]{0,40}") {
        if let Ok(normal) = normalise(&path) {
            let body = normal.trim_end_matches('/');
            prop_assert!(
                body.is_empty() || body[1..].split('/').all(|s| !matches!(s, "" | "." | "..")),
                "{} -> {}", path, normal
            );
            prop_assert!(!normal.to_ascii_lowercase().contains("%2f"), "{} -> {}", path, normal);
            let again = normalise(&normal).unwrap();
            prop_assert_eq!(again.as_ref(), normal.as_ref());
        }
    }
}
