//! Logging through `log` and `fern`: to stderr, one line per event, with
//! the connection id (`c…`/`s…`) in every line about a connection.
//!
//! Each line is formatted into a reused per-thread buffer and handed to the
//! kernel with one `write(2)`: `Stderr` is unbuffered, so formatting straight
//! into it costs a system call per fragment (a dozen per line), which showed
//! up as a tenth of the pooler's CPU under connection churn.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::io::Write as _;

thread_local! {
    static LINE: RefCell<String> = RefCell::new(String::with_capacity(256));
}

/// Installs the global logger; a second call (e.g. in tests) is a no-op.
pub fn init(debug: bool) {
    let level = if debug {
        log::LevelFilter::Debug
    } else {
        log::LevelFilter::Info
    };
    let _ = fern::Dispatch::new()
        .level(level)
        .chain(fern::Output::call(emit))
        .apply();
}

/// Formats one record as a line and writes it whole.
fn emit(record: &log::Record<'_>) {
    LINE.with(|line| {
        let Ok(mut line) = line.try_borrow_mut() else {
            // Logging from inside a Display impl that is being logged:
            // nothing sensible to do but skip the inner line.
            return;
        };
        line.clear();
        format_line(&mut line, record);
        // A failed write to stderr has nowhere to be reported.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
        if line.capacity() > 64 * 1024 {
            // One huge line (a long query in a debug message) must not pin
            // its buffer for the life of the thread.
            *line = String::with_capacity(256);
        }
    });
}

fn format_line(line: &mut String, record: &log::Record<'_>) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let _ = writeln!(
        line,
        "{}.{:03} {} [{}] {}",
        now.as_secs(),
        now.subsec_millis(),
        record.level(),
        std::thread::current().name().unwrap_or("main"),
        record.args()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_becomes_one_terminated_line() {
        let mut line = String::new();
        format_line(
            &mut line,
            &log::Record::builder()
                .args(format_args!("c1: login as {}@{}", "u", "d"))
                .level(log::Level::Info)
                .build(),
        );
        assert!(line.contains(" INFO ["), "{line}");
        assert!(line.ends_with("] c1: login as u@d\n"), "{line}");
        assert_eq!(line.matches('\n').count(), 1);
    }
}
