//! The `ringway` command: `ringway [run] [--config FILE]` starts the gateway,
//! `ringway check [--config FILE]` validates a config and exits, `ringway reload` asks the
//! running gateway (through its admin listener) to reload its config. Exit status: 0 after a
//! clean shutdown, a valid check or a reload done; 1 when start-up fails or the reload was not
//! done; 2 for a bad config or bad arguments.

use std::path::PathBuf;
use std::process::ExitCode;

use mimalloc::MiMalloc;
use tracing_subscriber::EnvFilter;

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

const DEFAULT_CONFIG: &str = "config/ringway.toml";

const USAGE: &str = "\
usage: ringway [run] [--config FILE] [--upgrade]
                                       start the gateway (default config: config/ringway.toml);
                                       --upgrade: take over the listening sockets of the ringway
                                       serving at [runtime] upgrade_socket, which then drains
       ringway check [--config FILE]   validate the config and exit
       ringway reload [--config FILE] [--admin HOST:PORT]
                                       ask the running gateway to reload its config (through
                                       the admin listener; default: the config's `admin`)
Log level: RINGWAY_LOG (e.g. info, debug, ringway::proxy=debug); default info.";

enum Command {
    Run { upgrade: bool },
    Check,
    Reload { admin: Option<String> },
}

fn parse_args() -> Result<(Command, PathBuf), lexopt::Error> {
    use lexopt::prelude::*;
    let mut command = Command::Run { upgrade: false };
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
            Value(v) if first && v == "run" => command = Command::Run { upgrade: false },
            Long("upgrade") if matches!(command, Command::Run { .. }) => {
                command = Command::Run { upgrade: true }
            }
            Value(v) if first && v == "check" => command = Command::Check,
            Value(v) if first && v == "reload" => command = Command::Reload { admin: None },
            Long("admin") if matches!(command, Command::Reload { .. }) => {
                command = Command::Reload {
                    admin: Some(parser.value()?.string()?),
                }
            }
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
    if let Command::Reload { admin } = &command {
        return reload(&path, admin.as_deref());
    }
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
        Command::Reload { .. } => ExitCode::SUCCESS,
        Command::Run { upgrade } => {
            tracing::info!(config = %path.display(), workers = config.runtime.workers, "starting");
            let predecessor = match (upgrade, &config.runtime.upgrade_socket) {
                (false, _) => None,
                (true, None) => {
                    eprintln!(
                        "error: {}: --upgrade needs [runtime] upgrade_socket",
                        path.display()
                    );
                    return ExitCode::from(2);
                }
                (true, Some(socket)) => match ringway::upgrade::take_over(socket) {
                    Ok(taken) => Some(taken),
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::from(1);
                    }
                },
            };
            match ringway::runtime::run(config, predecessor) {
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

/// `ringway reload`: `POST /config/reload` to the admin listener, and its answer on stdout.
fn reload(path: &std::path::Path, admin: Option<&str>) -> ExitCode {
    use std::io::{Read, Write};
    let addr = match admin {
        Some(a) => a.to_owned(),
        None => match ringway::config::load(path) {
            Ok(c) => match c.admin {
                // A wildcard address is reached on loopback.
                Some(a) if a.ip().is_unspecified() => format!("127.0.0.1:{}", a.port()),
                Some(a) => a.to_string(),
                None => {
                    eprintln!("error: {}: no `admin` address to send the reload to (give --admin HOST:PORT)", path.display());
                    return ExitCode::from(2);
                }
            },
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        },
    };
    let exchange = || -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect(&addr)?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
        s.write_all(b"POST /config/reload HTTP/1.1\r\nhost: ringway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        Ok(answer)
    };
    match exchange() {
        Ok(answer) => {
            let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
            println!("{body}");
            match head.split(' ').nth(1) {
                Some("200") => ExitCode::SUCCESS,
                Some("400") => ExitCode::from(2),
                _ => ExitCode::from(1),
            }
        }
        Err(e) => {
            eprintln!("error: cannot reach the admin listener at {addr}: {e}");
            ExitCode::from(1)
        }
    }
}
