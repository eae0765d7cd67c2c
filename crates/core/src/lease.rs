//! Lease holders: the names that keep an instance alive (`launch --lease HOLDER`,
//! `release ID HOLDER`).
//!
//! A holder is a name like any other ([`name::validate`] with [`NameKind::Lease`]): it is
//! stored with the instance, shown by `get` and `list`, and must be typed again to
//! release the lease, so it gets the same rules (1 to 63 ASCII letters, digits, `.`, `_`,
//! `-`). One instance holds at most [`MAX_LEASES`] holders; a launch that would add one
//! more is refused (re-taking a lease the holder already has is not).

use crate::name::{self, NameError, NameKind};

/// The most lease holders one instance can have.
pub const MAX_LEASES: usize = 1024;

/// A lease could not be taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    /// The holder's name is not a valid name.
    #[error("request field `{field}`: {source}")]
    Holder {
        /// The request field the holder came from (`lease`, or `session` when the
        /// session holds the lease).
        field: &'static str,
        source: NameError,
    },
    /// The instance already has [`MAX_LEASES`] other holders.
    #[error(
        "request field `{field}`: instance {id} already has {MAX_LEASES} lease holders, the \
         limit; release one first"
    )]
    TooMany { field: &'static str, id: String },
}

/// Checks a holder name given in request field `field`.
pub fn validate_holder(field: &'static str, holder: &str) -> Result<(), LeaseError> {
    name::validate(NameKind::Lease, holder).map_err(|source| LeaseError::Holder { field, source })
}

/// Whether one more holder may be added to an instance that has `held` holders, of which
/// `holder` is one already when `already` (re-taking a lease is always allowed).
pub fn admit(field: &'static str, id: &str, held: usize, already: bool) -> Result<(), LeaseError> {
    if already || held < MAX_LEASES {
        Ok(())
    } else {
        Err(LeaseError::TooMany {
            field,
            id: id.to_owned(),
        })
    }
}

/// The holders worth keeping of a list recorded by an older daemon, which took any
/// string: the valid names, at most [`MAX_LEASES`] of them. Returns them and how many were
/// dropped (a holder that is not a valid name could never be released).
pub fn retain_valid(holders: Vec<String>) -> (Vec<String>, usize) {
    let total = holders.len();
    let kept: Vec<String> = holders
        .into_iter()
        .filter(|h| name::validate(NameKind::Lease, h).is_ok())
        .take(MAX_LEASES)
        .collect();
    let dropped = total - kept.len();
    (kept, dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_holders_are_refused_naming_the_field() {
        let huge = "h".repeat(3 * 1024 * 1024);
        let long = "h".repeat(4096);
        for h in ["a\0b", "a\nb", "a\u{202e}b", "", "a b", &long, &huge] {
            let e = validate_holder("lease", h).unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.starts_with("request field `lease`: invalid lease holder name"),
                "{msg}"
            );
            assert!(msg.len() < 300, "the message stays short: {}", msg.len());
            assert!(!msg.contains('\u{202e}') && !msg.contains('\n'), "{msg:?}");
        }
        validate_holder("lease", "worker-1.a_b").unwrap();
    }

    #[test]
    fn at_most_max_leases_new_holders() {
        admit("lease", "ns:a:w", MAX_LEASES - 1, false).unwrap();
        admit("lease", "ns:a:w", MAX_LEASES, true).unwrap();
        let e = admit("lease", "ns:a:w", MAX_LEASES, false).unwrap_err();
        assert_eq!(
            e.to_string(),
            "request field `lease`: instance ns:a:w already has 1024 lease holders, the limit; \
             release one first"
        );
    }

    #[test]
    fn restored_hostile_holders_are_dropped() {
        let mut v = vec!["ok".to_owned(), "a\nb".to_owned(), "x".repeat(9 << 20)];
        v.extend((0..MAX_LEASES + 5).map(|i| format!("h{i}")));
        let (kept, dropped) = retain_valid(v);
        assert_eq!(kept.len(), MAX_LEASES);
        assert_eq!(kept[0], "ok");
        assert_eq!(dropped, 2 + 6);
    }
}
