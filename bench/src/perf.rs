//! System calls of a pooler during a pgbench run, counted by
//! `perf stat -e raw_syscalls:sys_enter -p PID -x, -- sleep S`, started in a
//! thread of its own alongside pgbench. Best effort: where perf is missing
//! or not allowed, the column reads absent and nothing fails.

use std::path::PathBuf;
use std::process::Command;
use std::thread::{self, JoinHandle};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::procs::{interrupted, run_with_timeout};

const EVENT: &str = "raw_syscalls:sys_enter";

/// The perf binary, when one can count [`EVENT`] here: tried once on
/// `perf stat -- true`. `Err` says why not.
pub(crate) fn probe(disabled: bool) -> Result<PathBuf, String> {
    if disabled {
        return Err("--no-perf".into());
    }
    let bin = crate::which("perf").ok_or("no perf on PATH")?;
    let mut cmd = Command::new(&bin);
    cmd.args(["stat", "-e", EVENT, "-x,", "--", "true"]);
    let out = run_with_timeout(cmd, Duration::from_secs(20), "perf stat")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    match parse(&stderr) {
        Some(_) if out.status.success() => Ok(bin),
        _ => Err(format!(
            "`perf stat -e {EVENT} -- true` failed ({}): {}",
            out.status,
            stderr.lines().next().unwrap_or("").trim()
        )),
    }
}

/// The count of [`EVENT`] in `perf stat -x,` output; `None` when it is not
/// there or was not counted.
fn parse(text: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(',').collect();
        (f.len() > 2 && f[2].trim().starts_with(EVENT))
            .then(|| f[0].trim().parse().ok())
            .flatten()
    })
}

/// What one perf run counted.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Count {
    pub(crate) syscalls: u64,
    /// The counted window, Unix time (s): it ends when perf returned and
    /// lasts the sleep's length.
    pub(crate) from: f64,
    pub(crate) to: f64,
}

/// A perf run under way.
pub(crate) struct Counting(JoinHandle<Result<Count, String>>);

/// Where in a run of `duration` s the count is taken: from 0.5 s after
/// pgbench starts (its clients are connected by then) to 0.5 s before it
/// ends (for runs under 2 s, the middle half).
fn window(duration: u64) -> (Duration, Duration) {
    if duration >= 2 {
        (
            Duration::from_millis(500),
            Duration::from_secs(duration - 1),
        )
    } else {
        let d = Duration::from_secs(duration);
        (d / 4, d / 2)
    }
}

/// Starts counting the system calls of process `pid` during a pgbench run
/// of `duration` s that starts now.
pub(crate) fn start(bin: &std::path::Path, pid: u32, duration: u64) -> Counting {
    let bin = bin.to_owned();
    let (delay, length) = window(duration);
    Counting(thread::spawn(move || {
        let until = std::time::Instant::now() + delay;
        while std::time::Instant::now() < until {
            if interrupted() {
                return Err("interrupted".into());
            }
            thread::sleep(Duration::from_millis(20));
        }
        let mut cmd = Command::new(&bin);
        cmd.args(["stat", "-e", EVENT, "-x,", "-p", &pid.to_string(), "--"])
            .arg("sleep")
            .arg(format!("{:.3}", length.as_secs_f64()));
        let out = run_with_timeout(cmd, length + Duration::from_secs(30), "perf stat")?;
        let to = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let stderr = String::from_utf8_lossy(&out.stderr);
        match parse(&stderr) {
            Some(syscalls) if out.status.success() => Ok(Count {
                syscalls,
                from: to - length.as_secs_f64(),
                to,
            }),
            _ => Err(format!(
                "perf stat -p {pid} ({}): {}",
                out.status,
                stderr.trim()
            )),
        }
    }))
}

impl Counting {
    /// The count, once perf returned.
    pub(crate) fn finish(self) -> Result<Count, String> {
        self.0
            .join()
            .unwrap_or_else(|_| Err("the perf thread panicked".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perf_csv_is_parsed() {
        assert_eq!(
            parse("83610,,raw_syscalls:sys_enter,209049036,100.00,,\n"),
            Some(83610)
        );
        assert_eq!(
            parse("<not counted>,,raw_syscalls:sys_enter,0,100.00,,"),
            None
        );
        assert_eq!(
            parse("1.11,msec,task-clock,1114686,100.00,0.647,CPUs utilized"),
            None
        );
        assert_eq!(parse(""), None);
    }

    #[test]
    fn the_window_sits_inside_the_run() {
        assert_eq!(
            window(10),
            (Duration::from_millis(500), Duration::from_secs(9))
        );
        assert_eq!(
            window(1),
            (Duration::from_millis(250), Duration::from_millis(500))
        );
    }
}
