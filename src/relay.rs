//! Relaying protocol messages without decoding them.
//!
//! The pooler needs to look at only a few messages on the hot path (the
//! client's Query/Sync/Terminate, the server's ReadyForQuery). [`Relay`]
//! walks the frame headers of a receive buffer and hands back, in order,
//! runs of bytes to pass through untouched and the few whole frames the
//! caller wants to see. A frame that is not inspected streams through even
//! when only part of it has arrived, so a 1 GB CopyData never has to sit in
//! memory whole.
//!
//! A server's relay ([`Relay::for_server`]) also checks every header
//! against what PostgreSQL sends ([`backend::check_header`]): an unknown
//! tag, or a length that message type cannot have, is an error at the
//! header, so a server out of step (a length off by one) or hostile (a
//! negative or huge one) is caught before its bytes reach the client or
//! pile up here.

use bytes::BytesMut;
use odissey_protocol::backend;
use odissey_protocol::codec::{peek_frontend_header, peek_header};

/// One step of relaying.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Nothing more can be done until more bytes arrive.
    NeedMore,
    /// Bytes to pass through as they are (whole frames or a frame's part).
    Pass(BytesMut),
    /// One complete frame (tag, length and body) the caller asked to see.
    Inspect(u8, BytesMut),
}

/// Where a relay stands between two calls.
#[derive(Debug, Default)]
pub(crate) struct Relay {
    /// Bytes of the current pass-through frame not yet seen.
    left: usize,
    /// The frame at the front of the buffer was already judged (it is to be
    /// delivered whole): `inspect` is called once per frame, never twice.
    whole: bool,
    /// It relays a server's output: headers are checked per message type.
    server: bool,
    /// It relays a logged-in client's input: a type PostgreSQL would not
    /// accept is an error at its first byte.
    client: bool,
}

impl Relay {
    /// The relay of a server's output.
    pub(crate) fn for_server() -> Self {
        Self {
            server: true,
            ..Self::default()
        }
    }

    /// The relay of a logged-in client's input.
    pub(crate) fn for_client() -> Self {
        Self {
            client: true,
            ..Self::default()
        }
    }

    /// Validates the header at the front of `buf` (see [`peek_header`]).
    /// A client's frames are bounded by `max_len`; a server's by their
    /// type (`max_len` then bounds only the frames delivered whole).
    fn header(
        &self,
        buf: &[u8],
        max_len: usize,
    ) -> Result<Option<(u8, usize)>, odissey_protocol::Error> {
        if self.client {
            return peek_frontend_header(buf, max_len);
        }
        if !self.server {
            return peek_header(buf, max_len);
        }
        let header = peek_header(buf, backend::MAX_LEN)?;
        if let Some((tag, total)) = header {
            backend::check_header(tag, (total - 1) as u32)?;
        }
        Ok(header)
    }

    /// True when the relay stands on a frame boundary (nothing half-sent).
    pub(crate) fn at_boundary(&self) -> bool {
        self.left == 0
    }

    /// True when the sender stopped inside a message: what is missing of
    /// the frame at the front of `rx` (its header, the rest of a frame held
    /// to be delivered whole, or of one being passed through) has not
    /// arrived. False when what is there was merely not relayed yet.
    pub(crate) fn unfinished(&self, rx: &[u8]) -> bool {
        if self.left > 0 {
            return rx.len() < self.left;
        }
        match self.wanted(rx) {
            Some(whole) => rx.len() < whole,
            None => !rx.is_empty() && rx.len() < 5,
        }
    }

    /// The tag of the frame at the front of `rx` that is held back to be
    /// delivered whole and has not been (its header was counted, nothing
    /// of it was passed on).
    pub(crate) fn held(&self, rx: &[u8]) -> Option<u8> {
        if self.whole {
            rx.first().copied()
        } else {
            None
        }
    }

    /// The size of the frame at the front that must be delivered whole,
    /// once its header has been seen: the receive buffer must be allowed
    /// to grow to it.
    pub(crate) fn wanted(&self, rx: &[u8]) -> Option<usize> {
        if !self.whole {
            return None;
        }
        let len = rx.get(1..5)?;
        let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        Some(len + 1)
    }

    /// Takes the next step out of `rx`. `inspect(tag, length)` is called
    /// exactly once for every frame header crossed (so the caller can count
    /// tags and keep state) and says whether that frame must be delivered
    /// whole (the caller must then let `rx` grow to hold it);
    /// `max_len` bounds any frame delivered whole, and any frame at all
    /// of a client.
    pub(crate) fn step(
        &mut self,
        rx: &mut BytesMut,
        max_len: usize,
        mut inspect: impl FnMut(u8, usize) -> bool,
    ) -> Result<Step, odissey_protocol::Error> {
        if self.whole {
            return self.take_whole(rx, max_len);
        }
        let mut pos = 0;
        loop {
            if self.left > 0 {
                let take = self.left.min(rx.len() - pos);
                pos += take;
                self.left -= take;
                if self.left > 0 {
                    break;
                }
            }
            let header = match self.header(&rx[pos..], max_len) {
                // The frames before a bad header go first: `inspect` has
                // seen them (and one may be partly relayed already). The
                // error comes at the next call, with the header in front.
                Err(_) if pos > 0 => break,
                header => header?,
            };
            let Some((tag, total)) = header else {
                break;
            };
            if inspect(tag, total) {
                self.whole = true;
                if pos > 0 {
                    break;
                }
                return self.take_whole(rx, max_len);
            }
            self.left = total;
        }
        if pos == 0 {
            Ok(Step::NeedMore)
        } else {
            Ok(Step::Pass(rx.split_to(pos)))
        }
    }

    /// The frame at the front, judged to be delivered whole: once it is
    /// all there. Beyond `max_len` it is an error rather than something to
    /// wait for (only a server's frame can be: a client's was bounded at
    /// its header).
    fn take_whole(
        &mut self,
        rx: &mut BytesMut,
        max_len: usize,
    ) -> Result<Step, odissey_protocol::Error> {
        Ok(match self.header(rx, max_len)? {
            Some((tag, total)) if total - 1 > max_len => {
                return Err(odissey_protocol::Error::TooLarge {
                    tag,
                    len: (total - 1) as u32,
                    max: max_len,
                })
            }
            Some((tag, total)) if rx.len() >= total => {
                self.whole = false;
                Step::Inspect(tag, rx.split_to(total))
            }
            _ => Step::NeedMore,
        })
    }
}

/// A whole frame (as `Step::Inspect` hands it over) as the protocol
/// crate's parsers take it.
pub(crate) fn frame_of(tag: u8, whole: &[u8]) -> odissey_protocol::Frame {
    odissey_protocol::Frame {
        tag,
        body: bytes::Bytes::copy_from_slice(whole.get(5..).unwrap_or(&[])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use odissey_protocol::{backend, frontend};

    fn run(relay: &mut Relay, rx: &mut BytesMut) -> Vec<(char, usize)> {
        let mut out = Vec::new();
        loop {
            match relay.step(rx, 1 << 20, |t, _| t == b'Z').unwrap() {
                Step::NeedMore => return out,
                Step::Pass(b) => out.push(('-', b.len())),
                Step::Inspect(t, b) => out.push((t as char, b.len())),
            }
        }
    }

    #[test]
    fn passes_runs_and_stops_at_inspected_frames() {
        let mut rx = BytesMut::new();
        backend::command_complete(&mut rx, "SELECT 1"); // 1+4+9 = 14
        backend::ready_for_query(&mut rx, backend::TransactionStatus::Idle); // 6
        backend::command_complete(&mut rx, "BEGIN"); // 11
        let mut r = Relay::default();
        assert_eq!(run(&mut r, &mut rx), vec![('-', 14), ('Z', 6), ('-', 11)]);
        assert!(rx.is_empty() && r.at_boundary());
    }

    #[test]
    fn streams_partial_frames_but_waits_for_whole_inspected_ones() {
        let mut all = BytesMut::new();
        frontend::copy_data(&mut all, &[7u8; 100]); // 105 bytes
        backend::ready_for_query(&mut all, backend::TransactionStatus::InTransaction);
        let total = all.len();
        // Feed one byte at a time: bytes pass as they come, Z only whole.
        let mut r = Relay::default();
        let mut rx = BytesMut::new();
        let mut passed = 0;
        let mut seen_z = false;
        for b in all.iter() {
            rx.extend_from_slice(&[*b]);
            loop {
                match r.step(&mut rx, 1 << 20, |t, _| t == b'Z').unwrap() {
                    Step::NeedMore => break,
                    Step::Pass(p) => passed += p.len(),
                    Step::Inspect(t, f) => {
                        assert_eq!((t, &f[..]), (b'Z', &b"Z\0\0\0\x05T"[..]));
                        seen_z = true;
                    }
                }
            }
        }
        assert_eq!(passed, total - 6);
        assert!(seen_z && r.at_boundary());
    }

    #[test]
    fn inspect_is_asked_once_per_frame() {
        let mut all = BytesMut::new();
        backend::command_complete(&mut all, "SELECT 1");
        backend::ready_for_query(&mut all, backend::TransactionStatus::Idle);
        backend::command_complete(&mut all, "SELECT 2");
        let mut asked = Vec::new();
        let mut r = Relay::default();
        let mut rx = BytesMut::new();
        let mut out = Vec::new();
        for b in all.iter() {
            rx.extend_from_slice(&[*b]);
            loop {
                let step = r
                    .step(&mut rx, 1 << 20, |t, _| {
                        asked.push(t);
                        t == b'Z'
                    })
                    .unwrap();
                match step {
                    Step::NeedMore => break,
                    Step::Pass(p) => out.push(('-', p.len())),
                    Step::Inspect(t, f) => out.push((t as char, f.len())),
                }
            }
        }
        assert_eq!(asked, b"CZC");
        let passed: usize = out.iter().filter(|o| o.0 == '-').map(|o| o.1).sum();
        assert_eq!(passed, 28);
        assert!(out.contains(&('Z', 6)));
    }

    /// Runs a server relay over `bytes`, passing everything but 'Z':
    /// what it passed, and the error it stopped at.
    fn server_run(bytes: &[u8], max_len: usize) -> (usize, Option<odissey_protocol::Error>) {
        let mut r = Relay::for_server();
        let mut rx = BytesMut::from(bytes);
        let mut passed = 0;
        loop {
            match r.step(&mut rx, max_len, |t, _| t == b'Z') {
                Ok(Step::NeedMore) => return (passed, None),
                Ok(Step::Pass(p)) => passed += p.len(),
                Ok(Step::Inspect(_, f)) => passed += f.len(),
                Err(e) => return (passed, Some(e)),
            }
        }
    }

    #[test]
    fn a_server_relay_checks_headers_per_type() {
        let mut good = BytesMut::new();
        backend::command_complete(&mut good, "SELECT 1");
        backend::ready_for_query(&mut good, backend::TransactionStatus::Idle);
        assert_eq!(server_run(&good, 1024), (good.len(), None));

        // A length off by one puts the next header mid-message: the frame
        // goes through as it was sent, the misread header after it is
        // refused.
        let mut long = BytesMut::new();
        long.extend_from_slice(b"C\0\0\0\x0eSELECT 1\0"); // one more than 13
        long.extend_from_slice(b"Z\0\0\0\x05I");
        let (passed, e) = server_run(&long, 1024);
        assert_eq!(passed, 15);
        assert!(
            matches!(e, Some(odissey_protocol::Error::Unexpected { got: 0, .. })),
            "{e:?}"
        );
        let mut short = BytesMut::new();
        short.extend_from_slice(b"C\0\0\0\x0cSELECT 1\0"); // one less
        short.extend_from_slice(b"Z\0\0\0\x05I");
        let (passed, e) = server_run(&short, 1024);
        assert_eq!(passed, 13);
        assert!(
            matches!(e, Some(odissey_protocol::Error::TooLarge { tag: 0, .. })),
            "{e:?}"
        );

        // Huge and negative lengths, fixed-size messages of another size:
        // refused at the header, nothing passed, nothing waited for.
        for bytes in [
            &b"D\x7f\xff\xff\xff"[..],
            b"D\xff\xff\xff\xff",
            b"C\x40\0\0\0",
            b"Z\0\0\0\x06I\0",
            b"1\0\0\0\x05",
            b"!\0\0\0\x04",
        ] {
            let (passed, e) = server_run(bytes, 1024);
            assert_eq!(passed, 0, "{bytes:?}");
            assert!(e.is_some(), "{bytes:?}");
        }
        // A DataRow may be as long as PostgreSQL allows: it streams.
        let (passed, e) = server_run(b"D\x40\0\0\0\0\x01", 1024);
        assert_eq!((passed, e), (7, None));
    }

    #[test]
    fn a_server_frame_wanted_whole_is_bounded() {
        // A DataRow the caller wants whole may not exceed max_len…
        let mut r = Relay::for_server();
        let mut rx = BytesMut::from(&b"D\0\x10\0\0"[..]);
        assert!(matches!(
            r.step(&mut rx, 1024, |_, _| true),
            Err(odissey_protocol::Error::TooLarge { tag: b'D', .. })
        ));
        // …while one passed through may.
        let mut r = Relay::for_server();
        let mut rx = BytesMut::from(&b"D\0\x10\0\0"[..]);
        assert!(matches!(
            r.step(&mut rx, 1024, |_, _| false),
            Ok(Step::Pass(_))
        ));
        // What comes before it goes first, then the error: nothing waits.
        let mut r = Relay::for_server();
        let mut rx = BytesMut::new();
        backend::command_complete(&mut rx, "SELECT 1");
        let before = rx.len();
        rx.extend_from_slice(b"E\0\x10\0\0");
        let mut asked = 0;
        let mut step = |r: &mut Relay, rx: &mut BytesMut| {
            r.step(rx, 1024, |t, _| {
                asked += 1;
                t == b'E'
            })
        };
        assert!(matches!(step(&mut r, &mut rx), Ok(Step::Pass(b)) if b.len() == before));
        assert!(matches!(
            step(&mut r, &mut rx),
            Err(odissey_protocol::Error::TooLarge { tag: b'E', .. })
        ));
        assert_eq!(asked, 2, "inspect is asked once per frame");
    }

    #[test]
    fn frames_before_a_bad_header_go_first() {
        // One call passes the good frame, the next reports the error: what
        // `inspect` counted is what gets relayed.
        let mut rx = BytesMut::new();
        frontend::query(&mut rx, "SELECT 1");
        let good = rx.len();
        rx.extend_from_slice(b"Q\0\0\0\x01");
        let mut r = Relay::default();
        let mut seen = Vec::new();
        let step = r.step(&mut rx, 1 << 20, |t, _| {
            seen.push(t);
            false
        });
        assert!(matches!(step, Ok(Step::Pass(b)) if b.len() == good));
        assert_eq!(seen, b"Q");
        assert!(r.step(&mut rx, 1 << 20, |_, _| false).is_err());
    }

    #[test]
    fn a_frame_held_back_whole_is_reported_until_passed_on() {
        let mut all = BytesMut::new();
        frontend::query(&mut all, "SET x = 1");
        let mut r = Relay::default();
        let mut rx = BytesMut::from(&all[..7]);
        let mut asked = 0;
        let step = r.step(&mut rx, 1 << 20, |_, _| {
            asked += 1;
            true
        });
        assert_eq!(step.unwrap(), Step::NeedMore);
        assert!(r.at_boundary(), "nothing of it was passed on");
        assert_eq!(r.held(&rx), Some(b'Q'));
        rx.extend_from_slice(&all[7..]);
        assert!(matches!(
            r.step(&mut rx, 1 << 20, |_, _| true).unwrap(),
            Step::Inspect(b'Q', _)
        ));
        assert_eq!((asked, r.held(&rx)), (1, None));
    }

    #[test]
    fn a_client_relay_refuses_unknown_types_after_what_came_before() {
        // Like PostgreSQL, which runs the Query then refuses the `z`: the
        // Query passes, the next step is the error, at the type byte alone.
        let mut rx = BytesMut::new();
        frontend::query(&mut rx, "SELECT 1");
        let good = rx.len();
        rx.extend_from_slice(b"z");
        let mut r = Relay::for_client();
        let step = r.step(&mut rx, 1 << 20, |_, _| false);
        assert!(matches!(step, Ok(Step::Pass(b)) if b.len() == good));
        assert_eq!(
            r.step(&mut rx, 1 << 20, |_, _| false),
            Err(odissey_protocol::Error::UnknownFrontendType { tag: b'z' })
        );
        // CopyData outside COPY is a known type (the server ignores it).
        let mut rx = BytesMut::new();
        frontend::copy_data(&mut rx, b"x");
        assert!(matches!(
            Relay::for_client().step(&mut rx, 1 << 20, |_, _| false),
            Ok(Step::Pass(_))
        ));
    }

    #[test]
    fn bad_lengths_are_errors() {
        let mut rx = BytesMut::from(&b"Q\0\0\0\x01"[..]);
        assert!(Relay::default()
            .step(&mut rx, 1 << 20, |_, _| false)
            .is_err());
        let mut rx = BytesMut::from(&b"d\x7f\xff\xff\xff"[..]);
        assert!(Relay::default()
            .step(&mut rx, 1 << 20, |_, _| false)
            .is_err());
    }

    #[test]
    fn unfinished_tells_a_stalled_sender_from_an_unrelayed_one() {
        let mut whole = BytesMut::new();
        frontend::copy_data(&mut whole, &[7u8; 100]); // 105 bytes, passed
        backend::ready_for_query(&mut whole, backend::TransactionStatus::Idle); // 6, held
        let mut r = Relay::default();
        // Part of a header.
        let mut rx = BytesMut::from(&whole[..3]);
        assert!(r.unfinished(&rx));
        // A passed frame cut short: what came went on, the rest is owed.
        rx.extend_from_slice(&whole[3..50]);
        assert_eq!(run(&mut r, &mut rx), vec![('-', 50)]);
        assert!(rx.is_empty() && r.unfinished(&rx));
        // Its rest arrived but is not relayed yet: not the sender's fault.
        rx.extend_from_slice(&whole[50..105]);
        assert!(!r.unfinished(&rx));
        assert_eq!(run(&mut r, &mut rx), vec![('-', 55)]);
        // A frame held whole, half there; then all there.
        rx.extend_from_slice(&whole[105..108]);
        assert_eq!(run(&mut r, &mut rx), vec![]);
        assert!(r.unfinished(&rx));
        rx.extend_from_slice(&whole[108..]);
        assert!(!r.unfinished(&rx));
        assert_eq!(run(&mut r, &mut rx), vec![('Z', 6)]);
        assert!(!r.unfinished(&rx));
    }
}
