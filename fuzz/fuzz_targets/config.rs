//! Any configuration text, target settings included: a Config or a list of
//! errors, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = steward_sinks::config::parse(text, std::path::Path::new("fuzz.toml"), std::path::Path::new("/tmp"));
    }
});
