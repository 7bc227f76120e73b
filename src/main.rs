//! The `token-sidecar` binary: parse the command line, load the configuration, start logging,
//! bind, and run until SIGTERM or SIGINT. A bad configuration exits 64 (EX_USAGE).

use clap::Parser;
use std::process::ExitCode;
use token_sidecar::cli::{Cli, Command, healthcheck};
use token_sidecar::config::{Config, Overrides, admin_address};
use token_sidecar::{Listeners, run, telemetry};

const EX_USAGE: u8 = 64;
const EX_UNAVAILABLE: u8 = 69;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(EX_USAGE);
        }
    };
    let env = |name: &str| std::env::var(name).ok();

    if let Some(Command::Healthcheck { admin, timeout }) = &cli.command {
        let flags = Overrides {
            admin: admin.or(cli.admin),
            ..cli.overrides()
        };
        let checked = admin_address(&flags, env, |path| std::fs::read_to_string(path))
            .map_err(|e| e.to_string())
            .and_then(|admin| healthcheck(admin, *timeout));
        return match checked {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("token-sidecar healthcheck: {e}");
                ExitCode::FAILURE
            }
        };
    }

    let config = match Config::load(cli.overrides(), env, |path| std::fs::read_to_string(path)) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("token-sidecar: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    if let Err(e) = telemetry::init(&config.log, env) {
        eprintln!("token-sidecar: {e}");
        return ExitCode::from(EX_USAGE);
    }
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if config.workers > 0 {
        runtime.worker_threads(config.workers);
    }
    let runtime = match runtime.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("token-sidecar: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        // The files the upstream clients read (CA bundle, client certificate and key) are checked
        // before any port is bound, so a typo never leaves a listener up for a moment.
        for route in &config.routes {
            if let Err(e) = token_sidecar::upstream::Upstream::new(route) {
                tracing::error!("{e}");
                return ExitCode::from(EX_USAGE);
            }
        }
        let listeners = match Listeners::bind(&config).await {
            Ok(listeners) => listeners,
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::from(EX_UNAVAILABLE);
            }
        };
        match run(config, listeners, shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e}");
                ExitCode::from(EX_USAGE)
            }
        }
    })
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
    tracing::info!("shutdown signal received");
}
