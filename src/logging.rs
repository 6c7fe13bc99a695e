//! Logging through `log` and `fern`: to stderr, one line per event, with
//! the connection id (`c…`/`s…`) in every line about a connection.

/// Installs the global logger; a second call (e.g. in tests) is a no-op.
pub fn init(debug: bool) {
    let level = if debug {
        log::LevelFilter::Debug
    } else {
        log::LevelFilter::Info
    };
    let _ = fern::Dispatch::new()
        .format(|out, message, record| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            out.finish(format_args!(
                "{}.{:03} {} [{}] {}",
                now.as_secs(),
                now.subsec_millis(),
                record.level(),
                std::thread::current().name().unwrap_or("main"),
                message
            ));
        })
        .level(level)
        .chain(std::io::stderr())
        .apply();
}
