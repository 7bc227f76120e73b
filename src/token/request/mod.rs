//! Reading a local caller's token request: the form body, HTTP Basic client authentication, and
//! the decision whether the request can be cached and under which keys. [`form`] decodes the
//! body and the `Authorization` header; [`parse`] decides whether the request is keyed at all
//! and, if it is, canonicalises it once ([`Canonical`], in [`key`]): every key the sidecar uses
//! for it, local or fleet, and its client digest are digests of that one form, so no second
//! parser can disagree with the first.
//!
//! The canonical form holds every input that can change the token the provider issues, each a
//! tagged, length-prefixed field so no two inputs can slide into each other:
//! - where the request was sent ([`KeyContext`]): the route, the token path, the query string, and,
//!   when the caller's `Host` goes upstream (`preserve_host`), that Host;
//! - who asks: the client id, and the client secret (or the exact bytes of a Basic header whose
//!   decoding changed them);
//! - what is asked: every other form parameter, sorted by name, with `scope` as a sorted set.
//!
//! The local cache key is its HMAC under a key that is random per process, so the cache key is
//! useless outside this process and the plaintext secret is never stored. Two requests share a
//! key only if the provider would see the same credentials and the same parameters at the same
//! place.

mod form;
mod key;

use std::borrow::Cow;

use crate::error::Error;
pub use form::{Form, parse_form};
pub(crate) use form::{MediaType, media_type, read_form};
use form::{credentials, parse_authorization, repeated_name};
pub(crate) use key::ClientKey;
pub use key::{CacheKey, Canonical, KeyContext, Keyer};

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
        /// The local cache key: `canonical` under the route's [`Keyer`].
        key: CacheKey,
        grant: Grant,
        /// Borrowed from the body where it can be: a hit never copies it.
        client_id: Cow<'a, str>,
        /// The request's one canonical form, from which every other key derives.
        canonical: Canonical,
    },
    /// Anything the sidecar does not key (other grants, public clients, assertions, JSON bodies):
    /// forwarded unchanged.
    PassThrough,
}

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
    let canonical = Canonical::new(context, &client, &params);
    Ok(Parsed::Keyed {
        key: keyer.key(&canonical),
        grant,
        client_id: client.client_id,
        canonical,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

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
