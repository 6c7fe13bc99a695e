//! The `odissey` binary: `odissey [CONFIG.toml]`, `odissey --check CONFIG.toml`,
//! `odissey --print-config [CONFIG.toml]`, `odissey --version`. Without a
//! config file it runs on built-in defaults (see `Config::zero_config_toml`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use odissey::config::Config;
use odissey::ConfigSource;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

const USAGE: &str = "\
usage: odissey [CONFIG.toml]             run (built-in defaults without a file)
       odissey --check CONFIG.toml       validate a config
       odissey --print-config [CONFIG]   print the effective config as TOML
       odissey --version";

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
        ["--print-config"] => print_config(None),
        ["--print-config", path] => print_config(Some(path)),
        [] => run(None),
        [path] if !path.starts_with('-') => run(Some(PathBuf::from(path))),
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

/// The built-in config, from this process's environment.
fn zero_config() -> String {
    Config::zero_config_toml(|k| std::env::var(k).ok())
}

fn print_config(path: Option<&str>) -> ExitCode {
    let cfg = match path {
        Some(p) => Config::load(p.as_ref()),
        None => Config::parse(&zero_config()),
    };
    match cfg.and_then(|c| c.to_toml()) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn run(path: Option<PathBuf>) -> ExitCode {
    let (cfg, source) = match path {
        Some(path) => (Config::load(&path), ConfigSource::File(path)),
        None => {
            let text = zero_config();
            (Config::parse(&text), ConfigSource::Toml(text))
        }
    };
    let cfg = match cfg {
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
    if matches!(source, ConfigSource::Toml(_)) {
        log::info!("no config file: built-in defaults (odissey --print-config shows them)");
    }
    let handle = match odissey::start(source) {
        Ok(h) => h,
        Err(e) => {
            log::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    // Signals, or the pooler stopping by itself (the console's SHUTDOWN).
    'running: loop {
        for signal in signals.pending() {
            match signal {
                SIGHUP => match handle.reload(None) {
                    Ok(()) => {}
                    Err(e) => log::error!("reload failed, keeping the running config: {e}"),
                },
                _ => {
                    log::info!("signal {signal}: graceful shutdown");
                    break 'running;
                }
            }
        }
        if handle.is_stopped() {
            return ExitCode::SUCCESS;
        }
        std::thread::sleep(Duration::from_millis(50));
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
