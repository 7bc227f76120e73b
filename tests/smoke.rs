//! A first end-to-end check: a cold request, then a hit.
mod support;

use support::sidecar::Sidecar;
use support::{FakeProvider, client, post_form};

#[tokio::test]
async fn second_request_is_a_hit() {
    let idp = FakeProvider::start().await;
    let sidecar = Sidecar::start(&idp.url()).await;
    let c = client();
    let form = "grant_type=client_credentials&client_id=app&client_secret=s3cret";
    let first = post_form(&c, &sidecar.token_url(), form, None).await;
    assert_eq!(first.status, 200, "{}", first.text());
    let second = post_form(&c, &sidecar.token_url(), form, None).await;
    assert_eq!(second.status, 200);
    assert_eq!(first.json()["access_token"], second.json()["access_token"]);
    assert!(
        second.header("cache-status").unwrap().contains("hit"),
        "{:?}",
        second.headers
    );
    assert_eq!(idp.token_calls(), 1);
    sidecar.stop().await.unwrap();
}
