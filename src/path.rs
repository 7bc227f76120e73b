//! Request paths as the sidecar routes them. Servers behind it normalise paths before they route
//! (most collapse `//` and resolve `..`, decode `%74`, Java containers drop `;params`, some ignore
//! case), so a spelling the sidecar matched literally could reach a provider's token endpoint
//! around the cache, or an API host's path on the login host. Routing therefore uses:
//! - the **normal form** ([`normalise`]): RFC 3986 §6.2.2 (percent-encoded unreserved characters
//!   decoded, other escapes in upper case, `.` and `..` segments resolved) and repeated slashes
//!   collapsed. It is what a matched route forwards. An encoded `/` or `\` (which servers disagree
//!   on), a `%` not followed by two hex digits (invalid in a URI; decoding what follows it could
//!   make a new escape, even an encoded `/`) and a `..` that climbs above the root cannot be
//!   normalised safely and are refused;
//! - the **match key** ([`match_key`]): the normal form without `;params`, without a trailing
//!   slash, in ASCII lower case. Route prefixes and token paths are compared by it.
//!
//! A plain path (`/oauth/token`, `/api/v2/users/me`) is its own normal form and match key:
//! checking that is one scan, and nothing is allocated.

use std::borrow::Cow;

/// Why a path cannot be routed.
pub type Unsafe = &'static str;

/// The normal form of `path`, or why it has none. Paths that do not start with `/` (`*`) are
/// returned as they are.
pub fn normalise(path: &str) -> Result<Cow<'_, str>, Unsafe> {
    if !path.starts_with('/') || is_normal(path) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path)?;
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing = false;
    for segment in decoded.split('/').skip(1) {
        trailing = matches!(segment, "" | "." | "..");
        match segment {
            "" | "." => {}
            ".." => {
                if segments.pop().is_none() {
                    return Err("a .. segment in the path climbs above its root");
                }
            }
            other => segments.push(other),
        }
    }
    let mut normal = String::with_capacity(decoded.len());
    for segment in &segments {
        normal.push('/');
        normal.push_str(segment);
    }
    if trailing || segments.is_empty() {
        normal.push('/');
    }
    Ok(Cow::Owned(normal))
}

/// Whether `path` (starting with `/`) is already in normal form: no `%`, no empty segment but a
/// trailing one, no `.` or `..` segment.
fn is_normal(path: &str) -> bool {
    let bytes = path.as_bytes();
    if memchr::memchr(b'%', bytes).is_some() {
        return false;
    }
    let body = &bytes[1..];
    let body = body.strip_suffix(b"/").unwrap_or(body);
    // Split on bytes, not chars: every request's path passes here.
    body.is_empty()
        || body
            .split(|&b| b == b'/')
            .all(|s| !matches!(s, b"" | b"." | b".."))
}

/// `path` with each `%XX` of an unreserved character decoded and other escapes in upper case; an
/// encoded `/` or `\`, and a `%` not followed by two hex digits, are refused. Were such a `%`
/// kept, `/%%32%66` would decode to `/%2f`: the encoded slash the first rule refuses.
fn decode_unreserved(path: &str) -> Result<String, Unsafe> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = (bytes[i] == b'%')
            .then(|| path.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escape {
            Some(b'/' | b'\\') => return Err("an encoded / or \\ in the path cannot be routed"),
            Some(c) if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') => {
                out.push(c as char);
                i += 3;
            }
            Some(c) => {
                out.push_str(&format!("%{c:02X}"));
                i += 3;
            }
            None if bytes[i] == b'%' => {
                return Err("a % in the path is not followed by two hex digits");
            }
            None => {
                // `path` is a valid URI path: ASCII, so every byte is a char.
                out.push(bytes[i] as char);
                i += 1;
            }
        }
    }
    Ok(out)
}

/// The key paths are compared by: `normal` (a normal form) without each segment's `;params`,
/// without a trailing slash, in ASCII lower case.
pub fn match_key(normal: &str) -> Cow<'_, str> {
    let trimmed = match normal.strip_suffix('/') {
        Some(rest) if !rest.is_empty() => rest,
        _ => normal,
    };
    let plain = !trimmed.bytes().any(|b| b == b';' || b.is_ascii_uppercase());
    if plain {
        return Cow::Borrowed(trimmed);
    }
    let mut key = String::with_capacity(trimmed.len());
    for (i, segment) in trimmed.split('/').enumerate() {
        if i > 0 {
            key.push('/');
        }
        let segment = segment.split(';').next().unwrap_or("");
        key.push_str(&segment.to_ascii_lowercase());
    }
    Cow::Owned(key)
}

/// Whether the route prefix with match key `prefix` covers the path with match key `key`, on a
/// segment boundary (`/api` covers `/api` and `/api/x`, not `/apix`).
pub fn covers(prefix: &str, key: &str) -> bool {
    prefix == "/"
        || key
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// `normal` without its first `count` segments, always starting with `/` (the path a route with
/// `strip_prefix` forwards; `count` is the number of segments of its prefix).
pub fn strip_segments(normal: &str, count: usize) -> &str {
    let mut rest = normal;
    for _ in 0..count {
        rest = match rest[1..].find('/') {
            Some(at) => &rest[at + 1..],
            None => return "/",
        };
    }
    rest
}

/// How many segments a route prefix has (`/` none, `/api/v2` two).
pub fn segments(prefix: &str) -> usize {
    prefix.split('/').filter(|s| !s.is_empty()).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normal(path: &str) -> String {
        normalise(path).unwrap().into_owned()
    }

    #[test]
    fn plain_paths_are_borrowed_as_they_are() {
        for path in ["/", "/oauth/token", "/api/v2/users/me", "/a/", "*"] {
            assert!(
                matches!(normalise(path), Ok(Cow::Borrowed(p)) if p == path),
                "{path}"
            );
        }
        assert!(matches!(
            match_key("/oauth/token"),
            Cow::Borrowed("/oauth/token")
        ));
    }

    #[test]
    fn spellings_of_one_path_normalise_alike() {
        for path in [
            "//oauth/token",
            "/oauth//token",
            "/oauth/./token",
            "/oauth/%74oken",
            "/x/../oauth/token",
            "/%2e/oauth/token",
            "/oauth/x/%2E%2E/token",
        ] {
            assert_eq!(normal(path), "/oauth/token", "{path}");
        }
        assert_eq!(normal("/oauth/token/"), "/oauth/token/");
        assert_eq!(normal("/a/b/.."), "/a/");
        assert_eq!(normal("/a/.."), "/");
        assert_eq!(normal("/%7euser/%c3%a9"), "/~user/%C3%A9");
    }

    #[test]
    fn match_keys_fold_case_params_and_a_trailing_slash() {
        for path in [
            "/OAUTH/TOKEN",
            "/oauth/token;x",
            "/oauth/token/",
            "/Oauth;a=b/token;c/",
        ] {
            assert_eq!(match_key(&normal(path)), "/oauth/token", "{path}");
        }
        assert_eq!(match_key("/"), "/");
    }

    #[test]
    fn unsafe_paths_are_refused() {
        for path in [
            "/api%2fv2/users/me",
            "/api%2Fv2",
            "/a%5cb",
            // A bare `%`: decoding after it would make new escapes, an encoded slash among them.
            "/api/%%32%66etc",
            "/%%61A",
            "/100%",
            "/a%zz",
            "/..",
            "/a/../../oauth/token",
        ] {
            assert!(normalise(path).is_err(), "{path}");
        }
    }

    #[test]
    fn prefixes_cover_on_segment_boundaries_and_strip_by_segments() {
        assert!(covers("/api", "/api"));
        assert!(covers("/api", "/api/v2"));
        assert!(!covers("/api", "/apix"));
        assert!(covers("/", "/anything"));
        assert_eq!(
            strip_segments("/login/oauth/token", segments("/login")),
            "/oauth/token"
        );
        assert_eq!(
            strip_segments("/login;x/oauth", segments("/login")),
            "/oauth"
        );
        assert_eq!(strip_segments("/login", segments("/login")), "/");
        assert_eq!(strip_segments("/a/b/c", segments("/")), "/a/b/c");
        assert_eq!(strip_segments("/a/b/c", segments("/a/b")), "/c");
    }
}
