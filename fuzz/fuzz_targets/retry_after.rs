//! Fuzzes `Retry-After` parsing. The first four bytes move the wall clock (whole seconds from
//! 2001 on), the rest is the header value.
//!
//! Oracles beyond "no panic": a usable HTTP-date is strictly in the future, lands on a whole
//! second, and its canonical IMF-fixdate spelling gives the same wait.
#![no_main]

use http::HeaderValue;
use libfuzzer_sys::fuzz_target;
use std::time::{Duration, UNIX_EPOCH};
use token_sidecar::token::cooldown::parse_retry_after;

fuzz_target!(|data: &[u8]| {
    let (clock, header) = data.split_at(data.len().min(4));
    let mut offset = [0u8; 4];
    offset[..clock.len()].copy_from_slice(clock);
    let now =
        UNIX_EPOCH + Duration::from_secs(1_000_000_000 + u64::from(u32::from_le_bytes(offset)));
    let Ok(value) = HeaderValue::from_bytes(header) else {
        return;
    };
    let Some(wait) = parse_retry_after(&value, now) else {
        return;
    };
    let text = value.to_str().expect("a usable value is text").trim();
    if text.bytes().all(|b| b.is_ascii_digit()) {
        return;
    }
    assert!(!wait.is_zero(), "a date gave a zero wait");
    let date = now + wait;
    let since_epoch = date.duration_since(UNIX_EPOCH).expect("after the epoch");
    assert_eq!(
        since_epoch.subsec_nanos(),
        0,
        "HTTP-dates have whole seconds"
    );
    let canonical = HeaderValue::from_str(&httpdate::fmt_http_date(date)).expect("ASCII");
    assert_eq!(parse_retry_after(&canonical, now), Some(wait), "{text:?}");
});
