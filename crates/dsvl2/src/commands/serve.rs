//! `dsvl2 serve`: the HTTP server (Cog predictions, OpenAI chat completions, Prometheus metrics).
//! It listens at once (health check `STARTING`) and loads the model in the background.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use dsvl2_engine::{Engine, EngineConfig};
use dsvl2_media::MediaPolicy;
use dsvl2_model::GgufWeights;
use dsvl2_server::{AppState, ServerOptions};

use crate::runner::{load_model, open_model, LoadArgs, LoadedModel, DEFAULT_MODEL};

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Model: a folder in the official Hugging Face layout, or a Hub repo id (`owner/name[@revision]`),
    /// downloaded into the Hugging Face cache on first use.
    #[arg(long, value_name = "DIR|REPO", default_value = DEFAULT_MODEL)]
    pub model: String,

    #[command(flatten)]
    pub load: LoadArgs,

    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,

    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,

    /// Model id reported by /v1/models and in responses. Default: the --model value.
    #[arg(long, value_name = "NAME")]
    pub served_model_name: Option<String>,

    /// Let image URLs reach private, loopback and link-local addresses (trusted networks only).
    /// Default: only public internet addresses are fetched.
    #[arg(long)]
    pub allow_private_urls: bool,

    /// Directory whose files requests may name as images (plain or file:// paths). Default: local
    /// paths are refused.
    #[arg(long, value_name = "DIR")]
    pub allowed_local_media_path: Option<PathBuf>,

    /// Largest image accepted, in MiB (fetched or inline).
    #[arg(long, value_name = "MIB", default_value_t = 20)]
    pub max_image_mib: u64,

    /// Time limit for fetching one image, in seconds (DNS, redirects and body together).
    #[arg(long, value_name = "SECONDS", default_value_t = 20)]
    pub fetch_timeout: u64,

    /// Largest request body, in MiB (larger: 413).
    #[arg(long, value_name = "MIB", default_value_t = 32)]
    pub max_body_mib: usize,

    /// Requests that may wait for a slot; more are refused (OpenAI 429, Cog 409).
    #[arg(long, value_name = "N", default_value_t = 32)]
    pub max_queue: usize,

    /// Sequences decoded together.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub max_running: usize,

    /// MiB of recent prompts' and finished conversations' caches kept: a request that repeats a
    /// prompt (same text and images) skips the vision tower and the prefill, a chat's next turn
    /// prefills only what is new (0: keep none).
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    pub prompt_cache_mib: usize,

    /// After SIGTERM/SIGINT, seconds that requests in flight get to finish.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub shutdown_timeout: u64,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();

    let local_dir = match &args.allowed_local_media_path {
        Some(dir) => Some(
            dir.canonicalize()
                .with_context(|| format!("--allowed-local-media-path {}", dir.display()))?,
        ),
        None => None,
    };
    let options = ServerOptions {
        model_name: args.served_model_name.clone().unwrap_or_else(|| args.model.clone()),
        media: MediaPolicy {
            allow_private_urls: args.allow_private_urls,
            allowed_local_dir: local_dir,
            max_bytes: args.max_image_mib << 20,
            timeout: Duration::from_secs(args.fetch_timeout),
            ..MediaPolicy::default()
        },
        body_limit: args.max_body_mib << 20,
        shutdown_grace: Duration::from_secs(args.shutdown_timeout),
    };
    let engine_config = EngineConfig {
        max_queue: args.max_queue.max(1),
        max_running: args.max_running.max(1),
        prompt_cache_bytes: args.prompt_cache_mib << 20,
        ..EngineConfig::default()
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
            .await
            .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
        let addr: SocketAddr = listener.local_addr()?;
        tracing::info!("listening on http://{addr} (loading the model: health check STARTING)");
        let state = AppState::new(options);

        let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<anyhow::Error>();
        let loading = {
            let state = state.clone();
            let spec = args.model.clone();
            let load_options = args.load.options(GgufWeights::InMemory);
            tokio::task::spawn_blocking(move || {
                let result = open_model(&spec)
                    .and_then(|dir| load_model(dir, &load_options))
                    .map(|loaded| {
                        let LoadedModel {
                            processor,
                            model,
                            load_seconds,
                            ..
                        } = loaded;
                        let processor = Arc::new(processor);
                        (
                            Engine::start(model, processor.clone(), engine_config),
                            processor,
                            load_seconds,
                        )
                    });
                match result {
                    Ok((engine, processor, seconds)) => {
                        state.set_ready(engine, processor);
                        tracing::info!("model {spec} loaded in {seconds:.1} s: READY");
                    }
                    Err(e) => {
                        state.set_failed(format!("{e:#}"));
                        let _ = failed_tx.send(e);
                    }
                }
            })
        };
        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
        let shutdown = async move {
            let _ = stop_rx.wait_for(|stop| *stop).await;
        };
        let server = tokio::spawn(dsvl2_server::serve(listener, state, shutdown));
        let failure = tokio::select! {
            _ = shutdown_signal() => None,
            failed = failed_rx => match failed {
                Ok(e) => Some(e),
                // Loaded: serve until a signal.
                Err(_) => {
                    shutdown_signal().await;
                    None
                }
            },
        };
        let _ = stop_tx.send(true);
        server.await.context("the server task failed")??;
        drop(loading);
        match failure {
            Some(e) => Err(e.context("the model could not be loaded")),
            None => Ok(()),
        }
    });
    // Do not wait for blocking tasks (a model still loading) at exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

/// SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received"),
        _ = term => tracing::info!("SIGTERM received"),
    }
}
