//! Each redirect hop is checked anew: a loopback server let through by exact socket address (the
//! test-only exemption) redirects to other private addresses, which must be refused before any
//! connection to them.

#[path = "../tests/common/mod.rs"]
mod common;

use common::{png_response, redirect, response, TestServer};

use crate::{fetch_image_with, MediaError, MediaPolicy};

#[tokio::test]
async fn every_redirect_hop_is_checked_before_connecting() {
    let other = TestServer::start(|_| png_response()).await;
    let other_port = other.port();
    let first = TestServer::start(move |path| match path {
        "/img" => png_response(),
        "/self" => redirect(302, "/img"),
        "/to-ip" => redirect(302, &format!("http://127.0.0.1:{other_port}/img")),
        "/to-localhost" => redirect(307, &format!("http://localhost:{other_port}/img")),
        "/to-mapped" => redirect(301, &format!("http://[::ffff:127.0.0.1]:{other_port}/img")),
        "/to-zero" => redirect(308, &format!("http://0.0.0.0:{other_port}/img")),
        "/to-metadata" => redirect(302, "http://169.254.169.254/latest/meta-data/"),
        "/to-private" => redirect(303, "http://10.0.0.1/img"),
        "/to-ula" => redirect(302, "http://[fd00::1]/img"),
        "/chain" => redirect(302, "/to-ip"),
        _ => response(404, &[], b""),
    })
    .await;
    let policy = MediaPolicy::default();
    let exempt = [first.addr];

    // The exemption lets the first server through, redirects to itself included.
    let bytes = fetch_image_with(&first.url("/self"), &policy, &exempt).await.unwrap();
    assert_eq!(bytes, common::PNG);

    for (path, addr, reason) in [
        ("/to-ip", "127.0.0.1", "loopback"),
        ("/to-localhost", "", "loopback"),
        ("/to-mapped", "::ffff:127.0.0.1", "loopback"),
        ("/to-zero", "0.0.0.0", "unspecified"),
        ("/to-metadata", "169.254.169.254", "link-local"),
        ("/to-private", "10.0.0.1", "private"),
        ("/to-ula", "fd00::1", "unique-local"),
        ("/chain", "127.0.0.1", "loopback"),
    ] {
        let err = fetch_image_with(&first.url(path), &policy, &exempt).await.unwrap_err();
        let MediaError::RefusedAddress {
            addr: refused,
            reason: why,
            ..
        } = &err
        else {
            panic!("{path}: expected RefusedAddress, got {err:?}");
        };
        if !addr.is_empty() {
            assert_eq!(refused.to_string(), addr, "{path}");
        }
        assert!(why.contains(reason), "{path}: {err}");
        assert!(err.is_client_error());
    }
    assert_eq!(
        other.connection_count(),
        0,
        "a refused hop reached the server: {:?}",
        other.requests()
    );

    // With private addresses allowed, the same chains are followed.
    let open = MediaPolicy {
        allow_private_urls: true,
        ..MediaPolicy::default()
    };
    assert_eq!(
        fetch_image_with(&first.url("/to-ip"), &open, &[]).await.unwrap(),
        common::PNG
    );
    assert_eq!(
        fetch_image_with(&first.url("/chain"), &open, &[]).await.unwrap(),
        common::PNG
    );
    assert_eq!(other.requests(), vec!["/img", "/img"]);
}
