//! Any column text for any of the common type OIDs: JSON or an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

const OIDS: &[u32] = &[
    16, 17, 18, 19, 20, 21, 23, 25, 26, 114, 700, 701, 1000, 1005, 1007, 1009, 1015, 1016, 1022, 1042, 1043, 1082,
    1083, 1114, 1115, 1182, 1184, 1185, 1186, 1231, 1266, 1700, 2950, 3802, 3807,
];

fuzz_target!(|data: &[u8]| {
    if let Some((&selector, text)) = data.split_first() {
        let oid = OIDS[selector as usize % OIDS.len()];
        let _ = steward_core::model::value::text_to_json(oid, text);
    }
});
