//! The provider's check of signed client assertions (RFC 7523, `private_key_jwt`): the signature
//! against the client's public key, the audience (the token URL), the expiry, `iss` = `sub` =
//! the client id, and a `jti` never seen before (an assertion is good for one call).

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use std::collections::HashSet;

/// What a verified assertion stands for in place of a secret.
pub(super) const ASSERTED: &str = "\u{0}asserted";

/// One client's public key and what its assertions must say.
pub(super) struct AssertionCheck {
    key: DecodingKey,
    validation: Validation,
    seen: HashSet<String>,
}

impl std::fmt::Debug for AssertionCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AssertionCheck")
            .field("seen", &self.seen.len())
            .finish_non_exhaustive()
    }
}

#[derive(serde::Deserialize)]
struct Claims {
    iss: String,
    sub: String,
    jti: String,
}

impl AssertionCheck {
    /// A check with the PEM public key `pem` (RSA: RS256; EC: ES256) for `audience`.
    pub(super) fn new(pem: &[u8], audience: &str) -> Option<AssertionCheck> {
        let (key, alg) = match DecodingKey::from_rsa_pem(pem) {
            Ok(key) => (key, Algorithm::RS256),
            Err(_) => (DecodingKey::from_ec_pem(pem).ok()?, Algorithm::ES256),
        };
        let mut validation = Validation::new(alg);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
        validation.leeway = 0;
        Some(AssertionCheck {
            key,
            validation,
            seen: HashSet::new(),
        })
    }

    /// `None` without an assertion in `form`; else the client id it proves, or `Some(None)`
    /// if it proves nothing (bad signature, audience, expiry, claims, or a `jti` replayed).
    pub(super) fn verify(&mut self, form: &[(String, String)]) -> Option<Option<String>> {
        let assertion = form
            .iter()
            .find(|(name, _)| name == "client_assertion")
            .map(|(_, value)| value)?;
        let Ok(data) = jsonwebtoken::decode::<Claims>(assertion, &self.key, &self.validation)
        else {
            return Some(None);
        };
        let claims = data.claims;
        let named = form
            .iter()
            .find(|(name, _)| name == "client_id")
            .is_none_or(|(_, id)| *id == claims.iss);
        if claims.iss != claims.sub || !named || !self.seen.insert(claims.jti) {
            return Some(None);
        }
        Some(Some(claims.iss))
    }
}
