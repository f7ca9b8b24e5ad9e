//! Any bytes, in or out of a streamed block: an error or a message, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let bytes = bytes::Bytes::copy_from_slice(data);
    let _ = steward_postgres::pgoutput::decode(&bytes, false);
    let _ = steward_postgres::pgoutput::decode(&bytes, true);
});
