//! Durations as written in manifests and on the command line: `250ms`, `5s`, `1m30s`,
//! `2h`; a bare number means seconds. Negative, fractional-nanosecond or absurd (over
//! [`MAX`]) values are rejected with a reason.

use std::time::Duration;

/// The longest duration accepted anywhere (one week).
pub const MAX: Duration = Duration::from_secs(7 * 24 * 3600);

/// A duration could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {shown}: {reason}")]
pub struct DurationError {
    pub shown: String,
    pub reason: &'static str,
}

/// Parses a duration; see the module docs for the syntax.
pub fn parse(s: &str) -> Result<Duration, DurationError> {
    let fail = |reason| {
        Err(DurationError {
            shown: crate::name::show(s),
            reason,
        })
    };
    let t = s.trim();
    if t.is_empty() {
        return fail("is empty");
    }
    if t.starts_with('-') {
        return fail("must not be negative");
    }
    let mut total: u128 = 0; // nanoseconds
    let mut rest = t;
    let bare = t.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return fail("expected a number, like 500ms, 5s, 1m30s or 2h");
        }
        let (num, after) = rest.split_at(num_len);
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let scale: u128 = match (unit, bare) {
            ("", true) => 1_000_000_000,
            ("ns", _) => 1,
            ("us" | "µs", _) => 1_000,
            ("ms", _) => 1_000_000,
            ("s", _) => 1_000_000_000,
            ("m", _) => 60_000_000_000,
            ("h", _) => 3_600_000_000_000,
            ("d", _) => 86_400_000_000_000,
            ("", false) => return fail("a number without a unit must stand alone"),
            _ => return fail("unknown unit (use ns, us, ms, s, m, h or d)"),
        };
        let value = match parse_decimal(num, scale) {
            Some(v) => v,
            None => return fail("is not a number"),
        };
        total = total.saturating_add(value);
        if total > MAX.as_nanos() {
            return fail("is longer than a week");
        }
        rest = after;
    }
    Ok(Duration::from_nanos(total as u64))
}

/// `num` (digits with at most one '.') times `scale`, truncated to whole units of 1.
fn parse_decimal(num: &str, scale: u128) -> Option<u128> {
    let (int, frac) = match num.split_once('.') {
        Some((i, f)) => (i, f),
        None => (num, ""),
    };
    if int.is_empty() && frac.is_empty() || frac.contains('.') || int.len() > 20 {
        return None;
    }
    let int_v: u128 = if int.is_empty() { 0 } else { int.parse().ok()? };
    let mut v = int_v.checked_mul(scale)?;
    let mut place = scale;
    for d in frac.bytes().take(18) {
        place /= 10;
        v = v.checked_add(u128::from(d - b'0') * place)?;
    }
    Some(v)
}

/// Formats a duration the way [`parse`] reads it back.
pub fn format(d: Duration) -> String {
    let ms = d.as_millis();
    if !d.subsec_nanos().is_multiple_of(1_000) {
        // Found by the `request` fuzz target: `5.00511011s` came back as `5.00511s`.
        format!("{}ns", d.as_nanos())
    } else if !d.subsec_nanos().is_multiple_of(1_000_000) {
        format!("{}us", d.as_micros())
    } else if !ms.is_multiple_of(1000) {
        format!("{ms}ms")
    } else {
        format!("{}s", d.as_secs())
    }
}

/// serde support: a duration field written as a string (`5s`) or a bare number of seconds.
pub mod serde_duration {
    use std::time::Duration;

    use serde::{de, Deserializer, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Duration;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a duration like 500ms, 5s or 1m30s")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
                super::parse(v).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
                super::parse(&v.to_string()).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
                super::parse(&v.to_string()).map_err(E::custom)
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
                if !v.is_finite() {
                    return Err(E::custom("invalid duration: not a finite number"));
                }
                super::parse(&v.to_string()).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }

    pub fn serialize<S: Serializer>(v: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format(*v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_units_and_compounds() {
        assert_eq!(parse("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse("5").unwrap(), Duration::from_secs(5));
        assert_eq!(parse("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse("0").unwrap(), Duration::ZERO);
        assert_eq!(parse("10us").unwrap(), Duration::from_micros(10));
    }

    #[test]
    fn rejects_bad_durations() {
        for (s, why) in [
            ("", "is empty"),
            ("-1s", "must not be negative"),
            ("5x", "unknown unit"),
            ("1s2", "a number without"),
            ("8d", "is longer than a week"),
            ("99999999999999999999999h", "is not a number"),
            ("1..2s", "is not a number"),
            ("s", "expected a number"),
        ] {
            let e = parse(s).unwrap_err();
            assert!(e.reason.starts_with(why), "{s:?}: {e}");
        }
    }

    proptest! {
        #[test]
        fn format_round_trips(ms in 0u64..(7 * 24 * 3600 * 1000)) {
            let d = Duration::from_millis(ms);
            prop_assert_eq!(parse(&format(d)).unwrap(), d);
        }

        #[test]
        fn format_round_trips_to_the_nanosecond(ns in 0u64..(7 * 24 * 3600 * 1_000_000_000)) {
            let d = Duration::from_nanos(ns);
            prop_assert_eq!(parse(&format(d)).unwrap(), d);
        }

        #[test]
        fn never_panics(s in "\\PC{0,40}") {
            let _ = parse(&s);
        }
    }
}
