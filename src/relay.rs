//! Relaying protocol messages without decoding them.
//!
//! The pooler needs to look at only a few messages on the hot path (the
//! client's Query/Sync/Terminate, the server's ReadyForQuery). [`Relay`]
//! walks the frame headers of a receive buffer and hands back, in order,
//! runs of bytes to pass through untouched and the few whole frames the
//! caller wants to see. A frame that is not inspected streams through even
//! when only part of it has arrived, so a 1 GB CopyData never has to sit in
//! memory whole.

use bytes::BytesMut;
use odissey_protocol::codec::peek_header;

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
}

impl Relay {
    /// True when the relay stands on a frame boundary (nothing half-sent).
    pub(crate) fn at_boundary(&self) -> bool {
        self.left == 0
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
    /// `max_len` bounds any frame.
    pub(crate) fn step(
        &mut self,
        rx: &mut BytesMut,
        max_len: usize,
        mut inspect: impl FnMut(u8, usize) -> bool,
    ) -> Result<Step, odissey_protocol::Error> {
        if self.whole {
            return Ok(match peek_header(rx, max_len)? {
                Some((tag, total)) if rx.len() >= total => {
                    self.whole = false;
                    Step::Inspect(tag, rx.split_to(total))
                }
                _ => Step::NeedMore,
            });
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
            let Some((tag, total)) = peek_header(&rx[pos..], max_len)? else {
                break;
            };
            if inspect(tag, total) {
                if pos > 0 || rx.len() < total {
                    self.whole = true;
                    break;
                }
                return Ok(Step::Inspect(tag, rx.split_to(total)));
            }
            self.left = total;
        }
        if pos == 0 {
            Ok(Step::NeedMore)
        } else {
            Ok(Step::Pass(rx.split_to(pos)))
        }
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
}
