//! The `ringway` command: `ringway [run] [--config FILE]` starts the gateway,
//! `ringway check [--config FILE]` validates a config and exits. Exit status: 0 after a clean
//! shutdown or a valid check, 1 when start-up fails, 2 for a bad config or bad arguments.

use std::path::PathBuf;
use std::process::ExitCode;

use mimalloc::MiMalloc;
use tracing_subscriber::EnvFilter;

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

const DEFAULT_CONFIG: &str = "config/ringway.toml";

const USAGE: &str = "\
usage: ringway [run] [--config FILE]   start the gateway (default config: config/ringway.toml)
       ringway check [--config FILE]   validate the config and exit
Log level: RINGWAY_LOG (e.g. info, debug, ringway::proxy=debug); default info.";

enum Command {
    Run,
    Check,
}

fn parse_args() -> Result<(Command, PathBuf), lexopt::Error> {
    use lexopt::prelude::*;
    let mut command = Command::Run;
    let mut config = PathBuf::from(DEFAULT_CONFIG);
    let mut parser = lexopt::Parser::from_env();
    let mut first = true;
    while let Some(arg) = parser.next()? {
        match arg {
            Short('c') | Long("config") => config = parser.value()?.into(),
            Short('h') | Long("help") => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            Short('V') | Long("version") => {
                println!("ringway {}", env!("CARGO_PKG_VERSION"));
                std::process::exit(0);
            }
            Value(v) if first && v == "run" => command = Command::Run,
            Value(v) if first && v == "check" => command = Command::Check,
            _ => return Err(arg.unexpected()),
        }
        first = false;
    }
    Ok((command, config))
}

fn main() -> ExitCode {
    let filter = EnvFilter::try_from_env("RINGWAY_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();

    let (command, path) = match parse_args() {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!("error: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let config = match ringway::config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match command {
        Command::Check => {
            println!(
                "{}: ok ({} listeners, {} upstreams, {} routes, {} workers)",
                path.display(),
                config.listeners.len(),
                config.upstreams.len(),
                config.routes.len(),
                config.runtime.workers
            );
            ExitCode::SUCCESS
        }
        Command::Run => {
            tracing::info!(config = %path.display(), workers = config.runtime.workers, "starting");
            match ringway::runtime::run(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}
