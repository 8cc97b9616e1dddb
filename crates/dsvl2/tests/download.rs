//! `dsvl2 download` against the loopback Hub stand-in of `dsvl2-hub` (feature `mock-hub`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use dsvl2_hub::mock::MockHub;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

/// Runs the binary with a clean Hugging Face environment plus `vars`.
fn dsvl2(args: &[&str], vars: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dsvl2"));
    cmd.args(args);
    for var in [
        "HF_HOME",
        "HF_HUB_CACHE",
        "HF_ENDPOINT",
        "HF_TOKEN",
        "HF_TOKEN_PATH",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_HUB_OFFLINE",
        "XDG_CACHE_HOME",
        // ureq ignores NO_PROXY: loopback must not go to a proxy.
        "ALL_PROXY",
        "HTTPS_PROXY",
        "HTTP_PROXY",
        "all_proxy",
        "https_proxy",
        "http_proxy",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(vars.iter().copied());
    cmd.output().expect("run dsvl2")
}

#[test]
fn download_prints_the_snapshot_path_and_later_runs_work_offline() {
    let hub = MockHub::start();
    let commit = hub.add_repo_dir("test-org/small-like", &fixture("small-like"));
    let tmp = tempfile::tempdir().unwrap();
    let hf_home = tmp.path().to_str().unwrap();
    let endpoint = hub.endpoint();

    let out = dsvl2(
        &["download", "test-org/small-like"],
        &[("HF_HOME", hf_home), ("HF_ENDPOINT", &endpoint)],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let path = PathBuf::from(stdout.trim_end());
    assert_eq!(
        path,
        tmp.path()
            .join("hub/models--test-org--small-like/snapshots")
            .join(&commit)
    );
    dsvl2_config::ModelDir::open(&path).unwrap();
    assert!(stderr.contains(&commit), "{stderr}");

    // Offline: the cache answers.
    let out = dsvl2(
        &["download", "test-org/small-like"],
        &[
            ("HF_HOME", hf_home),
            ("HF_ENDPOINT", &endpoint),
            ("HF_HUB_OFFLINE", "1"),
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8(out.stdout).unwrap(), stdout);
}

#[test]
fn download_errors_name_the_repo() {
    let hub = MockHub::start();
    let tmp = tempfile::tempdir().unwrap();
    let hf_home = tmp.path().to_str().unwrap();
    let endpoint = hub.endpoint();
    let out = dsvl2(
        &["download", "test-org/missing"],
        &[("HF_HOME", hf_home), ("HF_ENDPOINT", &endpoint)],
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("test-org/missing") && stderr.contains("not found"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());

    let out = dsvl2(&["download", "not a repo"], &[("HF_HOME", hf_home)]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a Hub repo id"));

    let out = dsvl2(
        &["download", "test-org/missing"],
        &[("HF_HOME", hf_home), ("HF_HUB_OFFLINE", "1")],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("config.json"));
}

/// `generate --model owner/name` fetches the model from the Hub on first use, then runs from the
/// cache without network (the stand-in is shut down), with the reference's greedy tokens.
#[test]
fn generate_takes_a_repo_id_and_then_runs_from_the_cache() {
    let mut hub = MockHub::start();
    hub.add_repo_dir("test-org/tiny-like", &fixture("tiny-like"));
    let tmp = tempfile::tempdir().unwrap();
    let hf_home = tmp.path().to_str().unwrap();
    let endpoint = hub.endpoint();
    let args = [
        "generate",
        "--model",
        "test-org/tiny-like",
        "--prompt",
        "hello",
        "--max-new-tokens",
        "6",
        "--temperature",
        "0",
        "--json",
    ];
    let first = dsvl2(&args, &[("HF_HOME", hf_home), ("HF_ENDPOINT", &endpoint)]);
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    hub.shutdown();
    let second = dsvl2(&args, &[("HF_HOME", hf_home), ("HF_ENDPOINT", &endpoint)]);
    assert!(second.status.success(), "{}", String::from_utf8_lossy(&second.stderr));
    let tokens = |out: &Output| -> serde_json::Value {
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["output_tokens"].clone()
    };
    assert_eq!(tokens(&first), tokens(&second));
    assert_eq!(tokens(&first).as_array().unwrap().len(), 6);
}
