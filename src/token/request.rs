//! Reading a local caller's token request: the form body, HTTP Basic client authentication, and
//! the decision whether the request can be cached and under which key.
//!
//! The key is one HMAC-SHA256 over every input that can change the token the provider issues,
//! each fed as a tagged, length-prefixed field so no two inputs can slide into each other:
//! - where the request was sent ([`KeyContext`]): the route, the token path, the query string, and,
//!   when the caller's `Host` goes upstream (`preserve_host`), that Host;
//! - who asks: the client id, and the client secret (or the exact bytes of a Basic header whose
//!   decoding changed them);
//! - what is asked: every other form parameter, sorted by name, with `scope` as a sorted set.
//!
//! The HMAC key is random per process, so the cache key is useless outside this process and the
//! plaintext secret is never stored. Two requests share a key only if the provider would see the
//! same credentials and the same parameters at the same place.

use base64::Engine as _;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::header;
use http::request::Parts;
use http_body_util::{BodyExt, Limited};
use percent_encoding::percent_decode;
use sha2::Sha256;
use smallvec::SmallVec;
use std::borrow::Cow;

use crate::error::Error;

/// The cache key: a keyed digest, so it is fixed-size, cheap to hash and compare, and reveals nothing.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CacheKey(pub [u8; 32]);

impl std::fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Enough to tell keys apart in a debugger; the digest reveals nothing anyway.
        write!(
            f,
            "CacheKey({:02x}{:02x}{:02x}{:02x}..)",
            self.0[0], self.0[1], self.0[2], self.0[3]
        )
    }
}

/// Which grant a keyed request asks for; they differ in refresh-ahead and how long answers are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// `client_credentials`: cached and refreshed ahead of expiry.
    ClientCredentials,
    /// `refresh_token`: coalesced and remembered briefly, keyed by everything including the
    /// refresh token itself.
    RefreshToken,
}

/// What kind of token request this is, once parsed.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// A request with a full client identity, served from the cache under `key`.
    Keyed {
        key: CacheKey,
        grant: Grant,
        /// Borrowed from the body where it can be: a hit never copies it.
        client_id: Cow<'a, str>,
    },
    /// Anything the sidecar does not key (other grants, public clients, assertions, JSON bodies):
    /// forwarded unchanged.
    PassThrough,
}

/// The HMAC that turns a request into its [`CacheKey`], keyed once: each request clones the keyed
/// state instead of hashing the key again.
#[derive(Clone)]
pub struct Keyer(Hmac<Sha256>);

impl Keyer {
    /// A keyer for this HMAC key.
    pub fn new(key: &[u8; 32]) -> Keyer {
        Keyer(<Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length"))
    }
}

impl std::fmt::Debug for Keyer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keyer(..)")
    }
}

/// Where a token request was sent: the part of the key that is not in the body. The same
/// credentials at two routes, two token paths, two queries (tenant or policy selectors) or two
/// preserved Hosts are two keys.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyContext<'a> {
    /// The route's name.
    pub route: &'a str,
    /// The token path the request came to.
    pub path: &'a str,
    /// The query string, if the request had one.
    pub query: Option<&'a str>,
    /// The caller's `Host`, when it goes upstream unchanged.
    pub host: Option<&'a str>,
}

impl<'a> KeyContext<'a> {
    /// The context of a request to route `route`; the Host counts only when it is preserved.
    pub(crate) fn of(route: &'a str, parts: &'a Parts, preserve_host: bool) -> Result<Self, Error> {
        let host = match preserve_host
            .then(|| parts.headers.get(header::HOST))
            .flatten()
        {
            Some(value) => Some(
                value
                    .to_str()
                    .map_err(|_| Error::InvalidRequest("malformed Host header"))?,
            ),
            None => None,
        };
        Ok(KeyContext {
            route,
            path: parts.uri.path(),
            query: parts.uri.query(),
            host,
        })
    }
}

/// What a token request's body is, by its `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MediaType {
    /// `application/x-www-form-urlencoded`: read and keyed.
    Form,
    /// `application/json`: some providers take it; never keyed.
    Json,
    /// Anything else, or none: refused.
    Other,
}

/// The media type of a token request, parameters ignored.
pub(crate) fn media_type(parts: &Parts) -> MediaType {
    let essence = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map_or("", |v| v.split(';').next().unwrap_or("").trim());
    if essence.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        MediaType::Form
    } else if essence.eq_ignore_ascii_case("application/json") {
        MediaType::Json
    } else {
        MediaType::Other
    }
}

/// Reads a token request's whole form body within `timeout`, refusing one over `limit` bytes
/// before reading (by its `Content-Length`) and while reading.
pub(crate) async fn read_form(
    parts: &Parts,
    body: hyper::body::Incoming,
    limit: usize,
    timeout: std::time::Duration,
) -> Result<Bytes, Error> {
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(Error::PayloadTooLarge { limit });
    }
    match tokio::time::timeout(timeout, Limited::new(body, limit).collect()).await {
        Err(_) => Err(Error::BodyTimeout),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            Err(Error::PayloadTooLarge { limit })
        }
        Ok(Err(_)) => Err(Error::InvalidRequest("the request body could not be read")),
    }
}

/// The domain tag of each field; a field that is absent is not fed at all, and a tag appears at
/// most once except [`TAG_PARAM`], whose name and value fields alternate in sorted order.
const TAG_ROUTE: u8 = 1;
const TAG_CLIENT: u8 = 2;
const TAG_SECRET: u8 = 3;
const TAG_RAW_BASIC: u8 = 4;
const TAG_PARAM: u8 = 5;
const TAG_PATH: u8 = 6;
const TAG_QUERY: u8 = 7;
const TAG_HOST: u8 = 8;

/// Parses a token request body and `Authorization` header into a [`Parsed`] decision, keyed
/// with `context`. Errors name the offending field, never its value.
pub fn parse<'a>(
    keyer: &Keyer,
    context: &KeyContext<'_>,
    authorization: Option<&[u8]>,
    body: &'a [u8],
) -> Result<Parsed<'a>, Error> {
    let params = parse_form(body)?;
    let basic = match authorization {
        Some(value) => parse_authorization(value)?,
        None => None,
    };

    let mut grant_type = None;
    let mut body_client_id = None;
    let mut body_secret = None;
    let mut has_assertion = false;
    let mut refresh_token = None;
    for (name, value) in &params {
        match name.as_ref() {
            "grant_type" => grant_type = Some(value.as_ref()),
            "client_id" => body_client_id = Some(value),
            "client_secret" => body_secret = Some(value.as_ref()),
            "client_assertion" | "client_assertion_type" => has_assertion = true,
            "refresh_token" => refresh_token = Some(value.as_ref()),
            _ => {}
        }
    }

    // RFC 6749 §3.2: no parameter twice. Only the grants the sidecar keys must obey it here (a
    // key must mean one thing); other grants go to the provider as they came (RFC 8707 repeats
    // `resource`). A repeated grant_type is never keyed nor guessed at.
    let repeated = repeated_name(&params);
    if let Some(name) = repeated.filter(|n| *n == "grant_type") {
        return Err(Error::DuplicateParameter(name.to_owned()));
    }
    let grant = match grant_type {
        Some("client_credentials") => Grant::ClientCredentials,
        Some("refresh_token") if refresh_token.is_some() => Grant::RefreshToken,
        _ => return Ok(Parsed::PassThrough),
    };
    if let Some(name) = repeated {
        return Err(Error::DuplicateParameter(name.to_owned()));
    }
    if has_assertion {
        return Ok(Parsed::PassThrough);
    }

    let Some(client) = credentials(basic, body_client_id, body_secret)? else {
        return Ok(Parsed::PassThrough);
    };
    Ok(Parsed::Keyed {
        key: digest(keyer, context, &client, &params),
        grant,
        client_id: client.client_id,
    })
}

/// A digest of a route and client id alone, for what a client's keys share (the fleet's
/// cool-downs).
pub fn client_digest(keyer: &Keyer, route: &str, client_id: &str) -> CacheKey {
    let mut mac = keyer.0.clone();
    field(&mut mac, TAG_ROUTE, route.as_bytes());
    field(&mut mac, TAG_CLIENT, client_id.as_bytes());
    CacheKey(mac.finalize().into_bytes().into())
}

/// The client's credentials, from exactly one authentication method (RFC 6749 §2.3); `None` for
/// a client that has no secret to key on.
fn credentials<'id, 's>(
    basic: Option<Credentials<'static, 'static>>,
    body_client_id: Option<&Cow<'id, str>>,
    body_secret: Option<&'s str>,
) -> Result<Option<Credentials<'id, 's>>, Error> {
    let client = match (basic, body_secret) {
        (Some(_), Some(_)) => {
            return Err(Error::InvalidRequest(
                "client authenticated by both the Authorization header and client_secret",
            ));
        }
        (Some(basic), None) => {
            if body_client_id.is_some_and(|id| *id != basic.client_id) {
                return Err(Error::InvalidRequest(
                    "client_id does not match the Authorization header",
                ));
            }
            basic
        }
        (None, Some(secret)) => match body_client_id {
            // A clone of a borrowed `Cow` is the same borrow: no copy of the id.
            Some(id) => Credentials {
                client_id: id.clone(),
                secret: Cow::Borrowed(secret),
                raw: None,
            },
            None => return Err(Error::InvalidRequest("client_secret without client_id")),
        },
        // A public client (id only) has no secret to key on: a token for it would be handed to
        // anyone who knows the id. Let the provider decide.
        (None, None) => return Ok(None),
    };
    Ok((!client.client_id.is_empty() && !client.secret.is_empty()).then_some(client))
}

/// The cache key: the context, the client, then every other parameter in canonical order.
fn digest(
    keyer: &Keyer,
    context: &KeyContext<'_>,
    client: &Credentials<'_, '_>,
    params: &Form<'_>,
) -> CacheKey {
    let mut mac = keyer.0.clone();
    field(&mut mac, TAG_ROUTE, context.route.as_bytes());
    field(&mut mac, TAG_PATH, context.path.as_bytes());
    if let Some(query) = context.query {
        field(&mut mac, TAG_QUERY, query.as_bytes());
    }
    if let Some(host) = context.host {
        field(&mut mac, TAG_HOST, host.as_bytes());
    }
    field(&mut mac, TAG_CLIENT, client.client_id.as_bytes());
    match &client.raw {
        // Percent or plus signs in a Basic header decode per RFC 6749, but not every provider
        // decodes: key on the raw bytes so two spellings never alias one cached token.
        Some(raw) => field(&mut mac, TAG_RAW_BASIC, raw),
        None => field(&mut mac, TAG_SECRET, client.secret.as_bytes()),
    }
    let mut rest: SmallVec<[(&str, Cow<'_, str>); INLINE_PARAMS]> = params
        .iter()
        .filter(|(name, _)| !matches!(name.as_ref(), "client_id" | "client_secret"))
        .map(|(name, value)| {
            let value = if name == "scope" {
                canonical_scope(value)
            } else {
                Cow::Borrowed(value.as_ref())
            };
            (name.as_ref(), value)
        })
        .collect();
    rest.sort_unstable();
    for (name, value) in &rest {
        field(&mut mac, TAG_PARAM, name.as_bytes());
        field(&mut mac, TAG_PARAM, value.as_bytes());
    }
    CacheKey(mac.finalize().into_bytes().into())
}

/// Feeds one length-prefixed, tagged field, so `("ab","c")` and `("a","bc")` never collide.
fn field(mac: &mut Hmac<Sha256>, tag: u8, bytes: &[u8]) {
    let mut head = [tag; 9];
    head[1..].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
    mac.update(&head);
    mac.update(bytes);
}

/// `scope` is a set (RFC 6749 §3.3): order and repetition carry no meaning. A scope already in
/// canonical form (the usual single word) is borrowed, not rebuilt.
fn canonical_scope(value: &str) -> Cow<'_, str> {
    let canonical = !value.starts_with(' ')
        && !value.ends_with(' ')
        && value
            .split(' ')
            .try_fold("", |previous, scope| (previous < scope).then_some(scope))
            .is_some();
    if canonical {
        return Cow::Borrowed(value);
    }
    let mut scopes: Vec<&str> = value.split(' ').filter(|s| !s.is_empty()).collect();
    scopes.sort_unstable();
    scopes.dedup();
    Cow::Owned(scopes.join(" "))
}

/// How many form parameters fit without a heap allocation; token requests rarely have more than five.
const INLINE_PARAMS: usize = 8;

/// Decoded form parameters in their original order.
pub type Form<'a> = SmallVec<[(Cow<'a, str>, Cow<'a, str>); INLINE_PARAMS]>;

/// Decodes an `application/x-www-form-urlencoded` body strictly: bad percent-escapes, invalid
/// UTF-8 and repeated parameters (RFC 6749 §3.2) are errors rather than silently repaired.
pub fn parse_form(body: &[u8]) -> Result<Form<'_>, Error> {
    let mut params: Form<'_> = SmallVec::new();
    // The usual body has nothing to decode: check that it is UTF-8 once and borrow every
    // component from it (splitting at ASCII `&` and `=` keeps each piece valid UTF-8).
    // Anything else takes the path below, which finds the first problem in order.
    if memchr::memchr2(b'%', b'+', body).is_none()
        && let Ok(text) = std::str::from_utf8(body)
    {
        for pair in text.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            push_param(&mut params, Cow::Borrowed(name), Cow::Borrowed(value))?;
        }
        return Ok(params);
    }
    for pair in body.split(|&b| b == b'&').filter(|p| !p.is_empty()) {
        let (name, value) = match memchr::memchr(b'=', pair) {
            Some(i) => (&pair[..i], &pair[i + 1..]),
            None => (pair, &b""[..]),
        };
        let name = decode_component(name).ok_or_else(malformed_form)?;
        let value = decode_component(value).ok_or_else(malformed_form)?;
        push_param(&mut params, name, value)?;
    }
    Ok(params)
}

fn malformed_form() -> Error {
    Error::InvalidRequest("malformed form body")
}

/// Adds one decoded parameter, refusing an empty name.
fn push_param<'a>(
    params: &mut Form<'a>,
    name: Cow<'a, str>,
    value: Cow<'a, str>,
) -> Result<(), Error> {
    if name.is_empty() {
        return Err(malformed_form());
    }
    params.push((name, value));
    Ok(())
}

/// The first parameter name that appears more than once, if any.
fn repeated_name<'f>(params: &'f Form<'_>) -> Option<&'f str> {
    params
        .iter()
        .enumerate()
        .find(|(i, (name, _))| params[..*i].iter().any(|(n, _)| n == name))
        .map(|(_, (name, _))| name.as_ref())
}

/// One form component: `+` is a space, `%XX` a byte, and the result must be UTF-8.
fn decode_component(raw: &[u8]) -> Option<Cow<'_, str>> {
    // A component with nothing to decode: one scan, and the bytes are the string.
    if memchr::memchr2(b'%', b'+', raw).is_none() {
        return std::str::from_utf8(raw).ok().map(Cow::Borrowed);
    }
    // Reject a `%` that is not followed by two hex digits, which lenient decoders pass through.
    let mut i = 0;
    while let Some(off) = raw[i..].iter().position(|&b| b == b'%') {
        let at = i + off;
        let hex = raw.get(at + 1..at + 3)?;
        if !hex.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        i = at + 3;
    }
    if raw.contains(&b'+') {
        let spaced: Vec<u8> = raw
            .iter()
            .map(|&b| if b == b'+' { b' ' } else { b })
            .collect();
        let decoded = percent_decode(&spaced).decode_utf8().ok()?;
        Some(Cow::Owned(decoded.into_owned()))
    } else {
        percent_decode(raw).decode_utf8().ok()
    }
}

/// A client's credentials: from a Basic `Authorization` header, or from the form (where the id
/// outlives the parsed form, the secret not).
#[derive(Debug)]
struct Credentials<'id, 's> {
    client_id: Cow<'id, str>,
    secret: Cow<'s, str>,
    /// The undecoded `id:secret`, kept only when decoding changed it (see [`parse`]).
    raw: Option<Vec<u8>>,
}

/// Parses `Authorization`. `Ok(None)` for schemes other than Basic (a bearer header on a token
/// request is the provider's business); an error for a malformed Basic header.
fn parse_authorization(value: &[u8]) -> Result<Option<Credentials<'static, 'static>>, Error> {
    let Some(scheme_end) = value.iter().position(|&b| b == b' ') else {
        return Ok(None);
    };
    if !value[..scheme_end].eq_ignore_ascii_case(b"basic") {
        return Ok(None);
    }
    let encoded = value[scheme_end + 1..].trim_ascii();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|_| Error::InvalidRequest("malformed Basic authorization header"))?;
    let colon = decoded
        .iter()
        .position(|&b| b == b':')
        .ok_or(Error::InvalidRequest(
            "malformed Basic authorization header",
        ))?;
    let (raw_id, raw_secret) = (&decoded[..colon], &decoded[colon + 1..]);
    let client_id = decode_component(raw_id)
        .ok_or(Error::InvalidRequest(
            "malformed Basic authorization header",
        ))?
        .into_owned();
    let secret = decode_component(raw_secret)
        .ok_or(Error::InvalidRequest(
            "malformed Basic authorization header",
        ))?
        .into_owned();
    // The exact bytes, not a lossy string: two byte strings must never map to one key.
    let raw = decoded
        .iter()
        .any(|&b| b == b'%' || b == b'+')
        .then(|| decoded.clone());
    Ok(Some(Credentials {
        client_id: Cow::Owned(client_id),
        secret: Cow::Owned(secret),
        raw,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k() -> Keyer {
        Keyer::new(&[7; 32])
    }

    fn basic(id: &str, secret: &str) -> String {
        let enc = |s: &str| {
            percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
        };
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!(
                "{}:{}",
                enc(id),
                enc(secret)
            ))
        )
    }

    fn at(route: &str) -> KeyContext<'_> {
        KeyContext {
            route,
            path: "/oauth/token",
            ..KeyContext::default()
        }
    }

    fn key(auth: Option<&str>, body: &str) -> CacheKey {
        key_at(&at("r"), auth, body)
    }

    fn key_at(context: &KeyContext<'_>, auth: Option<&str>, body: &str) -> CacheKey {
        match parse(&k(), context, auth.map(str::as_bytes), body.as_bytes()).unwrap() {
            Parsed::Keyed { key, .. } => key,
            Parsed::PassThrough => panic!("expected a keyed request for {body}"),
        }
    }

    #[test]
    fn basic_and_form_credentials_share_a_key() {
        let form = key(
            None,
            "grant_type=client_credentials&client_id=app&client_secret=s3cret",
        );
        let hdr = key(
            Some(&basic("app", "s3cret")),
            "grant_type=client_credentials",
        );
        assert_eq!(form, hdr);
    }

    #[test]
    fn different_secret_scope_or_route_give_different_keys() {
        let base = key(
            None,
            "grant_type=client_credentials&client_id=a&client_secret=s",
        );
        assert_ne!(
            base,
            key(
                None,
                "grant_type=client_credentials&client_id=a&client_secret=t"
            )
        );
        assert_ne!(
            base,
            key(
                None,
                "grant_type=client_credentials&client_id=a&client_secret=s&scope=x"
            )
        );
        assert_ne!(
            base,
            key(
                None,
                "grant_type=client_credentials&client_id=b&client_secret=s"
            )
        );
        let other_route = parse(
            &k(),
            &at("r2"),
            None,
            b"grant_type=client_credentials&client_id=a&client_secret=s",
        )
        .unwrap();
        assert!(
            matches!(other_route, Parsed::Keyed { key, grant: Grant::ClientCredentials, .. } if key != base)
        );
    }

    #[test]
    fn each_part_of_the_context_is_its_own_field() {
        let body = "grant_type=client_credentials&client_id=a&client_secret=s";
        let base = KeyContext {
            route: "r",
            path: "/oauth/token",
            query: None,
            host: None,
        };
        let variants = [
            base,
            KeyContext {
                path: "/token",
                ..base
            },
            KeyContext {
                query: Some(""),
                ..base
            },
            KeyContext {
                query: Some("tenant=1"),
                ..base
            },
            KeyContext {
                host: Some("tenant=1"),
                ..base
            },
            KeyContext {
                host: Some("a"),
                query: Some("b"),
                ..base
            },
            KeyContext {
                host: Some("b"),
                query: Some("a"),
                ..base
            },
            KeyContext {
                route: "r/oauth",
                path: "/token",
                ..base
            },
        ];
        let keys: std::collections::BTreeSet<CacheKey> =
            variants.iter().map(|c| key_at(c, None, body)).collect();
        assert_eq!(keys.len(), variants.len(), "every context is its own key");
        assert_eq!(key_at(&base, None, body), key_at(&base, None, body));
    }

    #[test]
    fn scope_is_a_set_and_parameter_order_does_not_matter() {
        let a = key(
            None,
            "grant_type=client_credentials&client_id=a&client_secret=s&scope=b+a&audience=x",
        );
        let b = key(
            None,
            "audience=x&scope=a%20b%20a&client_secret=s&client_id=a&grant_type=client_credentials",
        );
        assert_eq!(a, b);
    }

    #[test]
    fn canonical_scopes_are_borrowed_and_others_rebuilt() {
        assert!(matches!(canonical_scope("read"), Cow::Borrowed("read")));
        assert!(matches!(canonical_scope("a b c"), Cow::Borrowed("a b c")));
        assert_eq!(canonical_scope("b a"), "a b");
        assert_eq!(canonical_scope("a a"), "a");
        assert_eq!(canonical_scope(" a  b "), "a b");
        assert_eq!(canonical_scope(""), "");
    }

    #[test]
    fn field_boundaries_cannot_be_shifted() {
        let a = key(
            None,
            "grant_type=client_credentials&client_id=ab&client_secret=c",
        );
        let b = key(
            None,
            "grant_type=client_credentials&client_id=a&client_secret=bc",
        );
        assert_ne!(a, b);
    }

    #[test]
    fn raw_basic_spellings_that_decode_alike_do_not_share_a_key() {
        let b64 = |s: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(s)
            )
        };
        let plus = key(Some(&b64("app:a+b")), "grant_type=client_credentials");
        let space = key(Some(&b64("app:a%20b")), "grant_type=client_credentials");
        assert_ne!(plus, space);
    }

    #[test]
    fn other_grants_public_clients_and_assertions_pass_through() {
        for body in [
            "grant_type=authorization_code&code=x&client_id=a&client_secret=s",
            "grant_type=password&username=u&password=p&client_id=a&client_secret=s",
            "grant_type=client_credentials&client_id=a",
            "grant_type=client_credentials&client_assertion_type=jwt&client_assertion=x",
            "client_id=a&client_secret=s",
        ] {
            assert_eq!(
                parse(&k(), &at("r"), None, body.as_bytes()).unwrap(),
                Parsed::PassThrough,
                "{body}"
            );
        }
    }

    #[test]
    fn refresh_grant_is_keyed_by_its_refresh_token() {
        let a = parse(
            &k(),
            &at("r"),
            None,
            b"grant_type=refresh_token&refresh_token=1&client_id=a&client_secret=s",
        )
        .unwrap();
        let b = parse(
            &k(),
            &at("r"),
            None,
            b"grant_type=refresh_token&refresh_token=2&client_id=a&client_secret=s",
        )
        .unwrap();
        assert!(matches!(
            &a,
            Parsed::Keyed {
                grant: Grant::RefreshToken,
                ..
            }
        ));
        assert_ne!(a, b);
    }

    #[test]
    fn a_repeated_parameter_is_refused_only_where_the_sidecar_keys() {
        fn parsed(body: &str) -> Result<Parsed<'_>, Error> {
            parse(&k(), &at("r"), None, body.as_bytes())
        }
        // RFC 8707 repeats `resource` on grants the sidecar only forwards.
        assert!(matches!(
            parsed("grant_type=authorization_code&code=c&resource=a&resource=b"),
            Ok(Parsed::PassThrough)
        ));
        assert!(matches!(
            parsed("grant_type=client_credentials&client_id=a&client_secret=s&resource=a&resource=b"),
            Err(Error::DuplicateParameter(p)) if p == "resource"
        ));
        assert!(matches!(
            parsed("grant_type=authorization_code&grant_type=client_credentials&client_id=a&client_secret=s"),
            Err(Error::DuplicateParameter(p)) if p == "grant_type"
        ));
    }

    #[test]
    fn malformed_input_is_rejected_with_a_named_problem() {
        let bad = |auth: Option<&str>, body: &str| {
            parse(&k(), &at("r"), auth.map(str::as_bytes), body.as_bytes()).unwrap_err()
        };
        assert!(
            matches!(bad(None, "grant_type=client_credentials&scope=a&scope=b"), Error::DuplicateParameter(p) if p == "scope")
        );
        assert!(matches!(
            bad(None, "grant_type=client_%zzcredentials"),
            Error::InvalidRequest(_)
        ));
        assert!(matches!(
            bad(None, "grant_type=%ff"),
            Error::InvalidRequest(_)
        ));
        assert!(matches!(
            bad(Some("Basic !!!"), "grant_type=client_credentials"),
            Error::InvalidRequest(_)
        ));
        assert!(matches!(
            bad(Some("Basic YWJj"), "grant_type=client_credentials"),
            Error::InvalidRequest(_)
        ));
        assert!(matches!(
            bad(
                Some(&basic("a", "s")),
                "grant_type=client_credentials&client_secret=s"
            ),
            Error::InvalidRequest(_)
        ));
        assert!(matches!(
            bad(
                Some(&basic("a", "s")),
                "grant_type=client_credentials&client_id=b"
            ),
            Error::InvalidRequest(_)
        ));
    }

    #[test]
    fn errors_never_echo_values() {
        let err = parse(
            &k(),
            &at("r"),
            None,
            b"grant_type=client_credentials&client_id=a&client_secret=hunter2&client_secret=hunter2",
        )
        .unwrap_err();
        assert!(!format!("{err:?} {err}").contains("hunter2"));
    }
}
