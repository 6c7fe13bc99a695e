//! Session parameters that follow the client across server connections.
//!
//! In transaction pooling a client borrows a different server connection
//! for each transaction, but its session settings must not change under it
//! nor leak to the next borrower. A client's settings are what it asked for
//! at startup plus every ParameterStatus the server reported while the
//! client held it. Before a server connection serves a client that is not
//! its last owner, [`sync_queries`] gives the SET/RESET statements that
//! bring the server in line.

/// Parameters odissey carries for clients. The ones PostgreSQL reports with
/// ParameterStatus (GUC_REPORT) are compared with the server's known value;
/// the others (search_path before PostgreSQL 18, extra_float_digits) are
/// always re-applied on a change of owner, since a SQL `SET` of them cannot
/// be seen on the wire.
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

/// A list of (name, value), small enough that a Vec beats a map.
pub(crate) type Params = Vec<(String, String)>;

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

/// The canonical spelling of a tracked parameter, if it is one.
pub(crate) fn tracked(name: &str) -> Option<&'static str> {
    TRACKED
        .iter()
        .copied()
        .find(|t| t.eq_ignore_ascii_case(name))
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

/// Statements (one per Query message, so one failure doesn't skip the
/// rest) that give a server connection the client's settings.
///
/// `server` holds the values the server reported (its current state for
/// reported parameters); `defaults` the values it reported at login.
pub(crate) fn sync_queries(
    client: &[(String, String)],
    server: &[(String, String)],
    defaults: &[(String, String)],
) -> Vec<String> {
    let mut out = Vec::new();
    for &name in TRACKED {
        let reported = get(defaults, name).is_some() || get(server, name).is_some();
        match get(client, name) {
            Some(want) => {
                if reported && get(server, name) == Some(want) {
                    continue;
                }
                if let Some(lit) = quote_literal(want) {
                    out.push(format!("SET {name} TO {lit}"));
                }
            }
            None => {
                if reported && get(server, name) == get(defaults, name) {
                    continue;
                }
                out.push(format!("RESET {name}"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(v: &[(&str, &str)]) -> Params {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn only_differences_of_reported_parameters_are_sent() {
        let defaults = p(&[
            ("application_name", ""),
            ("client_encoding", "UTF8"),
            ("DateStyle", "ISO, MDY"),
            ("IntervalStyle", "postgres"),
            ("TimeZone", "UTC"),
            ("standard_conforming_strings", "on"),
        ]);
        let mut server = defaults.clone();
        set(&mut server, "application_name", "other");
        set(&mut server, "DateStyle", "German");
        let client = p(&[("application_name", "mine"), ("timezone", "UTC")]);
        let q = sync_queries(&client, &server, &defaults);
        assert_eq!(
            q,
            [
                "SET application_name TO 'mine'",
                "RESET DateStyle",
                "RESET search_path",
                "RESET extra_float_digits"
            ]
        );
        // The same client back on a server already in line: only the
        // unreported ones.
        set(&mut server, "application_name", "mine");
        set(&mut server, "DateStyle", "ISO, MDY");
        assert_eq!(sync_queries(&client, &server, &defaults).len(), 2);
    }

    #[test]
    fn unreported_parameters_are_always_applied_and_literals_quoted() {
        let client = p(&[("search_path", "\"$user\", it's")]);
        let q = sync_queries(&client, &[], &[]);
        assert!(
            q.contains(&"SET search_path TO '\"$user\", it''s'".to_string()),
            "{q:?}"
        );
        assert!(q.contains(&"RESET extra_float_digits".to_string()));
        assert_eq!(quote_literal("a\\b"), None);
    }

    #[test]
    fn set_and_get_ignore_case() {
        let mut l = Params::new();
        set(&mut l, "TimeZone", "UTC");
        set(&mut l, "timezone", "Europe/Paris");
        assert_eq!(l.len(), 1);
        assert_eq!(get(&l, "TIMEZONE"), Some("Europe/Paris"));
        assert_eq!(tracked("datestyle"), Some("DateStyle"));
        assert_eq!(tracked("work_mem"), None);
    }
}
