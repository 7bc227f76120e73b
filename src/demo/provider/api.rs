//! The provider's stand-in for a resource server: `GET /api/v2/users/me` and `POST
//! /api/v2/echo` accept the bearer tokens this provider issued (or those of a provider whose
//! tokens it accepts), and a revocation makes them answer 401, as an API does to revoked tokens.

use bytes::Bytes;
use http::{HeaderMap, Response, StatusCode, header};
use http_body_util::Full;

use super::{Provider, json, lock};

impl Provider {
    /// `POST /api/v2/echo`: with a bearer this provider issued, the body's length and SHA-256.
    pub(super) fn echo(&self, headers: &HeaderMap, body: &Bytes) -> Response<Full<Bytes>> {
        if self.users_me(headers).status() != StatusCode::OK {
            return self.users_me(headers);
        }
        let digest: String = <sha2::Sha256 as sha2::Digest>::digest(body)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let reply = serde_json::json!({"bytes": body.len(), "sha256": digest});
        json(StatusCode::OK, reply.to_string())
    }

    /// `POST /api/v2/notifications/channels`: with a bearer this provider issued, a new channel.
    pub(super) fn channel(&self, headers: &HeaderMap) -> Response<Full<Bytes>> {
        let me = self.users_me(headers);
        if me.status() != StatusCode::OK {
            return me;
        }
        let id = format!("channel-{}", rand::random::<u32>());
        let reply = serde_json::json!({"id": id, "connectUri": format!("wss://streaming.invalid/channels/{id}")});
        json(StatusCode::OK, reply.to_string())
    }

    /// Forgets every access token issued so far: the API stand-in answers 401 to them, as a
    /// resource server does to revoked tokens.
    pub fn revoke_issued(&self) {
        let issued = self.script().issued.clone();
        lock(&issued).clear();
    }

    /// The API endpoint: 200 with a fake user for `Authorization: Bearer <an issued token>`, else
    /// a 401 in Genesys Cloud's error shape.
    pub(super) fn users_me(&self, headers: &HeaderMap) -> Response<Full<Bytes>> {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        let issued = self.script().issued.clone();
        if bearer.is_some_and(|token| lock(&issued).contains(token)) {
            let body =
                serde_json::json!({"id": "fake-user", "name": "Fake User", "state": "active"});
            json(StatusCode::OK, body.to_string())
        } else {
            let body = serde_json::json!({"message": "bad token", "code": "bad.credentials", "status": 401});
            json(StatusCode::UNAUTHORIZED, body.to_string())
        }
    }
}
