//! fetch_image over loopback servers, data URIs and local files. Only 127.0.0.1 / ::1 are ever
//! connected to; the private and link-local addresses below appear only in refusal tests, which
//! must fail before any connection.

mod common;

use std::time::{Duration, Instant};

use common::{png_response, redirect, response, Step, TestServer, PNG};
use dsvl2_media::{fetch_image, parse_data_uri, MediaError, MediaPolicy};

fn open_policy() -> MediaPolicy {
    MediaPolicy {
        allow_private_urls: true,
        ..MediaPolicy::default()
    }
}

fn b64(bytes: &[u8]) -> String {
    use std::fmt::Write;
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (*b as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.write_char(T[(n >> (18 - 6 * i) & 63) as usize] as char).unwrap();
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[tokio::test]
async fn fetches_a_png() {
    let server = TestServer::start(|_| png_response()).await;
    let bytes = fetch_image(&server.url("/cat.png?size=1"), &open_policy())
        .await
        .unwrap();
    assert_eq!(bytes, PNG);
    assert_eq!(server.requests(), vec!["/cat.png?size=1"]);
}

#[tokio::test]
async fn content_type_is_not_trusted() {
    let server = TestServer::start(|path| match path {
        "/png-as-html" => response(200, &[("Content-Type", "text/html")], PNG),
        _ => response(
            200,
            &[("Content-Type", "image/png")],
            b"<!DOCTYPE html><html><body>hello</body></html>",
        ),
    })
    .await;
    assert_eq!(
        fetch_image(&server.url("/png-as-html"), &open_policy()).await.unwrap(),
        PNG
    );
    let err = fetch_image(&server.url("/html-as-png"), &open_policy())
        .await
        .unwrap_err();
    assert!(matches!(err, MediaError::NotAnImage { .. }), "{err:?}");
    assert!(err.to_string().contains("HTML"), "{err}");
    assert!(err.is_client_error());
}

#[tokio::test]
async fn short_and_empty_non_images_are_refused() {
    let server = TestServer::start(|path| match path {
        "/empty" => response(200, &[], b""),
        _ => response(200, &[], b"hi"),
    })
    .await;
    for path in ["/empty", "/short"] {
        let err = fetch_image(&server.url(path), &open_policy()).await.unwrap_err();
        assert!(matches!(err, MediaError::NotAnImage { .. }), "{path}: {err:?}");
    }
}

#[tokio::test]
async fn content_length_over_the_cap_is_refused() {
    let server = TestServer::start(|_| {
        let mut body = PNG.to_vec();
        body.resize(10_000, 0);
        response(200, &[], &body)
    })
    .await;
    let policy = MediaPolicy {
        max_bytes: 1000,
        ..open_policy()
    };
    let err = fetch_image(&server.url("/big.png"), &policy).await.unwrap_err();
    assert!(
        matches!(
            err,
            MediaError::TooLarge {
                size: Some(10_000),
                limit: 1000,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("10000 bytes exceeds the limit of 1000 bytes"),
        "{err}"
    );
    // Exactly at the cap is fine.
    let policy = MediaPolicy {
        max_bytes: 10_000,
        ..open_policy()
    };
    assert_eq!(
        fetch_image(&server.url("/big.png"), &policy).await.unwrap().len(),
        10_000
    );
}

#[tokio::test]
async fn chunked_body_over_the_cap_is_refused_mid_stream() {
    // 200 chunks of 1000 bytes, 10 ms apart: 2 s to send it all.
    let server = TestServer::start(|_| {
        let mut steps = vec![Step::Write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec(),
        )];
        for i in 0..200 {
            let mut data = if i == 0 { PNG.to_vec() } else { Vec::new() };
            data.resize(1000, 7);
            let mut chunk = format!("{:x}\r\n", data.len()).into_bytes();
            chunk.extend_from_slice(&data);
            chunk.extend_from_slice(b"\r\n");
            steps.push(Step::Write(chunk));
            steps.push(Step::Sleep(Duration::from_millis(10)));
        }
        steps.push(Step::Write(b"0\r\n\r\n".to_vec()));
        steps
    })
    .await;
    let policy = MediaPolicy {
        max_bytes: 5_500,
        ..open_policy()
    };
    let start = Instant::now();
    let err = fetch_image(&server.url("/stream.png"), &policy).await.unwrap_err();
    assert!(
        matches!(
            err,
            MediaError::TooLarge {
                size: None,
                limit: 5_500,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        start.elapsed() < Duration::from_millis(1500),
        "not stopped mid-stream: {:?}",
        start.elapsed()
    );
    // The same stream is accepted under a larger cap.
    let policy = MediaPolicy {
        max_bytes: 200_000,
        ..open_policy()
    };
    assert_eq!(
        fetch_image(&server.url("/stream.png"), &policy).await.unwrap().len(),
        200_000
    );
}

#[tokio::test]
async fn a_slow_server_hits_the_timeout() {
    let server = TestServer::start(|path| match path {
        // Headers and the start of the body, then nothing.
        "/slow-body" => vec![
            Step::Write(format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", PNG.len()).into_bytes()),
            Step::Write(PNG[..20].to_vec()),
            Step::Sleep(Duration::from_secs(30)),
        ],
        // No answer at all.
        _ => vec![Step::Sleep(Duration::from_secs(30))],
    })
    .await;
    let policy = MediaPolicy {
        timeout: Duration::from_millis(300),
        ..open_policy()
    };
    for path in ["/slow-body", "/slow-head"] {
        let start = Instant::now();
        let err = fetch_image(&server.url(path), &policy).await.unwrap_err();
        assert!(matches!(err, MediaError::Timeout { .. }), "{path}: {err:?}");
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{path}: {:?}",
            start.elapsed()
        );
        assert!(err.to_string().contains("timed out after 300 ms"), "{err}");
        assert!(!err.is_client_error());
        assert_eq!(err.http_status(), 504);
    }
}

#[tokio::test]
async fn redirects_are_followed_up_to_the_limit() {
    let server = TestServer::start(|path| {
        let Some(n) = path.strip_prefix("/r/").and_then(|n| n.parse::<u32>().ok()) else {
            return png_response();
        };
        match n {
            0 => redirect(302, "/img.png"),
            // Every redirect status, relative and absolute locations.
            n => redirect([301, 302, 303, 307, 308][n as usize % 5], &format!("/r/{}", n - 1)),
        }
    })
    .await;
    let policy = MediaPolicy {
        max_redirects: 5,
        ..open_policy()
    };
    // /r/4 -> /r/3 -> ... -> /r/0 -> /img.png: five redirects.
    assert_eq!(fetch_image(&server.url("/r/4"), &policy).await.unwrap(), PNG);
    let before = server.requests().len();
    let err = fetch_image(&server.url("/r/5"), &policy).await.unwrap_err();
    assert!(matches!(err, MediaError::TooManyRedirects { limit: 5, .. }), "{err:?}");
    assert!(
        err.to_string().contains("/r/5"),
        "the message names the original reference: {err}"
    );
    // Six requests (the original and five redirects), never the seventh.
    assert_eq!(
        server.requests()[before..],
        ["/r/5", "/r/4", "/r/3", "/r/2", "/r/1", "/r/0"]
    );

    let none = MediaPolicy {
        max_redirects: 0,
        ..open_policy()
    };
    assert_eq!(fetch_image(&server.url("/img.png"), &none).await.unwrap(), PNG);
    let err = fetch_image(&server.url("/r/0"), &none).await.unwrap_err();
    assert!(matches!(err, MediaError::TooManyRedirects { limit: 0, .. }), "{err:?}");
}

#[tokio::test]
async fn redirects_across_servers_and_bad_redirects() {
    let target = TestServer::start(|_| png_response()).await;
    let target_url = target.url("/img.png");
    let server = TestServer::start(move |path| match path {
        "/elsewhere" => redirect(302, &target_url),
        "/to-file" => redirect(302, "file:///etc/passwd"),
        "/to-data" => redirect(302, &format!("data:image/png;base64,{}", b64(PNG))),
        "/to-gopher" => redirect(302, "gopher://127.0.0.1:70/"),
        "/no-location" => response(302, &[], b""),
        "/missing" => response(404, &[], b"not found"),
        "/broken" => response(503, &[], b""),
        _ => png_response(),
    })
    .await;
    assert_eq!(
        fetch_image(&server.url("/elsewhere"), &open_policy()).await.unwrap(),
        PNG
    );
    assert_eq!(target.requests(), vec!["/img.png"]);
    for (path, scheme) in [("/to-file", "file"), ("/to-data", "data"), ("/to-gopher", "gopher")] {
        let err = fetch_image(&server.url(path), &open_policy()).await.unwrap_err();
        assert!(
            matches!(&err, MediaError::UnsupportedScheme { scheme: s, .. } if s == scheme),
            "{path}: {err:?}"
        );
    }
    let err = fetch_image(&server.url("/no-location"), &open_policy())
        .await
        .unwrap_err();
    assert!(matches!(err, MediaError::BadRedirect { .. }), "{err:?}");
    let err = fetch_image(&server.url("/missing"), &open_policy()).await.unwrap_err();
    assert!(matches!(err, MediaError::HttpStatus { status: 404, .. }), "{err:?}");
    assert!(err.is_client_error());
    let err = fetch_image(&server.url("/broken"), &open_policy()).await.unwrap_err();
    assert!(matches!(err, MediaError::HttpStatus { status: 503, .. }), "{err:?}");
    assert!(!err.is_client_error());
    assert_eq!(err.http_status(), 502);
}

#[tokio::test]
async fn non_public_addresses_are_refused_before_connecting() {
    let server = TestServer::start(|_| png_response()).await;
    let v6 = TestServer::start_on("[::1]:0".parse().unwrap(), |_| png_response()).await;
    let port = server.port();
    let v6_port = v6.as_ref().map_or(port, |s| s.port());
    let cases = [
        (format!("http://127.0.0.1:{port}/x"), Some("127.0.0.1"), "loopback"),
        (format!("http://localhost:{port}/x"), None, "loopback"),
        (format!("http://127.1:{port}/x"), Some("127.0.0.1"), "loopback"),
        (format!("http://2130706433:{port}/x"), Some("127.0.0.1"), "loopback"),
        (format!("http://0x7f.0.0.1:{port}/x"), Some("127.0.0.1"), "loopback"),
        (format!("http://[::1]:{v6_port}/x"), Some("::1"), "loopback"),
        (
            format!("http://[::ffff:127.0.0.1]:{port}/x"),
            Some("::ffff:127.0.0.1"),
            "loopback",
        ),
        (
            format!("http://[::127.0.0.1]:{port}/x"),
            Some("::7f00:1"),
            "IPv4-compatible",
        ),
        (
            format!("http://[64:ff9b::127.0.0.1]:{port}/x"),
            Some("64:ff9b::7f00:1"),
            "loopback",
        ),
        (format!("http://0.0.0.0:{port}/x"), Some("0.0.0.0"), "unspecified"),
        (format!("http://[::]:{v6_port}/x"), Some("::"), "unspecified"),
        (
            "http://169.254.169.254/latest/meta-data/".to_string(),
            Some("169.254.169.254"),
            "link-local",
        ),
        ("http://10.0.0.1/".to_string(), Some("10.0.0.1"), "private"),
        (
            "https://192.168.1.1/img.png".to_string(),
            Some("192.168.1.1"),
            "private",
        ),
        ("http://172.16.0.1/".to_string(), Some("172.16.0.1"), "private"),
        (
            "http://100.64.0.1/".to_string(),
            Some("100.64.0.1"),
            "carrier-grade NAT",
        ),
        ("http://[fd00::1]/".to_string(), Some("fd00::1"), "unique-local"),
        ("http://[fe80::1]/".to_string(), Some("fe80::1"), "link-local"),
        ("http://224.0.0.1/".to_string(), Some("224.0.0.1"), "multicast"),
        (
            "http://255.255.255.255/".to_string(),
            Some("255.255.255.255"),
            "broadcast",
        ),
    ];
    for (url, addr, reason) in &cases {
        let start = Instant::now();
        let err = fetch_image(url, &MediaPolicy::default()).await.unwrap_err();
        let MediaError::RefusedAddress {
            addr: refused,
            reason: why,
            ..
        } = &err
        else {
            panic!("{url}: expected RefusedAddress, got {err:?}");
        };
        if let Some(addr) = addr {
            assert_eq!(&refused.to_string(), addr, "{url}");
        }
        assert!(why.contains(reason), "{url}: {err}");
        assert!(err.to_string().contains(&refused.to_string()), "{url}: {err}");
        assert!(err.is_client_error());
        assert_eq!(err.http_status(), 422);
        assert!(start.elapsed() < Duration::from_secs(2), "{url}: {:?}", start.elapsed());
    }
    assert_eq!(
        server.connection_count(),
        0,
        "requests reached the server: {:?}",
        server.requests()
    );
    if let Some(v6) = &v6 {
        assert_eq!(
            v6.connection_count(),
            0,
            "requests reached the [::1] server: {:?}",
            v6.requests()
        );
    }
    // The same servers answer when private addresses are allowed.
    assert_eq!(
        fetch_image(&format!("http://localhost:{port}/x"), &open_policy())
            .await
            .unwrap(),
        PNG
    );
    if v6.is_some() {
        assert_eq!(
            fetch_image(&format!("http://[::1]:{v6_port}/x"), &open_policy())
                .await
                .unwrap(),
            PNG
        );
    }
}

#[tokio::test]
async fn a_closed_port_is_an_upstream_network_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let err = fetch_image(&format!("http://127.0.0.1:{port}/x.png"), &open_policy())
        .await
        .unwrap_err();
    assert!(matches!(err, MediaError::Network { .. }), "{err:?}");
    assert!(!err.is_client_error());
}

#[tokio::test]
async fn bad_urls_and_schemes_are_refused() {
    let policy = MediaPolicy::default();
    for (reference, scheme) in [
        ("ftp://127.0.0.1/x.png", "ftp"),
        ("gopher://127.0.0.1:70/", "gopher"),
        ("javascript:alert(1)", "javascript"),
        ("ws://127.0.0.1/", "ws"),
    ] {
        let err = fetch_image(reference, &policy).await.unwrap_err();
        assert!(
            matches!(&err, MediaError::UnsupportedScheme { scheme: s, .. } if s == scheme),
            "{reference}: {err:?}"
        );
        assert_eq!(err.http_status(), 400);
    }
    for reference in ["", "   ", "http://", "http://[::1/x", "https://exa mple.com/"] {
        let err = fetch_image(reference, &policy).await.unwrap_err();
        assert!(matches!(err, MediaError::BadUrl { .. }), "{reference:?}: {err:?}");
    }
    // Credentials never appear in messages.
    let err = fetch_image("http://user:hunter2@10.0.0.1/x.png", &policy)
        .await
        .unwrap_err();
    assert!(!err.to_string().contains("hunter2"), "{err}");
}

#[tokio::test]
async fn data_uris() {
    let policy = MediaPolicy::default();
    let uri = format!("data:image/png;base64,{}", b64(PNG));
    assert_eq!(fetch_image(&uri, &policy).await.unwrap(), PNG);
    let (mime, bytes) = parse_data_uri(&uri).unwrap();
    assert_eq!((mime.as_str(), bytes.as_slice()), ("image/png", PNG));
    // Declared type is not trusted either way.
    assert_eq!(
        fetch_image(&format!("data:text/plain;base64,{}", b64(PNG)), &policy)
            .await
            .unwrap(),
        PNG
    );
    // Bare base64 (no data: prefix) of an image.
    assert_eq!(fetch_image(&b64(PNG), &policy).await.unwrap(), PNG);

    let err = fetch_image("data:image/png;base64,iVBOR$$$w0KGgo", &policy)
        .await
        .unwrap_err();
    assert!(matches!(err, MediaError::BadDataUri { .. }), "{err:?}");
    assert!(err.to_string().contains("invalid base64"), "{err}");
    assert_eq!(err.http_status(), 400);

    let err = fetch_image(
        &format!("data:image/png;base64,{}", b64(b"just some text, no image")),
        &policy,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, MediaError::NotAnImage { .. }), "{err:?}");
    let err = fetch_image(
        "data:image/svg+xml,%3Csvg%20xmlns%3D%22http://www.w3.org/2000/svg%22%3E%3C/svg%3E",
        &policy,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, MediaError::NotAnImage { .. }), "{err:?}");
    assert!(err.to_string().contains("SVG"), "{err}");

    let long_text = b64(&vec![b'x'; 300]);
    let err = fetch_image(&long_text, &policy).await.unwrap_err();
    assert!(
        matches!(err, MediaError::NotAnImage { .. }),
        "bare base64 of text: {err:?}"
    );

    let mut big = PNG.to_vec();
    big.resize(5000, 0);
    let small = MediaPolicy {
        max_bytes: 4096,
        ..MediaPolicy::default()
    };
    let err = fetch_image(&format!("data:image/png;base64,{}", b64(&big)), &small)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            MediaError::TooLarge {
                size: Some(5000),
                limit: 4096,
                ..
            }
        ),
        "{err:?}"
    );
    // Long data URIs are shortened in messages.
    assert!(err.to_string().len() < 300, "{err}");
}

#[cfg(unix)]
#[tokio::test]
async fn local_paths() {
    let root = tempfile::tempdir().unwrap();
    let allowed = root.path().join("images");
    let outside = root.path().join("secret");
    std::fs::create_dir_all(allowed.join("sub")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(allowed.join("cat.png"), PNG).unwrap();
    std::fs::write(allowed.join("sub/dog.png"), PNG).unwrap();
    std::fs::write(allowed.join("notes.txt"), b"not an image").unwrap();
    std::fs::write(outside.join("secret.png"), PNG).unwrap();
    std::os::unix::fs::symlink(outside.join("secret.png"), allowed.join("escape.png")).unwrap();
    std::os::unix::fs::symlink(&outside, allowed.join("escape-dir")).unwrap();
    std::os::unix::fs::symlink(allowed.join("cat.png"), allowed.join("alias.png")).unwrap();
    let inside = allowed.join("cat.png");
    let inside = inside.to_str().unwrap();

    // Refused by default, whether or not the file exists.
    for reference in [inside.to_string(), format!("file://{inside}"), "cat.png".to_string()] {
        let err = fetch_image(&reference, &MediaPolicy::default()).await.unwrap_err();
        assert!(
            matches!(err, MediaError::LocalPathNotAllowed { .. }),
            "{reference}: {err:?}"
        );
        assert!(err.is_client_error());
    }

    let policy = MediaPolicy {
        allowed_local_dir: Some(allowed.clone()),
        ..MediaPolicy::default()
    };
    for reference in [
        inside.to_string(),
        format!("file://{inside}"),
        "cat.png".into(),
        "sub/dog.png".into(),
        "alias.png".into(),
    ] {
        assert_eq!(fetch_image(&reference, &policy).await.unwrap(), PNG, "{reference}");
    }

    let secret = outside.join("secret.png");
    for reference in [
        secret.to_str().unwrap().to_string(),
        format!("file://{}", secret.display()),
        "/etc/passwd".to_string(),
        "../secret/secret.png".to_string(),
        format!("{}/../secret/secret.png", allowed.display()),
        "sub/../cat.png".to_string(),
        "escape.png".to_string(),
        "escape-dir/secret.png".to_string(),
        "sub".to_string(),
    ] {
        let err = fetch_image(&reference, &policy).await.unwrap_err();
        assert!(
            matches!(err, MediaError::LocalPathRefused { .. }),
            "{reference}: {err:?}"
        );
        assert!(err.is_client_error());
    }

    let err = fetch_image("notes.txt", &policy).await.unwrap_err();
    assert!(matches!(err, MediaError::NotAnImage { .. }), "{err:?}");
    let err = fetch_image("missing.png", &policy).await.unwrap_err();
    assert!(matches!(err, MediaError::Io { .. }), "{err:?}");
    assert!(err.is_client_error(), "a missing file is the client's mistake");
    let small = MediaPolicy {
        max_bytes: 10,
        ..policy.clone()
    };
    let err = fetch_image("cat.png", &small).await.unwrap_err();
    assert!(
        matches!(
            err,
            MediaError::TooLarge {
                size: Some(_),
                limit: 10,
                ..
            }
        ),
        "{err:?}"
    );
}
