//! Host names resolved off the reactor threads.
//!
//! `getaddrinfo` blocks for as long as the system's resolver waits for its
//! name servers: seconds, with a name server that does not answer. A worker
//! that called it would stall every client it serves for that long, so a
//! worker never does. It asks its [`Dns`], which answers at once when it
//! can (an IP literal needs no lookup; a cached answer is used while it is
//! younger than [`TTL`], and a stale one is still used while a refresh
//! runs), and otherwise starts a lookup on a thread of its own and tells
//! the caller to wait: the caller parks what it was doing
//! ([`Dns::park`]) and sets a deadline. The lookup thread answers through
//! the worker's polled channel (`WorkerCmd::Resolved`); [`Dns::answered`]
//! caches the answer and hands back what was parked, which the worker runs
//! again (it now finds the answer in the cache). At the deadline
//! ([`Dns::timed_out`]) what is parked fails with a timeout, which is
//! cached for [`NEGATIVE_TTL`] like any failure, so the clients queued
//! behind it fail at once instead of waiting in turn. The lookup thread
//! cannot be interrupted; when it ends its answer still fills the cache.
//!
//! Sans-IO apart from the lookup itself: the thread is started through the
//! `start` callback given to [`Dns::new`], time is passed in.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::time::{Duration, Instant};

/// How long an answer is used before it is asked again (PgBouncer's
/// `dns_max_ttl` default; `getaddrinfo` does not tell the record's TTL).
pub(crate) const TTL: Duration = Duration::from_secs(15);

/// How long a failed or timed-out lookup is remembered: connections to
/// that host fail at once meanwhile, then the next one asks again.
pub(crate) const NEGATIVE_TTL: Duration = Duration::from_secs(2);

/// The longest a connection waits for a lookup (less when
/// `server_connect_timeout` is shorter).
pub(crate) const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Past this many cached host names the cache starts over (names come from
/// the config, but reloads may bring new ones for ever).
const MAX_HOSTS: usize = 1024;

/// Why a host name has no address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DnsError {
    /// The resolver answered with an error (no such host, no address, a
    /// name server that refused...).
    Failed(String),
    /// No answer within the lookup's timeout.
    TimedOut(Duration),
    /// The lookup thread could not be started.
    NoThread(String),
}

impl fmt::Display for DnsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Failed(why) => write!(f, "DNS lookup failed: {why}"),
            Self::TimedOut(after) => {
                write!(f, "DNS lookup timed out after {} ms", after.as_millis())
            }
            Self::NoThread(why) => write!(f, "DNS lookup could not start: {why}"),
        }
    }
}

/// What [`Dns::lookup`] can say at once.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// Connect here.
    Ready(SocketAddr),
    /// The name does not resolve (remembered for [`NEGATIVE_TTL`]).
    Failed(DnsError),
    /// A lookup runs: park the caller with [`Dns::park`].
    Wait,
}

/// A lookup's outcome as the lookup thread reports it.
pub(crate) type Answer = Result<Vec<IpAddr>, String>;

/// What the cache holds for a host name.
#[derive(Debug)]
struct Entry {
    addrs: Result<Vec<IpAddr>, DnsError>,
    at: Instant,
}

/// Callers waiting for one host name, and the id of their deadline.
#[derive(Debug)]
struct Parked<P> {
    id: u64,
    waiting: Vec<P>,
}

/// Starts a lookup of the host name given, off the reactor thread.
pub(crate) type Start = Box<dyn FnMut(&str) -> std::io::Result<()> + Send>;

/// One worker's resolver: cache, lookups running, and what waits for them.
/// `P` is what a caller parks (a worker's continuation).
pub(crate) struct Dns<P> {
    cache: HashMap<String, Entry>,
    running: HashSet<String>,
    parked: HashMap<String, Parked<P>>,
    next_id: u64,
    start: Start,
}

impl<P> Dns<P> {
    pub(crate) fn new(start: Start) -> Self {
        Self {
            cache: HashMap::new(),
            running: HashSet::new(),
            parked: HashMap::new(),
            next_id: 0,
            start,
        }
    }

    /// Where to connect for `host:port`, if that is known now. An IP
    /// literal is used as it is. A stale answer is used while a refresh is
    /// started, so only a host never resolved (or whose failure is older
    /// than [`NEGATIVE_TTL`]) makes a caller wait.
    pub(crate) fn lookup(&mut self, host: &str, port: u16, now: Instant) -> Lookup {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Lookup::Ready(SocketAddr::new(ip, port));
        }
        let (answer, fresh) = match self.cache.get(host) {
            Some(Entry { addrs: Ok(a), at }) => {
                let fresh = now.saturating_duration_since(*at) < TTL;
                // Non-empty: `answered` stores no empty list.
                (a.first().map(|ip| SocketAddr::new(*ip, port)), fresh)
            }
            Some(Entry { addrs: Err(e), at })
                if now.saturating_duration_since(*at) < NEGATIVE_TTL =>
            {
                return Lookup::Failed(e.clone());
            }
            _ => (None, false),
        };
        if !fresh && !self.running.contains(host) {
            if let Err(e) = (self.start)(host) {
                let e = DnsError::NoThread(e.to_string());
                if answer.is_none() {
                    self.remember(host, Err(e.clone()), now);
                    return Lookup::Failed(e);
                }
            } else {
                self.running.insert(host.to_string());
            }
        }
        match answer {
            Some(addr) => Lookup::Ready(addr),
            None => Lookup::Wait,
        }
    }

    /// Parks `p` until `host` is answered or times out. Returns the id of
    /// a deadline to set when `p` is the first to wait (then
    /// [`Dns::timed_out`] with that id at the deadline).
    pub(crate) fn park(&mut self, host: &str, p: P) -> Option<u64> {
        if let Some(parked) = self.parked.get_mut(host) {
            parked.waiting.push(p);
            return None;
        }
        self.next_id += 1;
        let id = self.next_id;
        self.parked.insert(
            host.to_string(),
            Parked {
                id,
                waiting: vec![p],
            },
        );
        Some(id)
    }

    /// A lookup ended: caches its answer and returns what waited for it.
    /// A failed refresh keeps the previous addresses another [`TTL`] (a
    /// name server down must not take a working pool down with it).
    pub(crate) fn answered(&mut self, host: &str, answer: Answer, now: Instant) -> Vec<P> {
        self.running.remove(host);
        let addrs = match answer {
            Ok(a) if !a.is_empty() => Ok(a),
            Ok(_) => Err(DnsError::Failed("no address".into())),
            Err(why) => Err(DnsError::Failed(why)),
        };
        let kept = match (&addrs, self.cache.get(host)) {
            (Err(_), Some(Entry { addrs: Ok(old), .. })) => Some(old.clone()),
            _ => None,
        };
        match kept {
            Some(old) => self.remember(host, Ok(old), now),
            None => self.remember(host, addrs, now),
        }
        self.parked
            .remove(host)
            .map_or_else(Vec::new, |p| p.waiting)
    }

    /// Deadline `id` passed: what waits for its host fails with a
    /// timeout of `after`, which is remembered as that host's answer. The
    /// host name and the callers are returned; nothing when the lookup
    /// was answered first.
    pub(crate) fn timed_out(
        &mut self,
        id: u64,
        after: Duration,
        now: Instant,
    ) -> Option<(String, Vec<P>)> {
        let host = self
            .parked
            .iter()
            .find(|(_, p)| p.id == id)
            .map(|(h, _)| h.clone())?;
        let parked = self.parked.remove(&host)?;
        self.remember(&host, Err(DnsError::TimedOut(after)), now);
        Some((host, parked.waiting))
    }

    fn remember(&mut self, host: &str, addrs: Result<Vec<IpAddr>, DnsError>, at: Instant) {
        if self.cache.len() >= MAX_HOSTS && !self.cache.contains_key(host) {
            self.cache.clear();
        }
        self.cache.insert(host.to_string(), Entry { addrs, at });
    }
}

/// Resolves `host` the blocking way: run on a lookup thread only.
pub(crate) fn resolve_blocking(host: &str) -> Answer {
    match (host, 0).to_socket_addrs() {
        Ok(addrs) => Ok(addrs.map(|a| a.ip()).collect()),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn dns() -> (Dns<u32>, Arc<Mutex<Vec<String>>>) {
        let started = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&started);
        let start: Start = Box::new(move |h: &str| {
            log.lock().expect("test lock").push(h.to_string());
            Ok(())
        });
        (Dns::new(start), started)
    }

    fn v4(a: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, a])
    }

    #[test]
    fn literals_need_no_lookup() {
        let (mut d, started) = dns();
        let now = Instant::now();
        assert_eq!(
            d.lookup("127.0.0.1", 5432, now),
            Lookup::Ready("127.0.0.1:5432".parse().unwrap())
        );
        assert_eq!(
            d.lookup("::1", 6432, now),
            Lookup::Ready("[::1]:6432".parse().unwrap())
        );
        assert!(started.lock().unwrap().is_empty());
    }

    #[test]
    fn a_name_waits_once_then_comes_from_the_cache() {
        let (mut d, started) = dns();
        let t0 = Instant::now();
        assert_eq!(d.lookup("db", 5432, t0), Lookup::Wait);
        assert_eq!(d.park("db", 1), Some(1));
        // A second caller waits on the same lookup and deadline.
        assert_eq!(d.lookup("db", 5432, t0), Lookup::Wait);
        assert_eq!(d.park("db", 2), None);
        assert_eq!(started.lock().unwrap().len(), 1);
        assert_eq!(d.answered("db", Ok(vec![v4(1), v4(2)]), t0), vec![1, 2]);
        let ready = Lookup::Ready(SocketAddr::new(v4(1), 5432));
        assert_eq!(d.lookup("db", 5432, t0 + Duration::from_secs(1)), ready);
        assert_eq!(started.lock().unwrap().len(), 1);
        // The deadline of an answered lookup is void.
        assert_eq!(d.timed_out(1, LOOKUP_TIMEOUT, t0), None);
    }

    #[test]
    fn a_stale_answer_serves_while_it_is_refreshed_and_outlives_a_failure() {
        let (mut d, started) = dns();
        let t0 = Instant::now();
        assert_eq!(d.lookup("db", 1, t0), Lookup::Wait);
        d.answered("db", Ok(vec![v4(1)]), t0);
        let later = t0 + TTL;
        let old = Lookup::Ready(SocketAddr::new(v4(1), 1));
        assert_eq!(d.lookup("db", 1, later), old);
        assert_eq!(started.lock().unwrap().len(), 2, "a refresh started");
        // Another call while it runs starts nothing more.
        assert_eq!(d.lookup("db", 1, later), old);
        assert_eq!(started.lock().unwrap().len(), 2);
        // The refresh fails: the old address stays, fresh again.
        assert!(d.answered("db", Err("down".into()), later).is_empty());
        assert_eq!(d.lookup("db", 1, later + Duration::from_secs(1)), old);
        assert_eq!(started.lock().unwrap().len(), 2);
        // A refresh that succeeds replaces it.
        let t2 = later + TTL;
        assert_eq!(d.lookup("db", 1, t2), old);
        d.answered("db", Ok(vec![v4(9)]), t2);
        assert_eq!(
            d.lookup("db", 1, t2),
            Lookup::Ready(SocketAddr::new(v4(9), 1))
        );
    }

    #[test]
    fn failures_and_timeouts_are_remembered_briefly() {
        let (mut d, started) = dns();
        let t0 = Instant::now();
        assert_eq!(d.lookup("gone", 1, t0), Lookup::Wait);
        let id = d.park("gone", 7).expect("first waiter sets the deadline");
        let after = Duration::from_millis(1500);
        let (host, waiting) = d.timed_out(id, after, t0 + after).expect("parked");
        assert_eq!((host.as_str(), waiting), ("gone", vec![7]));
        let t1 = t0 + after;
        assert_eq!(
            d.lookup("gone", 1, t1),
            Lookup::Failed(DnsError::TimedOut(after))
        );
        // The stuck lookup still runs: after NEGATIVE_TTL a caller waits
        // again (on a new deadline) without a second thread.
        let t2 = t1 + NEGATIVE_TTL;
        assert_eq!(d.lookup("gone", 1, t2), Lookup::Wait);
        assert_eq!(d.park("gone", 8), Some(id + 1));
        assert_eq!(started.lock().unwrap().len(), 1);
        // Its late answer is an error, remembered as such.
        assert_eq!(d.answered("gone", Err("no such host".into()), t2), vec![8]);
        assert_eq!(
            d.lookup("gone", 1, t2),
            Lookup::Failed(DnsError::Failed("no such host".into()))
        );
        assert_eq!(
            DnsError::TimedOut(after).to_string(),
            "DNS lookup timed out after 1500 ms"
        );
    }

    #[test]
    fn a_lookup_that_cannot_start_fails_at_once() {
        let start: Start = Box::new(|_: &str| Err(std::io::Error::other("no threads")));
        let mut d: Dns<u32> = Dns::new(start);
        let got = d.lookup("db", 1, Instant::now());
        assert!(
            matches!(&got, Lookup::Failed(DnsError::NoThread(w)) if w.contains("no threads")),
            "{got:?}"
        );
    }

    #[test]
    fn localhost_resolves_the_blocking_way() {
        let ips = resolve_blocking("localhost").expect("localhost resolves");
        assert!(ips.iter().all(IpAddr::is_loopback), "{ips:?}");
    }
}
