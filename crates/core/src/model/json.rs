//! Writing JSON by hand where serde's generic path costs the most: the
//! per-event CloudEvents envelope and audit records (instruction counts of
//! `STEWARD_BENCH_WRAPPER="valgrind --tool=callgrind" cargo bench --bench
//! e2e -- W1`). The output is what
//! `serde_json::to_writer` writes for the same values (compact form).

/// Appends `s` as a JSON string. Most strings (ids, keys, names, times)
/// need no escaping and are copied whole; the rest go through serde_json,
/// which escapes exactly `"`, `\` and control characters.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    if is_plain(s) {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        // Writing a str into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

/// Whether `s` is written as a JSON string without any escape.
pub fn is_plain(s: &str) -> bool {
    // Eight bytes at a time (SWAR): a byte below 0x20, or equal to `"` or
    // `\`, sets its high bit in `flags`; bytes >= 0x80 (UTF-8) never do.
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let has_zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGHS;
    let mut chunks = s.as_bytes().chunks_exact(8);
    for c in &mut chunks {
        let x = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        let below_space = x.wrapping_sub(ONES * 0x20) & !x & HIGHS;
        let flags = below_space
            | has_zero(x ^ (ONES * u64::from(b'"')))
            | has_zero(x ^ (ONES * u64::from(b'\\')));
        if flags != 0 {
            return false;
        }
    }
    chunks
        .remainder()
        .iter()
        .all(|&b| b >= 0x20 && b != b'"' && b != b'\\')
}

/// Appends `"key":` for a key known to need no escaping, after a comma
/// unless it is the first field of the object.
pub fn write_key(out: &mut Vec<u8>, key: &str, first: bool) {
    if !first {
        out.push(b',');
    }
    out.push(b'"');
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(b"\":");
}

/// Appends an integer as a JSON number.
pub fn write_int(out: &mut Vec<u8>, n: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn strings_that_need_escaping_are_escaped_like_serde_json() {
        for s in [
            "",
            "plain",
            "quote\"d",
            "back\\slash",
            "tab\there",
            "nl\n",
            "\u{0}\u{1f}",
            "ünïcödé €",
            "\u{7f}",
        ] {
            let mut out = Vec::new();
            write_str(&mut out, s);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                serde_json::to_string(s).unwrap()
            );
        }
    }

    #[test]
    fn a_character_to_escape_is_found_at_any_position() {
        for len in 1..20 {
            for at in 0..len {
                for special in ['"', '\\', '\n', '\u{0}', '\u{1f}'] {
                    let s: String = (0..len)
                        .map(|i| if i == at { special } else { 'é' })
                        .collect();
                    assert!(!is_plain(&s), "{s:?}");
                }
                let s: String = (0..len).map(|i| if i == at { ' ' } else { 'x' }).collect();
                assert!(is_plain(&s), "{s:?}");
            }
        }
    }

    proptest! {
        #[test]
        fn any_string_matches_serde_json(s in any::<String>()) {
            let mut out = Vec::new();
            write_str(&mut out, &s);
            prop_assert_eq!(String::from_utf8(out).unwrap(), serde_json::to_string(&s).unwrap());
        }
    }
}
