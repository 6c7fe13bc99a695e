//! odissey's Prometheus endpoint, read over a plain TcpStream: the
//! cross-thread counters `odissey_thread_messages_total` and
//! `odissey_thread_wakeups_total` (one sample per thread, label `thread`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(5);
const MESSAGES: &str = "odissey_thread_messages_total";
const WAKEUPS: &str = "odissey_thread_wakeups_total";
/// The system thread's name, in the `thread` label and in /proc's comm.
pub(crate) const SYSTEM_THREAD: &str = "odissey-system";

/// The thread counters of one scrape; `None` where the exposition has no
/// sample of that family (the thread does not report it yet).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct ThreadCounters {
    /// Messages, all threads together.
    pub(crate) messages: Option<f64>,
    /// Wake-ups, all threads together.
    pub(crate) wakeups: Option<f64>,
    /// Messages sent to the system thread.
    pub(crate) system_messages: Option<f64>,
}

/// `GET /metrics` from 127.0.0.1:`port`, parsed.
pub(crate) fn thread_counters(port: u16) -> Result<ThreadCounters, String> {
    get_metrics(port).map(|body| parse(&body))
}

fn get_metrics(port: u16) -> Result<String, String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let what = |e: std::io::Error| format!("GET http://{addr}/metrics: {e}");
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(what)?;
    s.set_read_timeout(Some(TIMEOUT)).map_err(what)?;
    s.set_write_timeout(Some(TIMEOUT)).map_err(what)?;
    s.write_all(
        format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .map_err(what)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(what)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("GET http://{addr}/metrics: no HTTP response"))?;
    let status = head.lines().next().unwrap_or("");
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(format!("GET http://{addr}/metrics: {status}"));
    }
    Ok(body.to_owned())
}

/// One sample line `name{labels} value [timestamp]`: its name, the value of
/// its `thread` label, its value.
fn sample(line: &str) -> Option<(&str, Option<&str>, f64)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (name, labels, rest) = match line.find('{') {
        Some(i) => {
            let close = i + line[i..].find('}')?;
            (&line[..i], &line[i + 1..close], &line[close + 1..])
        }
        None => {
            let (n, r) = line.split_once(char::is_whitespace)?;
            (n, "", r)
        }
    };
    let value = rest.split_whitespace().next()?.parse().ok()?;
    let thread = labels.split(',').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k.trim() == "thread").then(|| v.trim().trim_matches('"'))
    });
    Some((name.trim(), thread, value))
}

fn parse(body: &str) -> ThreadCounters {
    let mut c = ThreadCounters::default();
    let add = |slot: &mut Option<f64>, v: f64| *slot = Some(slot.unwrap_or(0.0) + v);
    for (name, thread, value) in body.lines().filter_map(sample) {
        match name {
            MESSAGES => {
                add(&mut c.messages, value);
                if thread == Some(SYSTEM_THREAD) {
                    add(&mut c.system_messages, value);
                }
            }
            WAKEUPS => add(&mut c.wakeups, value),
            _ => {}
        }
    }
    c
}

/// `after - before` of one counter, where both scrapes had it.
pub(crate) fn delta(before: Option<f64>, after: Option<f64>) -> Option<f64> {
    Some((after? - before?).max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_counters_are_summed() {
        let body = "\
# HELP odissey_thread_messages_total Commands sent to a thread.
# TYPE odissey_thread_messages_total counter
odissey_thread_messages_total{thread=\"odissey-system\"} 7
odissey_thread_messages_total{thread=\"odissey-worker-0\"} 3
# TYPE odissey_thread_wakeups_total counter
odissey_thread_wakeups_total{thread=\"odissey-system\"} 5
odissey_thread_wakeups_total{thread=\"odissey-worker-0\"} 1e1
odissey_up 1
odissey_transactions_total{database=\"test\",user=\"u\",pool_mode=\"transaction\"} 99
";
        assert_eq!(
            parse(body),
            ThreadCounters {
                messages: Some(10.0),
                wakeups: Some(15.0),
                system_messages: Some(7.0),
            }
        );
    }

    #[test]
    fn missing_families_read_absent() {
        let body = "# HELP odissey_thread_messages_total x\n\
                    # TYPE odissey_thread_messages_total counter\n\
                    odissey_up 1\n";
        assert_eq!(parse(body), ThreadCounters::default());
        // Only a worker's line: the system thread's own count is absent.
        let c = parse("odissey_thread_messages_total{thread=\"odissey-worker-1\"} 4\n");
        assert_eq!(c.messages, Some(4.0));
        assert_eq!(c.system_messages, None);
        assert_eq!(delta(Some(1.0), None), None);
        assert_eq!(delta(Some(1.0), Some(4.0)), Some(3.0));
    }
}
