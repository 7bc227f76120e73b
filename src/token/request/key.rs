//! Every key of a token request, from its one canonical form ([`Canonical`]): the tagged,
//! length-prefixed encoding of every field that can change the token the provider issues (see
//! [`super`] for what goes in and why), built once per request. Each key is a digest of it:
//!
//! - the local [`CacheKey`]: an HMAC of the whole form under the process's random [`Keyer`];
//! - the fleet's Redis names and value key: HMACs of the whole form under keys derived from the
//!   fleet secret, one per purpose (`token::fleet`);
//! - the fleet's cool-down name: an HMAC of the client part alone (route and client id, no
//!   secret), so every key of one client shares it;
//! - the [`ClientKey`] of the per-client tables (cool-downs, probe pacing) and the client's
//!   eight-hex label: the SHA-256 of the client id (unkeyed: see [`ClientKey`]).

use hmac::{Hmac, Mac};
use http::header;
use http::request::Parts;
use sha2::{Digest, Sha256};
use smallvec::SmallVec;
use std::borrow::Cow;
use std::ops::Range;

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

/// An HMAC key for digests of [`Canonical`] forms, keyed once: each digest clones the keyed
/// state instead of hashing the key again. A route's random one makes its [`CacheKey`]s; the
/// fleet's, derived from the fleet secret, make Redis names and value keys.
#[derive(Clone)]
pub struct Keyer(Hmac<Sha256>);

impl Keyer {
    /// A keyer for this HMAC key.
    pub fn new(key: &[u8; 32]) -> Keyer {
        Keyer(<Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length"))
    }

    /// The local cache key of a request: its whole canonical form under this key.
    pub fn key(&self, canonical: &Canonical) -> CacheKey {
        CacheKey(canonical.digest(self))
    }

    fn mac(&self, bytes: &[u8]) -> [u8; 32] {
        let mut mac = self.0.clone();
        mac.update(bytes);
        mac.finalize().into_bytes().into()
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

/// A keyed token request in canonical form, built once by [`super::parse`]; every key of the
/// request is a digest of it (see the module's list). It holds the client secret, so it is never
/// printed, logged or stored: only its digests leave it.
#[derive(Clone, PartialEq, Eq)]
pub struct Canonical {
    /// The tagged fields in a fixed order: the client part (route, client id), then path, query,
    /// Host, the secret (or the raw Basic bytes), and every other parameter sorted by name,
    /// `scope` as a set. The order only has to be fixed: the tags keep fields apart.
    bytes: Vec<u8>,
    /// Where the client id's bytes are in `bytes`; the client part ends with them.
    client_id: Range<usize>,
}

impl std::fmt::Debug for Canonical {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Canonical(..)")
    }
}

impl Canonical {
    /// The canonical form of `client`'s request with `params`, sent to `context`. The client's
    /// own parameters (`client_id`, `client_secret`) are in `client`, not repeated from `params`.
    pub(super) fn new(
        context: &KeyContext<'_>,
        client: &Credentials<'_, '_>,
        params: &Form<'_>,
    ) -> Canonical {
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
        let (secret_tag, secret) = match &client.raw {
            // Percent or plus signs in a Basic header decode per RFC 6749, but not every provider
            // decodes: key on the raw bytes so two spellings never alias one cached token.
            Some(raw) => (TAG_RAW_BASIC, raw.as_slice()),
            None => (TAG_SECRET, client.secret.as_bytes()),
        };
        let sizes = [context.route, client.client_id.as_ref(), context.path]
            .into_iter()
            .chain(context.query)
            .chain(context.host)
            .chain(
                rest.iter()
                    .flat_map(|(name, value)| [*name, value.as_ref()]),
            )
            .map(|field| FIELD_HEAD + field.len());
        let mut bytes = Vec::with_capacity(sizes.sum::<usize>() + FIELD_HEAD + secret.len());
        field(&mut bytes, TAG_ROUTE, context.route.as_bytes());
        let client_id = field(&mut bytes, TAG_CLIENT, client.client_id.as_bytes());
        field(&mut bytes, TAG_PATH, context.path.as_bytes());
        if let Some(query) = context.query {
            field(&mut bytes, TAG_QUERY, query.as_bytes());
        }
        if let Some(host) = context.host {
            field(&mut bytes, TAG_HOST, host.as_bytes());
        }
        field(&mut bytes, secret_tag, secret);
        for (name, value) in &rest {
            field(&mut bytes, TAG_PARAM, name.as_bytes());
            field(&mut bytes, TAG_PARAM, value.as_bytes());
        }
        Canonical { bytes, client_id }
    }

    /// The whole form under `keyer`: the local cache key, or under a fleet key a Redis name or
    /// the key that seals a value. The client secret is in it.
    pub fn digest(&self, keyer: &Keyer) -> [u8; 32] {
        keyer.mac(&self.bytes)
    }

    /// The client part alone (route and client id) under `keyer`: what every key of one client
    /// at one route shares, whatever its secret or parameters (the fleet's cool-down name).
    pub fn client_digest(&self, keyer: &Keyer) -> [u8; 32] {
        keyer.mac(&self.bytes[..self.client_id.end])
    }

    /// The client's key in the per-client tables; computed once per request that needs it.
    pub(crate) fn client_key(&self) -> ClientKey {
        ClientKey::of_bytes(&self.bytes[self.client_id.clone()])
    }
}

/// A client id as the per-client tables (cool-downs, probe pacing) hold it: its SHA-256, so an
/// entry costs 32 bytes however long the id, and no table holds an id in plain text. Unlike
/// every other digest here it is not keyed: its first bytes are the client's name in logs,
/// metrics and `/status` ([`Self::label`]), which must be the same in every pod and after a
/// restart, as [`crate::telemetry::client_hash`] gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ClientKey([u8; 32]);

impl ClientKey {
    /// The key of the client id `client_id`, for tests that name a client directly; the
    /// request path only ever makes one from a [`Canonical`].
    #[cfg(test)]
    pub(crate) fn of(client_id: &str) -> ClientKey {
        ClientKey::of_bytes(client_id.as_bytes())
    }

    fn of_bytes(client_id: &[u8]) -> ClientKey {
        ClientKey(Sha256::digest(client_id).into())
    }

    /// The first four bytes, for tables that name clients more compactly (see [`Self::label`]).
    pub(crate) fn prefix(&self) -> [u8; 4] {
        [self.0[0], self.0[1], self.0[2], self.0[3]]
    }

    /// The client's name in logs and metric labels: the same eight hex digits as
    /// [`crate::telemetry::client_hash`] gives for the id.
    pub(crate) fn label(&self) -> String {
        self.0[..4].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// A field's head: its tag, then its length as 8 little-endian bytes.
const FIELD_HEAD: usize = 9;

/// Appends one length-prefixed, tagged field, so `("ab","c")` and `("a","bc")` never collide;
/// returns where its bytes are.
fn field(out: &mut Vec<u8>, tag: u8, bytes: &[u8]) -> Range<usize> {
    out.push(tag);
    out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    let start = out.len();
    out.extend_from_slice(bytes);
    start..out.len()
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
    use crate::token::request::{Parsed, parse};

    const AT: KeyContext<'static> = KeyContext {
        route: "r",
        path: "/oauth/token",
        query: None,
        host: None,
    };

    /// The canonical form `parse` makes of a request at `context`.
    fn canonical_at(context: &KeyContext<'_>, auth: Option<&str>, body: &str) -> Canonical {
        let keyer = Keyer::new(&[7; 32]);
        match parse(&keyer, context, auth.map(str::as_bytes), body.as_bytes()).unwrap() {
            Parsed::Keyed { key, canonical, .. } => {
                assert_eq!(
                    key,
                    keyer.key(&canonical),
                    "the local key is the form's HMAC"
                );
                canonical
            }
            Parsed::PassThrough => panic!("expected a keyed request for {body}"),
        }
    }

    fn canonical(body: &str) -> Canonical {
        canonical_at(&AT, None, body)
    }

    fn basic(id_secret: &str) -> String {
        use base64::Engine as _;
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(id_secret)
        )
    }

    #[test]
    fn a_client_key_labels_like_the_logs_and_never_holds_the_id() {
        let id = "x".repeat(8192);
        assert_eq!(
            ClientKey::of(&id).label(),
            crate::telemetry::client_hash(&id)
        );
        assert_eq!(std::mem::size_of::<ClientKey>(), 32);
    }

    #[test]
    fn the_client_key_comes_from_the_canonical_client_id_however_it_was_sent() {
        let form = canonical("grant_type=client_credentials&client_id=app&client_secret=s");
        let header = canonical_at(&AT, Some(&basic("app:s")), "grant_type=client_credentials");
        let escaped = canonical_at(
            &AT,
            Some(&basic("a%70p:s+t")),
            "grant_type=client_credentials",
        );
        for canonical in [&form, &header, &escaped] {
            assert_eq!(canonical.client_key(), ClientKey::of("app"));
        }
        let other = canonical("grant_type=client_credentials&client_id=app2&client_secret=s");
        assert_ne!(other.client_key(), ClientKey::of("app"));
    }

    #[test]
    fn the_client_part_is_route_and_client_id_and_never_the_secret() {
        let fleet = crate::config::FleetSecret::from_file_bytes(&[b'f'; 32]).unwrap();
        let keyer = Keyer::new(&fleet.derive("client names"));
        let base = canonical("grant_type=client_credentials&client_id=a&client_secret=s");
        let client = base.client_digest(&keyer);
        for same_client in [
            canonical("grant_type=client_credentials&client_id=a&client_secret=t"),
            canonical("grant_type=client_credentials&client_id=a&client_secret=s&scope=x"),
            canonical_at(
                &KeyContext {
                    path: "/token",
                    query: Some("q"),
                    host: Some("h"),
                    ..AT
                },
                Some(&basic("a:u")),
                "grant_type=client_credentials",
            ),
        ] {
            assert_eq!(same_client.client_digest(&keyer), client);
            assert_ne!(same_client.digest(&keyer), base.digest(&keyer));
        }
        for other_client in [
            canonical("grant_type=client_credentials&client_id=b&client_secret=s"),
            canonical_at(
                &KeyContext { route: "r2", ..AT },
                None,
                "grant_type=client_credentials&client_id=a&client_secret=s",
            ),
        ] {
            assert_ne!(other_client.client_digest(&keyer), client);
        }
    }

    #[test]
    fn every_digest_depends_on_its_key_and_the_form_never_prints() {
        let body = "grant_type=client_credentials&client_id=app&client_secret=hunter2";
        let form = canonical(body);
        let ours = crate::config::FleetSecret::from_file_bytes(&[b'f'; 32]).unwrap();
        let theirs = crate::config::FleetSecret::from_file_bytes(&[b'g'; 32]).unwrap();
        let keyer =
            |secret: &crate::config::FleetSecret, purpose| Keyer::new(&secret.derive(purpose));
        let digests = [
            form.digest(&keyer(&ours, "names")),
            form.digest(&keyer(&ours, "values")),
            form.digest(&keyer(&theirs, "names")),
            form.client_digest(&keyer(&ours, "names")),
            form.client_digest(&keyer(&theirs, "names")),
            Keyer::new(&[7; 32]).key(&form).0,
        ];
        let distinct: std::collections::BTreeSet<_> = digests.iter().collect();
        assert_eq!(distinct.len(), digests.len());
        assert_eq!(format!("{form:?}"), "Canonical(..)");
        let printed = format!(
            "{:?}",
            parse(&Keyer::new(&[7; 32]), &AT, None, body.as_bytes())
        );
        assert!(!printed.contains("hunter2"), "{printed}");
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
}
