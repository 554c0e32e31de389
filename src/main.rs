//! The `sluice` command line: parses arguments and hands over to the library. Run as
//! `ratelimit` (or with `SLUICE_ENV_COMPAT=envoyproxy-ratelimit`), it reads
//! envoyproxy/ratelimit's environment instead (`config::settings::compat`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sluice::config::settings::{Overrides, Settings, compat};

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "A distributed rate-limit service for Envoy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum EnvoyCommand {
    /// The `local_reply_config` block (for the HTTP connection manager) that answers each
    /// route's `rejected_code` other than 429.
    LocalReply {
        /// Directory of limits files
        #[arg(long, default_value = "config/limits")]
        limits_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Serve Envoy's RLS v3 over gRPC.
    Serve {
        /// Settings file (YAML); environment variables SLUICE_* and flags override it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// gRPC listen address [env: SLUICE_GRPC_ADDR, default 0.0.0.0:8081]
        #[arg(long)]
        grpc_addr: Option<String>,
        /// HTTP listen address [env: SLUICE_HTTP_ADDR, default 0.0.0.0:8080]
        #[arg(long)]
        http_addr: Option<String>,
        /// Directory of limits files [env: SLUICE_LIMITS_DIR, default config/limits]
        #[arg(long)]
        limits_dir: Option<PathBuf>,
        /// Counter store: memory or redis [env: SLUICE_BACKEND, default memory]
        #[arg(long)]
        backend: Option<String>,
        /// Log filter, e.g. info or sluice=debug [env: SLUICE_LOG, default info]
        #[arg(long)]
        log: Option<String>,
    },
    /// Validate limits files or directories; prints every error, exits 1 on any.
    Check {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Print Envoy configuration that goes with the limits.
    Envoy {
        #[command(subcommand)]
        what: EnvoyCommand,
    },
    /// Print the version.
    Version,
    /// Serve a no-op RLS that answers OK to everything (the benchmarks' baseline).
    #[command(hide = true)]
    Baseline {
        /// gRPC listen address
        #[arg(long, default_value = "127.0.0.1:8091")]
        grpc_addr: String,
        /// A bare tonic server instead: `Server::builder()` defaults, no health or reflection
        #[arg(long)]
        plain: bool,
    },
}

/// Whether envoyproxy/ratelimit's environment is read: sluice runs as `ratelimit` (their
/// image's program name) or `SLUICE_ENV_COMPAT` names it.
fn ratelimit_compat() -> Result<bool, String> {
    match std::env::var("SLUICE_ENV_COMPAT") {
        Ok(v) if v == compat::COMPAT_NAME => return Ok(true),
        Ok(v) if !v.trim().is_empty() => {
            return Err(format!(
                "SLUICE_ENV_COMPAT: \"{v}\" is not a known environment: the one supported is {}",
                compat::COMPAT_NAME
            ));
        }
        _ => {}
    }
    Ok(started_as_ratelimit())
}

fn started_as_ratelimit() -> bool {
    std::env::args_os()
        .next()
        .map(PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n == compat::PROGRAM_NAME))
        .unwrap_or(false)
}

fn serve(config: Option<PathBuf>, flags: Overrides) -> ExitCode {
    let compat_on = match ratelimit_compat() {
        Ok(on) => on,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let env = |k: &str| std::env::var(k).ok();
    let translation = if compat_on {
        match compat::translate(&env) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        None
    };
    let loaded = match &translation {
        Some(t) => Settings::load(config.as_deref(), t.layered(&env), &flags),
        None => Settings::load(config.as_deref(), env, &flags),
    };
    let settings = match loaded {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    sluice::server::init_tracing(&settings);
    if let Some(t) = &translation {
        tracing::info!(
            "reading envoyproxy/ratelimit's environment (SLUICE_* variables, when set, win)"
        );
        for (variable, what) in &t.notes {
            if what.starts_with("ignored") {
                tracing::warn!(variable = %variable, "{what}");
            } else {
                tracing::info!(variable = %variable, "{what}");
            }
        }
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(sluice::server::run(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    // envoyproxy/ratelimit's program takes no arguments: `ratelimit` alone serves.
    if started_as_ratelimit() && std::env::args_os().len() == 1 {
        return serve(None, Overrides::default());
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            config,
            grpc_addr,
            http_addr,
            limits_dir,
            backend,
            log,
        } => serve(
            config,
            Overrides {
                grpc_addr,
                http_addr,
                limits_dir,
                backend,
                log,
            },
        ),
        Command::Check { paths } => {
            let mut out = std::io::stdout().lock();
            match sluice::check::check(&paths, &mut out) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Baseline { grpc_addr, plain } => {
            sluice::server::init_tracing(&Settings::default());
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let served = if plain {
                runtime.block_on(sluice::server::run_plain_baseline(&grpc_addr))
            } else {
                runtime.block_on(sluice::server::run_baseline(&grpc_addr))
            };
            match served {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Envoy {
            what: EnvoyCommand::LocalReply { limits_dir },
        } => match sluice::config::load_dir(&limits_dir) {
            Ok(limits) => {
                match sluice::envoy_snippets::local_reply(&limits, 0) {
                    Some(block) => print!("{block}"),
                    None => eprintln!(
                        "every route answers 429: Envoy needs no local_reply_config for sluice"
                    ),
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Version => {
            println!("sluice {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
    }
}
