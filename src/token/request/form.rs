//! Decoding a token request: its media type, its body read within limits, the strict
//! `application/x-www-form-urlencoded` decoder, and the client's credentials from HTTP Basic or
//! the form (RFC 6749 §2.3). Errors name the field at fault, never its value.

use base64::Engine as _;
use bytes::Bytes;
use http::header;
use http::request::Parts;
use http_body_util::{BodyExt, Limited};
use percent_encoding::percent_decode;
use smallvec::SmallVec;
use std::borrow::Cow;

use crate::error::Error;

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

/// How many form parameters fit without a heap allocation; token requests rarely have more than five.
pub(super) const INLINE_PARAMS: usize = 8;

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
        let mut start = 0;
        for end in memchr::memchr_iter(b'&', body).chain([body.len()]) {
            let pair = &text[start..end];
            start = end + 1;
            if pair.is_empty() {
                continue;
            }
            let (name, value) = match memchr::memchr(b'=', pair.as_bytes()) {
                Some(i) => (&pair[..i], &pair[i + 1..]),
                None => (pair, ""),
            };
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
pub(super) fn repeated_name<'f>(params: &'f Form<'_>) -> Option<&'f str> {
    params
        .iter()
        .enumerate()
        .find(|(i, (name, _))| params[..*i].iter().any(|(n, _)| n == name))
        .map(|(_, (name, _))| name.as_ref())
}

/// One form component: `+` is a space, `%XX` a byte, and the result must be UTF-8.
pub(super) fn decode_component(raw: &[u8]) -> Option<Cow<'_, str>> {
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
pub(super) struct Credentials<'id, 's> {
    pub(super) client_id: Cow<'id, str>,
    pub(super) secret: Cow<'s, str>,
    /// The undecoded `id:secret`, kept only when decoding changed it (see [`parse`]).
    pub(super) raw: Option<Vec<u8>>,
}

/// Parses `Authorization`. `Ok(None)` for schemes other than Basic (a bearer header on a token
/// request is the provider's business); an error for a malformed Basic header.
pub(super) fn parse_authorization(
    value: &[u8],
) -> Result<Option<Credentials<'static, 'static>>, Error> {
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

/// The client's credentials, from exactly one authentication method (RFC 6749 §2.3); `None` for
/// a client that has no secret to key on.
pub(super) fn credentials<'id, 's>(
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
