//! Signal names and numbers (Linux, x86-64 and aarch64 share these).

use std::fmt;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// A signal a manifest may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Signal(i32);

const TABLE: &[(&str, i32)] = &[
    ("HUP", 1),
    ("INT", 2),
    ("QUIT", 3),
    ("ILL", 4),
    ("TRAP", 5),
    ("ABRT", 6),
    ("BUS", 7),
    ("FPE", 8),
    ("KILL", 9),
    ("USR1", 10),
    ("SEGV", 11),
    ("USR2", 12),
    ("PIPE", 13),
    ("ALRM", 14),
    ("TERM", 15),
    ("STKFLT", 16),
    ("CHLD", 17),
    ("CONT", 18),
    ("STOP", 19),
    ("TSTP", 20),
    ("TTIN", 21),
    ("TTOU", 22),
    ("URG", 23),
    ("XCPU", 24),
    ("XFSZ", 25),
    ("VTALRM", 26),
    ("PROF", 27),
    ("WINCH", 28),
    ("IO", 29),
    ("PWR", 30),
    ("SYS", 31),
];

impl Signal {
    pub const TERM: Signal = Signal(15);
    pub const KILL: Signal = Signal(9);
    pub const INT: Signal = Signal(2);

    /// A signal by number, if it is a valid Linux signal (1..=64).
    pub fn from_number(n: i32) -> Option<Signal> {
        (1..=64).contains(&n).then_some(Signal(n))
    }

    /// Parses `TERM`, `SIGTERM`, `sigterm` or `15`.
    pub fn parse(s: &str) -> Option<Signal> {
        if let Ok(n) = s.parse::<i32>() {
            return Signal::from_number(n);
        }
        let up = s.to_ascii_uppercase();
        let bare = up.strip_prefix("SIG").unwrap_or(&up);
        TABLE
            .iter()
            .find(|(n, _)| *n == bare)
            .map(|(_, v)| Signal(*v))
    }

    pub fn number(self) -> i32 {
        self.0
    }

    /// `SIGTERM`, or `SIG<n>` for signals without a name here.
    pub fn name(self) -> String {
        match TABLE.iter().find(|(_, v)| *v == self.0) {
            Some((n, _)) => format!("SIG{n}"),
            None => format!("SIG{}", self.0),
        }
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

impl<'de> Deserialize<'de> for Signal {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Signal, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Signal;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a signal name like SIGTERM or a number from 1 to 64")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Signal, E> {
                Signal::parse(v)
                    .ok_or_else(|| E::custom(format!("unknown signal {}", crate::name::show(v))))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Signal, E> {
                i32::try_from(v)
                    .ok()
                    .and_then(Signal::from_number)
                    .ok_or_else(|| E::custom(format!("signal number {v} is out of range 1..64")))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Signal, E> {
                self.visit_i64(i64::try_from(v).unwrap_or(i64::MAX))
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for Signal {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_numbers() {
        assert_eq!(Signal::parse("SIGTERM"), Some(Signal::TERM));
        assert_eq!(Signal::parse("term"), Some(Signal::TERM));
        assert_eq!(Signal::parse("9"), Some(Signal::KILL));
        assert_eq!(Signal::parse("0"), None);
        assert_eq!(Signal::parse("65"), None);
        assert_eq!(Signal::parse("SIGFOO"), None);
        assert_eq!(Signal::from_number(34).unwrap().name(), "SIG34");
    }

    /// Issue 14: the CLI shows signals by name; every standard Linux signal has one.
    #[test]
    fn every_standard_signal_has_a_name() {
        for n in 1..=31 {
            let name = Signal::from_number(n).unwrap().name();
            assert!(
                !name[3..].starts_with(|c: char| c.is_ascii_digit()),
                "signal {n} is {name}"
            );
            assert_eq!(Signal::parse(&name).map(Signal::number), Some(n), "{name}");
        }
    }
}
