//! The manifest parser and validator on arbitrary input: never a panic, and a manifest that
//! validates survives the JSON round trip the instance table relies on.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(spec) = bulkhead_core::spec::parse_manifest("w/manifest.yaml", "w", text) else {
        return;
    };
    let json = serde_json::to_string(&spec).expect("a valid spec serializes");
    let back: bulkhead_core::spec::WorkloadSpec =
        serde_json::from_str(&json).expect("a serialized spec parses back");
    assert_eq!(back, spec, "JSON round trip changed the spec");
    back.validate().expect("a round-tripped spec is still valid");
});
