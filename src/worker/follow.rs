//! How the session follows a client in transaction and statement pooling,
//! as the pump sees its requests: texts scanned for what may change the
//! session (`scan_into`, `note_scan`, the names a Bind gives), what a
//! session check found (`checked`), and why a client keeps its server
//! (`Pin`s). The pump (`link`) calls these; the rules themselves, and the
//! queries, are `crate::session`'s.

use log::{debug, info};

use crate::ids::ConnId;
use crate::session::{Pin, Scan};

use super::client::Client;
use super::server::Server;

/// True for a simple query that drops the session's prepared statements.
pub(super) fn drops_statements(sql: &str) -> bool {
    // Cheap test first: this runs for every short simple query.
    if !matches!(sql.trim_start().as_bytes().first(), Some(b'd' | b'D')) {
        return false;
    }
    let words: Vec<&str> = sql
        .trim()
        .trim_end_matches(';')
        .split_whitespace()
        .collect();
    matches!(words.as_slice(), [a, b] if (a.eq_ignore_ascii_case("DISCARD") || a.eq_ignore_ascii_case("DEALLOCATE"))
        && b.eq_ignore_ascii_case("ALL"))
}

/// Scans a Query or Parse text, keeping the custom variable names it sets.
pub(super) fn scan_into(
    custom: &mut Option<Box<crate::session::CustomNames>>,
    text: &[u8],
) -> Scan {
    match custom {
        Some(c) => crate::session::scan(text, &mut c.names),
        None => {
            let mut names = Vec::new();
            let sc = crate::session::scan(text, &mut names);
            if !names.is_empty() {
                *custom = Some(Box::new(crate::session::CustomNames {
                    names,
                    unnamed_param: None,
                }));
            }
            sc
        }
    }
}

/// Keeps which parameter of the client's unnamed statement names a
/// setting (a new unnamed Parse replaces the last).
pub(super) fn note_unnamed_param(
    custom: &mut Option<Box<crate::session::CustomNames>>,
    n: Option<u16>,
) {
    match custom {
        Some(c) => c.unnamed_param = n,
        None if n.is_some() => {
            *custom = Some(Box::new(crate::session::CustomNames {
                names: Vec::new(),
                unnamed_param: n,
            }));
        }
        None => {}
    }
}

/// A Bind whose statement names a setting in parameter `n`: that name is
/// read back by later checks.
pub(super) fn note_bound_name(
    custom: &mut Option<Box<crate::session::CustomNames>>,
    bind: &[u8],
    n: u16,
) {
    if let Some(value) = crate::session::bind_param(bind, n) {
        let c = custom.get_or_insert_with(Default::default);
        crate::session::remember_bound(&mut c.names, value);
    }
}

/// Notes what a scanned Query or Parse text may do to the client's session.
/// (`discard`: the route's pool_discard, under which nothing pins.)
pub(super) fn note_scan(
    check_due: &mut bool,
    pinned: &mut Option<Pin>,
    id: ConnId,
    sc: Scan,
    discard: bool,
) {
    if sc.marks || (sc.unpins && pinned.is_some()) {
        *check_due = true;
    }
    if sc.opaque && !discard && *pinned != Some(PIN_OPAQUE) {
        if pinned.is_none() {
            info!("{id}: keeps its server connection from now on: {PIN_OPAQUE}");
        }
        *pinned = Some(PIN_OPAQUE);
    }
}

/// Why a client keeps its server for good: it called set_config with a
/// name odissey could not read (an expression, or a parameter of an
/// untracked statement), which may be a custom variable no check can list.
const PIN_OPAQUE: Pin = "set_config with a name odissey cannot read";

/// Why a client keeps its server when its session could not be read back.
const PIN_UNREADABLE: Pin = "its session could not be read back";

/// A session check of server `s` for client `c` came back: both now
/// carry what the server reported, and the client keeps the server while
/// it holds state that cannot follow it elsewhere.
pub(super) fn checked(c: &mut Client, s: &mut Server, check: crate::session::Check) {
    let pin = match check.finish() {
        Some((settings, pin)) => {
            s.session.clone_from(&settings);
            c.session = settings;
            pin
        }
        None => Some(PIN_UNREADABLE),
    };
    let pin = if s.route.route.pool_discard {
        // The route asked for every change of owner to start afresh
        // (DISCARD ALL): nothing pins.
        None
    } else if c.pinned == Some(PIN_OPAQUE) {
        c.pinned
    } else {
        pin
    };
    match (c.pinned, pin) {
        (None, Some(why)) => info!("{}: keeps {} while it holds {why}", c.id, s.id),
        (Some(_), None) => debug!("{}: no longer keeps {}", c.id, s.id),
        _ => {}
    }
    c.pinned = pin;
}

/// Query and Parse texts up to this size are scanned for words that may
/// change the session (held whole for it); a longer one is checked after
/// its transaction without being scanned.
pub(super) const SCAN_MAX: usize = 64 * 1024;
