//! Downloads against a loopback Hub stand-in (`src/mock.rs`): no network beyond 127.0.0.1.

#[allow(dead_code)]
#[path = "../src/mock.rs"]
mod mock;

use std::path::{Path, PathBuf};
use std::sync::Once;

use dsvl2_hub::{download_model, resolve_model, resolve_repo, HubError, HubOptions, HubRepo};
use mock::{Fault, MockHub, MockRepo};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

/// hf-hub's ureq client takes proxies from the environment (ignoring NO_PROXY): loopback requests
/// must not go to a proxy. Done once, before any test builds a client (all call `setup` first).
fn setup() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for var in [
            "ALL_PROXY",
            "HTTPS_PROXY",
            "HTTP_PROXY",
            "all_proxy",
            "https_proxy",
            "http_proxy",
        ] {
            if std::env::var_os(var).is_some() {
                std::env::remove_var(var);
            }
        }
    });
}

struct Env {
    hub: MockHub,
    _tmp: tempfile::TempDir,
    options: HubOptions,
}

fn env_with(repos: &[(&str, &str)]) -> Env {
    setup();
    let hub = MockHub::start();
    for (id, dir) in repos {
        hub.add_repo_dir(id, &fixture(dir));
    }
    let tmp = tempfile::tempdir().unwrap();
    let options = HubOptions::new(tmp.path().join("hub"))
        .with_endpoint(hub.endpoint())
        .with_max_retries(0);
    Env {
        hub,
        _tmp: tmp,
        options,
    }
}

fn assert_same_files(snapshot: &Path, fixture_dir: &Path) {
    for entry in std::fs::read_dir(fixture_dir).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        let got = std::fs::read(snapshot.join(&name)).unwrap_or_else(|e| panic!("{name:?}: {e}"));
        assert!(got == std::fs::read(entry.path()).unwrap(), "{name:?} differs");
    }
}

fn files_under(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p, suffix));
            } else if p.to_string_lossy().ends_with(suffix) {
                out.push(p);
            }
        }
    }
    out
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

fn repo(spec: &str) -> HubRepo {
    HubRepo::parse(spec).unwrap()
}

#[test]
fn downloads_sharded_model_into_hf_cache_layout() {
    let env = env_with(&[("test-org/small-like", "small-like")]);
    let snap = resolve_repo(&repo("test-org/small-like"), &env.options).unwrap();

    let repo_dir = env.options.cache_dir.join("models--test-org--small-like");
    assert_eq!(snap.path, repo_dir.join("snapshots").join(&snap.commit));
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(),
        snap.commit
    );
    assert!(
        !repo_dir.join("refs").join(&snap.commit).exists(),
        "no refs/<commit> (huggingface_hub layout)"
    );
    assert_eq!(snap.downloaded.len(), 8, "{:?}", snap.downloaded);
    assert_eq!(snap.downloaded_bytes, dir_size(&fixture("small-like")));
    assert_same_files(&snap.path, &fixture("small-like"));
    // Snapshot entries are links into blobs/, and no partial file remains.
    assert!(std::fs::symlink_metadata(snap.path.join("config.json"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(files_under(&repo_dir, ".part").is_empty());

    let model = dsvl2_config::ModelDir::open(&snap.path).unwrap();
    assert_eq!(model.weights.files().len(), 2);
    // The weights came through the CDN redirect, like LFS files on the real Hub.
    assert!(env
        .hub
        .requests()
        .iter()
        .any(|r| r.starts_with("GET /cdn/test-org/small-like/")));
}

#[test]
fn resolves_single_file_model_by_spec() {
    let env = env_with(&[("test-org/tiny-like", "tiny-like")]);
    let path = resolve_model("test-org/tiny-like", &env.options).unwrap();
    assert_same_files(&path, &fixture("tiny-like"));
    let model = dsvl2_config::ModelDir::open(&path).unwrap();
    assert_eq!(model.weights.files(), vec![path.join("model.safetensors")]);
    // The sharded index was looked up in the file list, not requested.
    assert!(!env.hub.requests().iter().any(|r| r.contains("index.json")));
}

#[test]
fn cached_model_starts_without_network() {
    let mut env = env_with(&[("test-org/small-like", "small-like")]);
    let first = resolve_model("test-org/small-like", &env.options).unwrap();
    let seen = env.hub.requests().len();

    // Server up: the cache answers, no request at all.
    let again = resolve_model("test-org/small-like", &env.options).unwrap();
    assert_eq!(again, first);
    assert_eq!(
        env.hub.requests().len(),
        seen,
        "a cached model must not touch the network"
    );

    // Server gone: still fine, online or offline.
    env.hub.shutdown();
    assert_eq!(resolve_model("test-org/small-like", &env.options).unwrap(), first);
    let offline = env.options.clone().with_offline(true);
    assert_eq!(resolve_model("test-org/small-like", &offline).unwrap(), first);
    dsvl2_config::ModelDir::open(&first).unwrap();

    // By commit hash too (no ref needed).
    let commit = first.file_name().unwrap().to_str().unwrap().to_string();
    let by_commit = resolve_model(&format!("test-org/small-like@{commit}"), &offline).unwrap();
    assert_eq!(by_commit, first);
}

#[test]
fn download_always_rechecks_but_skips_present_files() {
    let env = env_with(&[("test-org/tiny-like", "tiny-like")]);
    let r = repo("test-org/tiny-like");
    let first = download_model(&r, &env.options).unwrap();
    assert_eq!(first.downloaded.len(), 6);
    let seen = env.hub.requests().len();
    let second = download_model(&r, &env.options).unwrap();
    assert_eq!(second.path, first.path);
    assert!(second.downloaded.is_empty());
    let new: Vec<String> = env.hub.requests()[seen..].to_vec();
    assert_eq!(new.len(), 1, "only the revision lookup: {new:?}");
    assert!(
        new[0].starts_with("GET /api/models/test-org/tiny-like/revision/main"),
        "{new:?}"
    );
}

#[test]
fn offline_with_empty_cache_names_the_missing_file() {
    let env = env_with(&[]);
    let offline = env.options.clone().with_offline(true);
    let err = resolve_model("test-org/tiny-like", &offline).unwrap_err();
    assert!(
        matches!(&err, HubError::NotCached { file, .. } if file == "config.json"),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("config.json") && msg.contains("test-org/tiny-like") && msg.contains("HF_HUB_OFFLINE"),
        "{msg}"
    );
    assert!(env.hub.requests().is_empty());
    let err = download_model(&repo("test-org/tiny-like"), &offline).unwrap_err();
    assert!(matches!(err, HubError::NotCached { .. }), "{err:?}");
}

#[test]
fn offline_with_partial_cache_names_the_missing_shard() {
    let env = env_with(&[("test-org/small-like", "small-like")]);
    let path = resolve_model("test-org/small-like", &env.options).unwrap();
    std::fs::remove_file(path.join("model-00002-of-00002.safetensors")).unwrap();
    let offline = env.options.clone().with_offline(true);
    let err = resolve_model("test-org/small-like", &offline).unwrap_err();
    assert!(err.to_string().contains("model-00002-of-00002.safetensors"), "{err}");
    // Online, only the missing shard is fetched again.
    let seen = env.hub.requests().len();
    let snap = resolve_repo(&repo("test-org/small-like"), &env.options).unwrap();
    assert_eq!(snap.downloaded, vec!["model-00002-of-00002.safetensors".to_string()]);
    assert_same_files(&snap.path, &fixture("small-like"));
    assert!(env.hub.requests().len() > seen);
}

#[test]
fn missing_repo_revision_and_model_files_are_clear_errors() {
    let env = env_with(&[("test-org/tiny-like", "tiny-like")]);
    let err = resolve_model("test-org/no-such-model", &env.options).unwrap_err();
    assert!(matches!(err, HubError::RepoNotFound { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("test-org/no-such-model") && msg.contains(&env.hub.endpoint()),
        "{msg}"
    );

    let err = resolve_model("test-org/tiny-like@v9", &env.options).unwrap_err();
    assert!(matches!(err, HubError::RevisionNotFound { .. }), "{err:?}");
    assert!(err.to_string().contains("v9"), "{err}");

    // A repo without weights is refused before anything is downloaded.
    let mut files = MockRepo::from_dir("test-org/no-weights", &fixture("tiny-like")).unwrap();
    files.files.remove("model.safetensors");
    env.hub.add_repo("test-org/no-weights", files);
    let err = resolve_model("test-org/no-weights", &env.options).unwrap_err();
    assert!(matches!(err, HubError::NotAModel { .. }), "{err:?}");
    assert!(err.to_string().contains("model.safetensors"), "{err}");
    assert!(!env.hub.requests().iter().any(|r| r.contains("/no-weights/resolve/")));
}

#[test]
fn optional_tokenizer_files_may_be_absent() {
    let env = env_with(&[]);
    let mut files = MockRepo::from_dir("test-org/bare", &fixture("tiny-like")).unwrap();
    files.files.remove("tokenizer_config.json");
    files.files.remove("special_tokens_map.json");
    env.hub.add_repo("test-org/bare", files);
    let path = resolve_model("test-org/bare", &env.options).unwrap();
    assert!(!path.join("tokenizer_config.json").exists());
    dsvl2_config::ModelDir::open(&path).unwrap();
    // Known absent (`.no_exist`): the next resolve needs no network.
    let seen = env.hub.requests().len();
    resolve_model("test-org/bare", &env.options).unwrap();
    assert_eq!(env.hub.requests().len(), seen);
}

#[test]
fn optional_files_tolerate_404_when_the_hub_lists_no_files() {
    let env = env_with(&[]);
    // A mirror whose repo info has no `siblings`: files are requested and 404s of optional ones are fine.
    let mut files = MockRepo::from_dir("test-org/unlisted", &fixture("tiny-like")).unwrap();
    files.files.remove("special_tokens_map.json");
    env.hub.add_repo("test-org/unlisted", files);
    env.hub.hide_siblings();
    let path = resolve_model("test-org/unlisted", &env.options).unwrap();
    dsvl2_config::ModelDir::open(&path).unwrap();
    assert!(env
        .hub
        .requests()
        .iter()
        .any(|r| r.contains("/resolve/") && r.contains("special_tokens_map.json")));
}

fn interrupted(with_length: bool) {
    let env = env_with(&[("test-org/small-like", "small-like")]);
    let shard = "model-00002-of-00002.safetensors";
    env.hub.set_fault(
        shard,
        Fault {
            send: 100_000,
            with_length,
            times: 1,
        },
    );
    let err = resolve_model("test-org/small-like", &env.options).unwrap_err();
    assert!(
        matches!(&err, HubError::Interrupted { file, .. } if file == shard),
        "{err:?}"
    );
    let msg = err.to_string();
    println!("{msg}");
    assert!(
        msg.contains(shard) && msg.contains("test-org/small-like") && msg.contains("interrupted"),
        "{msg}"
    );

    // Nothing partial in the snapshot; the bytes wait in a .part file outside it.
    let repo_dir = env.options.cache_dir.join("models--test-org--small-like");
    let snapshots = files_under(&repo_dir.join("snapshots"), shard);
    assert!(snapshots.is_empty(), "{snapshots:?}");
    let parts = files_under(&repo_dir.join("blobs"), ".part");
    assert_eq!(parts.len(), 1);
    assert_eq!(std::fs::metadata(&parts[0]).unwrap().len(), 100_000);
    // Offline, the cache is not taken as complete (refs/main only moves to complete snapshots).
    let offline = env.options.clone().with_offline(true);
    let err = resolve_model("test-org/small-like", &offline).unwrap_err();
    assert!(matches!(err, HubError::NotCached { .. }), "{err:?}");
    assert!(!repo_dir.join("refs/main").exists());

    // The next run resumes from the partial file and completes.
    let path = resolve_model("test-org/small-like", &env.options).unwrap();
    assert_same_files(&path, &fixture("small-like"));
    dsvl2_config::ModelDir::open(&path).unwrap();
    assert!(
        env.hub
            .requests()
            .iter()
            .any(|r| r.contains(shard) && r.ends_with("bytes=100000-")),
        "{:?}",
        env.hub.requests()
    );
    assert!(files_under(&repo_dir, ".part").is_empty());
}

#[test]
fn interrupted_download_short_body_with_content_length() {
    interrupted(true);
}

#[test]
fn interrupted_download_connection_closed_without_length() {
    interrupted(false);
}

#[test]
fn interrupted_download_is_retried_within_one_call() {
    let env = env_with(&[("test-org/tiny-like", "tiny-like")]);
    env.hub.set_fault(
        "model.safetensors",
        Fault {
            send: 1000,
            with_length: true,
            times: 2,
        },
    );
    let options = env.options.clone().with_max_retries(2);
    let path = resolve_model("test-org/tiny-like", &options).unwrap();
    assert_same_files(&path, &fixture("tiny-like"));
}

#[test]
fn token_is_sent_and_its_absence_explained() {
    let env = env_with(&[("test-org/private", "tiny-like")]);
    env.hub.require_token("hf_secret");
    let err = resolve_model("test-org/private", &env.options).unwrap_err();
    assert!(matches!(err, HubError::Unauthorized { status: 401, .. }), "{err:?}");
    assert!(err.to_string().contains("HF_TOKEN"), "{err}");
    let wrong = env.options.clone().with_token(Some("nope".into()));
    let err = resolve_model("test-org/private", &wrong).unwrap_err();
    assert!(err.to_string().contains("refused"), "{err}");
    let with_token = env.options.clone().with_token(Some("hf_secret".into()));
    let path = resolve_model("test-org/private", &with_token).unwrap();
    assert_same_files(&path, &fixture("tiny-like"));
}

#[test]
fn unreachable_endpoint_is_named() {
    setup();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let tmp = tempfile::tempdir().unwrap();
    let endpoint = format!("http://127.0.0.1:{port}");
    let options = HubOptions::new(tmp.path()).with_endpoint(endpoint.clone());
    let err = resolve_model("test-org/tiny-like", &options).unwrap_err();
    assert!(matches!(err, HubError::Network { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&endpoint) && msg.contains("test-org/tiny-like"), "{msg}");
}

#[test]
fn local_directories_and_bad_specs() {
    let tmp = tempfile::tempdir().unwrap();
    let options = HubOptions::new(tmp.path().join("hub")).with_offline(true);
    let dir = fixture("tiny-like");
    assert_eq!(resolve_model(dir.to_str().unwrap(), &options).unwrap(), dir);
    // A relative folder that also looks like a repo id is a folder.
    std::fs::create_dir_all(tmp.path().join("owner/name")).unwrap();
    let spec = tmp.path().join("owner/name");
    assert_eq!(resolve_model(spec.to_str().unwrap(), &options).unwrap(), spec);

    let err = resolve_model("not a repo", &options).unwrap_err();
    assert!(matches!(err, HubError::InvalidSpec { .. }), "{err:?}");
    assert!(
        err.to_string().contains("not a directory and not a Hub repo id"),
        "{err}"
    );
    let file = dir.join("config.json");
    let err = resolve_model(file.to_str().unwrap(), &options).unwrap_err();
    assert!(matches!(err, HubError::NotADirectory { .. }), "{err:?}");
}

#[test]
fn options_from_environment_variables() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let vars = |pairs: &[(&str, &str)]| {
        let map: std::collections::HashMap<String, String> =
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k: &str| map.get(k).cloned()
    };

    let o = HubOptions::from_vars(vars(&[]), Some(home.clone()));
    assert_eq!(o.cache_dir, home.join(".cache/huggingface/hub"));
    assert_eq!(o.endpoint, "https://huggingface.co");
    assert!(o.token.is_none() && !o.offline && o.progress);

    let hf_home = tmp.path().join("hf");
    std::fs::create_dir_all(&hf_home).unwrap();
    std::fs::write(hf_home.join("token"), "hf_fromfile\n").unwrap();
    let o = HubOptions::from_vars(
        vars(&[
            ("HF_HOME", hf_home.to_str().unwrap()),
            ("HF_ENDPOINT", "http://mirror.local:8080/"),
            ("HF_HUB_OFFLINE", "1"),
            ("HF_HUB_DISABLE_PROGRESS_BARS", "true"),
        ]),
        Some(home.clone()),
    );
    assert_eq!(o.cache_dir, hf_home.join("hub"));
    assert_eq!(o.endpoint, "http://mirror.local:8080");
    assert_eq!(o.token.as_deref(), Some("hf_fromfile"));
    assert!(o.offline && !o.progress);
    assert!(!format!("{o:?}").contains("hf_fromfile"), "Debug must hide the token");

    let o = HubOptions::from_vars(
        vars(&[
            ("HF_HOME", hf_home.to_str().unwrap()),
            ("HF_HUB_CACHE", "/elsewhere/hub"),
            ("HF_TOKEN", "hf_env"),
            ("HF_HUB_OFFLINE", "0"),
            ("HF_ENDPOINT", ""),
        ]),
        Some(home.clone()),
    );
    assert_eq!(o.cache_dir, PathBuf::from("/elsewhere/hub"));
    assert_eq!(o.token.as_deref(), Some("hf_env"));
    assert_eq!(o.endpoint, "https://huggingface.co");
    assert!(!o.offline);

    let o = HubOptions::from_vars(vars(&[("XDG_CACHE_HOME", "/xdg")]), Some(home));
    assert_eq!(o.cache_dir, PathBuf::from("/xdg/huggingface/hub"));
}
