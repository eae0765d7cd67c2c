//! The range of TCP ports handed to instances (`$PORT`) and the pure part of picking one.
//!
//! The daemon keeps the ports its live instances hold and picks a new one by scanning the
//! range sequentially from a cursor ([`pick`]): a port held by a live instance is never
//! given twice, and the scan ends only when every port of the range has been tried, so a
//! burst cannot fail while a port is free. Whether a port is free of other programs is the
//! daemon's test (a bind); here it is a function.
//!
//! ```
//! use bulkhead_core::port::{pick, PortRange};
//!
//! let range: PortRange = "9000-9003".parse().unwrap();
//! // 9001 is held by an instance, 9002 is bound by another program: from 9001 on, 9003.
//! let got = pick(range, 9001, |p| p == 9001, |p| Ok::<_, ()>(p != 9002));
//! assert_eq!(got, Ok(Some(9003)));
//! assert_eq!(range.after(9003), 9000); // the cursor wraps
//! ```

use std::fmt;
use std::str::FromStr;

/// An inclusive range of TCP ports, `low <= high`, never containing port 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    low: u16,
    high: u16,
}

/// The default range: 12,001 ports below the kernel's ephemeral range (32768-60999 on
/// Linux), so outgoing connections never hold one of them (Nomad's dynamic ports use the
/// same range).
pub const DEFAULT_RANGE: PortRange = PortRange {
    low: 20000,
    high: 32000,
};

/// A port range could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid port range {given:?}: expected LOW-HIGH with 1 <= LOW <= HIGH <= 65535")]
pub struct PortRangeError {
    pub given: String,
}

impl PortRange {
    /// `low..=high`; `None` when `low` is 0 or greater than `high`.
    pub fn new(low: u16, high: u16) -> Option<PortRange> {
        (low >= 1 && low <= high).then_some(PortRange { low, high })
    }

    pub fn low(self) -> u16 {
        self.low
    }

    pub fn high(self) -> u16 {
        self.high
    }

    /// How many ports the range holds (1 to 65,535).
    pub fn len(self) -> usize {
        usize::from(self.high - self.low) + 1
    }

    /// Never true: a range holds at least one port.
    pub fn is_empty(self) -> bool {
        false
    }

    pub fn contains(self, port: u16) -> bool {
        (self.low..=self.high).contains(&port)
    }

    /// The port after `port` in the range, wrapping from `high` to `low` (a port outside
    /// the range gives `low`).
    pub fn after(self, port: u16) -> u16 {
        if port >= self.low && port < self.high {
            port + 1
        } else {
            self.low
        }
    }

    /// The `n`-th port of the range, counted from `low` and wrapping (a cursor from a
    /// random number).
    pub fn nth(self, n: u64) -> u16 {
        let off = n % self.len() as u64;
        // `off < len <= 65535` and `low + off <= high`: no overflow.
        self.low + off as u16
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.low, self.high)
    }
}

impl FromStr for PortRange {
    type Err = PortRangeError;

    /// `LOW-HIGH` (`20000-32000`), or one port (`9000`).
    fn from_str(s: &str) -> Result<PortRange, PortRangeError> {
        let err = || PortRangeError {
            given: crate::text::sanitize(s, 64),
        };
        let (low, high) = match s.split_once('-') {
            Some((l, h)) => (l, h),
            None => (s, s),
        };
        let num = |t: &str| {
            let t = t.trim();
            // Digits only: no sign, no spaces inside, at most 5 of them.
            if t.is_empty() || t.len() > 5 || !t.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            t.parse::<u16>().ok()
        };
        let (Some(low), Some(high)) = (num(low), num(high)) else {
            return Err(err());
        };
        PortRange::new(low, high).ok_or_else(err)
    }
}

/// The first port from `start` upward (wrapping once around the range) that is not
/// `held` and that `free` accepts; `None` after every port of the range was tried.
/// `free` is called only for ports that are not `held`, at most once each; its error (it
/// could not tell) ends the scan.
pub fn pick<E>(
    range: PortRange,
    start: u16,
    held: impl Fn(u16) -> bool,
    mut free: impl FnMut(u16) -> Result<bool, E>,
) -> Result<Option<u16>, E> {
    let mut port = if range.contains(start) {
        start
    } else {
        range.low
    };
    for _ in 0..range.len() {
        if !held(port) && free(port)? {
            return Ok(Some(port));
        }
        port = range.after(port);
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    #[test]
    fn ranges_parse_and_bad_ones_are_named() {
        assert_eq!(
            "20000-32000".parse::<PortRange>().unwrap(),
            PortRange::new(20000, 32000).unwrap()
        );
        assert_eq!("9000".parse::<PortRange>().unwrap().len(), 1);
        assert_eq!("1-65535".parse::<PortRange>().unwrap().len(), 65535);
        for bad in [
            "", "0-10", "10-9", "-5", "5-", "1-65536", "a-b", "+1-2", "1 - 2x", "1-2-3",
        ] {
            let e = bad.parse::<PortRange>().unwrap_err();
            assert!(
                e.to_string().starts_with("invalid port range"),
                "{bad}: {e}"
            );
        }
        assert_eq!(DEFAULT_RANGE.to_string(), "20000-32000");
        assert!(DEFAULT_RANGE.high() < 32768, "below the ephemeral range");
    }

    #[test]
    fn a_full_range_gives_none_after_trying_each_port_once() {
        let r = PortRange::new(100, 104).unwrap();
        let mut tried = Vec::new();
        let got = pick(
            r,
            102,
            |p| p == 100,
            |p| {
                tried.push(p);
                Ok::<_, ()>(false)
            },
        );
        assert_eq!(got, Ok(None));
        assert_eq!(tried, vec![102, 103, 104, 101]);
    }

    #[test]
    fn an_error_of_the_test_ends_the_scan() {
        let r = PortRange::new(100, 104).unwrap();
        let mut tried = 0;
        let got = pick(
            r,
            100,
            |_| false,
            |_| {
                tried += 1;
                Err("emfile")
            },
        );
        assert_eq!((got, tried), (Err("emfile"), 1));
    }

    proptest! {
        /// A picked port is in the range, not held and free; `None` only when no port of
        /// the range is both.
        #[test]
        fn pick_finds_a_free_port_whenever_one_exists(
            low in 1u16..200,
            span in 0u16..60,
            start in 0u16..300,
            held in proptest::collection::hash_set(0u16..300, 0..80),
            busy in proptest::collection::hash_set(0u16..300, 0..80),
        ) {
            let r = PortRange::new(low, low + span).unwrap();
            let got = pick(r, start, |p| held.contains(&p), |p| Ok::<_, ()>(!busy.contains(&p)))
                .unwrap();
            let any = (r.low()..=r.high()).any(|p| !held.contains(&p) && !busy.contains(&p));
            match got {
                Some(p) => {
                    prop_assert!(r.contains(p));
                    prop_assert!(!held.contains(&p) && !busy.contains(&p));
                    // The first such port from the cursor: nothing usable was skipped.
                    let mut q = if r.contains(start) { start } else { r.low() };
                    while q != p {
                        prop_assert!(held.contains(&q) || busy.contains(&q));
                        q = r.after(q);
                    }
                }
                None => prop_assert!(!any),
            }
        }

        /// An allocator built on `pick` (held set + cursor after the last pick) hands out
        /// every port of the range before it fails, never one twice while it is held, and
        /// a released port comes back.
        #[test]
        fn an_allocator_never_gives_a_held_port_twice(
            low in 1u16..1000,
            span in 0u16..40,
            seed in any::<u64>(),
            ops in proptest::collection::vec(any::<bool>(), 1..200),
        ) {
            let r = PortRange::new(low, low + span).unwrap();
            let mut held: HashSet<u16> = HashSet::new();
            let mut order: Vec<u16> = Vec::new();
            let mut cursor = r.nth(seed);
            for (i, alloc) in ops.into_iter().enumerate() {
                if alloc || order.is_empty() {
                    match pick(r, cursor, |p| held.contains(&p), |_| Ok::<_, ()>(true)).unwrap() {
                        Some(p) => {
                            prop_assert!(held.insert(p), "port {} given twice", p);
                            order.push(p);
                            cursor = r.after(p);
                        }
                        None => prop_assert_eq!(held.len(), r.len()),
                    }
                } else {
                    let p = order.remove(i % order.len());
                    prop_assert!(held.remove(&p));
                }
            }
        }

        #[test]
        fn nth_and_after_stay_in_the_range(low in 1u16.., span in any::<u16>(), n in any::<u64>()) {
            let high = low.saturating_add(span);
            let r = PortRange::new(low, high).unwrap();
            prop_assert!(r.contains(r.nth(n)));
            prop_assert!(r.contains(r.after(r.nth(n))));
            prop_assert!(r.contains(r.after(0)));
        }
    }
}
