//! Logging through `log` and `fern`, one line per event, with the
//! connection id (`c…`/`s…`) in every line about a connection.
//!
//! **Sinks.** The console (stderr, or stdout with `log_to_stdout`) always;
//! the file `log_file` (append mode, created if missing) and syslog
//! (`log_syslog`) when asked for. [`reopen`] swaps the file for a new one at
//! the same path (logrotate: the binary calls it on SIGUSR1 and SIGHUP).
//!
//! **Formats.** `text`: `<time> <LEVEL> [<thread>] <message>`; `json`: one
//! object per line with `time`, `level`, `thread`, `message`. The time is
//! RFC 3339 in UTC with milliseconds. Syslog gets RFC 3164 datagrams,
//! `<PRI>TAG[PID]: <body>`, where the body is the line without its time and
//! level (syslog stamps the time, and the level is in `PRI`): `[<thread>]
//! <message>` in text, the whole object in json.
//!
//! **One record, one line, whatever a peer sent.** Messages quote what
//! clients and servers said (user and database names, application_name,
//! query text, server errors), so a newline in a user name would otherwise
//! start a line of the attacker's making, and an escape sequence would
//! drive the terminal of whoever reads the log. Escaping is done here, once
//! for every sink (console, file and syslog share the formatted line),
//! rather than at each call site that might forget: in `text`, control
//! characters (C0, DEL, C1) and the invisible line and direction marks are
//! written as `\n`, `\r`, `\t`, `\x1b`, `\u{2028}` (backslashes themselves
//! are left alone, so quoted SQL stays readable); `json` escapes as JSON
//! does.
//!
//! **One write per line and sink.** Each line is formatted into a reused
//! per-thread buffer and handed to the kernel with one `write(2)` per sink:
//! `Stderr` is unbuffered, so formatting straight into it costs a system
//! call per fragment (a dozen per line), which showed up as a tenth of the
//! pooler's CPU under connection churn. One write also keeps the lines of
//! different threads whole, in the file (opened `O_APPEND`) as on the
//! console. The syslog socket is non-blocking: when the daemon falls behind,
//! lines are dropped and counted rather than stalling a worker.
//!
//! **Installed once.** The logger is global and the sinks are fixed when it
//! is installed: a reload cannot change the `log_*` keys (they need a
//! restart), only [`reopen`] replaces the file.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::os::fd::AsFd;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{OnceLock, PoisonError, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::{Config, LogFormat};

/// The syslog socket, unless [`SYSLOG_SOCKET_ENV`] names another.
pub const SYSLOG_SOCKET: &str = "/dev/log";

/// Environment variable naming another syslog socket than `/dev/log`; meant
/// for tests (a datagram socket of their own on a machine without syslog).
pub const SYSLOG_SOCKET_ENV: &str = "ODISSEY_SYSLOG_SOCKET";

/// Longest syslog message body sent, in bytes; a longer one is cut (at a
/// character boundary) rather than refused by the socket as too large.
const SYSLOG_MAX_BODY: usize = 32 * 1024;

/// Why the logger could not be set up.
#[derive(Debug)]
#[non_exhaustive]
pub enum LogError {
    /// `log_file` could not be opened for appending.
    File {
        /// The configured path.
        path: String,
        /// What the system said.
        source: io::Error,
    },
    /// No datagram socket for syslog.
    Syslog(io::Error),
    /// `log_syslog_facility` names no facility we know.
    Facility(UnknownFacility),
}

impl fmt::Display for LogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File { path, source } => write!(f, "log_file: cannot open {path:?}: {source}"),
            Self::Syslog(e) => write!(f, "log_syslog: cannot create a socket: {e}"),
            Self::Facility(e) => write!(f, "log_syslog_facility: {e}"),
        }
    }
}

impl std::error::Error for LogError {}

/// A `log_syslog_facility` that is not one of [`FACILITIES`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownFacility(pub String);

impl fmt::Display for UnknownFacility {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown syslog facility {:?} (expected one of: {})",
            self.0,
            FACILITIES
                .iter()
                .map(|(name, _)| *name)
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

impl std::error::Error for UnknownFacility {}

/// The syslog facilities `log_syslog_facility` accepts, with their codes
/// (RFC 3164, section 4.1.1).
pub const FACILITIES: [(&str, u8); 10] = [
    ("daemon", 3),
    ("user", 1),
    ("local0", 16),
    ("local1", 17),
    ("local2", 18),
    ("local3", 19),
    ("local4", 20),
    ("local5", 21),
    ("local6", 22),
    ("local7", 23),
];

/// The code of a `log_syslog_facility` value; the check config validation
/// runs on that key.
pub fn syslog_facility(name: &str) -> Result<u8, UnknownFacility> {
    FACILITIES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, code)| *code)
        .ok_or_else(|| UnknownFacility(name.to_string()))
}

/// Installs a stderr, text-format logger at debug or info level (what the
/// tests use); a no-op when a logger is installed already.
pub fn init(debug: bool) {
    let sinks = Sinks {
        format: LogFormat::Text,
        console: console(false),
        file: None,
        syslog: None,
    };
    install(sinks, debug);
}

/// Installs the logger `cfg` asks for: the console, `log_file`,
/// `log_syslog`, in `log_format`, at `log_debug`'s level. Call it once, at
/// start-up, before anything logs; a later call (or one after [`init`]) is
/// a no-op. The `log_*` keys of a reloaded config are not looked at again.
pub fn init_from(cfg: &Config) -> Result<(), LogError> {
    if SINKS.get().is_some() {
        return Ok(());
    }
    let file = match &cfg.log_file {
        Some(path) => Some(LogFile {
            file: RwLock::new(open_log_file(path)?),
            path: path.clone(),
        }),
        None => None,
    };
    let syslog = if cfg.log_syslog {
        let facility = syslog_facility(&cfg.log_syslog_facility).map_err(LogError::Facility)?;
        let socket = UnixDatagram::unbound().map_err(LogError::Syslog)?;
        socket.set_nonblocking(true).map_err(LogError::Syslog)?;
        let path = std::env::var_os(SYSLOG_SOCKET_ENV)
            .filter(|p| !p.is_empty())
            .map_or_else(|| PathBuf::from(SYSLOG_SOCKET), PathBuf::from);
        Some(Syslog {
            socket,
            path,
            facility,
            tag: format!("{}[{}]: ", cfg.log_syslog_ident, std::process::id()),
            dropped: AtomicU64::new(0),
        })
    } else {
        None
    };
    let sinks = Sinks {
        format: cfg.log_format,
        console: console(cfg.log_to_stdout),
        file,
        syslog,
    };
    install(sinks, cfg.log_debug);
    if let Some(path) = SINKS.get().and_then(|s| s.syslog.as_ref()).map(|s| &s.path) {
        if !path.exists() {
            log::warn!(
                "log_syslog: no socket at {}: syslog lines are dropped (and counted) until it appears",
                path.display()
            );
        }
    }
    Ok(())
}

/// Reopens `log_file` at its configured path, so that after logrotate
/// renamed it new lines go to a new file there. Lines being written while
/// it runs go whole to the old file or the new one. Does nothing when no
/// file is configured; on error the old file is kept.
pub fn reopen() -> Result<(), LogError> {
    let Some(log_file) = SINKS.get().and_then(|s| s.file.as_ref()) else {
        return Ok(());
    };
    // Open before locking: writers wait only for the swap.
    let fresh = open_log_file(&log_file.path)?;
    let old = std::mem::replace(
        &mut *log_file
            .file
            .write()
            .unwrap_or_else(PoisonError::into_inner),
        fresh,
    );
    drop(old);
    Ok(())
}

/// Whether the installed logger writes a file (that [`reopen`] reopens).
pub fn has_file() -> bool {
    SINKS.get().is_some_and(|s| s.file.is_some())
}

fn open_log_file(path: &str) -> Result<File, LogError> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .map_err(|source| LogError::File {
            path: path.to_string(),
            source,
        })
}

/// Our own descriptor for stdout or stderr, written with plain `write(2)`
/// (`Stdout` would buffer; both would take a lock). `None` when the
/// descriptor is closed.
fn console(stdout: bool) -> Option<File> {
    let fd = if stdout {
        io::stdout().as_fd().try_clone_to_owned()
    } else {
        io::stderr().as_fd().try_clone_to_owned()
    };
    fd.ok().map(File::from)
}

/// Everything a line goes to; fixed once installed.
struct Sinks {
    format: LogFormat,
    console: Option<File>,
    file: Option<LogFile>,
    syslog: Option<Syslog>,
}

struct LogFile {
    path: String,
    /// Writers share the read lock (one `write(2)` each, `O_APPEND` keeps
    /// them whole); [`reopen`] takes the write lock only to swap.
    file: RwLock<File>,
}

struct Syslog {
    socket: UnixDatagram,
    path: PathBuf,
    facility: u8,
    /// `TAG[PID]: `.
    tag: String,
    /// Lines the socket refused since the last one it took.
    dropped: AtomicU64,
}

impl Syslog {
    /// Sends `body` as one datagram, then reports lines dropped before it.
    fn send(&self, datagram: &mut Vec<u8>, level: log::Level, body: &str) {
        if self.send_one(datagram, severity(level), cut(body, SYSLOG_MAX_BODY)) {
            let dropped = self.dropped.swap(0, Ordering::Relaxed);
            if dropped > 0 {
                let note = format!("syslog: {dropped} line(s) dropped (socket full or absent)");
                self.send_one(datagram, severity(log::Level::Warn), &note);
            }
        }
    }

    fn send_one(&self, datagram: &mut Vec<u8>, severity: u8, body: &str) -> bool {
        datagram.clear();
        let _ = write!(
            datagram,
            "<{}>",
            u16::from(self.facility) * 8 + u16::from(severity)
        );
        datagram.extend_from_slice(self.tag.as_bytes());
        datagram.extend_from_slice(body.as_bytes());
        let sent = self.socket.send_to(datagram, &self.path).is_ok();
        if !sent {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        sent
    }
}

/// The RFC 3164 severity of a level.
fn severity(level: log::Level) -> u8 {
    match level {
        log::Level::Error => 3,
        log::Level::Warn => 4,
        log::Level::Info => 6,
        log::Level::Debug | log::Level::Trace => 7,
    }
}

/// `s` cut to at most `max` bytes, at a character boundary.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

static SINKS: OnceLock<Sinks> = OnceLock::new();

fn install(sinks: Sinks, debug: bool) {
    if SINKS.set(sinks).is_err() {
        return;
    }
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

/// The per-thread buffers a line is built in.
struct Buffers {
    line: String,
    datagram: Vec<u8>,
}

thread_local! {
    static BUFFERS: RefCell<Buffers> = RefCell::new(Buffers {
        line: String::with_capacity(256),
        datagram: Vec::new(),
    });
}

/// Formats one record and writes it whole to every sink.
fn emit(record: &log::Record<'_>) {
    let Some(sinks) = SINKS.get() else {
        return;
    };
    BUFFERS.with(|buffers| {
        let Ok(mut buffers) = buffers.try_borrow_mut() else {
            // Logging from inside a Display impl that is being logged:
            // nothing sensible to do but skip the inner line.
            return;
        };
        let Buffers { line, datagram } = &mut *buffers;
        line.clear();
        let body = format_line(line, sinks.format, SystemTime::now(), record);
        // A failed write has nowhere to be reported.
        if let Some(console) = &sinks.console {
            let _ = (&*console).write_all(line.as_bytes());
        }
        if let Some(log_file) = &sinks.file {
            let file = log_file.file.read().unwrap_or_else(PoisonError::into_inner);
            let _ = (&*file).write_all(line.as_bytes());
        }
        if let Some(syslog) = &sinks.syslog {
            let end = line.len() - 1; // the newline
            syslog.send(datagram, record.level(), &line[body..end]);
        }
        // One huge line (a long query in a debug message) must not pin its
        // buffers for the life of the thread.
        if line.capacity() > 64 * 1024 {
            *line = String::with_capacity(256);
        }
        if datagram.capacity() > 64 * 1024 {
            *datagram = Vec::new();
        }
    });
}

/// Appends `record` as one `\n`-terminated line; returns where the part
/// syslog gets starts (after the time and level in text, the whole object
/// in json).
fn format_line(
    line: &mut String,
    format: LogFormat,
    now: SystemTime,
    record: &log::Record<'_>,
) -> usize {
    let thread = std::thread::current();
    let thread = thread.name().unwrap_or("main");
    match format {
        LogFormat::Text => {
            push_rfc3339(line, now);
            let _ = write!(line, " {} ", record.level());
            let body = line.len();
            let _ = write!(line, "[{thread}] ");
            let _ = write!(TextEscaped(line), "{}", record.args());
            line.push('\n');
            body
        }
        LogFormat::Json => {
            line.push_str("{\"time\":\"");
            push_rfc3339(line, now);
            let _ = write!(line, "\",\"level\":\"{}\",\"thread\":", record.level());
            push_json_string(line, thread);
            line.push_str(",\"message\":\"");
            let _ = write!(JsonEscaped(line), "{}", record.args());
            line.push_str("\"}\n");
            0
        }
    }
}

/// Unix time `ms` as [`push_rfc3339`] writes it (the console).
pub(crate) fn rfc3339_ms(ms: u64) -> String {
    let mut s = String::new();
    push_rfc3339(&mut s, UNIX_EPOCH + std::time::Duration::from_millis(ms));
    s
}

/// `2024-02-29T23:59:59.123Z`: RFC 3339, UTC, milliseconds.
fn push_rfc3339(out: &mut String, t: SystemTime) {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (year, month, day) = civil_from_days(secs / 86_400);
    let sod = secs % 86_400;
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        sod / 3600,
        sod / 60 % 60,
        sod % 60,
        since.subsec_millis()
    );
}

/// Year, month, day of the `days`-th day after 1970-01-01 (H. Hinnant's
/// `civil_from_days`, for days on or after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468; // days since 0000-03-01
    let era = z / 146_097;
    let doe = z % 146_097; // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365], from March 1st
    let mp = (5 * doy + 2) / 153; // [0, 11], March = 0
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// Appends `s` as a JSON string, quotes included.
fn push_json_string(out: &mut String, s: &str) {
    out.push('"');
    push_json_escaped(out, s);
    out.push('"');
}

/// Appends `s` escaped for the inside of a JSON string: quotes,
/// backslashes and control characters (and U+2028/U+2029, which some
/// JavaScript readers choke on); other non-ASCII text stays as UTF-8.
fn push_json_escaped(out: &mut String, s: &str) {
    let mut plain = 0;
    for (i, c) in s.char_indices() {
        let escape = match c {
            '"' => "\\\"",
            '\\' => "\\\\",
            '\n' => "\\n",
            '\r' => "\\r",
            '\t' => "\\t",
            '\u{8}' => "\\b",
            '\u{c}' => "\\f",
            c if c.is_control() || c == '\u{2028}' || c == '\u{2029}' => "",
            _ => continue,
        };
        out.push_str(&s[plain..i]);
        if escape.is_empty() {
            // `char::is_control` covers C0, DEL and C1: all in the BMP.
            let _ = write!(out, "\\u{:04x}", u32::from(c));
        } else {
            out.push_str(escape);
        }
        plain = i + c.len_utf8();
    }
    out.push_str(&s[plain..]);
}

/// A `fmt::Write` that escapes what goes through it for a JSON string, so
/// a message is formatted and escaped without a temporary `String`.
struct JsonEscaped<'a>(&'a mut String);

impl fmt::Write for JsonEscaped<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        push_json_escaped(self.0, s);
        Ok(())
    }
}

/// Appends `s` with every character that could break or disguise a text
/// line escaped (see the module's notes): C0 controls, DEL and C1
/// controls, the Unicode line and paragraph separators, and the marks that
/// reorder how a line displays (bidirectional embeddings, overrides and
/// isolates). Everything else, backslashes included, stays as it is.
fn push_text_escaped(out: &mut String, s: &str) {
    // The common case: printable ASCII only.
    if s.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        out.push_str(s);
        return;
    }
    let mut plain = 0;
    for (i, c) in s.char_indices() {
        let escape = match c {
            '\n' => "\\n",
            '\r' => "\\r",
            '\t' => "\\t",
            c if c.is_control() || is_invisible_mark(c) => "",
            _ => continue,
        };
        out.push_str(&s[plain..i]);
        if !escape.is_empty() {
            out.push_str(escape);
        } else if c.is_ascii() {
            let _ = write!(out, "\\x{:02x}", u32::from(c));
        } else {
            let _ = write!(out, "\\u{{{:04x}}}", u32::from(c));
        }
        plain = i + c.len_utf8();
    }
    out.push_str(&s[plain..]);
}

/// Characters that are not controls but still change how a line reads: the
/// line and paragraph separators, the left-to-right/right-to-left marks,
/// embeddings, overrides and isolates ("Trojan Source", CVE-2021-42574).
fn is_invisible_mark(c: char) -> bool {
    matches!(
        c,
        '\u{200e}' | '\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
    )
}

/// A `fmt::Write` that escapes what goes through it for a text line.
struct TextEscaped<'a>(&'a mut String);

impl fmt::Write for TextEscaped<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        push_text_escaped(self.0, s);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(secs: u64, millis: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(secs * 1000 + millis)
    }

    fn line(format: LogFormat, level: log::Level, args: fmt::Arguments<'_>) -> (String, usize) {
        let mut line = String::new();
        let body = format_line(
            &mut line,
            format,
            at(1_700_000_000, 42),
            &log::Record::builder().args(args).level(level).build(),
        );
        (line, body)
    }

    #[test]
    fn a_text_record_becomes_one_terminated_line() {
        let (line, body) = line(
            LogFormat::Text,
            log::Level::Info,
            format_args!("c1: login as {}@{}", "u", "d"),
        );
        assert!(
            line.starts_with("2023-11-14T22:13:20.042Z INFO ["),
            "{line}"
        );
        assert!(line.ends_with("] c1: login as u@d\n"), "{line}");
        assert_eq!(line.matches('\n').count(), 1);
        assert!(line[body..].starts_with('['), "{}", &line[body..]);
    }

    #[test]
    fn a_json_record_is_one_escaped_object() {
        let (line, body) = line(
            LogFormat::Json,
            log::Level::Warn,
            format_args!("say \"{}\"\n", "hé\\"),
        );
        assert_eq!(body, 0);
        let thread = std::thread::current();
        let mut name = String::new();
        push_json_string(&mut name, thread.name().unwrap_or("main"));
        assert_eq!(
            line,
            format!(
                "{{\"time\":\"2023-11-14T22:13:20.042Z\",\"level\":\"WARN\",\
                 \"thread\":{name},\"message\":\"say \\\"hé\\\\\\\"\\n\"}}\n"
            )
        );
    }

    #[test]
    fn a_forged_line_stays_inside_the_text_record() {
        let user = "x\n2026-01-01T00:00:00.000Z INFO [odissey-worker-0] cX: login as admin@console";
        let (line, body) = line(
            LogFormat::Text,
            log::Level::Info,
            format_args!("c1: login refused: no route for user \"{user}\""),
        );
        assert_eq!(line.matches('\n').count(), 1, "{line}");
        assert!(line.ends_with('\n'));
        assert!(
            line.contains("user \"x\\n2026-01-01T00:00:00.000Z INFO [odissey-worker-0] cX:"),
            "{line}"
        );
        // Syslog gets the same escaped body.
        assert!(!line[body..line.len() - 1].contains('\n'));
    }

    #[test]
    fn text_escaping() {
        let mut out = String::new();
        push_text_escaped(
            &mut out,
            "a\\b\"c\n\r\t\u{0}\u{1b}[2J\u{7f}\u{85}é€😀\u{2028}\u{202e}\u{2066}/",
        );
        assert_eq!(
            out,
            "a\\b\"c\\n\\r\\t\\x00\\x1b[2J\\x7f\\u{0085}é€😀\\u{2028}\\u{202e}\\u{2066}/"
        );
        // Printable text goes through as it is, and in pieces.
        let mut out = String::new();
        let (plain, control) = ("plain text", "a\u{8}");
        let _ = write!(TextEscaped(&mut out), "{plain}|{control}");
        assert_eq!(out, "plain text|a\\x08");
    }

    #[test]
    fn json_escaping() {
        let mut out = String::new();
        push_json_escaped(
            &mut out,
            "a\"b\\c\n\r\t\u{8}\u{c}\u{0}\u{1f}\u{7f}\u{85}é€😀\u{2028}/",
        );
        assert_eq!(
            out,
            "a\\\"b\\\\c\\n\\r\\t\\b\\f\\u0000\\u001f\\u007f\\u0085é€😀\\u2028/"
        );
        let mut out = String::new();
        push_json_string(&mut out, "");
        assert_eq!(out, "\"\"");
        // Through the fmt adapter, in pieces.
        let mut out = String::new();
        let piece = "x\"";
        let _ = write!(JsonEscaped(&mut out), "{piece}{}", 1);
        assert_eq!(out, "x\\\"1");
    }

    #[test]
    fn rfc3339_times() {
        let cases = [
            (0, 0, "1970-01-01T00:00:00.000Z"),
            (951_782_400, 7, "2000-02-29T00:00:00.007Z"),
            (1_709_251_199, 999, "2024-02-29T23:59:59.999Z"),
            (4_107_542_399, 0, "2100-02-28T23:59:59.000Z"),
            (253_402_300_799, 500, "9999-12-31T23:59:59.500Z"),
        ];
        for (secs, millis, want) in cases {
            let mut out = String::new();
            push_rfc3339(&mut out, at(secs, millis));
            assert_eq!(out, want);
        }
    }

    #[test]
    fn facilities() {
        assert_eq!(syslog_facility("daemon"), Ok(3));
        assert_eq!(syslog_facility("user"), Ok(1));
        assert_eq!(syslog_facility("local0"), Ok(16));
        assert_eq!(syslog_facility("local7"), Ok(23));
        let e = syslog_facility("local8").unwrap_err();
        assert!(e.to_string().contains("\"local8\""), "{e}");
        assert!(syslog_facility("Daemon").is_err());
    }

    #[test]
    fn syslog_datagrams() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let receiver = UnixDatagram::bind(&path).unwrap();
        let socket = UnixDatagram::unbound().unwrap();
        socket.set_nonblocking(true).unwrap();
        let syslog = Syslog {
            socket,
            path: path.clone(),
            facility: 16,
            tag: "tag[7]: ".into(),
            dropped: AtomicU64::new(2),
        };
        let mut datagram = Vec::new();
        syslog.send(&mut datagram, log::Level::Error, "[t] boom");
        let mut buf = [0; 256];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"<131>tag[7]: [t] boom");
        let n = receiver.recv(&mut buf).unwrap();
        let note = String::from_utf8_lossy(&buf[..n]);
        assert!(note.starts_with("<132>tag[7]: syslog: 2 line(s)"), "{note}");
    }

    #[test]
    fn cut_keeps_whole_characters() {
        assert_eq!(cut("héllo", 2), "h");
        assert_eq!(cut("héllo", 3), "hé");
        assert_eq!(cut("hé", 10), "hé");
    }
}
