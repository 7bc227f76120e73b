//! HTTPS for the fake provider and the test client: a throwaway PKI made with rcgen, provider
//! server configs for TLS and mutual TLS (served through `tokio_rustls::TlsAcceptor`), and a
//! client that trusts only a given CA.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::FakeProvider;

/// A CA with a server leaf (for `localhost`/`127.0.0.1`) and a client leaf, all as PEM.
pub struct Pki {
    pub ca: String,
    pub server_cert: String,
    pub server_key: String,
    pub client_cert: String,
    pub client_key: String,
}

/// A fresh CA that signed a server certificate and a client certificate.
pub fn test_pki() -> Pki {
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "token-sidecar test CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).expect("CA cert");
    let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().expect("leaf key");
        let mut params = CertificateParams::new(names).expect("leaf params");
        params
            .distinguished_name
            .push(DnType::CommonName, "token-sidecar test leaf");
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        let cert = params
            .signed_by(&key, &ca_cert, &ca_key)
            .expect("leaf cert");
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(
        vec!["localhost".into(), "127.0.0.1".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client_cert, client_key) = leaf(
        vec!["token-sidecar".into()],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    Pki {
        ca: ca_cert.pem(),
        server_cert,
        server_key,
        client_cert,
        client_key,
    }
}

impl FakeProvider {
    /// Starts an HTTPS provider with the PKI's server certificate. ALPN offers `h2` and
    /// `http/1.1`.
    pub async fn start_tls(pki: &Pki) -> FakeProvider {
        let config = server_config(pki, None, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
        Self::spawn_on(Some(config), 0).await
    }

    /// Starts an HTTPS provider that requires a client certificate signed by the PKI's CA. ALPN
    /// offers `http/1.1` only.
    pub async fn start_mtls(pki: &Pki) -> FakeProvider {
        let config = server_config(pki, Some(&pki.ca), vec![b"http/1.1".to_vec()]);
        Self::spawn_on(Some(config), 0).await
    }
}

fn ring() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate in `pem`, as a root store.
fn roots(pem: &str) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        roots
            .add(cert.expect("CA PEM is not valid"))
            .expect("CA certificate rejected");
    }
    roots
}

/// The provider's server config: the PKI's server leaf, client certificates signed by
/// `client_ca` required when it is given, and these ALPN protocols.
fn server_config(
    pki: &Pki,
    client_ca: Option<&str>,
    alpn: Vec<Vec<u8>>,
) -> Arc<rustls::ServerConfig> {
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(pki.server_cert.as_bytes())
            .collect::<Result<_, _>>()
            .expect("server_cert is not valid PEM");
    assert!(!certs.is_empty(), "server_cert holds no certificate");
    let key = PrivateKeyDer::from_pem_slice(pki.server_key.as_bytes())
        .expect("server_key holds no usable private key");
    let builder = rustls::ServerConfig::builder_with_provider(ring())
        .with_safe_default_protocol_versions()
        .expect("protocol versions");
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => builder.with_client_cert_verifier(
            rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots(ca)),
                ring(),
            )
            .build()
            .expect("client certificate verifier"),
        ),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .expect("certificate and key do not match");
    config.alpn_protocols = alpn;
    Arc::new(config)
}

/// An HTTPS (and plain HTTP) test client; see [`tls_client`].
pub type TlsClient =
    hyper_util::client::legacy::Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// An HTTPS (and plain HTTP) HTTP/1 client that trusts only the CA certificates in `ca_pem`.
pub fn tls_client(ca_pem: &str) -> TlsClient {
    let config = rustls::ClientConfig::builder_with_provider(ring())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots(ca_pem))
        .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_or_http()
        .enable_http1()
        .build();
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(2048)
        .build(connector)
}
