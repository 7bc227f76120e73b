//! A first end-to-end check: a cold request, then a hit.
use crate::support;

use support::Fixture;

#[tokio::test]
async fn second_request_is_a_hit() {
    let fx = Fixture::start("").await;
    let form = "grant_type=client_credentials&client_id=app&client_secret=s3cret";
    let first = fx.post_token(form).await;
    assert_eq!(first.status, 200, "{}", first.text());
    let second = fx.post_token(form).await;
    assert_eq!(second.status, 200);
    assert_eq!(first.json()["access_token"], second.json()["access_token"]);
    assert!(
        second.header("cache-status").unwrap().contains("hit"),
        "{:?}",
        second.headers
    );
    assert_eq!(fx.idp.token_calls(), 1);
    fx.sidecar.stop().await.unwrap();
}
