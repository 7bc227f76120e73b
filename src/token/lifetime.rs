//! A cached token and its clock: when it was issued, until when it may be served, when to refresh
//! it ahead of expiry, and how to render it with the remaining lifetime in `expires_in`.
//!
//! The upstream JSON is validated once, when the token arrives, and split into the bytes before and
//! after the `expires_in` value. An answer is then sent as three pieces, that prefix, the remaining
//! seconds and the suffix, without joining them: no JSON parsing, serialisation or copy on the hot
//! path, and every other field stays byte-for-byte as the provider sent it.

use bytes::{BufMut, Bytes, BytesMut};
use http::HeaderValue;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use std::time::Duration;
use tokio::time::Instant;

use crate::config::TokenConfig;

/// A token that may be cached: rendering template plus its timings.
#[derive(Debug)]
pub struct Token {
    /// The JSON up to and including `"expires_in":`.
    prefix: Bytes,
    /// The JSON after the `expires_in` value.
    suffix: Bytes,
    /// The provider's `Content-Type`, served back unchanged.
    pub content_type: HeaderValue,
    /// A digest of `access_token`, to notice a provider handing out the same token again without
    /// keeping a second copy of the secret.
    pub(crate) fingerprint: [u8; 32],
    /// When the provider says the token stops working (capped by `max_lifetime`).
    pub expires_at: Instant,
    /// The last instant this token is handed to callers (expiry less the safety margin, or sooner
    /// for remembered refresh-token answers).
    pub serve_until: Instant,
    /// When the next request should start a background refresh; `None` for tokens that are never
    /// refreshed ahead (refresh-token grant answers).
    pub refresh_at: Option<Instant>,
    /// Another pod of the fleet fetched it (its `Cache-Status` says `detail=fleet`).
    pub from_fleet: bool,
}

/// What a successful upstream body turned out to be.
#[derive(Debug)]
pub enum Validated {
    /// A token that can be cached.
    Token(Token),
    /// A well-formed token answer that must not be cached (no `expires_in`, or a lifetime under one
    /// second): shared with the callers waiting for it, then forgotten.
    Uncacheable,
}

impl Token {
    /// Validates an upstream 2xx body and builds the cache record.
    ///
    /// `jitter` in `[0, 1)` spreads refresh moments so that keys issued together do not refresh
    /// together. Errors describe what is wrong without quoting the body.
    pub fn from_upstream(
        body: &[u8],
        content_type: HeaderValue,
        now: Instant,
        config: &TokenConfig,
        jitter: f64,
    ) -> Result<Validated, &'static str> {
        let Some(template) = Template::of(body)? else {
            return Ok(Validated::Uncacheable);
        };
        let lifetime = Duration::from_secs(template.seconds).min(config.max_lifetime);
        // Too short to serve with a whole second left: passed on as the provider said it.
        if lifetime <= Duration::from_secs(2) {
            return Ok(Validated::Uncacheable);
        }
        let margin = config
            .safety_margin_max
            .min(lifetime.mul_f64(config.safety_margin_ratio));
        // A provider's expiry is whole seconds from its own issue time, which may be up to a
        // second before `now` (the send) in our clock: the token is counted as expiring a second
        // early, so the `expires_in` served is never more than it has left, and it is served
        // only while at least a whole second is left, so that figure is never 0.
        let expires_at = now + lifetime - Duration::from_secs(1);
        let serve_until = (now + (lifetime - margin)).min(expires_at - Duration::from_secs(1));
        let share = (config.refresh_at - config.refresh_jitter * jitter.clamp(0.0, 1.0)).max(0.0);
        Ok(Validated::Token(template.token(
            content_type,
            expires_at,
            serve_until,
            Some((now + lifetime.mul_f64(share)).min(serve_until)),
        )))
    }

    /// A token another sidecar of the fleet fetched: `body` as it served it, with the clock it
    /// shared (`expires_left`, `serve_left`, `refresh_left` from `now`). `None` if the body is
    /// not a cacheable token or less than a whole second is left to serve.
    pub fn from_fleet(
        body: &[u8],
        content_type: HeaderValue,
        now: Instant,
        expires_left: Duration,
        serve_left: Duration,
        refresh_left: Option<Duration>,
    ) -> Option<Token> {
        let template = Template::of(body).ok()??;
        let serve_left = serve_left.min(expires_left.checked_sub(Duration::from_secs(1))?);
        if serve_left < Duration::from_secs(1) {
            return None;
        }
        let mut token = template.token(
            content_type,
            now + expires_left,
            now + serve_left,
            refresh_left.map(|left| now + left.min(serve_left)),
        );
        token.from_fleet = true;
        Some(token)
    }

    /// The whole answer body at `now`, as [`Self::pieces`] sends it.
    pub fn body(&self, now: Instant) -> Bytes {
        let pieces = self.pieces(now);
        let mut body = BytesMut::with_capacity(pieces.iter().map(Bytes::len).sum());
        for piece in pieces {
            body.put_slice(&piece);
        }
        body.freeze()
    }

    /// Whether the token may still be handed out.
    pub fn servable(&self, now: Instant) -> bool {
        now < self.serve_until
    }

    /// Whether a request at `now` should start a background refresh.
    pub fn refresh_due(&self, now: Instant) -> bool {
        self.refresh_at.is_some_and(|at| now >= at)
    }

    /// Whole seconds of life left, rounded down: never more than what is left.
    pub fn remaining_secs(&self, now: Instant) -> u64 {
        self.expires_at.saturating_duration_since(now).as_secs()
    }

    /// Whole seconds the sidecar will keep serving this token (the `ttl` of `Cache-Status`).
    pub(crate) fn ttl_secs(&self, now: Instant) -> u64 {
        self.serve_until.saturating_duration_since(now).as_secs()
    }

    /// The response body at `now`, in order: the JSON up to `"expires_in":`, the remaining
    /// seconds, the rest. The first and last pieces are the token's own bytes, shared.
    pub fn pieces(&self, now: Instant) -> [Bytes; 3] {
        let digits = itoa::Buffer::new()
            .format(self.remaining_secs(now))
            .as_bytes()
            .to_vec();
        [
            self.prefix.clone(),
            Bytes::from(digits),
            self.suffix.clone(),
        ]
    }

    /// Makes this token one that is never refreshed ahead and served until `until` at the latest
    /// (an answer to a refresh-token grant, kept only for late duplicates of the same request).
    pub(crate) fn keep_briefly(&mut self, until: Instant) {
        self.refresh_at = None;
        self.serve_until = self.serve_until.min(until);
    }
}

/// A token answer split around its `expires_in` value, with the lifetime it states.
struct Template {
    prefix: Bytes,
    suffix: Bytes,
    fingerprint: [u8; 32],
    /// The `expires_in` seconds as the provider gave them.
    seconds: u64,
}

impl Template {
    /// Validates a 2xx token body; `None` for a well-formed answer without `expires_in`.
    fn of(body: &[u8]) -> Result<Option<Template>, &'static str> {
        let object = parse_object(body).ok_or("not a JSON object")?;
        let access_token = object
            .iter()
            .find(|(k, _)| k == "access_token")
            .and_then(|(_, v)| serde_json::from_str::<String>(v.get()).ok())
            .filter(|t| !t.is_empty())
            .ok_or("no access_token")?;
        if object.iter().filter(|(k, _)| k == "expires_in").count() > 1 {
            return Err("expires_in given twice");
        }
        let Some(position) = object.iter().position(|(k, _)| k == "expires_in") else {
            return Ok(None);
        };
        let seconds = parse_expires_in(object[position].1.get()).ok_or("bad expires_in")?;
        let (prefix, suffix) = split_template(&object, position, body.len());
        Ok(Some(Template {
            prefix,
            suffix,
            fingerprint: Sha256::digest(access_token.as_bytes()).into(),
            seconds,
        }))
    }

    fn token(
        self,
        content_type: HeaderValue,
        expires_at: Instant,
        serve_until: Instant,
        refresh_at: Option<Instant>,
    ) -> Token {
        Token {
            prefix: self.prefix,
            suffix: self.suffix,
            // A copy, so the token does not pin the buffer the header was parsed from.
            content_type: HeaderValue::from_bytes(content_type.as_bytes()).unwrap_or(content_type),
            fingerprint: self.fingerprint,
            expires_at,
            serve_until,
            refresh_at,
            from_fleet: false,
        }
    }
}

/// The object re-serialised around member `position`, whose value is left out: the bytes before
/// it and after it. One allocation for both halves, which are views into it.
fn split_template(object: &[(String, &RawValue)], position: usize, size: usize) -> (Bytes, Bytes) {
    let mut template = BytesMut::with_capacity(size + 2);
    let mut split = 0;
    template.put_u8(b'{');
    for (i, (key, value)) in object.iter().enumerate() {
        if i > 0 {
            template.put_u8(b',');
        }
        match serde_json::to_string(key) {
            Ok(key) => template.put_slice(key.as_bytes()),
            Err(_) => unreachable!("serde_json writes any string to a String"),
        }
        template.put_u8(b':');
        if i == position {
            split = template.len();
        } else {
            template.put_slice(value.get().as_bytes());
        }
    }
    template.put_u8(b'}');
    let mut prefix = template.freeze();
    let suffix = prefix.split_off(split);
    (prefix, suffix)
}

/// `expires_in` as whole seconds: a non-negative JSON integer, a non-negative number (rounded
/// down), or a string of digits (some providers quote it).
fn parse_expires_in(raw: &str) -> Option<u64> {
    let value: serde_json::Value = serde_json::from_str(raw).ok()?;
    match value {
        serde_json::Value::Number(n) => n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.is_finite() && *f >= 0.0)
                .map(|f| f as u64)
        }),
        serde_json::Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            Some(s.parse::<u64>().unwrap_or(u64::MAX))
        }
        _ => None,
    }
}

/// A JSON object's members in their original order, values kept as raw JSON text.
fn parse_object(body: &[u8]) -> Option<Vec<(String, &RawValue)>> {
    struct Members;
    impl<'de> Visitor<'de> for Members {
        type Value = Vec<(String, &'de RawValue)>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut members = Vec::with_capacity(map.size_hint().unwrap_or(8));
            while let Some(member) = map.next_entry::<String, &'de RawValue>()? {
                members.push(member);
            }
            Ok(members)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let members = (&mut de).deserialize_map(Members).ok()?;
    de.end().ok()?;
    Some(members)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> TokenConfig {
        TokenConfig::default()
    }

    fn render(token: &Token, now: Instant) -> Vec<u8> {
        token.pieces(now).concat()
    }

    fn token(body: &str, now: Instant) -> Token {
        match Token::from_upstream(
            body.as_bytes(),
            HeaderValue::from_static("application/json"),
            now,
            &config(),
            0.0,
        ) {
            Ok(Validated::Token(t)) => t,
            other => panic!("expected a token, got {other:?}"),
        }
    }

    #[test]
    fn content_type_is_served_back_byte_for_byte() {
        let now = Instant::now();
        for sent in [
            "application/json;charset=UTF-8",
            "application/json",
            "application/vnd.idp+json; charset=latin1",
        ] {
            let token = match Token::from_upstream(
                br#"{"access_token":"t","expires_in":60}"#,
                HeaderValue::from_str(sent).unwrap(),
                now,
                &config(),
                0.0,
            ) {
                Ok(Validated::Token(t)) => t,
                other => panic!("expected a token, got {other:?}"),
            };
            assert_eq!(token.content_type.as_bytes(), sent.as_bytes());
        }
    }

    #[test]
    fn render_keeps_other_fields_and_counts_down() {
        let now = Instant::now();
        let body = r#"{"access_token":"abc","token_type":"bearer","expires_in":3600,"scope":"a b","n":1.50}"#;
        let t = token(body, now);
        let out: serde_json::Value = serde_json::from_slice(&render(&t, now)).unwrap();
        // One second less than the provider said (see `from_upstream`).
        assert_eq!(out["expires_in"], 3599);
        assert_eq!(out["access_token"], "abc");
        assert_eq!(out["scope"], "a b");
        let later = render(&t, now + Duration::from_millis(100_500));
        let text = std::str::from_utf8(&later).unwrap();
        assert_eq!(
            text,
            r#"{"access_token":"abc","token_type":"bearer","expires_in":3498,"scope":"a b","n":1.50}"#
        );
    }

    #[test]
    fn expires_in_first_or_last_renders_valid_json() {
        let now = Instant::now();
        for body in [
            r#"{"expires_in":60,"access_token":"a"}"#,
            r#"{"access_token":"a","expires_in":60}"#,
            r#" { "access_token" : "a" , "expires_in" : "60" } "#,
        ] {
            let out: serde_json::Value =
                serde_json::from_slice(&render(&token(body, now), now)).unwrap();
            assert_eq!(out["expires_in"], 59, "{body}");
            assert_eq!(out["access_token"], "a");
        }
    }

    #[test]
    fn margin_is_the_smaller_of_thirty_seconds_and_a_tenth() {
        let now = Instant::now();
        let long = token(r#"{"access_token":"a","expires_in":3600}"#, now);
        assert_eq!(long.serve_until, now + Duration::from_secs(3570));
        let short = token(r#"{"access_token":"a","expires_in":100}"#, now);
        assert_eq!(short.serve_until, now + Duration::from_secs(90));
        assert!(short.servable(now + Duration::from_secs(89)));
        assert!(!short.servable(now + Duration::from_secs(90)));
    }

    #[test]
    fn refresh_is_due_at_the_configured_share_less_jitter() {
        let now = Instant::now();
        let t = token(r#"{"access_token":"a","expires_in":100}"#, now);
        assert_eq!(t.refresh_at, Some(now + Duration::from_secs(80)));
        assert!(!t.refresh_due(now + Duration::from_secs(79)));
        assert!(t.refresh_due(now + Duration::from_secs(80)));
        let jittered = Token::from_upstream(
            br#"{"access_token":"a","expires_in":100}"#,
            HeaderValue::from_static("application/json"),
            now,
            &config(),
            1.0,
        );
        let Ok(Validated::Token(j)) = jittered else {
            panic!()
        };
        assert_eq!(j.refresh_at, Some(now + Duration::from_secs(75)));
    }

    #[test]
    fn bad_bodies_are_rejected_and_odd_lifetimes_bounded() {
        let now = Instant::now();
        let parse = |b: &str| {
            Token::from_upstream(
                b.as_bytes(),
                HeaderValue::from_static("application/json"),
                now,
                &config(),
                0.0,
            )
        };
        for bad in [
            "not json",
            "[]",
            r#"{"token_type":"x"}"#,
            r#"{"access_token":""}"#,
            r#"{"access_token":"a","expires_in":-1}"#,
            r#"{"access_token":"a","expires_in":"soon"}"#,
            r#"{"access_token":"a","expires_in":1,"expires_in":2}"#,
            r#"{"access_token":"a"} x"#,
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert!(matches!(
            parse(r#"{"access_token":"a"}"#),
            Ok(Validated::Uncacheable)
        ));
        assert!(matches!(
            parse(r#"{"access_token":"a","expires_in":0}"#),
            Ok(Validated::Uncacheable)
        ));
        let Ok(Validated::Token(years)) =
            parse(r#"{"access_token":"a","expires_in":999999999999}"#)
        else {
            panic!()
        };
        assert_eq!(
            years.expires_at,
            now + config().max_lifetime - Duration::from_secs(1)
        );
        // Too short to serve with a whole second left: passed on untouched.
        for short in [1, 2] {
            let body = format!(r#"{{"access_token":"a","expires_in":{short}}}"#);
            assert!(matches!(parse(&body), Ok(Validated::Uncacheable)), "{body}");
        }
    }

    #[test]
    fn a_token_kept_briefly_is_never_refreshed_and_served_only_until_then() {
        let now = Instant::now();
        let mut t = token(r#"{"access_token":"a","expires_in":3600}"#, now);
        t.keep_briefly(now + Duration::from_secs(30));
        assert_eq!(t.refresh_at, None);
        assert!(!t.refresh_due(now + Duration::from_secs(3000)));
        assert_eq!(t.serve_until, now + Duration::from_secs(30));
        let mut short = token(r#"{"access_token":"a","expires_in":10}"#, now);
        short.keep_briefly(now + Duration::from_secs(30));
        assert_eq!(
            short.serve_until,
            now + Duration::from_secs(8),
            "never later than before"
        );
    }

    #[test]
    fn remaining_never_exceeds_what_is_left() {
        let now = Instant::now();
        let t = token(r#"{"access_token":"a","expires_in":10}"#, now);
        // The provider's clock may have started up to a second before ours (whole-second `exp`).
        assert_eq!(t.remaining_secs(now + Duration::from_millis(1)), 8);
        assert_eq!(t.remaining_secs(now + Duration::from_secs(20)), 0);
        // Served only while a whole second is left.
        let short = token(r#"{"access_token":"a","expires_in":3}"#, now);
        let last = short.serve_until - Duration::from_millis(1);
        assert!(short.servable(last));
        assert!(short.remaining_secs(last) >= 1);
    }
}
