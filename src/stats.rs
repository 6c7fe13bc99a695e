//! Per-pool counters: transactions, queries, bytes, time in transaction and
//! in query, time waiting for a server (with a histogram for quantiles),
//! and server errors by SQLSTATE class. Each worker keeps its own (plain
//! integers, no atomics on the hot path); a gathering sums them.

/// Counters of one pool on one worker (or summed over workers).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Counters {
    pub(crate) xacts: u64,
    pub(crate) queries: u64,
    /// Bytes from clients to the server.
    pub(crate) bytes_in: u64,
    /// Bytes from the server to clients.
    pub(crate) bytes_out: u64,
    pub(crate) xact_us: u64,
    pub(crate) query_us: u64,
    /// Clients that waited (or not) for a server, and how long in total.
    pub(crate) waits: u64,
    pub(crate) wait_us: u64,
    pub(crate) wait_hist: Histogram,
    /// ErrorResponses from the server, by SQLSTATE class (two characters).
    pub(crate) errors: Vec<([u8; 2], u64)>,
}

impl Counters {
    /// Adds `other` in.
    pub(crate) fn merge(&mut self, other: &Self) {
        self.xacts += other.xacts;
        self.queries += other.queries;
        self.bytes_in += other.bytes_in;
        self.bytes_out += other.bytes_out;
        self.xact_us += other.xact_us;
        self.query_us += other.query_us;
        self.waits += other.waits;
        self.wait_us += other.wait_us;
        self.wait_hist.merge(&other.wait_hist);
        for (class, n) in &other.errors {
            self.error_n(*class, *n);
        }
    }

    /// One client waited `us` for a server.
    pub(crate) fn waited(&mut self, us: u64) {
        self.waits += 1;
        self.wait_us += us;
        self.wait_hist.record(us);
    }

    /// The server answered an ErrorResponse with this SQLSTATE.
    pub(crate) fn error(&mut self, code: &[u8]) {
        let class = [
            code.first().copied().unwrap_or(b'?'),
            code.get(1).copied().unwrap_or(b'?'),
        ];
        self.error_n(class, 1);
    }

    fn error_n(&mut self, class: [u8; 2], n: u64) {
        match self.errors.iter_mut().find(|(c, _)| *c == class) {
            Some((_, k)) => *k += n,
            None => self.errors.push((class, n)),
        }
    }

    /// Nothing counted yet (cheap to skip when flushing).
    pub(crate) fn is_empty(&self) -> bool {
        self.queries == 0 && self.bytes_in == 0 && self.bytes_out == 0 && self.errors.is_empty()
    }
}

/// Buckets per power of two: four, so a bucket spans at most 19 %.
const SUB: usize = 4;
/// Values up to 2^40 µs (about 12 days) fit.
const BUCKETS: usize = 41 * SUB;

/// A log-scale histogram of microseconds, for quantiles without keeping
/// samples. Allocated on first use: most pools on most workers never wait.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Histogram {
    counts: Option<Box<[u64; BUCKETS]>>,
}

fn bucket(us: u64) -> usize {
    if us < SUB as u64 {
        return us as usize;
    }
    let log = 63 - us.leading_zeros() as usize;
    // The two bits below the top one pick the sub-bucket.
    let sub = ((us >> (log - 2)) & 0b11) as usize;
    (log * SUB + sub).min(BUCKETS - 1)
}

/// The largest value bucket `i` holds.
fn upper(i: usize) -> u64 {
    if i < SUB {
        return i as u64;
    }
    let (log, sub) = (i / SUB, (i % SUB) as u64);
    let base = 1u64 << log;
    base + (sub + 1) * (base >> 2) - 1
}

impl Histogram {
    pub(crate) fn record(&mut self, us: u64) {
        let counts = self.counts.get_or_insert_with(|| Box::new([0; BUCKETS]));
        counts[bucket(us)] += 1;
    }

    pub(crate) fn merge(&mut self, other: &Self) {
        let Some(theirs) = &other.counts else {
            return;
        };
        let mine = self.counts.get_or_insert_with(|| Box::new([0; BUCKETS]));
        for (m, t) in mine.iter_mut().zip(theirs.iter()) {
            *m += t;
        }
    }

    /// The value below which a fraction `q` of the samples fall (to the
    /// bucket's upper bound); 0 without samples.
    pub(crate) fn quantile(&self, q: f64) -> u64 {
        let Some(counts) = &self.counts else {
            return 0;
        };
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0;
        }
        let want = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in counts.iter().enumerate() {
            seen += n;
            if seen >= want {
                return upper(i);
            }
        }
        upper(BUCKETS - 1)
    }
}

/// The SQLSTATE of an ErrorResponse body (its `C` field), if well formed.
pub(crate) fn error_code(body: &[u8]) -> Option<&[u8]> {
    let mut rest = body;
    while let Some((&field, tail)) = rest.split_first() {
        if field == 0 {
            return None;
        }
        let end = tail.iter().position(|b| *b == 0)?;
        if field == b'C' {
            return Some(&tail[..end]);
        }
        rest = &tail[end + 1..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_values_in_order() {
        let mut last = 0;
        for us in [0u64, 1, 3, 4, 5, 7, 8, 100, 1000, 65_535, 1 << 30, u64::MAX] {
            let b = bucket(us);
            assert!(b >= last, "{us}");
            assert!(
                upper(b) >= us.min(upper(BUCKETS - 1)),
                "{us} in bucket {b} ≤ {}",
                upper(b)
            );
            last = b;
        }
        // A bucket spans under a fifth of its values.
        let b = bucket(1000);
        assert!(upper(b) - upper(b - 1) <= 1000 / 4);
    }

    #[test]
    fn quantiles_of_a_known_distribution() {
        let mut h = Histogram::default();
        assert_eq!(h.quantile(0.5), 0);
        for us in 1..=1000 {
            h.record(us);
        }
        let p50 = h.quantile(0.50);
        let p99 = h.quantile(0.99);
        assert!((450..=650).contains(&p50), "p50 {p50}");
        assert!((950..=1200).contains(&p99), "p99 {p99}");
        let mut other = Histogram::default();
        for _ in 0..1000 {
            other.record(1_000_000);
        }
        h.merge(&other);
        assert!(h.quantile(0.95) >= 1_000_000);
        assert!(h.quantile(0.25) <= 600);
    }

    #[test]
    fn counters_merge_and_errors_group_by_class() {
        let mut a = Counters {
            queries: 3,
            ..Counters::default()
        };
        a.error(b"23505");
        a.error(b"23503");
        a.waited(10);
        let mut b = Counters::default();
        b.error(b"42601");
        b.waited(30);
        a.merge(&b);
        assert_eq!(a.queries, 3);
        assert_eq!(a.errors, vec![(*b"23", 2), (*b"42", 1)]);
        assert_eq!((a.waits, a.wait_us), (2, 40));
    }

    #[test]
    fn the_code_is_found_among_the_fields() {
        let body = b"SERROR\0VERROR\0C23505\0Mduplicate key\0\0";
        assert_eq!(error_code(body), Some(&b"23505"[..]));
        assert_eq!(error_code(b"SERROR\0Mno code\0\0"), None);
        assert_eq!(error_code(b"SERROR"), None);
        assert_eq!(error_code(b""), None);
    }
}
