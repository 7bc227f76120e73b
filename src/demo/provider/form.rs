//! A token call's form and credentials as RFC 6749 has clients send them: an
//! `application/x-www-form-urlencoded` body, and the client id and secret either in HTTP Basic
//! (§2.3.1, each form-encoded) or in the form.

use base64::Engine as _;
use http::{HeaderMap, HeaderValue, header};

/// The `(client_id, client_secret)` a token call presents: an `Authorization` header wins over
/// form parameters.
pub(super) fn presented(
    headers: &HeaderMap,
    form: &[(String, String)],
) -> Option<(String, String)> {
    match headers.get(header::AUTHORIZATION) {
        Some(value) => parse_basic(value),
        None => form_get(form, "client_id").map(|id| {
            let secret = form_get(form, "client_secret").unwrap_or_default();
            (id.to_owned(), secret.to_owned())
        }),
    }
}

/// Decodes `Basic base64(form_encode(id) ":" form_encode(secret))` (RFC 6749 §2.3.1).
fn parse_basic(value: &HeaderValue) -> Option<(String, String)> {
    let (scheme, rest) = value.to_str().ok()?.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    Some((form_decode(id), form_decode(secret)))
}

/// An `application/x-www-form-urlencoded` body as ordered pairs.
pub(super) fn parse_form(body: &[u8]) -> Vec<(String, String)> {
    String::from_utf8_lossy(body)
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (form_decode(k), form_decode(v))
        })
        .collect()
}

pub(super) fn form_get<'a>(form: &'a [(String, String)], key: &str) -> Option<&'a str> {
    form.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// `application/x-www-form-urlencoded` decoding of one name or value (`+` is a space).
fn form_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(&s.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_and_basic_credentials_are_decoded_as_rfc_6749_says() {
        let form = parse_form(b"grant_type=client_credentials&client_id=a%3Ab&scope=x+y&flag&");
        assert_eq!(form_get(&form, "client_id"), Some("a:b"));
        assert_eq!(form_get(&form, "scope"), Some("x y"));
        assert_eq!(form_get(&form, "flag"), Some(""));
        assert_eq!(form_get(&form, "missing"), None);
        // base64("svc%3Aa:s3+cr%2Bt") in either case of the scheme.
        let encoded = base64::engine::general_purpose::STANDARD.encode("svc%3Aa:s3+cr%2Bt");
        for scheme in ["Basic", "basic"] {
            let value = HeaderValue::from_str(&format!("{scheme} {encoded}")).unwrap();
            let expected = ("svc:a".to_owned(), "s3 cr+t".to_owned());
            assert_eq!(parse_basic(&value), Some(expected));
        }
        assert_eq!(parse_basic(&HeaderValue::from_static("Bearer x")), None);
    }
}
