//! The `token-sidecar` binary: parse the command line, load the configuration, start logging,
//! build, bind, and run until SIGTERM or SIGINT. A bad configuration or unusable TLS file exits 64
//! (EX_USAGE), a port that cannot be bound 69 (EX_UNAVAILABLE).

use clap::Parser;
use std::net::SocketAddr;
use std::process::ExitCode;
use token_sidecar::app::shutdown_signal;
use token_sidecar::cli::{Cli, Command, healthcheck, status};
use token_sidecar::config::{Config, ConfigError, Overrides, admin_address};
use token_sidecar::{App, Listeners, StartupError, demo, telemetry};

const EX_USAGE: u8 = 64;
const EX_UNAVAILABLE: u8 = 69;
const EX_OSERR: u8 = 71;

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
    match &cli.command {
        Some(Command::Healthcheck { admin, timeout }) => report(
            "healthcheck",
            admin_of(&cli, *admin, env)
                .and_then(|admin| healthcheck(admin, *timeout))
                .map(|()| String::new()),
        ),
        Some(Command::Status {
            admin,
            timeout,
            json,
        }) => report(
            "status",
            admin_of(&cli, *admin, env).and_then(|admin| status::command(admin, *timeout, *json)),
        ),
        Some(Command::Demo(args)) => report("demo", demo::run(args).map(|()| String::new())),
        None => match start(&cli, env) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                // Logging is up for everything after the configuration, so those go to the log.
                match e {
                    StartupError::Config(_) => eprintln!("token-sidecar: {e}"),
                    _ => tracing::error!("{e}"),
                }
                ExitCode::from(exit_code(&e))
            }
        },
    }
}

/// The admin address a subcommand talks to: its own `--admin`, else the sidecar's, layered like
/// the sidecar's own (flag, env, file, default).
fn admin_of(
    cli: &Cli,
    admin: Option<SocketAddr>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<SocketAddr, String> {
    let flags = Overrides {
        admin: admin.or(cli.admin),
        ..cli.overrides()
    };
    admin_address(&flags, env, |path| std::fs::read_to_string(path)).map_err(|e| e.to_string())
}

/// A subcommand's outcome: its text on stdout and exit 0, or a line on stderr and exit 1.
fn report(subcommand: &str, outcome: Result<String, String>) -> ExitCode {
    match outcome {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("token-sidecar {subcommand}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The one place a startup failure becomes an exit code (sysexits.h).
fn exit_code(error: &StartupError) -> u8 {
    match error {
        StartupError::Config(_) | StartupError::Files(_) => EX_USAGE,
        StartupError::Bind(_) => EX_UNAVAILABLE,
        StartupError::Runtime(_) => EX_OSERR,
    }
}

/// Loads the configuration, starts logging and the runtime, builds, binds, and serves until a
/// shutdown signal.
fn start(cli: &Cli, env: impl Fn(&str) -> Option<String> + Copy) -> Result<(), StartupError> {
    let config = Config::load(cli.overrides(), env, |path| std::fs::read_to_string(path))
        .map_err(StartupError::Config)?;
    telemetry::init(&config.log, env).map_err(|e| StartupError::Config(ConfigError::new(e)))?;
    let runtime = runtime(config.workers)
        .enable_all()
        .build()
        .map_err(|e| StartupError::Runtime(e.to_string()))?;
    runtime.block_on(async {
        let app = App::build(&config)?;
        let listeners = Listeners::bind(&config)?;
        app.run(listeners, shutdown_signal()).await;
        Ok(())
    })
}

/// The runtime for `workers` threads: one runs on the main thread (a current-thread runtime,
/// like linkerd2-proxy's default for a sidecar that shares its pod's CPUs with the app); 0 means
/// one per CPU the process may use, which the standard library reads from the cgroup quota too.
fn runtime(workers: usize) -> tokio::runtime::Builder {
    if workers == 1 {
        return tokio::runtime::Builder::new_current_thread();
    }
    let threads = match workers {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(threads);
    builder
}
