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

/// The log filter from `RINGWAY_LOG` (default `info`). A bare word must be a level or one of
/// ringway's (or monoio's) targets: `EnvFilter` would take a typo such as `debg` as a target
/// name and silently log nothing at all.
fn log_filter() -> Result<EnvFilter, String> {
    let Ok(spec) = std::env::var("RINGWAY_LOG") else {
        return Ok(EnvFilter::new("info"));
    };
    let levels = ["trace", "debug", "info", "warn", "error", "off"];
    for directive in spec.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let known = directive.contains('=')
            || levels.iter().any(|l| directive.eq_ignore_ascii_case(l))
            || directive.starts_with("ringway")
            || directive.starts_with("monoio");
        if !known {
            return Err(format!(
                "RINGWAY_LOG={spec:?}: {directive:?} is neither a level ({}) nor TARGET=LEVEL",
                levels.join(", ")
            ));
        }
    }
    EnvFilter::try_new(&spec).map_err(|e| format!("RINGWAY_LOG={spec:?}: {e}"))
}

fn main() -> ExitCode {
    let filter = match log_filter() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
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
                    // Once, on stderr: a log line too would print it twice.
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}
