//! The `sluice` command line: parses arguments and hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sluice::config::settings::{Overrides, Settings};

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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            config,
            grpc_addr,
            http_addr,
            limits_dir,
            backend,
            log,
        } => {
            let flags = Overrides {
                grpc_addr,
                http_addr,
                limits_dir,
                backend,
                log,
            };
            let settings =
                match Settings::load(config.as_deref(), |k| std::env::var(k).ok(), &flags) {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::from(2);
                    }
                };
            sluice::server::init_tracing(&settings);
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
