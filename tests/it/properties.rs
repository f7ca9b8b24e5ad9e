//! Property tests over untrusted input: the config loader never panics on
//! any text, and on any mix of valid and invalid sections it either loads or
//! names the offending keys. (The pgoutput decoder and value conversion have
//! their own properties next to their code.)
//!
//! Longer runs: `PROPTEST_CASES=100000 cargo test --release --test properties`.

use std::path::Path;

use proptest::prelude::*;
use steward_core::config::Config;

fn parse(text: &str) -> Result<Config, steward_core::config::ConfigErrors> {
    steward_sinks::config::parse(text, Path::new("prop.toml"), Path::new("/tmp"))
}

/// Fragments that look like parts of a real config, valid or not.
fn line() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("[source]".to_string()),
        Just("[state]".to_string()),
        Just("[metrics]".to_string()),
        "\\[entities\\.[a-z]{1,6}\\]".prop_map(|s| s),
        "\\[targets\\.[a-z]{1,6}\\]".prop_map(|s| s),
        Just("url = \"postgres://steward@localhost/odoo\"".to_string()),
        Just("url = \"http://127.0.0.1:9/x\"".to_string()),
        Just("type = \"http\"".to_string()),
        Just("table = \"product_template\"".to_string()),
        Just("path = \"state.redb\"".to_string()),
        Just("fields = { sku = \"default_code\", name = \"name.en_US\" }".to_string()),
        Just("entities = [\"a\", \"product\"]".to_string()),
        "[a-z_]{1,12} = [0-9]{1,12}".prop_map(|s| s),
        "[a-z_]{1,12} = \"[ -~]{0,20}\"".prop_map(|s| s),
        "[a-z_]{1,12} = \\{ [a-z]{1,5} = \"[a-z.]{0,10}\" \\}".prop_map(|s| s),
        "[ -~]{0,40}".prop_map(|s| s),
    ]
}

proptest! {
    #[test]
    fn any_text_is_rejected_or_accepted_without_panic(text in "\\PC{0,400}") {
        let _ = parse(&text);
    }

    #[test]
    fn config_shaped_text_never_panics_and_errors_always_say_something(lines in proptest::collection::vec(line(), 0..40)) {
        let text = lines.join("\n");
        if let Err(errors) = parse(&text) {
            prop_assert!(!errors.errors.is_empty(), "a rejected config lists at least one problem:\n{text}");
            for e in &errors.errors {
                prop_assert!(!e.message.trim().is_empty(), "every problem has a message");
            }
        }
    }
}
