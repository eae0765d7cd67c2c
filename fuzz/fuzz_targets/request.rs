//! Request validation on arbitrary input: names, keys, instance ids, durations, sizes and
//! `${VAR}` expansion never panic, and what parses formats back to itself.
#![no_main]

use bulkhead_core::key::{InstanceId, Isolation, Key};
use bulkhead_core::name::{self, NameKind};
use bulkhead_core::{duration, expand, size};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut parts = text.splitn(3, '\u{1f}');
    let a = parts.next().unwrap_or_default();
    let b = parts.next().unwrap_or_default();
    let c = parts.next().unwrap_or_default();
    for kind in [
        NameKind::Workload,
        NameKind::Namespace,
        NameKind::Session,
        NameKind::Lease,
    ] {
        if name::validate(kind, a).is_ok() {
            assert!(!a.contains('/') && !a.contains('\0') && a != "..");
        }
    }
    for iso in [Isolation::None, Isolation::Namespace, Isolation::Session] {
        if let Ok(key) = Key::new(a, iso, Some(b), Some(c)) {
            let id = key.instance_id();
            let (parsed, again) = InstanceId::parse(id.as_str()).expect("a key's id parses");
            assert_eq!(parsed, id);
            assert_eq!(again.instance_id(), id);
        }
    }
    if let Ok((id, _)) = InstanceId::parse(a) {
        assert_eq!(id.as_str(), a, "an instance id is its own text");
    }
    if let Ok(d) = duration::parse(a) {
        assert_eq!(duration::parse(&duration::format(d)).ok(), Some(d));
    }
    if let Ok(n) = size::parse(a) {
        assert_eq!(size::parse(&size::format(n)).ok(), Some(n));
    }
    let _ = expand::expand(0, c, |v| (v == "A").then_some(b));
});
