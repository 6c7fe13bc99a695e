//! Session state that follows a client in transaction pooling (sans-IO).
//!
//! A client's session is what PostgreSQL would keep for it between
//! transactions: its settings (startup parameters, `SET`, `RESET`,
//! `set_config(..., false)`, `SET SESSION CHARACTERISTICS`, `SET ROLE`,
//! custom variables) and state that lives in one backend (LISTEN, temporary
//! tables, session advisory locks, SQL `PREPARE`, `WITH HOLD` cursors).
//!
//! odissey does not parse SQL to learn that state: [`scan`] looks at each
//! Query and Parse text for words that *may* change it, cheaply and
//! conservatively. A transaction that contained one is followed, before its
//! server is released, by one [`check_query`] answered to odissey alone;
//! [`Check`] reads its rows into the settings the server now carries and
//! the reasons (if any) the client must keep that server ([`Pin`]).
//! Unmarked transactions, the common case, cost nothing.
//!
//! Settings are replayed on the next server with `set_config` (the value is
//! parsed as in postgresql.conf, so lists such as `search_path` keep their
//! meaning) and the ones the server carries that the client did not ask for
//! are reset ([`sync_queries`]). What cannot be replayed pins the client to
//! its server until it is gone; a pinned client's server is cleaned with
//! `DISCARD ALL` when the client leaves.

/// Settings as `(name, value)`, names in lower case, sorted by name, so
/// two sessions compare equal with `==` whatever order they were set in.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub(crate) struct Settings(Vec<(String, String)>);

impl Settings {
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// Where `name` (any case) is, or would go: names are kept in lower
    /// case, and compared so without allocating.
    fn find(&self, name: &str) -> Result<usize, usize> {
        let lower = name.bytes().map(|b| b.to_ascii_lowercase());
        self.0
            .binary_search_by(|(n, _)| n.bytes().cmp(lower.clone()))
    }

    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.find(name).ok().map(|i| self.0[i].1.as_str())
    }

    /// Sets `name` (any case) to `value`.
    pub(crate) fn set(&mut self, name: &str, value: &str) {
        match self.find(name) {
            Ok(i) => value.clone_into(&mut self.0[i].1),
            Err(i) => self
                .0
                .insert(i, (name.to_ascii_lowercase(), value.to_string())),
        }
    }

    pub(crate) fn remove(&mut self, name: &str) {
        if let Ok(i) = self.find(name) {
            self.0.remove(i);
        }
    }

    pub(crate) fn clear(&mut self) {
        self.0.clear();
    }
}

/// What a query text may do to the session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Scan {
    /// It may change the session (a setting, LISTEN, a temp table...):
    /// the server is checked before it is released.
    pub(crate) marks: bool,
    /// It may end state that pins (`DROP`, `CLOSE`): matters only to a
    /// pinned client, whose server is checked again.
    pub(crate) unpins: bool,
    /// It calls `set_config` with a name odissey cannot read (an
    /// expression): a custom variable set that way cannot be listed, so
    /// the client keeps its server.
    pub(crate) opaque: bool,
    /// It calls `set_config($n, ...)`: the name is the statement's n-th
    /// parameter (1-based), read from each Bind ([`bind_param`]).
    pub(crate) name_param: Option<u16>,
    /// It may open a savepoint (`SAVEPOINT name`): odissey then leaves a
    /// later LISTEN of the transaction to the server, which alone knows
    /// what a `ROLLBACK TO` undoes (`worker::listen`).
    pub(crate) savepoint: bool,
}

impl Scan {
    pub(crate) fn any(self) -> bool {
        self.marks || self.unpins || self.opaque || self.name_param.is_some()
    }
}

/// Custom variable names a client was seen setting (boxed by the client,
/// which mostly has none: an idle client's every byte counts).
#[derive(Debug, Default)]
pub(crate) struct CustomNames {
    pub(crate) names: Vec<String>,
    /// The client's unnamed statement calls `set_config($n, ...)`: its
    /// Binds name the setting in parameter n.
    pub(crate) unnamed_param: Option<u16>,
}

/// The statement name of a Parse or Bind frame (tag and length included):
/// empty for the unnamed statement. A Bind's comes after its portal's.
pub(crate) fn statement_name(frame: &[u8]) -> &[u8] {
    let body = frame.get(5..).unwrap_or(&[]);
    let mut names = body.split(|&b| b == 0);
    if frame.first() == Some(&b'B') {
        names.next();
    }
    names.next().unwrap_or(&[])
}

/// Most custom variable names a client is followed for.
pub(crate) const MAX_CUSTOM: usize = 64;

/// Statement words that change session state where a statement starts.
const STATEMENT_WORDS: &[&str] = &[
    "set",
    "reset",
    "listen",
    "unlisten",
    "prepare",
    "deallocate",
    "discard",
    "load",
];

/// Words that change session state wherever they are.
const ANYWHERE_WORDS: &[&str] = &["set_config", "temp", "temporary", "pg_temp", "hold"];

/// Identifiers after which `SET` belongs to another statement (`UPDATE t
/// SET`, `ALTER ... SET`) unless they open a PL/pgSQL block or branch,
/// where a SET statement may start.
const BLOCK_WORDS: &[&str] = &["begin", "then", "else", "loop", "do"];

/// Scans SQL text for words that may change session state. Conservative:
/// a word in a string literal or a comment counts too (dynamic SQL in a DO
/// block is a string); what matters is that a real change is never missed
/// by the statements it recognises. Custom variable names (`SET a.b`,
/// `set_config('a.b', ...)`) are added to `names`.
pub(crate) fn scan(sql: &[u8], names: &mut Vec<String>) -> Scan {
    let mut out = Scan::default();
    let mut i = 0;
    // What came before the current token, comments left out: whether a
    // statement may start here.
    let mut starts = true;
    let mut in_comment = 0usize;
    while i < sql.len() {
        let b = sql[i];
        if in_comment > 0 {
            if b == b'*' && sql.get(i + 1) == Some(&b'/') {
                in_comment -= 1;
                i += 2;
                continue;
            }
            if b == b'/' && sql.get(i + 1) == Some(&b'*') {
                in_comment += 1;
                i += 2;
                continue;
            }
        } else if b == b'-' && sql.get(i + 1) == Some(&b'-') {
            // A line comment: its words still mark (conservative), but it
            // does not change where a statement starts.
            let end = sql[i..]
                .iter()
                .position(|&c| c == b'\n')
                .map_or(sql.len(), |p| i + p);
            let mut ignored = Vec::new();
            let inner = scan(&sql[i + 2..end], &mut ignored);
            out.marks |= inner.marks;
            out.unpins |= inner.unpins;
            out.savepoint |= inner.savepoint;
            i = end;
            continue;
        } else if b == b'/' && sql.get(i + 1) == Some(&b'*') {
            in_comment = 1;
            i += 2;
            continue;
        }
        if b.is_ascii_alphabetic() || b == b'_' || b >= 0x80 {
            let start = i;
            while i < sql.len()
                && (sql[i].is_ascii_alphanumeric()
                    || matches!(sql[i], b'_' | b'$')
                    || sql[i] >= 0x80)
            {
                i += 1;
            }
            let word = &sql[start..i];
            let at_start = starts && in_comment == 0;
            classify(word, at_start || in_comment > 0, sql, i, names, &mut out);
            if in_comment == 0 {
                starts = BLOCK_WORDS
                    .iter()
                    .any(|w| word.eq_ignore_ascii_case(w.as_bytes()));
            }
            continue;
        }
        if in_comment == 0 && !b.is_ascii_whitespace() {
            // A quoted identifier is a name (`UPDATE "t" SET`); a number
            // or `.` continues an expression; anything else (`;`, `(`, a
            // quote, `$`) may be followed by a statement.
            starts = !matches!(b, b'"' | b'.' | b'0'..=b'9' | b',' | b'=' | b')');
            if b == b'"' {
                // Skip the quoted name whole: `"set"` is a name.
                i += 1;
                while i < sql.len() && sql[i] != b'"' {
                    i += 1;
                }
            }
        }
        i += 1;
    }
    out
}

fn classify(
    word: &[u8],
    at_start: bool,
    sql: &[u8],
    after: usize,
    names: &mut Vec<String>,
    out: &mut Scan,
) {
    let is = |w: &str| word.eq_ignore_ascii_case(w.as_bytes());
    if at_start && STATEMENT_WORDS.iter().any(|w| is(w)) {
        out.marks = true;
        if is("set") || is("reset") {
            if let Some(name) = set_target(&sql[after..]) {
                remember(names, name);
            }
        }
        return;
    }
    if at_start && (is("drop") || is("close")) {
        out.unpins = true;
        return;
    }
    if at_start && is("savepoint") {
        out.savepoint = true;
        return;
    }
    if ANYWHERE_WORDS.iter().any(|w| is(w)) {
        out.marks = true;
        if is("set_config") {
            match first_arg(&sql[after..]) {
                Some(Arg::Literal(name)) => remember(names, name),
                Some(Arg::Param(n)) if out.name_param.is_none_or(|m| m == n) => {
                    out.name_param = Some(n);
                }
                _ => out.opaque = true,
            }
        }
        return;
    }
    // Session-level advisory lock functions (not the `_xact_` ones), with no
    // allocation: this runs for every word of every scanned query.
    let starts = |p: &[u8]| word.len() >= p.len() && word[..p.len()].eq_ignore_ascii_case(p);
    let advisory = starts(b"pg_advisory_") || starts(b"pg_try_advisory_");
    if advisory && !word.windows(6).any(|w| w.eq_ignore_ascii_case(b"_xact_")) {
        out.marks = true;
    }
}

/// The dotted name after `SET [SESSION]` / `RESET`, if it is a custom
/// variable.
fn set_target(rest: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(rest).ok()?;
    let mut words = text.split(|c: char| c.is_whitespace() || c == '=' || c == ';');
    let mut w = words.find(|w| !w.is_empty())?;
    if w.eq_ignore_ascii_case("session") {
        w = words.find(|w| !w.is_empty())?;
    }
    w.contains('.').then_some(w)
}

/// A call's first argument, when odissey can know its value.
enum Arg<'a> {
    /// A plain string literal: `('a.b', ...)`.
    Literal(&'a str),
    /// A parameter placeholder, maybe cast: `($2, ...)`, `($1::text, ...)`.
    Param(u16),
}

fn first_arg(rest: &[u8]) -> Option<Arg<'_>> {
    let text = std::str::from_utf8(rest).ok()?.trim_start();
    let text = text.strip_prefix('(')?.trim_start();
    if let Some(text) = text.strip_prefix('\'') {
        let end = text.find('\'')?;
        // `'a''b'` is not a plain literal: odissey does not unquote.
        return (!text[end + 1..].starts_with('\'')).then(|| Arg::Literal(&text[..end]));
    }
    let digits = text.strip_prefix('$')?;
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    let after = digits[end..].trim_start();
    if !(after.starts_with(',') || after.starts_with("::")) {
        return None;
    }
    digits[..end]
        .parse()
        .ok()
        .filter(|n| *n > 0)
        .map(Arg::Param)
}

/// The value of parameter `n` (1-based) of a Bind frame (tag and length
/// included), in either format: `set_config`'s name is text, whose binary
/// form is its bytes. None for a NULL, a missing parameter or a malformed
/// frame.
pub(crate) fn bind_param(frame: &[u8], n: u16) -> Option<&[u8]> {
    let body = frame.get(5..)?;
    let mut at = 0;
    for _ in 0..2 {
        // The portal's and the statement's names.
        at += body.get(at..)?.iter().position(|&b| b == 0)? + 1;
    }
    let u16_at =
        |i: usize| -> Option<u16> { Some(u16::from_be_bytes([*body.get(i)?, *body.get(i + 1)?])) };
    let formats = usize::from(u16_at(at)?);
    at += 2 + 2 * formats;
    let params = u16_at(at)?;
    at += 2;
    if n == 0 || n > params {
        return None;
    }
    for i in 1..=params {
        let len = i32::from_be_bytes(body.get(at..at + 4)?.try_into().ok()?);
        at += 4;
        let value = if len < 0 {
            None
        } else {
            let v = body.get(at..at + len as usize)?;
            at += len as usize;
            Some(v)
        };
        if i == n {
            return value;
        }
    }
    None
}

/// Records the name a Bind gave `set_config` (see [`Scan::name_param`]):
/// a custom variable to read back by name. Anything that is not a valid
/// name is left to the check, which sees every other setting.
pub(crate) fn remember_bound(names: &mut Vec<String>, value: &[u8]) {
    if let Ok(name) = std::str::from_utf8(value) {
        remember(names, name);
    }
}

/// Records a custom variable name (a name with a dot: the others are in
/// pg_settings).
fn remember(names: &mut Vec<String>, name: &str) {
    if !name.contains('.') || !valid_name(name) || names.len() >= MAX_CUSTOM {
        return;
    }
    let name = name.to_ascii_lowercase();
    if !names.contains(&name) {
        names.push(name);
    }
}

/// True for a parameter name we may put in SQL (letters, digits, `_`,
/// dots between words, as PostgreSQL's GUC names).
pub(crate) fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        && !name.ends_with('.')
        && name.len() <= 63
}

/// `value` as a SQL string literal that means the same whatever the
/// session's `standard_conforming_strings`: single quotes when it holds no
/// backslash, else dollar quotes. None for a NUL (PostgreSQL has none in
/// text).
pub(crate) fn literal(value: &str) -> Option<String> {
    if value.contains('\0') {
        return None;
    }
    if !value.contains('\\') {
        return Some(format!("'{}'", value.replace('\'', "''")));
    }
    let mut tag = String::from("$o$");
    let mut n = 0;
    while value.contains(&tag) || value.ends_with('$') {
        n += 1;
        tag = format!("$o{n}$");
        if n > 100 {
            return None;
        }
    }
    Some(format!("{tag}{value}{tag}"))
}

/// Why a client keeps its server: state PostgreSQL keeps in one backend.
pub(crate) type Pin = &'static str;

const PINS: &[(&str, Pin)] = &[
    ("listen", "LISTEN"),
    ("temp", "a temporary table"),
    ("advisory", "a session advisory lock"),
    ("prepare", "an SQL PREPARE"),
    ("cursor", "a WITH HOLD cursor"),
    ("authorization", "SET SESSION AUTHORIZATION"),
];

/// The query that reads a server's session state after a marked
/// transaction: one row per session setting (`s`), custom variable (`c`,
/// for the names given) and pinning state (`p`). Every object is
/// schema-qualified: a client's temporary table must not stand in for a
/// catalog.
pub(crate) fn check_query(custom: &[String], login_user: &str) -> String {
    let mut q = String::from(
        "SELECT 's', name, setting FROM pg_catalog.pg_settings WHERE source = 'session' \
         UNION ALL SELECT 's', 'role', pg_catalog.current_setting('role') \
         WHERE pg_catalog.current_setting('role') <> 'none'",
    );
    let names: Vec<String> = custom
        .iter()
        .filter(|n| valid_name(n))
        .map(|n| format!("'{n}'"))
        .collect();
    if !names.is_empty() {
        q.push_str(&format!(
            " UNION ALL SELECT 'c', n, pg_catalog.current_setting(n, true) \
             FROM pg_catalog.unnest(ARRAY[{}]::text[]) n",
            names.join(",")
        ));
    }
    q.push_str(
        " UNION ALL SELECT 'p', 'listen', NULL \
         WHERE EXISTS (SELECT FROM pg_catalog.pg_listening_channels()) \
         UNION ALL SELECT 'p', 'temp', NULL WHERE EXISTS (SELECT FROM pg_catalog.pg_class \
         WHERE relnamespace = pg_catalog.pg_my_temp_schema()) \
         UNION ALL SELECT 'p', 'advisory', NULL WHERE EXISTS (SELECT FROM pg_catalog.pg_locks \
         WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid()) \
         UNION ALL SELECT 'p', 'prepare', NULL \
         WHERE EXISTS (SELECT FROM pg_catalog.pg_prepared_statements WHERE from_sql) \
         UNION ALL SELECT 'p', 'cursor', NULL WHERE EXISTS (SELECT FROM pg_catalog.pg_cursors)",
    );
    if let Some(user) = literal(login_user) {
        q.push_str(&format!(
            " UNION ALL SELECT 'p', 'authorization', NULL WHERE session_user <> {user}"
        ));
    }
    q
}

/// The answer to a [`check_query`], read row by row.
#[derive(Debug, Default)]
pub(crate) struct Check {
    settings: Settings,
    pin: Option<Pin>,
    /// A row that could not be read, or an ErrorResponse: the server's
    /// state is unknown.
    pub(crate) failed: bool,
}

impl Check {
    /// One DataRow's values.
    pub(crate) fn row(&mut self, values: &[Option<&[u8]>]) {
        fn text(v: Option<&[u8]>) -> Option<&str> {
            v.and_then(|b| std::str::from_utf8(b).ok())
        }
        match values {
            [Some(kind), Some(name), value] => {
                let (Some(name), value) = (text(Some(name)), text(*value)) else {
                    self.failed = true;
                    return;
                };
                match *kind {
                    b"s" => self.settings.set(name, value.unwrap_or("")),
                    // A custom variable once set stays defined, as ''
                    // after RESET: only a value counts.
                    b"c" => {
                        if let Some(v) = value.filter(|v| !v.is_empty()) {
                            self.settings.set(name, v);
                        }
                    }
                    b"p" => {
                        if self.pin.is_none() {
                            self.pin = PINS.iter().find(|(k, _)| *k == name).map(|(_, p)| *p);
                        }
                    }
                    _ => self.failed = true,
                }
            }
            _ => self.failed = true,
        }
    }

    /// The settings the server carries and why the client must keep it;
    /// None when the check failed.
    pub(crate) fn finish(self) -> Option<(Settings, Option<Pin>)> {
        (!self.failed).then_some((self.settings, self.pin))
    }
}

/// Statements (one Query each, so one failure doesn't skip the rest) that
/// turn a server carrying `server` into one carrying `client`: a RESET for
/// each setting the client did not ask for, a `set_config` for each it
/// asked for differently. `role` goes last, so that the others are set as
/// the login user.
pub(crate) fn sync_queries(client: &Settings, server: &Settings) -> Vec<String> {
    let mut out = Vec::new();
    for (name, _) in server.iter() {
        if client.get(name).is_none() && valid_name(name) {
            // Each part quoted: a custom variable may be named with a
            // keyword (`app.user`), which RESET would not parse bare.
            let quoted: Vec<String> = name.split('.').map(|p| format!("\"{p}\"")).collect();
            out.push(format!("RESET {}", quoted.join(".")));
        }
    }
    let mut role = None;
    for (name, value) in client.iter() {
        if server.get(name) == Some(value) || !valid_name(name) {
            continue;
        }
        let Some(lit) = literal(value) else { continue };
        if name == "role" {
            role = Some(format!("SET ROLE {lit}"));
        } else {
            out.push(format!(
                "SELECT pg_catalog.set_config('{name}', {lit}, false)"
            ));
        }
    }
    out.extend(role);
    out
}

/// The text of a simple Query frame (tag and length included), without
/// its terminating NUL.
pub(crate) fn query_text(frame: &[u8]) -> &[u8] {
    frame.get(5..frame.len().saturating_sub(1)).unwrap_or(&[])
}

/// The query text of a Parse frame (tag and length included).
pub(crate) fn parse_text(frame: &[u8]) -> &[u8] {
    let body = frame.get(5..).unwrap_or(&[]);
    let Some(name_end) = body.iter().position(|&b| b == 0) else {
        return &[];
    };
    let rest = &body[name_end + 1..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    &rest[..end]
}

/// True for a startup setting odissey can report the way PostgreSQL would
/// without asking a server: an `application_name` PostgreSQL keeps as it is
/// (printable ASCII, shorter than NAMEDATALEN), a `client_encoding` already
/// in PostgreSQL's spelling.
/// (`name` in any case.)
pub(crate) fn reported_locally(name: &str, value: &str) -> bool {
    if name.eq_ignore_ascii_case("application_name") {
        value.len() < 64 && value.bytes().all(|b| (0x20..0x7f).contains(&b))
    } else if name.eq_ignore_ascii_case("client_encoding") {
        canonical_encoding(value) == Some(value)
    } else {
        false
    }
}

/// What a login's greeting depends on: its settings but those reported
/// locally. Clients with the same key share one greeting.
pub(crate) fn greeting_key(session: &Settings) -> Settings {
    Settings(
        session
            .0
            .iter()
            .filter(|(n, v)| !reported_locally(n, v))
            .cloned()
            .collect(),
    )
}

/// What PostgreSQL says to a login with some startup settings.
#[derive(Debug, Clone)]
pub(crate) enum Greeting {
    /// Its ParameterStatus values, as a server reported them with those
    /// settings applied.
    Ready(std::sync::Arc<crate::params::Params>),
    /// A setting PostgreSQL refused: its error, until `until` (a refusal
    /// may depend on grants or catalog contents that change; a client
    /// retrying in a loop meanwhile costs no server).
    Refused {
        code: String,
        message: String,
        until: std::time::Instant,
    },
}

/// How long a refused set of startup settings is answered without asking a
/// server again.
pub(crate) const REFUSAL_TTL: std::time::Duration = std::time::Duration::from_secs(10);

/// Most greetings a pool remembers: one per distinct set of startup
/// settings (an application sends the same ones on every connection).
const GREETINGS_MAX: usize = 256;

/// A pool's greetings by [`greeting_key`], shared by every worker: once any
/// worker's server has answered for a set of startup settings, logins with
/// the same ones are greeted at once, without a server. The empty key is
/// the pool's own: what its servers report after login.
#[derive(Debug, Default)]
pub(crate) struct Greetings(std::sync::Mutex<std::collections::HashMap<Settings, Greeting>>);

impl Greetings {
    pub(crate) fn get(&self, key: &Settings) -> Option<Greeting> {
        let map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match map.get(key) {
            Some(Greeting::Refused { until, .. }) if *until <= std::time::Instant::now() => None,
            g => g.cloned(),
        }
    }

    /// Remembers a greeting (the first one stays: they are all alike; an
    /// expired refusal is replaced).
    pub(crate) fn put(&self, key: Settings, greeting: Greeting) {
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = std::time::Instant::now();
        map.retain(|_, g| !matches!(g, Greeting::Refused { until, .. } if *until <= now));
        if map.len() < GREETINGS_MAX || key.0.is_empty() {
            map.entry(key).or_insert(greeting);
        }
    }

    /// The pool's own ParameterStatus values, once a server logged in.
    pub(crate) fn base(&self) -> Option<std::sync::Arc<crate::params::Params>> {
        match self.get(&Settings::default()) {
            Some(Greeting::Ready(p)) => Some(p),
            _ => None,
        }
    }
}

/// PostgreSQL's name for a client encoding as a client may spell it
/// (`utf-8`, `euc_jp`, `Latin1`): what the server reports in ParameterStatus.
/// None for a name this table doesn't know (the server decides).
pub(crate) fn canonical_encoding(name: &str) -> Option<&'static str> {
    // pg_encname_tbl: names compared without '-' and '_', case-insensitively.
    const NAMES: &[(&str, &str)] = &[
        ("unicode", "UTF8"),
        ("utf8", "UTF8"),
        ("sqlascii", "SQL_ASCII"),
        ("eucjp", "EUC_JP"),
        ("euccn", "EUC_CN"),
        ("euckr", "EUC_KR"),
        ("euctw", "EUC_TW"),
        ("eucjis2004", "EUC_JIS_2004"),
        ("latin1", "LATIN1"),
        ("latin2", "LATIN2"),
        ("latin3", "LATIN3"),
        ("latin4", "LATIN4"),
        ("latin5", "LATIN5"),
        ("latin6", "LATIN6"),
        ("latin7", "LATIN7"),
        ("latin8", "LATIN8"),
        ("latin9", "LATIN9"),
        ("latin10", "LATIN10"),
        ("iso88591", "LATIN1"),
        ("iso88592", "LATIN2"),
        ("iso88593", "LATIN3"),
        ("iso88594", "LATIN4"),
        ("iso88599", "LATIN5"),
        ("iso885910", "LATIN6"),
        ("iso885913", "LATIN7"),
        ("iso885914", "LATIN8"),
        ("iso885915", "LATIN9"),
        ("iso885916", "LATIN10"),
        ("iso88595", "ISO_8859_5"),
        ("iso88596", "ISO_8859_6"),
        ("iso88597", "ISO_8859_7"),
        ("iso88598", "ISO_8859_8"),
        ("win1250", "WIN1250"),
        ("win1251", "WIN1251"),
        ("win1252", "WIN1252"),
        ("win1253", "WIN1253"),
        ("win1254", "WIN1254"),
        ("win1255", "WIN1255"),
        ("win1256", "WIN1256"),
        ("win1257", "WIN1257"),
        ("win1258", "WIN1258"),
        ("win866", "WIN866"),
        ("win874", "WIN874"),
        ("windows1250", "WIN1250"),
        ("windows1251", "WIN1251"),
        ("windows1252", "WIN1252"),
        ("windows1253", "WIN1253"),
        ("windows1254", "WIN1254"),
        ("windows1255", "WIN1255"),
        ("windows1256", "WIN1256"),
        ("windows1257", "WIN1257"),
        ("windows1258", "WIN1258"),
        ("windows866", "WIN866"),
        ("windows874", "WIN874"),
        ("koi8", "KOI8R"),
        ("koi8r", "KOI8R"),
        ("koi8u", "KOI8U"),
        ("mskanji", "SJIS"),
        ("shiftjis", "SJIS"),
        ("sjis", "SJIS"),
        ("shiftjis2004", "SHIFT_JIS_2004"),
        ("big5", "BIG5"),
        ("gbk", "GBK"),
        ("gb18030", "GB18030"),
        ("uhc", "UHC"),
        ("johab", "JOHAB"),
        ("mulecode", "MULE_INTERNAL"),
        ("muleinternal", "MULE_INTERNAL"),
        ("alt", "WIN866"),
        ("tcvn", "WIN1258"),
        ("tcvn5712", "WIN1258"),
        ("vscii", "WIN1258"),
        ("abc", "WIN1258"),
    ];
    let key: String = name
        .chars()
        .filter(|c| !matches!(c, '-' | '_'))
        .map(|c| c.to_ascii_lowercase())
        .collect();
    NAMES.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marks(sql: &str) -> Scan {
        scan(sql.as_bytes(), &mut Vec::new())
    }

    #[test]
    fn session_changes_are_marked_in_every_form() {
        for sql in [
            "SET search_path TO s1",
            "set session TimeZone = 'UTC'",
            "  /* hi */ SET x.y = 1",
            "-- set the path\nSET search_path = a",
            "BEGIN; SET search_path TO s1; COMMIT",
            "RESET ALL",
            "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "select set_config('search_path', 'a', false)",
            "SELECT pg_catalog.set_config($1, $2, false)",
            "LISTEN ch",
            "unlisten *",
            "CREATE TEMP TABLE t (a int)",
            "create temporary table t as select 1",
            "select * into temp t from x",
            "SELECT pg_advisory_lock(42)",
            "select pg_try_advisory_lock_shared(1, 2)",
            "SELECT pg_advisory_unlock_all()",
            "PREPARE p AS SELECT 1",
            "DEALLOCATE p",
            "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
            "DISCARD ALL",
            "LOAD 'auto_explain'",
            "DO $$ BEGIN SET search_path = a; END $$",
            "DO $$BEGIN EXECUTE 'SET search_path = a'; END$$",
            "SET ROLE app",
            "SET SESSION AUTHORIZATION bob",
            "select 1;set work_mem='1MB'",
        ] {
            assert!(marks(sql).marks, "not marked: {sql}");
        }
    }

    #[test]
    fn savepoints_are_seen_without_marking_the_session() {
        for sql in [
            "SAVEPOINT a",
            "  savepoint \"x y\"",
            "select 1; SAVEPOINT s1",
        ] {
            let sc = marks(sql);
            assert!(sc.savepoint && !sc.marks, "{sql}: {sc:?}");
        }
        for sql in [
            "RELEASE SAVEPOINT a",
            "ROLLBACK TO SAVEPOINT a",
            "ROLLBACK TO a",
        ] {
            assert!(!marks(sql).savepoint, "{sql}");
        }
    }

    #[test]
    fn ordinary_queries_are_not_marked() {
        for sql in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 42;",
            "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 1;",
            "update \"T\" set a = 1",
            "UPDATE t AS x SET a = 1",
            "INSERT INTO t VALUES (1) ON CONFLICT (a) DO UPDATE SET b = 2",
            "ALTER TABLE t ALTER COLUMN c SET DEFAULT 1",
            "SELECT * FROM t ORDER BY a LIMIT 10 OFFSET 20",
            "SELECT reset_count, settings FROM t",
            "BEGIN",
            "COMMIT",
            "SELECT pg_advisory_xact_lock(1)",
            "insert into logs(msg) values ('please reset me')",
        ] {
            assert_eq!(marks(sql), Scan::default(), "marked: {sql}");
        }
    }

    #[test]
    fn custom_variable_names_are_collected() {
        let mut names = Vec::new();
        scan(b"SET app.Tenant = 5", &mut names);
        scan(b"select set_config('my.var', $1, false)", &mut names);
        scan(b"RESET app.tenant", &mut names);
        scan(b"SET search_path = a", &mut names);
        assert_eq!(names, ["app.tenant", "my.var"]);
        let s = scan(b"select set_config($1, $2, false)", &mut names);
        assert_eq!((s.opaque, s.name_param), (false, Some(1)));
        let s = scan(b"select set_config($2::text, $1, false)", &mut names);
        assert_eq!((s.opaque, s.name_param), (false, Some(2)));
        assert!(scan(b"select set_config(lower($1), 'x', false)", &mut names).opaque);
        assert!(scan(b"select set_config('a''b', 'x', false)", &mut names).opaque);
        assert!(!marks("select set_config('search_path', $1, false)").opaque);
        // A Bind's parameters, read back.
        let mut f = bytes::BytesMut::new();
        odissey_protocol::frontend::bind(&mut f, "", "s1", &[Some(b"app.user"), None, Some(b"7")]);
        assert_eq!(bind_param(&f, 1), Some(&b"app.user"[..]));
        assert_eq!(bind_param(&f, 2), None);
        assert_eq!(bind_param(&f, 3), Some(&b"7"[..]));
        assert_eq!(bind_param(&f, 4), None);
        assert_eq!(bind_param(&f[..12], 1), None, "a truncated frame");
        assert_eq!(statement_name(&f), b"s1");
        let mut p = bytes::BytesMut::new();
        odissey_protocol::frontend::parse(&mut p, "", "select 1", &[]);
        assert_eq!(statement_name(&p), b"");
        remember_bound(&mut names, b"App.User");
        assert!(names.contains(&"app.user".to_string()));
        assert!(marks("DROP TABLE t").unpins);
        assert!(!marks("DROP TABLE t").marks);
    }

    #[test]
    fn a_check_is_read_into_settings_and_pins() {
        let mut c = Check::default();
        c.row(&[Some(b"s"), Some(b"search_path"), Some(b"a, b")]);
        c.row(&[Some(b"s"), Some(b"DateStyle"), Some(b"ISO, DMY")]);
        c.row(&[Some(b"c"), Some(b"app.x"), Some(b"")]);
        c.row(&[Some(b"c"), Some(b"app.y"), Some(b"7")]);
        c.row(&[Some(b"p"), Some(b"temp"), None]);
        let (s, pin) = c.finish().expect("a good check");
        assert_eq!(s.get("datestyle"), Some("ISO, DMY"));
        assert_eq!(s.get("app.x"), None);
        assert_eq!(s.get("APP.Y"), Some("7"));
        assert_eq!(pin, Some("a temporary table"));
        let mut c = Check::default();
        c.row(&[Some(b"s")]);
        assert!(c.finish().is_none());
    }

    #[test]
    fn sync_resets_what_the_client_did_not_ask_for_and_sets_the_rest() {
        let mut server = Settings::default();
        server.set("search_path", "s1");
        server.set("statement_timeout", "1500");
        server.set("role", "other");
        let mut client = Settings::default();
        client.set("search_path", "s2, public");
        client.set("role", "mine");
        client.set("TimeZone", "it's");
        let q = sync_queries(&client, &server);
        assert_eq!(
            q,
            [
                "RESET \"statement_timeout\"",
                "SELECT pg_catalog.set_config('search_path', 's2, public', false)",
                "SELECT pg_catalog.set_config('timezone', 'it''s', false)",
                "SET ROLE 'mine'",
            ]
        );
        assert!(sync_queries(&client, &client).is_empty());
        let mut server = Settings::default();
        server.set("app.user", "u");
        assert_eq!(
            sync_queries(&Settings::default(), &server),
            ["RESET \"app\".\"user\""]
        );
        assert_eq!(literal("a\\b").as_deref(), Some("$o$a\\b$o$"));
        assert_eq!(literal("x$o$\\").as_deref(), Some("$o1$x$o$\\$o1$"));
    }

    #[test]
    fn query_texts_are_found_in_frames() {
        let mut f = bytes::BytesMut::new();
        odissey_protocol::frontend::parse(&mut f, "s1", "SET a.b = 1", &[]);
        assert_eq!(parse_text(&f), b"SET a.b = 1");
        let mut f = bytes::BytesMut::new();
        odissey_protocol::frontend::query(&mut f, "LISTEN x");
        assert_eq!(query_text(&f), b"LISTEN x");
    }

    #[test]
    fn greetings_are_kept_and_refusals_expire() {
        let g = Greetings::default();
        let mut key = Settings::default();
        key.set("TimeZone", "Mars/Olympus");
        assert!(g.base().is_none());
        g.put(Settings::default(), Greeting::Ready(Default::default()));
        assert!(g.base().is_some());
        let refused = |until| Greeting::Refused {
            code: "22023".into(),
            message: "invalid value".into(),
            until,
        };
        g.put(key.clone(), refused(std::time::Instant::now()));
        assert!(g.get(&key).is_none(), "an expired refusal is forgotten");
        let later = std::time::Instant::now() + REFUSAL_TTL;
        g.put(key.clone(), refused(later));
        assert!(matches!(g.get(&key), Some(Greeting::Refused { .. })));
        // The locally reported settings are not part of the key.
        let mut s = key.clone();
        s.set("application_name", "app-17");
        s.set("client_encoding", "UTF8");
        assert_eq!(greeting_key(&s), key);
    }

    #[test]
    fn encodings_are_named_as_postgresql_reports_them() {
        assert_eq!(canonical_encoding("utf-8"), Some("UTF8"));
        assert_eq!(canonical_encoding("euc_jp"), Some("EUC_JP"));
        assert_eq!(canonical_encoding("Latin1"), Some("LATIN1"));
        assert_eq!(canonical_encoding("klingon"), None);
    }
}
