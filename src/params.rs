//! Session parameters that follow the client across server connections.
//!
//! In transaction pooling a client borrows a different server connection
//! for each transaction, but its session settings must not change under it
//! nor leak to the next borrower. A client's settings are:
//! - what it asked for at startup (parameters and `-c name=value` options);
//! - every ParameterStatus the server reported while the client held it
//!   (PostgreSQL reports GUC_REPORT parameters, e.g. after `SET TimeZone`);
//! - `SET name TO value` / `RESET name` / `RESET ALL` that the client sent
//!   as a whole simple query (for parameters the server does not report,
//!   such as search_path before PostgreSQL 18 or statement_timeout).
//!
//! Before a server connection serves a client that is not its last owner,
//! [`sync_queries`] gives the SET/RESET statements that bring it in line.
//! What a client sets in other ways (inside a function, a multi-statement
//! query, `SET ROLE`) is not seen; `pool_discard` covers those.

/// Parameters always brought in line on a change of owner, whether or not
/// a client set them.
pub(crate) const TRACKED: &[&str] = &[
    "application_name",
    "client_encoding",
    "DateStyle",
    "IntervalStyle",
    "TimeZone",
    "standard_conforming_strings",
    "search_path",
    "extra_float_digits",
];

/// Server-reported values: (name, value).
pub(crate) type Params = Vec<(String, String)>;

/// A client setting: a plain value (from startup or ParameterStatus) or
/// SQL text to put after `SET name TO` (from the client's own SET).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Value {
    /// A value, quoted as a literal when applied.
    Literal(String),
    /// SQL as the client wrote it, applied as is.
    Sql(String),
}

/// A client's settings.
pub(crate) type ClientParams = Vec<(String, Value)>;

/// The value of `name` (parameter names are case-insensitive).
pub(crate) fn get<'a>(list: &'a [(String, String)], name: &str) -> Option<&'a str> {
    list.iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Sets `name` to `value`, keeping the first spelling of the name.
pub(crate) fn set(list: &mut Params, name: &str, value: &str) {
    match list.iter_mut().find(|(n, _)| n.eq_ignore_ascii_case(name)) {
        Some(p) => value.clone_into(&mut p.1),
        None => list.push((name.to_string(), value.to_string())),
    }
}

/// A client's setting of `name`.
pub(crate) fn client_get<'a>(list: &'a ClientParams, name: &str) -> Option<&'a Value> {
    list.iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
}

/// Records a client setting.
pub(crate) fn client_set(list: &mut ClientParams, name: &str, value: Value) {
    match list.iter_mut().find(|(n, _)| n.eq_ignore_ascii_case(name)) {
        Some(p) => p.1 = value,
        None => list.push((name.to_string(), value)),
    }
}

/// Forgets a client setting (RESET).
pub(crate) fn client_reset(list: &mut ClientParams, name: &str) {
    list.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
}

/// True for a parameter name we can put in SQL unquoted (custom
/// parameters have a dot).
pub(crate) fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        && name.len() <= 63
}

/// `value` as a SQL string literal, or None when it holds characters we
/// will not embed (NUL; backslashes, whose meaning depends on
/// standard_conforming_strings).
pub(crate) fn quote_literal(value: &str) -> Option<String> {
    if value.contains(['\0', '\\']) {
        return None;
    }
    Some(format!("'{}'", value.replace('\'', "''")))
}

/// Parses the startup `options` parameter: `-c name=value` and
/// `--name=value`, with `\` escaping a space, as libpq builds it.
pub(crate) fn parse_options(options: &str) -> Vec<(String, String)> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut escaped = false;
    for ch in options.chars() {
        if escaped {
            word.push(ch);
            escaped = false;
        } else if ch == '\\' {
            escaped = true;
        } else if ch.is_whitespace() {
            if !word.is_empty() {
                words.push(std::mem::take(&mut word));
            }
        } else {
            word.push(ch);
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    let mut out = Vec::new();
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        let setting = if w == "-c" {
            it.next()
        } else if let Some(rest) = w.strip_prefix("-c") {
            Some(rest.to_string())
        } else {
            w.strip_prefix("--").map(str::to_string)
        };
        if let Some((name, value)) = setting.as_deref().and_then(|s| s.split_once('=')) {
            let name = name.replace('-', "_");
            if valid_name(&name) {
                out.push((name, value.to_string()));
            }
        }
    }
    out
}

/// What a simple query does to the session's settings, when it is one
/// plain SET or RESET statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SetCommand {
    /// `SET [SESSION] name {TO|=} value`
    Set(String, String),
    /// `RESET name` or `SET name TO DEFAULT`
    Reset(String),
    /// `RESET ALL`
    ResetAll,
}

/// Recognises a single SET/RESET statement (case-insensitive, optional
/// trailing semicolon). Anything else, including `SET LOCAL`, `SET ROLE`,
/// `SET TRANSACTION`, several statements or comments, gives None.
pub(crate) fn parse_set(sql: &str) -> Option<SetCommand> {
    // Cheap test first: this runs for every short simple query.
    if !matches!(
        sql.trim_start().as_bytes().first(),
        Some(b's' | b'S' | b'r' | b'R')
    ) {
        return None;
    }
    let sql = sql.trim().trim_end_matches(';').trim_end();
    if sql.contains(';') || sql.contains("--") || sql.contains("/*") {
        return None;
    }
    let (first, rest) = split_word(sql)?;
    if first.eq_ignore_ascii_case("RESET") {
        let name = rest.trim();
        if name.eq_ignore_ascii_case("ALL") {
            return Some(SetCommand::ResetAll);
        }
        return valid_name(name).then(|| SetCommand::Reset(name.to_string()));
    }
    if !first.eq_ignore_ascii_case("SET") {
        return None;
    }
    let (mut name, mut rest) = split_word(rest)?;
    if name.eq_ignore_ascii_case("SESSION") {
        (name, rest) = split_word(rest)?;
        if name.eq_ignore_ascii_case("AUTHORIZATION")
            || name.eq_ignore_ascii_case("CHARACTERISTICS")
        {
            return None;
        }
    }
    if name.eq_ignore_ascii_case("LOCAL") {
        return None;
    }
    // `SET name=value` without spaces.
    let (name, value) = match name.split_once('=') {
        Some((n, v)) => (n, format!("{v}{rest}")),
        None => {
            let rest = rest.trim_start();
            let value = if let Some(v) = rest.strip_prefix('=') {
                v
            } else {
                let (to, v) = split_word(rest)?;
                if !to.eq_ignore_ascii_case("TO") {
                    return None;
                }
                v
            };
            (name, value.to_string())
        }
    };
    let value = value.trim();
    if !valid_name(name) || value.is_empty() {
        return None;
    }
    if value.eq_ignore_ascii_case("DEFAULT") {
        return Some(SetCommand::Reset(name.to_string()));
    }
    Some(SetCommand::Set(name.to_string(), value.to_string()))
}

fn split_word(s: &str) -> Option<(&str, &str)> {
    let s = s.trim_start();
    if s.is_empty() {
        return None;
    }
    let end = s.find(char::is_whitespace).unwrap_or(s.len());
    Some((&s[..end], &s[end..]))
}

/// Statements (one per Query message, so one failure doesn't skip the
/// rest) that give a server connection the client's settings.
///
/// `server` holds the values the server reported (its current state for
/// reported parameters); `defaults` the values it reported at login;
/// `applied` the unreported parameters odissey set on it for its last
/// owner (they must be reset for the next one).
pub(crate) fn sync_queries(
    client: &ClientParams,
    server: &[(String, String)],
    defaults: &[(String, String)],
    applied: &[String],
) -> Vec<String> {
    // The tracked names, then the client's others, then the last owner's
    // others, each once; no allocation unless something must be sent.
    let is_tracked = |n: &str| TRACKED.iter().any(|t| t.eq_ignore_ascii_case(n));
    let extra_client = client
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| !is_tracked(n));
    let extra_applied = applied
        .iter()
        .map(String::as_str)
        .filter(|n| !is_tracked(n) && client_get(client, n).is_none());
    let names = TRACKED
        .iter()
        .copied()
        .chain(extra_client)
        .chain(extra_applied);
    let mut out = Vec::new();
    for name in names {
        if !valid_name(name) {
            continue;
        }
        let reported = get(defaults, name).is_some() || get(server, name).is_some();
        match client_get(client, name) {
            Some(Value::Literal(want)) => {
                if reported && get(server, name) == Some(want.as_str()) {
                    continue;
                }
                if let Some(lit) = quote_literal(want) {
                    out.push(format!("SET {name} TO {lit}"));
                }
            }
            Some(Value::Sql(sql)) => out.push(format!("SET {name} TO {sql}")),
            None => {
                if reported && get(server, name) == get(defaults, name) {
                    continue;
                }
                // An unreported parameter is reset only when odissey set it
                // for the last owner: one a client set unseen (inside a
                // transaction or a function) is not known to need it, and
                // resetting every one on each change of owner would cost
                // queries per transaction. pool_discard covers the rest.
                let was_ours = applied.iter().any(|a| a.eq_ignore_ascii_case(name));
                if reported || was_ours {
                    out.push(format!("RESET {name}"));
                }
            }
        }
    }
    out
}

/// The unreported parameters a client's settings put on a server (to be
/// reset when the next owner doesn't want them).
pub(crate) fn applied_by(client: &ClientParams, defaults: &[(String, String)]) -> Vec<String> {
    client
        .iter()
        .filter(|(n, _)| get(defaults, n).is_none())
        .map(|(n, _)| n.clone())
        .collect()
}

/// The canonical spelling of a tracked parameter, if it is one.
pub(crate) fn tracked(name: &str) -> Option<&'static str> {
    TRACKED
        .iter()
        .copied()
        .find(|t| t.eq_ignore_ascii_case(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(v: &[(&str, &str)]) -> Params {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    fn lit(v: &[(&str, &str)]) -> ClientParams {
        v.iter()
            .map(|(a, b)| (a.to_string(), Value::Literal(b.to_string())))
            .collect()
    }

    fn defaults() -> Params {
        p(&[
            ("application_name", ""),
            ("client_encoding", "UTF8"),
            ("DateStyle", "ISO, MDY"),
            ("IntervalStyle", "postgres"),
            ("TimeZone", "UTC"),
            ("standard_conforming_strings", "on"),
        ])
    }

    #[test]
    fn only_differences_of_reported_parameters_are_sent() {
        let defaults = defaults();
        let mut server = defaults.clone();
        set(&mut server, "application_name", "other");
        set(&mut server, "DateStyle", "German");
        let client = lit(&[("application_name", "mine"), ("timezone", "UTC")]);
        let q = sync_queries(&client, &server, &defaults, &[]);
        assert_eq!(q, ["SET application_name TO 'mine'", "RESET DateStyle"]);
        set(&mut server, "application_name", "mine");
        set(&mut server, "DateStyle", "ISO, MDY");
        assert!(
            sync_queries(&client, &server, &defaults, &[]).is_empty(),
            "nothing to do: no query per transaction"
        );
        // What odissey set for the last owner is reset.
        let q = sync_queries(&client, &server, &defaults, &["search_path".into()]);
        assert_eq!(q, ["RESET search_path"]);
    }

    #[test]
    fn client_sql_settings_are_replayed_and_the_last_owners_reset() {
        let defaults = defaults();
        let mut client = ClientParams::new();
        client_set(&mut client, "search_path", Value::Sql("s1, public".into()));
        client_set(&mut client, "statement_timeout", Value::Sql("'5s'".into()));
        let q = sync_queries(&client, &defaults, &defaults, &["work_mem".into()]);
        assert!(
            q.contains(&"SET search_path TO s1, public".to_string()),
            "{q:?}"
        );
        assert!(
            q.contains(&"SET statement_timeout TO '5s'".to_string()),
            "{q:?}"
        );
        assert!(q.contains(&"RESET work_mem".to_string()), "{q:?}");
        assert_eq!(
            applied_by(&client, &defaults),
            ["search_path", "statement_timeout"]
        );
    }

    #[test]
    fn literals_are_quoted_or_refused() {
        let client = lit(&[("search_path", "\"$user\", it's")]);
        let q = sync_queries(&client, &[], &[], &[]);
        assert!(
            q.contains(&"SET search_path TO '\"$user\", it''s'".to_string()),
            "{q:?}"
        );
        assert_eq!(quote_literal("a\\b"), None);
        assert!(!valid_name("x; drop table t"));
        assert!(valid_name("myapp.tenant_id"));
    }

    #[test]
    fn set_statements_are_recognised_conservatively() {
        use SetCommand::*;
        assert_eq!(
            parse_set("SET search_path TO s1, public;"),
            Some(Set("search_path".into(), "s1, public".into()))
        );
        assert_eq!(
            parse_set("set session TimeZone = 'UTC'"),
            Some(Set("TimeZone".into(), "'UTC'".into()))
        );
        assert_eq!(parse_set("SET x.y=3"), Some(Set("x.y".into(), "3".into())));
        assert_eq!(
            parse_set("set work_mem to default"),
            Some(Reset("work_mem".into()))
        );
        assert_eq!(
            parse_set("RESET statement_timeout"),
            Some(Reset("statement_timeout".into()))
        );
        assert_eq!(parse_set("reset all;"), Some(ResetAll));
        for no in [
            "SET LOCAL work_mem = '1MB'",
            "SET ROLE admin",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "SET SESSION AUTHORIZATION bob",
            "SET a = 1; SET b = 2",
            "SET a = 1 -- c",
            "select 1",
            "SET",
        ] {
            assert_eq!(parse_set(no), None, "{no}");
        }
    }

    #[test]
    fn startup_options_are_parsed_like_libpq_builds_them() {
        assert_eq!(
            parse_options(
                "-c search_path=s1,public --statement-timeout=5s -cTimeZone=Asia/Tokyo -c a=b\\ c"
            ),
            vec![
                ("search_path".into(), "s1,public".into()),
                ("statement_timeout".into(), "5s".into()),
                ("TimeZone".into(), "Asia/Tokyo".into()),
                ("a".into(), "b c".into()),
            ]
        );
        assert!(parse_options("-x -c").is_empty());
    }
}
