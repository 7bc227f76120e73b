//! The cache key of a token request: the keyed HMAC ([`Keyer`]), where the request was sent
//! ([`KeyContext`]), and the tagged, length-prefixed encoding of every field (see [`super`] for
//! what goes in and why).

use hmac::{Hmac, Mac};
use http::header;
use http::request::Parts;
use sha2::Sha256;
use smallvec::SmallVec;
use std::borrow::Cow;

use super::form::{Credentials, Form, INLINE_PARAMS};
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

/// A digest of a route and client id alone, for what a client's keys share (the fleet's
/// cool-downs).
pub fn client_digest(keyer: &Keyer, route: &str, client_id: &str) -> CacheKey {
    let mut mac = keyer.0.clone();
    field(&mut mac, TAG_ROUTE, route.as_bytes());
    field(&mut mac, TAG_CLIENT, client_id.as_bytes());
    CacheKey(mac.finalize().into_bytes().into())
}

/// The cache key: the context, the client, then every other parameter in canonical order.
pub(super) fn digest(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_scopes_are_borrowed_and_others_rebuilt() {
        assert!(matches!(canonical_scope("read"), Cow::Borrowed("read")));
        assert!(matches!(canonical_scope("a b c"), Cow::Borrowed("a b c")));
        assert_eq!(canonical_scope("b a"), "a b");
        assert_eq!(canonical_scope("a a"), "a");
        assert_eq!(canonical_scope(" a  b "), "a b");
        assert_eq!(canonical_scope(""), "");
    }
}
