//! The fleet tier's cryptography: the keys derived from the fleet secret (HKDF-SHA256, one per
//! purpose; `config` reads and checks the secret itself), the sealing of what Redis holds
//! (AES-256-GCM with a random nonce, the Redis key name as associated data, so an entry copied
//! to another name does not open), and the MAC of cool-down deadlines.
//!
//! Redis sees key names that are HMACs under a derived key, and values it cannot open: the value
//! key is derived from the fleet secret *and* the caller's whole key material, client secret
//! included (see `token::fleet`), so Redis plus the fleet secret still opens nothing.

use bytes::{BufMut, Bytes, BytesMut};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hkdf::{HKDF_SHA256, Salt};
use ring::rand::{SecureRandom, SystemRandom};

use crate::config::FleetSecret;

/// The first byte of every sealed value: the format, so a later one can be told apart.
const FORMAT: u8 = 1;

/// Keys are derived here, from the secret [`crate::config`] read and checked.
impl FleetSecret {
    /// The 32-byte key for `purpose`, HKDF-SHA256 of the secret: each purpose gets a key of its
    /// own, and none of them reveals the secret or another.
    pub fn derive(&self, purpose: &str) -> [u8; 32] {
        struct Len32;
        impl ring::hkdf::KeyType for Len32 {
            fn len(&self) -> usize {
                32
            }
        }
        let prk = Salt::new(HKDF_SHA256, b"token-sidecar fleet v1").extract(self.bytes());
        let info = [purpose.as_bytes()];
        let okm = prk
            .expand(&info, Len32)
            .expect("32 bytes is a valid HKDF length");
        let mut key = [0u8; 32];
        okm.fill(&mut key).expect("32 bytes is a valid HKDF length");
        key
    }
}

/// A token as the fleet shares it: the answer body and its clock, as Unix milliseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The provider's `Content-Type`.
    pub content_type: String,
    /// The token answer as the sidecar serves it.
    pub body: Bytes,
    /// When the token stops working.
    pub expires_ms: u64,
    /// The last moment it is handed out (the Redis TTL ends here too).
    pub serve_ms: u64,
    /// When the fleet refreshes it; 0 for never.
    pub refresh_ms: u64,
}

impl Entry {
    fn encode(&self) -> Vec<u8> {
        let ct = self.content_type.as_bytes();
        let mut out = BytesMut::with_capacity(26 + ct.len() + self.body.len() + 16);
        out.put_u64(self.expires_ms);
        out.put_u64(self.serve_ms);
        out.put_u64(self.refresh_ms);
        out.put_u16(ct.len().min(u16::MAX as usize) as u16);
        out.put_slice(&ct[..ct.len().min(u16::MAX as usize)]);
        out.put_slice(&self.body);
        out.to_vec()
    }

    fn decode(plain: &[u8]) -> Option<Entry> {
        let number = |at: usize| -> Option<u64> {
            Some(u64::from_be_bytes(plain.get(at..at + 8)?.try_into().ok()?))
        };
        let ct_len = usize::from(u16::from_be_bytes(plain.get(24..26)?.try_into().ok()?));
        let content_type = std::str::from_utf8(plain.get(26..26 + ct_len)?).ok()?;
        Some(Entry {
            expires_ms: number(0)?,
            serve_ms: number(8)?,
            refresh_ms: number(16)?,
            content_type: content_type.to_owned(),
            body: Bytes::copy_from_slice(&plain[26 + ct_len..]),
        })
    }
}

/// Seals `entry` under `key` for the Redis key `name`: format byte, nonce, ciphertext and tag.
/// `None` if the system's random source fails (then nothing is shared, and the pod goes on
/// alone for this token).
pub fn seal(key: &[u8; 32], name: &str, entry: &Entry) -> Option<Vec<u8>> {
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).ok()?);
    let mut nonce = [0u8; NONCE_LEN];
    SystemRandom::new().fill(&mut nonce).ok()?;
    let mut data = entry.encode();
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(name.as_bytes()),
        &mut data,
    )
    .ok()?;
    let mut out = Vec::with_capacity(1 + NONCE_LEN + data.len());
    out.push(FORMAT);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&data);
    Some(out)
}

/// Opens a value sealed by [`seal`]; `None` if another key or name sealed it, or it was altered.
pub fn open(key: &[u8; 32], name: &str, sealed: &[u8]) -> Option<Entry> {
    let (&format, rest) = sealed.split_first()?;
    if format != FORMAT || rest.len() < NONCE_LEN {
        return None;
    }
    let (nonce, data) = rest.split_at(NONCE_LEN);
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).ok()?);
    let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
    let mut data = data.to_vec();
    let plain = key
        .open_in_place(nonce, Aad::from(name.as_bytes()), &mut data)
        .ok()?;
    Entry::decode(plain)
}

/// A fleet cool-down's value: its deadline (Unix milliseconds) and a MAC of it and the
/// cool-down's name under `key`, so that nobody without the fleet secret can write a hold that
/// pods obey, and a valid one copied to another client's name or replayed later does nothing
/// (its deadline is in it).
pub fn hold_value(key: &[u8; 32], name: &str, deadline_ms: u64) -> String {
    let tag = hold_mac(key, name, deadline_ms);
    let mac: String = tag.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{deadline_ms}.{mac}")
}

/// The deadline of a cool-down value made by [`hold_value`] for `name` under `key`; `None` if
/// it was not (forged, altered, or another name's).
pub fn hold_deadline(key: &[u8; 32], name: &str, value: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(value).ok()?;
    let (deadline, mac) = text.split_once('.')?;
    let deadline_ms: u64 = deadline.parse().ok()?;
    let expected = hold_value(key, name, deadline_ms);
    let expected = &expected.as_bytes()[expected.len() - 32..];
    // Compared in constant time: the MAC is what a forger would guess at.
    let differ = mac.len() != 32
        || expected
            .iter()
            .zip(mac.as_bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            != 0;
    (!differ).then_some(deadline_ms)
}

fn hold_mac(key: &[u8; 32], name: &str, deadline_ms: u64) -> ring::hmac::Tag {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let mut context = ring::hmac::Context::with_key(&key);
    context.update(name.as_bytes());
    context.update(&deadline_ms.to_be_bytes());
    context.sign()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        Entry {
            content_type: "application/json".into(),
            body: Bytes::from_static(br#"{"access_token":"tok-123","expires_in":60}"#),
            expires_ms: 1_000_060_000,
            serve_ms: 1_000_050_000,
            refresh_ms: 1_000_040_000,
        }
    }

    #[test]
    fn a_sealed_entry_opens_only_with_its_key_and_name() {
        let key = [7u8; 32];
        let sealed = seal(&key, "tsc:t:ab", &entry()).unwrap();
        assert_eq!(open(&key, "tsc:t:ab", &sealed), Some(entry()));
        assert_eq!(open(&[8u8; 32], "tsc:t:ab", &sealed), None, "another key");
        assert_eq!(open(&key, "tsc:t:cd", &sealed), None, "another name");
        let mut altered = sealed.clone();
        *altered.last_mut().unwrap() ^= 1;
        assert_eq!(open(&key, "tsc:t:ab", &altered), None, "altered");
        assert_eq!(open(&key, "tsc:t:ab", &sealed[..10]), None, "truncated");
        assert!(
            !sealed.windows(7).any(|w| w == b"tok-123"),
            "no plaintext token in the sealed bytes"
        );
        assert_ne!(
            seal(&key, "tsc:t:ab", &entry()).unwrap(),
            sealed,
            "a fresh nonce each time"
        );
    }

    #[test]
    fn a_hold_value_checks_only_for_its_name_and_deadline() {
        let key = [9u8; 32];
        let value = hold_value(&key, "tsc:{c}:c:proven", 1_000);
        assert_eq!(
            hold_deadline(&key, "tsc:{c}:c:proven", value.as_bytes()),
            Some(1_000)
        );
        assert_eq!(
            hold_deadline(&[1u8; 32], "tsc:{c}:c:proven", value.as_bytes()),
            None
        );
        assert_eq!(
            hold_deadline(&key, "tsc:{d}:c:proven", value.as_bytes()),
            None
        );
        let later = value.replacen("1000", "9000", 1);
        assert_eq!(
            hold_deadline(&key, "tsc:{c}:c:proven", later.as_bytes()),
            None
        );
        for forged in [&b"1"[..], b"", b"99999999999999.", b"\xff.00"] {
            assert_eq!(hold_deadline(&key, "tsc:{c}:c:proven", forged), None);
        }
    }

    #[test]
    fn secrets_must_be_long_enough_and_purposes_get_their_own_keys() {
        assert!(FleetSecret::from_file_bytes(b"short\n").is_err());
        let secret = FleetSecret::from_file_bytes(&[b'x'; 40]).unwrap();
        let trimmed = FleetSecret::from_file_bytes(&[&[b'x'; 40][..], b"\n"].concat()).unwrap();
        assert_eq!(secret.derive("names"), trimmed.derive("names"));
        assert_ne!(secret.derive("names"), secret.derive("values"));
        let other = FleetSecret::from_file_bytes(&[b'y'; 40]).unwrap();
        assert_ne!(secret.derive("names"), other.derive("names"));
        assert_eq!(format!("{secret:?}"), "FleetSecret(..)");
    }
}
