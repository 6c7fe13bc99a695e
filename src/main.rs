//! The `odissey` binary: `odissey CONFIG.toml`, `odissey --check CONFIG.toml`,
//! `odissey --version`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use odissey::config::Config;
use odissey::ConfigSource;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

const USAGE: &str = "usage: odissey [--check] CONFIG.toml | --version";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["--version" | "-V"] => {
            println!("odissey {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        ["--help" | "-h"] => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        ["--check", path] => match Config::load(path.as_ref()) {
            Ok(_) => {
                println!("{path}: ok");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        [path] if !path.starts_with('-') => run(PathBuf::from(path)),
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn run(path: PathBuf) -> ExitCode {
    let cfg = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    odissey::logging::init(cfg.log_debug);
    let grace = Duration::from_millis(cfg.shutdown_timeout);
    let mut signals = match Signals::new([SIGHUP, SIGINT, SIGTERM]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let handle = match odissey::start(ConfigSource::File(path)) {
        Ok(h) => h,
        Err(e) => {
            log::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    for signal in signals.forever() {
        match signal {
            SIGHUP => match handle.reload(None) {
                Ok(()) => {}
                Err(e) => log::error!("reload failed, keeping the running config: {e}"),
            },
            _ => {
                log::info!("signal {signal}: graceful shutdown");
                break;
            }
        }
    }
    // A second signal during the grace period stops at once.
    let handle_thread = std::thread::spawn(move || handle.shutdown(grace));
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            log::warn!("second signal: exiting now");
            std::process::exit(1);
        }
    });
    match handle_thread.join() {
        Ok(Ok(())) => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    }
}
