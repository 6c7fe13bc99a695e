//! Rate-limited log lines: a fault that repeats thousands of times a second
//! (a descriptor limit hit on every accept, a server down for every login)
//! writes a few lines and then one summary, not a line per occurrence.
//!
//! Each call site has its own budget per thread (workers log on their own
//! threads, so no lock): `BURST` lines per second, then the rest are
//! counted and the next line written says how many were left out.

use std::cell::RefCell;
use std::time::{Duration, Instant};

/// Lines a call site may write per second (per thread).
pub(crate) const BURST: u32 = 10;

const WINDOW: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct Site {
    key: &'static str,
    window: Instant,
    written: u32,
    suppressed: u64,
}

thread_local! {
    static SITES: RefCell<Vec<Site>> = const { RefCell::new(Vec::new()) };
}

/// Whether a line of call site `key` may be written now, and how many of
/// its lines were left out since the last one written (to say so).
pub(crate) fn admit(key: &'static str, now: Instant) -> Option<u64> {
    SITES.with(|sites| {
        let mut sites = sites.borrow_mut();
        let i = match sites.iter().position(|s| s.key == key) {
            Some(i) => i,
            None => {
                sites.push(Site {
                    key,
                    window: now,
                    written: 0,
                    suppressed: 0,
                });
                sites.len() - 1
            }
        };
        let site = &mut sites[i];
        if now.saturating_duration_since(site.window) >= WINDOW {
            site.window = now;
            site.written = 0;
        }
        if site.written >= BURST {
            site.suppressed += 1;
            return None;
        }
        site.written += 1;
        Some(std::mem::take(&mut site.suppressed))
    })
}

/// `log::$level!` with a per-call-site budget (see the module): beyond it
/// lines are counted, and the next one written ends with how many were
/// left out.
macro_rules! limited {
    ($level:ident, $($arg:tt)+) => {{
        const SITE: &str = concat!(file!(), ":", line!());
        if let Some(left_out) = $crate::ratelimit::admit(SITE, std::time::Instant::now()) {
            if left_out > 0 {
                log::$level!("{} ({left_out} more like it left out)", format_args!($($arg)+));
            } else {
                log::$level!($($arg)+);
            }
        }
    }};
}
pub(crate) use limited;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_silence_then_a_count() {
        let t0 = Instant::now();
        for i in 0..BURST {
            assert_eq!(admit("a", t0), Some(0), "line {i} of the burst");
        }
        for _ in 0..500 {
            assert_eq!(admit("a", t0 + Duration::from_millis(10)), None);
        }
        // Another site has its own budget.
        assert_eq!(admit("b", t0), Some(0));
        // A second later: written again, saying how many were left out.
        assert_eq!(admit("a", t0 + WINDOW), Some(500));
        assert_eq!(admit("a", t0 + WINDOW), Some(0));
    }
}
