//! Signed client assertions (RFC 7523, `private_key_jwt`) for credential injection: a fresh JWT
//! for every token call (iss = sub = the client id, aud = the token URL, a random jti, a one-minute
//! exp), signed with the route's RS256 or ES256 key, put in the form in place of the stable
//! stand-in the token path keys the request by (the assertion changes every call; the key must
//! not).

use bytes::Bytes;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use std::time::{SystemTime, UNIX_EPOCH};

/// How long an assertion is valid.
const LIFETIME_S: u64 = 60;

/// The form parameter the token path keys an asserting client by, in place of a secret.
pub(crate) const STAND_IN: &str = "client_secret";

/// Signs a client's assertions.
pub(crate) struct Signer {
    key: EncodingKey,
    header: Header,
    client_id: String,
    audience: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("alg", &self.header.alg)
            .finish_non_exhaustive()
    }
}

#[derive(serde::Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    jti: String,
    iat: u64,
    exp: u64,
}

impl Signer {
    /// A signer with the PEM private key `pem` (RSA: RS256; EC P-256: ES256), or why not.
    pub(crate) fn new(
        pem: &[u8],
        kid: Option<String>,
        client_id: &str,
        audience: &str,
    ) -> Result<Signer, &'static str> {
        let (key, alg) = match EncodingKey::from_rsa_pem(pem) {
            Ok(key) => (key, Algorithm::RS256),
            Err(_) => match EncodingKey::from_ec_pem(pem) {
                Ok(key) => (key, Algorithm::ES256),
                Err(_) => return Err("not an RSA or EC (P-256) private key in PEM"),
            },
        };
        let mut header = Header::new(alg);
        header.kid = kid;
        let signer = Signer {
            key,
            header,
            client_id: client_id.to_owned(),
            audience: audience.to_owned(),
        };
        // A key that parses but cannot sign (a P-384 key for ES256) fails here, not on a call.
        signer.assertion()?;
        Ok(signer)
    }

    /// A fresh assertion.
    fn assertion(&self) -> Result<String, &'static str> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let claims = Claims {
            iss: &self.client_id,
            sub: &self.client_id,
            aud: &self.audience,
            jti: format!("{:032x}", rand::random::<u128>()),
            iat: now,
            exp: now + LIFETIME_S,
        };
        jsonwebtoken::encode(&self.header, &claims, &self.key)
            .map_err(|_| "the key cannot sign an assertion")
    }

    /// The form to send for `keyed` (the form the token path keyed): its stand-in secret
    /// replaced by a fresh assertion. `None` if signing fails.
    pub(crate) fn sign(&self, keyed: &Bytes) -> Option<Bytes> {
        let assertion = self.assertion().ok()?;
        let mut form: Vec<&[u8]> = keyed
            .split(|b| *b == b'&')
            .filter(|pair| !pair.starts_with(format!("{STAND_IN}=").as_bytes()))
            .collect();
        let tail = format!(
            "client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer&client_assertion={assertion}"
        );
        form.push(tail.as_bytes());
        Some(Bytes::from(form.join(&b'&')))
    }
}
