//! The `odissey` binary: `odissey [--daemonize] [CONFIG.toml]`,
//! `odissey --check CONFIG.toml`, `odissey --print-config [CONFIG.toml]`,
//! `odissey --version`. Without a config file it runs on built-in defaults
//! (see `Config::zero_config_toml`).
//!
//! Online restart: SIGUSR2 starts a successor (this binary, these
//! arguments) with `ODISSEY_REPLACES` set to this process's id; the
//! successor binds the same addresses (SO_REUSEPORT) and, once it serves,
//! sends this process SIGTERM, which drains it.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use odissey::config::Config;
use odissey::ConfigSource;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1, SIGUSR2};
use signal_hook::iterator::Signals;

const USAGE: &str = "\
usage: odissey [CONFIG.toml]             run (built-in defaults without a file)
       odissey --daemonize CONFIG.toml   run in the background (log to log_file
                                         or syslog; pid in pid_file)
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
        ["--daemonize", path] => daemonize(path),
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

/// Reopens `log_file` (SIGUSR1, SIGHUP): after logrotate renamed it, new
/// lines go to a new file at the configured path.
fn reopen_log() {
    if !odissey::logging::has_file() {
        return;
    }
    match odissey::logging::reopen() {
        Ok(()) => log::info!("log file reopened"),
        Err(e) => log::error!("{e}; still writing to the old file"),
    }
}

/// The environment variable that tells a successor whom it replaces.
const REPLACES: &str = "ODISSEY_REPLACES";

/// Starts this binary again in the background, detached from the terminal
/// (its own process group, no stdin/stdout/stderr), and returns once it runs.
fn daemonize(path: &str) -> ExitCode {
    let cfg = match Config::load(path.as_ref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    if cfg.log_file.is_none() && !cfg.log_syslog {
        eprintln!("warning: --daemonize without log_file or log_syslog: the log is lost");
    }
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("cannot find my own binary: {e}");
            return ExitCode::FAILURE;
        }
    };
    let child = std::process::Command::new(exe)
        .arg(path)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cannot start in the background: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Running once its pid file names it (or, without one, once it has not
    // failed at start for a moment).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            eprintln!("odissey failed to start in the background ({status}); see its log");
            return ExitCode::FAILURE;
        }
        let up = match &cfg.pid_file {
            Some(f) => std::fs::read_to_string(f).is_ok_and(|p| p.trim() == child.id().to_string()),
            None => std::time::Instant::now() + Duration::from_secs(9) > deadline,
        };
        if up {
            println!("{}", child.id());
            return ExitCode::SUCCESS;
        }
        if std::time::Instant::now() > deadline {
            eprintln!("odissey did not come up within 10 s in the background");
            return ExitCode::FAILURE;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGUSR2: starts a successor with the same binary and arguments; it
/// takes over (see the module docs).
fn start_successor() {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            log::error!("online restart: cannot find my own binary: {e}");
            return;
        }
    };
    let spawned = std::process::Command::new(exe)
        .args(std::env::args().skip(1))
        .env(REPLACES, std::process::id().to_string())
        .stdin(std::process::Stdio::null())
        .spawn();
    match spawned {
        Ok(mut child) => {
            log::info!("online restart: successor {} starting", child.id());
            // Reaped here; a successor that fails to start is reported,
            // and this process goes on serving.
            std::thread::spawn(move || {
                if let Ok(status) = child.wait() {
                    if !status.success() {
                        log::error!(
                            "online restart: the successor exited ({status}); still serving"
                        );
                    }
                }
            });
        }
        Err(e) => log::error!("online restart: cannot start a successor: {e}"),
    }
}

/// A successor that serves now tells the process it replaces to drain.
fn replace_predecessor() {
    let Ok(pid) = std::env::var(REPLACES) else {
        return;
    };
    if pid.parse::<u32>().is_err() {
        return;
    }
    log::info!("online restart: serving; asking {pid} to drain");
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        log::warn!("online restart: could not signal {pid}");
    }
}

/// Writes the pid file; removed by `remove_pid_file` unless a successor
/// has written its own meanwhile.
fn write_pid_file(cfg: &Config) {
    if let Some(f) = &cfg.pid_file {
        if let Err(e) = std::fs::write(f, format!("{}\n", std::process::id())) {
            log::error!("cannot write pid_file {f}: {e}");
        }
    }
}

fn remove_pid_file(cfg: &Config) {
    if let Some(f) = &cfg.pid_file {
        let mine =
            std::fs::read_to_string(f).is_ok_and(|p| p.trim() == std::process::id().to_string());
        if mine {
            let _ = std::fs::remove_file(f);
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
    // The sinks are fixed here: a reload does not change the `log_*` keys.
    if let Err(e) = odissey::logging::init_from(&cfg) {
        eprintln!("{e}");
        return ExitCode::FAILURE;
    }
    let grace = Duration::from_millis(cfg.shutdown_timeout);
    let mut signals = match Signals::new([SIGHUP, SIGINT, SIGTERM, SIGUSR1, SIGUSR2]) {
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
    write_pid_file(&cfg);
    replace_predecessor();
    // Signals, or the pooler stopping by itself (the console's SHUTDOWN).
    'running: loop {
        for signal in signals.pending() {
            match signal {
                SIGUSR1 => reopen_log(),
                SIGUSR2 => start_successor(),
                SIGHUP => {
                    reopen_log();
                    match handle.reload(None) {
                        Ok(_) => {}
                        Err(e) => log::error!("reload failed, keeping the running config: {e}"),
                    }
                }
                _ => {
                    log::info!("signal {signal}: graceful shutdown");
                    break 'running;
                }
            }
        }
        if handle.is_stopped() {
            remove_pid_file(&cfg);
            return ExitCode::SUCCESS;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // A second SIGINT or SIGTERM during the grace period stops at once;
    // SIGHUP and SIGUSR1 (logrotate) still reopen the log file.
    let handle_thread = std::thread::spawn(move || handle.shutdown(grace));
    std::thread::spawn(move || {
        for signal in signals.forever() {
            match signal {
                SIGHUP | SIGUSR1 => reopen_log(),
                SIGUSR2 => log::warn!("online restart: already draining"),
                _ => {
                    log::warn!("second signal: exiting now");
                    std::process::exit(1);
                }
            }
        }
    });
    let done = handle_thread.join();
    remove_pid_file(&cfg);
    match done {
        Ok(Ok(())) => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    }
}
