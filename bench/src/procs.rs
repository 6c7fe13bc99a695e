//! Child processes (killed on drop, on panic and on Ctrl-C), commands run
//! with a time limit, and what /proc says about a process.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// Process ids of the children alive now. Locked while a child is reaped, so
/// the signal thread never kills a recycled pid.
static LIVE: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// Whether SIGINT/SIGTERM/SIGHUP was received.
pub(crate) fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// `Err("interrupted")` once a signal was received.
pub(crate) fn check_interrupted() -> Result<(), String> {
    if interrupted() {
        Err("interrupted by a signal".into())
    } else {
        Ok(())
    }
}

/// On the first SIGINT/SIGTERM/SIGHUP: kill every child and let the main
/// thread unwind (its guards then stop PostgreSQL and remove temp dirs). On
/// the second: kill the children and exit at once.
pub(crate) fn install_signal_handler() -> Result<(), String> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            static SEEN: AtomicUsize = AtomicUsize::new(0);
            for sig in signals.forever() {
                INTERRUPTED.store(true, Ordering::SeqCst);
                kill_all_children();
                if SEEN.fetch_add(1, Ordering::SeqCst) == 0 {
                    eprintln!("odissey-bench: signal {sig}: children killed, cleaning up (again to exit now)");
                } else {
                    std::process::exit(130);
                }
            }
        })
        .map_err(|e| format!("cannot spawn the signal thread: {e}"))?;
    Ok(())
}

fn live() -> std::sync::MutexGuard<'static, Vec<u32>> {
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

fn kill_all_children() {
    let pids = live();
    for pid in pids.iter() {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .stderr(Stdio::null())
            .status();
    }
}

/// Tries to reap `child`; on exit removes it from the live list.
fn try_reap(child: &mut Child) -> Option<std::process::ExitStatus> {
    let mut pids = live();
    match child.try_wait() {
        Ok(Some(status)) => {
            pids.retain(|&p| p != child.id());
            Some(status)
        }
        Ok(None) => None,
        Err(_) => {
            pids.retain(|&p| p != child.id());
            Some(std::os::unix::process::ExitStatusExt::from_raw(0))
        }
    }
}

fn kill_and_reap(child: &mut Child) {
    let mut pids = live();
    let _ = child.kill();
    let _ = child.wait();
    pids.retain(|&p| p != child.id());
}

fn spawn_registered(cmd: &mut Command) -> std::io::Result<Child> {
    let mut pids = live();
    let child = cmd.spawn()?;
    pids.push(child.id());
    Ok(child)
}

/// A long-running child (a pooler). Killed and reaped on drop.
pub(crate) struct ChildGuard {
    name: String,
    child: Child,
    log: PathBuf,
    exited: Option<String>,
}

impl ChildGuard {
    /// Spawns `cmd` with stdout and stderr appended to `log`.
    pub(crate) fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Self, String> {
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| format!("cannot open {}: {e}", log.display()))?;
        let file2 = file
            .try_clone()
            .map_err(|e| format!("cannot dup {}: {e}", log.display()))?;
        cmd.stdin(Stdio::null()).stdout(file).stderr(file2);
        let child = spawn_registered(&mut cmd)
            .map_err(|e| format!("cannot start {name} ({cmd:?}): {e}"))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
            exited: None,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Err` (with the log tail) once the child has exited.
    pub(crate) fn check_alive(&mut self) -> Result<(), String> {
        if self.exited.is_none() {
            if let Some(status) = try_reap(&mut self.child) {
                self.exited = Some(format!(
                    "{} exited ({status}); last lines of {}:\n{}",
                    self.name,
                    self.log.display(),
                    tail(&self.log, 30)
                ));
            }
        }
        match &self.exited {
            Some(msg) => Err(msg.clone()),
            None => Ok(()),
        }
    }

    pub(crate) fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.exited.is_none() {
            kill_and_reap(&mut self.child);
        }
    }
}

/// The last `lines` lines of a file (lossy UTF-8; empty when unreadable).
pub(crate) fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The last `lines` lines of a string.
pub(crate) fn tail_str(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Runs `cmd` to completion, killing it after `limit` (or on a signal).
pub(crate) fn run_with_timeout(
    mut cmd: Command,
    limit: Duration,
    what: &str,
) -> Result<Output, String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child =
        spawn_registered(&mut cmd).map_err(|e| format!("{what}: cannot run {cmd:?}: {e}"))?;
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let out_t = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + limit;
    let mut why_killed = None;
    let status = loop {
        if let Some(status) = try_reap(&mut child) {
            break status;
        }
        if interrupted() {
            why_killed = Some("interrupted by a signal".to_owned());
        } else if Instant::now() >= deadline {
            why_killed = Some(format!(
                "still running after {} s (hung?); killed",
                limit.as_secs()
            ));
        }
        if why_killed.is_some() {
            kill_and_reap(&mut child);
            break std::os::unix::process::ExitStatusExt::from_raw(9);
        }
        thread::sleep(Duration::from_millis(20));
    };
    let output = Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    };
    if let Some(why) = why_killed {
        return Err(format!(
            "{what}: {why}\n--- command ---\n{cmd:?}\n--- stdout (tail) ---\n{}\n--- stderr (tail) ---\n{}",
            tail_str(&String::from_utf8_lossy(&output.stdout), 15),
            tail_str(&String::from_utf8_lossy(&output.stderr), 15)
        ));
    }
    Ok(output)
}

/// Clock ticks per second for /proc/PID/stat (`getconf CLK_TCK`, else 100).
fn clk_tck() -> f64 {
    static TCK: OnceLock<f64> = OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .filter(|&t: &f64| t > 0.0)
            .unwrap_or(100.0)
    })
}

/// CPU seconds (user + system, all threads) used so far by process `pid`.
pub(crate) fn cpu_seconds(pid: u32) -> Result<f64, String> {
    stat_cpu_seconds(&format!("/proc/{pid}/stat"))
}

/// utime + stime of a `/proc/.../stat` file, in seconds.
fn stat_cpu_seconds(path: &str) -> Result<f64, String> {
    let stat = fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    // "pid (comm) state ppid ..." — comm may contain spaces and parentheses.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| format!("unexpected {path}: {stat}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    let ticks = |i: usize| -> Result<f64, String> {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or_else(|| format!("unexpected {path}: {stat}"))
    };
    Ok((ticks(11)? + ticks(12)?) / clk_tck())
}

/// One thread of a process and the CPU it has used so far.
#[derive(Clone, Debug)]
pub(crate) struct ThreadCpu {
    pub(crate) tid: u32,
    /// Its name (`/proc/PID/task/TID/comm`: at most 15 bytes, so
    /// `odissey-worker-<i>` reads `odissey-worker-`).
    pub(crate) comm: String,
    /// utime + stime, seconds.
    pub(crate) seconds: f64,
}

/// Every thread of process `pid` now, with its CPU seconds. A thread that
/// ends while it is read is left out.
pub(crate) fn thread_cpu(pid: u32) -> Result<Vec<ThreadCpu>, String> {
    let dir = format!("/proc/{pid}/task");
    let entries = fs::read_dir(&dir).map_err(|e| format!("cannot read {dir}: {e}"))?;
    let mut threads = Vec::new();
    for entry in entries.flatten() {
        let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        let (Ok(comm), Ok(seconds)) = (
            fs::read_to_string(format!("{dir}/{tid}/comm")),
            stat_cpu_seconds(&format!("{dir}/{tid}/stat")),
        ) else {
            continue;
        };
        threads.push(ThreadCpu {
            tid,
            comm: comm.trim_end().to_owned(),
            seconds,
        });
    }
    Ok(threads)
}

/// CPU seconds the threads named `comm` used between two readings of
/// [`thread_cpu`] (a thread only in `after` counts from zero); `None` when
/// no such thread was there after.
pub(crate) fn thread_cpu_delta(
    before: &[ThreadCpu],
    after: &[ThreadCpu],
    comm: &str,
) -> Option<f64> {
    let mut found = false;
    let mut sum = 0.0;
    for t in after.iter().filter(|t| t.comm == comm) {
        found = true;
        let was = before
            .iter()
            .find(|b| b.tid == t.tid)
            .map_or(0.0, |b| b.seconds);
        sum += (t.seconds - was).max(0.0);
    }
    found.then_some(sum)
}

/// A `VmXxx:` value of /proc/PID/status, in KiB.
pub(crate) fn status_kb(pid: u32, key: &str) -> Result<u64, String> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| format!("no {key} in {path}"))
}

/// Resident set size of `pid`, in KiB.
pub(crate) fn rss_kb(pid: u32) -> Result<u64, String> {
    status_kb(pid, "VmRSS")
}

/// Resets `pid`'s peak RSS (VmHWM) to its current RSS. Best effort.
pub(crate) fn reset_hwm(pid: u32) -> bool {
    fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// uid and gid of an OS user, from /etc/passwd.
pub(crate) fn os_user_ids(name: &str) -> Option<(u32, u32)> {
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() > 3 && f[0] == name).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
    })
}

/// Whether the effective uid is 0.
pub(crate) fn running_as_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// First line of `<bin> <args>` output (stdout, else stderr), or "?".
pub(crate) fn first_line(bin: &Path, args: &[&str]) -> String {
    Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()
        .and_then(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .map(|l| l.trim().to_owned())
        })
        .filter(|l| !l.is_empty())
        .unwrap_or_else(|| "?".into())
}

/// Clock ticks of all CPUs together since boot, from the first line of
/// /proc/stat: `(busy, total)`, busy being all but idle and iowait.
pub(crate) fn box_ticks() -> Result<(u64, u64), String> {
    let stat =
        fs::read_to_string("/proc/stat").map_err(|e| format!("cannot read /proc/stat: {e}"))?;
    let v: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|f| f.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    if v.len() < 5 {
        return Err(format!(
            "unexpected /proc/stat: {}",
            stat.lines().next().unwrap_or("")
        ));
    }
    // user nice system idle iowait irq softirq steal (guest time is
    // already in user and nice).
    let total: u64 = v.iter().take(8).sum();
    Ok((total - v[3] - v[4], total))
}
