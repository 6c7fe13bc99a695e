//! Just enough of the PostgreSQL v3 protocol, over plain TCP, for the idle
//! clients, the slow large-result reader, the readiness checks and the
//! flood workload (timed queries, refused logins).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::procs::check_interrupted;

const HOST: [u8; 4] = [127, 0, 0, 1];
/// How long the slow reader waits for data before calling the pooler hung.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from((HOST, port))
}

fn startup_packet(user: &str, db: &str) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&196_608u32.to_be_bytes()); // protocol 3.0
    for (k, v) in [("user", user), ("database", db)] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    packet
}

/// Severity, SQLSTATE and message of an ErrorResponse / NoticeResponse body.
fn error_fields(body: &[u8]) -> (String, String, String) {
    let (mut sev, mut code, mut msg) = (String::new(), String::new(), String::new());
    for field in body.split(|&b| b == 0) {
        if let Some((&t, v)) = field.split_first() {
            let v = String::from_utf8_lossy(v).into_owned();
            match t {
                b'S' => sev = v,
                b'C' => code = v,
                b'M' => msg = v,
                _ => {}
            }
        }
    }
    (sev, code, msg)
}

/// Text of an ErrorResponse / NoticeResponse body ("SEVERITY CODE: message").
pub(crate) fn error_text(body: &[u8]) -> String {
    let (sev, code, msg) = error_fields(body);
    format!("{sev} {code}: {msg}")
}

fn read_message(stream: &mut TcpStream) -> io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    stream.read_exact(&mut head)?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len < 4 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "bad length"));
    }
    let mut body = vec![0u8; len - 4];
    stream.read_exact(&mut body)?;
    Ok((head[0], body))
}

fn connect(port: u16, timeout: Duration) -> Result<TcpStream, String> {
    let stream = TcpStream::connect_timeout(&addr(port), timeout)
        .map_err(|e| format!("connect 127.0.0.1:{port}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .and_then(|()| stream.set_nodelay(true))
        .map_err(|e| format!("socket options: {e}"))?;
    Ok(stream)
}

fn send_startup(stream: &mut TcpStream, user: &str, db: &str) -> Result<(), String> {
    stream
        .write_all(&startup_packet(user, db))
        .map_err(|e| format!("sending the startup packet: {e}"))
}

/// Reads the login replies up to ReadyForQuery.
fn finish_login(stream: &mut TcpStream) -> Result<(), String> {
    loop {
        let (t, body) = read_message(stream).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                "no reply to the startup packet in time (hung?)".to_owned()
            }
            _ => format!("reading login replies: {e}"),
        })?;
        match t {
            b'R' => {
                let code = body
                    .get(..4)
                    .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
                if code != Some(0) {
                    return Err(format!(
                        "the server asks for authentication (code {code:?}); trust expected"
                    ));
                }
            }
            b'E' => return Err(format!("login refused: {}", error_text(&body))),
            b'Z' => return Ok(()),
            _ => {} // ParameterStatus, BackendKeyData, NoticeResponse
        }
    }
}

/// A logged-in connection (after ReadyForQuery).
pub(crate) fn login(
    port: u16,
    user: &str,
    db: &str,
    timeout: Duration,
) -> Result<TcpStream, String> {
    let mut stream = connect(port, timeout)?;
    send_startup(&mut stream, user, db)?;
    finish_login(&mut stream)?;
    Ok(stream)
}

/// Sends Terminate and closes with an RST (SO_LINGER 0), so that thousands
/// of closed connections leave no TIME_WAIT behind.
pub(crate) fn close(mut stream: TcpStream) {
    let _ = stream.write_all(&[b'X', 0, 0, 0, 4]);
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// Retries [`login`] until it works or `limit` passes; returns the last error.
pub(crate) fn wait_for_login(
    port: u16,
    user: &str,
    db: &str,
    limit: Duration,
    mut alive: impl FnMut() -> Result<(), String>,
) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    loop {
        check_interrupted()?;
        alive()?;
        match login(port, user, db, Duration::from_secs(3)) {
            Ok(stream) => {
                close(stream);
                return Ok(());
            }
            Err(e) if Instant::now() >= deadline => {
                return Err(format!(
                    "no successful login on 127.0.0.1:{port} within {} s; last error: {e}",
                    limit.as_secs()
                ))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Opens `k` idle logged-in connections, `batch` startups in flight at a
/// time (below the listen backlogs).
pub(crate) fn open_idle(
    port: u16,
    user: &str,
    db: &str,
    k: usize,
    timeout: Duration,
) -> Result<Vec<TcpStream>, String> {
    const BATCH: usize = 100;
    let mut conns = Vec::with_capacity(k);
    while conns.len() < k {
        check_interrupted()?;
        let n = BATCH.min(k - conns.len());
        let mut pending = Vec::with_capacity(n);
        for _ in 0..n {
            let i = conns.len() + pending.len();
            let mut s = connect(port, timeout).map_err(|e| format!("idle client {i}: {e}"))?;
            send_startup(&mut s, user, db).map_err(|e| format!("idle client {i}: {e}"))?;
            pending.push(s);
        }
        for mut s in pending {
            let i = conns.len();
            finish_login(&mut s).map_err(|e| format!("idle client {i}: {e}"))?;
            conns.push(s);
        }
    }
    Ok(conns)
}

/// Opens `k` connections that send nothing (a flood that never sends a
/// startup packet; the pooler's auth_timeout drops them in the end).
pub(crate) fn open_silent(
    port: u16,
    k: usize,
    timeout: Duration,
) -> Result<Vec<TcpStream>, String> {
    let mut conns = Vec::with_capacity(k);
    for i in 0..k {
        check_interrupted()?;
        conns.push(connect(port, timeout).map_err(|e| format!("silent connection {i}: {e}"))?);
    }
    Ok(conns)
}

/// What a slow read of a large result saw.
pub(crate) struct SlowRead {
    pub(crate) bytes: u64,
    pub(crate) rows: u64,
    pub(crate) elapsed: Duration,
}

/// Runs `sql` through a fresh connection and reads the reply slowly: `chunk`
/// bytes at a time with `pause` between reads, up to ReadyForQuery.
pub(crate) fn slow_read(
    port: u16,
    user: &str,
    db: &str,
    sql: &str,
    chunk: usize,
    pause: Duration,
    limit: Duration,
) -> Result<SlowRead, String> {
    let started = Instant::now();
    let mut stream = login(port, user, db, READ_TIMEOUT)?;
    stream
        .write_all(&query_message(sql))
        .map_err(|e| format!("sending the query: {e}"))?;

    let mut buf = vec![0u8; chunk];
    let mut pending: Vec<u8> = Vec::with_capacity(2 * chunk);
    let (mut bytes, mut rows) = (0u64, 0u64);
    let mut error = None;
    loop {
        check_interrupted()?;
        if started.elapsed() > limit {
            return Err(format!(
                "slow read not finished after {} s ({bytes} bytes, {rows} rows so far)",
                limit.as_secs()
            ));
        }
        let n = stream.read(&mut buf).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => format!(
                "no data for {} s after {bytes} bytes (hung?)",
                READ_TIMEOUT.as_secs()
            ),
            _ => format!("reading the result after {bytes} bytes: {e}"),
        })?;
        if n == 0 {
            return Err(format!(
                "connection closed after {bytes} bytes, {rows} rows"
            ));
        }
        bytes += n as u64;
        pending.extend_from_slice(&buf[..n]);
        let mut at = 0;
        while pending.len() - at >= 5 {
            let len = u32::from_be_bytes([
                pending[at + 1],
                pending[at + 2],
                pending[at + 3],
                pending[at + 4],
            ]) as usize;
            if pending.len() - at < 1 + len {
                break;
            }
            match pending[at] {
                b'D' => rows += 1,
                b'E' => error = Some(error_text(&pending[at + 5..at + 1 + len])),
                b'Z' => {
                    close(stream);
                    return match error {
                        Some(e) => Err(format!("query failed: {e}")),
                        None => Ok(SlowRead {
                            bytes,
                            rows,
                            elapsed: started.elapsed(),
                        }),
                    };
                }
                _ => {}
            }
            at += 1 + len;
        }
        pending.drain(..at);
        std::thread::sleep(pause);
    }
}

/// A logged-in connection that runs simple-protocol queries and times
/// nothing itself (the caller holds the clock).
pub(crate) struct Session {
    stream: TcpStream,
    /// Bytes read and not yet parsed: `buf[..filled]`.
    buf: Vec<u8>,
    filled: usize,
}

/// A simple-protocol Query message for `sql`.
pub(crate) fn query_message(sql: &str) -> Vec<u8> {
    let mut q = vec![b'Q'];
    q.extend_from_slice(&((sql.len() + 5) as u32).to_be_bytes());
    q.extend_from_slice(sql.as_bytes());
    q.push(0);
    q
}

impl Session {
    /// Logs in; a login refused with 53300 (a limit still counting a client
    /// that just left) is retried every 50 ms until `limit` passes.
    pub(crate) fn login(port: u16, user: &str, db: &str, limit: Duration) -> Result<Self, String> {
        let deadline = Instant::now() + limit;
        loop {
            check_interrupted()?;
            match login(port, user, db, READ_TIMEOUT) {
                Ok(stream) => {
                    return Ok(Self {
                        stream,
                        buf: vec![0; 8192],
                        filled: 0,
                    })
                }
                Err(e) if e.contains(" 53300: ") && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends `query` (from [`query_message`]) and reads the replies up to
    /// ReadyForQuery. `Ok(Some(text))` when the server answered with an
    /// ErrorResponse; `Err` when the connection failed (it is then unusable).
    pub(crate) fn query(&mut self, query: &[u8]) -> Result<Option<String>, String> {
        self.stream
            .write_all(query)
            .map_err(|e| format!("sending a query: {e}"))?;
        let mut error = None;
        loop {
            let mut at = 0;
            while self.filled - at >= 5 {
                let b = &self.buf[at..self.filled];
                let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
                if len < 4 {
                    return Err(format!("a reply with length {len}"));
                }
                if b.len() < 1 + len {
                    break;
                }
                match b[0] {
                    b'E' => error = Some(error_text(&b[5..1 + len])),
                    b'Z' => {
                        self.buf.copy_within(at + 1 + len..self.filled, 0);
                        self.filled -= at + 1 + len;
                        return Ok(error);
                    }
                    _ => {}
                }
                at += 1 + len;
            }
            self.buf.copy_within(at..self.filled, 0);
            self.filled -= at;
            if self.filled == self.buf.len() {
                self.buf.resize(2 * self.buf.len(), 0);
            }
            let n = self
                .stream
                .read(&mut self.buf[self.filled..])
                .map_err(|e| match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => format!(
                        "no reply to a query for {} s (hung?)",
                        READ_TIMEOUT.as_secs()
                    ),
                    _ => format!("reading a reply: {e}"),
                })?;
            if n == 0 {
                return Err("the connection was closed during a query".into());
            }
            self.filled += n;
        }
    }

    /// Sends Terminate and closes (see [`close`]).
    pub(crate) fn close(self) {
        close(self.stream);
    }
}

/// How a login that should be refused ended.
pub(crate) enum Refusal {
    /// An ErrorResponse with SQLSTATE 53300: the time from the start of
    /// connect() and from the send of the startup packet until it was read,
    /// and its text.
    Refused {
        from_connect: Duration,
        from_startup: Duration,
        text: String,
    },
    /// The login went through (ReadyForQuery); the connection is closed.
    Admitted,
    /// Anything else: a failed connect, another error, the end of the
    /// stream, no reply within the time limit.
    Other(String),
}

/// Connects, sends a startup packet and reads the reply, expecting a
/// refusal: an ErrorResponse with one of `codes` (53300 from odissey;
/// PgBouncer says 08P01 for max_client_conn). The connection is closed
/// with an RST right after, so that thousands of refused logins leave no
/// TIME_WAIT behind.
pub(crate) fn refused_login(
    port: u16,
    user: &str,
    db: &str,
    timeout: Duration,
    codes: &[&str],
) -> Refusal {
    let started = Instant::now();
    let mut stream = match connect(port, timeout) {
        Ok(s) => s,
        Err(e) => return Refusal::Other(e),
    };
    let sent = Instant::now();
    if let Err(e) = send_startup(&mut stream, user, db) {
        return Refusal::Other(e);
    }
    let outcome = loop {
        match read_message(&mut stream) {
            Ok((b'E', body)) => {
                let (from_connect, from_startup) = (started.elapsed(), sent.elapsed());
                let (sev, code, msg) = error_fields(&body);
                let text = format!("{sev} {code}: {msg}");
                break if codes.contains(&code.as_str()) {
                    Refusal::Refused {
                        from_connect,
                        from_startup,
                        text,
                    }
                } else {
                    Refusal::Other(format!("login failed with another error: {text}"))
                };
            }
            Ok((b'Z', _)) => {
                let _ = stream.write_all(&[b'X', 0, 0, 0, 4]);
                break Refusal::Admitted;
            }
            Ok(_) => {} // AuthenticationOk, ParameterStatus, BackendKeyData
            Err(e) => {
                break Refusal::Other(match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => format!(
                        "no reply to the startup packet within {} s",
                        timeout.as_secs_f64()
                    ),
                    io::ErrorKind::UnexpectedEof => {
                        "the connection was closed without an error message".into()
                    }
                    _ => format!("reading the reply to the startup packet: {e}"),
                })
            }
        }
    };
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    outcome
}
