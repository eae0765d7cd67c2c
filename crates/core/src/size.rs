//! Byte sizes as written in manifests: `512Mi`, `1Gi`, `64M`, `1.5G`, `4096`; a bare number
//! means bytes. Binary (`Ki`, `Mi`, `Gi`, `Ti`) and decimal (`k`/`K`, `M`, `G`, `T`)
//! suffixes, as in Kubernetes. Negative, fractional-byte or absurd (over [`MAX`]) values are
//! rejected with a reason.

use serde::{Deserialize, Deserializer, Serializer};

/// The largest size accepted anywhere (1 PiB).
pub const MAX: u64 = 1 << 50;

/// A size could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid size {shown}: {reason}")]
pub struct SizeError {
    pub shown: String,
    pub reason: &'static str,
}

/// Parses a size; see the module docs for the syntax.
pub fn parse(s: &str) -> Result<u64, SizeError> {
    let fail = |reason| {
        Err(SizeError {
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
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return fail("expected a number, like 512Mi, 1Gi or 4096");
    }
    let scale: u64 = match unit {
        "" | "B" => 1,
        "k" | "K" | "kB" | "KB" => 1_000,
        "M" | "MB" => 1_000_000,
        "G" | "GB" => 1_000_000_000,
        "T" | "TB" => 1_000_000_000_000,
        "Ki" | "KiB" => 1 << 10,
        "Mi" | "MiB" => 1 << 20,
        "Gi" | "GiB" => 1 << 30,
        "Ti" | "TiB" => 1 << 40,
        _ => return fail("unknown unit (use Ki, Mi, Gi, Ti, or k, M, G, T)"),
    };
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if int.is_empty() || frac.contains('.') || (num.contains('.') && frac.is_empty()) {
        return fail("malformed number");
    }
    let Ok(int) = int.parse::<u128>() else {
        return fail("too large");
    };
    let mut total = int.saturating_mul(u128::from(scale));
    if !frac.is_empty() {
        if frac.len() > 9 {
            return fail("too many decimal places");
        }
        let Ok(f) = frac.parse::<u128>() else {
            return fail("malformed number");
        };
        let denom = 10u128.pow(frac.len() as u32);
        let part = f * u128::from(scale);
        if part % denom != 0 {
            return fail("is not a whole number of bytes");
        }
        total = total.saturating_add(part / denom);
    }
    if total > u128::from(MAX) {
        return fail("is more than 1 PiB");
    }
    Ok(total as u64)
}

/// Formats a size with the largest binary unit that divides it exactly.
pub fn format(bytes: u64) -> String {
    for (unit, scale) in [
        ("Ti", 1u64 << 40),
        ("Gi", 1 << 30),
        ("Mi", 1 << 20),
        ("Ki", 1 << 10),
    ] {
        if bytes >= scale && bytes.is_multiple_of(scale) {
            return format!("{}{unit}", bytes / scale);
        }
    }
    bytes.to_string()
}

/// serde for a size field written as a string (`512Mi`) or a bare integer of bytes.
pub mod serde_size {
    use super::*;

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) if n <= MAX => Ok(n),
            Raw::N(_) => Err(serde::de::Error::custom("size is more than 1 PiB")),
            Raw::S(s) => parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

/// serde for an optional size field.
pub mod opt_size {
    use super::*;

    pub fn serialize<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => serde_size::serialize(v, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        serde_size::deserialize(d).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(parse("4096").unwrap(), 4096);
        assert_eq!(parse("512Mi").unwrap(), 512 << 20);
        assert_eq!(parse("1Gi").unwrap(), 1 << 30);
        assert_eq!(parse("64M").unwrap(), 64_000_000);
        assert_eq!(parse("1.5Gi").unwrap(), 3 << 29);
        assert_eq!(parse(" 2k ").unwrap(), 2000);
    }

    #[test]
    fn rejects() {
        for bad in [
            "",
            "-1",
            "1.5",
            "1..5Mi",
            "Mi",
            "10X",
            "1.0000000001Gi",
            "2Pi",
            "9999999Ti",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should be rejected");
        }
        assert_eq!(parse("-5Mi").unwrap_err().reason, "must not be negative");
    }

    #[test]
    fn format_round_trips() {
        for v in [
            0u64,
            1,
            1023,
            1024,
            512 << 20,
            3 << 29,
            1 << 40,
            123_456_789,
        ] {
            assert_eq!(parse(&format(v)).unwrap(), v);
        }
        assert_eq!(format(512 << 20), "512Mi");
    }
}
