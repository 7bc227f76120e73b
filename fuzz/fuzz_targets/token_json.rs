//! Fuzzes the upstream token body: `Token::from_upstream` on arbitrary bytes and, when it keeps a
//! token, its rendering (`pieces`) at several ages.
//!
//! Oracles beyond "no panic": every rendering is JSON; its `expires_in` is `remaining_secs`;
//! every other member equals the input's; the token's instants are ordered.
#![no_main]

use http::HeaderValue;
use libfuzzer_sys::fuzz_target;
use serde::de::IgnoredAny;
use std::time::Duration;
use token_sidecar::config::TokenConfig;
use token_sidecar::token::lifetime::{Token, Validated};
use tokio::time::Instant;

fuzz_target!(|data: &[u8]| {
    let config = TokenConfig::default();
    let now = Instant::now();
    let content_type = HeaderValue::from_static("application/json");
    let Ok(Validated::Token(token)) = Token::from_upstream(data, content_type, now, &config, 0.5)
    else {
        return;
    };
    assert!(token.serve_until <= token.expires_at);
    assert!(
        token
            .refresh_at
            .is_some_and(|at| at >= now && at <= token.serve_until)
    );
    // serde_json's Value refuses some texts its raw-value parser accepts (lone surrogate
    // escapes); those must still render as well-formed JSON text.
    let input = serde_json::from_slice::<serde_json::Value>(data).ok();
    for age in [0, 1, 59, 3_599, 86_400, 1_000_000_000] {
        let at = now + Duration::from_secs(age);
        let rendered = token.pieces(at).concat();
        if let Err(e) = serde_json::from_slice::<IgnoredAny>(&rendered) {
            panic!(
                "render is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&rendered)
            );
        }
        let Some(input) = &input else { continue };
        let output: serde_json::Value =
            serde_json::from_slice(&rendered).expect("renders of a Value-clean body are too");
        assert_eq!(output["expires_in"], token.remaining_secs(at));
        let (mut a, mut b) = (
            input.as_object().unwrap().clone(),
            output.as_object().unwrap().clone(),
        );
        a.remove("expires_in");
        b.remove("expires_in");
        assert_eq!(a, b, "render changed another member");
    }
});
