//! Column value conversion to JSON, and commit timestamps to RFC 3339.
//!
//! Values arrive as the server's text output (pgoutput in text mode, or a
//! text-format query during a snapshot). steward's session settings fix that
//! output: `DateStyle=ISO`, `TimeZone=UTC`, `IntervalStyle=iso_8601`,
//! `extra_float_digits=3`, `bytea_output=hex`. The conversion relies on them.
//!
//! This runs for every mapped column of every event, so it validates UTF-8
//! once and then works on borrowed `&str`s; the only allocation on the common
//! path is the one the resulting `serde_json::Value` itself owns.
//!
//! Numbers keep their exact digits: serde_json's `arbitrary_precision`
//! feature stores a `Number` as its text, so `numeric` `1234.5600` is
//! delivered as `1234.5600`, never rounded through `f64`.
//!
//! Errors never quote the value itself, since column values are business
//! data (names, e-mail addresses) that must not end up in logs.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::str::FromStr;

use base64::Engine as _;
use serde_json::{Number, Value};

const BOOL: u32 = 16;
const BYTEA: u32 = 17;
const CHAR: u32 = 18;
const NAME: u32 = 19;
const INT8: u32 = 20;
const INT2: u32 = 21;
const INT4: u32 = 23;
const TEXT: u32 = 25;
const OID: u32 = 26;
const JSON: u32 = 114;
const FLOAT4: u32 = 700;
const FLOAT8: u32 = 701;
const BPCHAR: u32 = 1042;
const VARCHAR: u32 = 1043;
const DATE: u32 = 1082;
const TIME: u32 = 1083;
const TIMESTAMP: u32 = 1114;
const TIMESTAMPTZ: u32 = 1184;
const INTERVAL: u32 = 1186;
const TIMETZ: u32 = 1266;
const NUMERIC: u32 = 1700;
const UUID: u32 = 2950;
const JSONB: u32 = 3802;

/// PostgreSQL's MAXDIM: arrays never have more dimensions, so deeper nesting
/// is bad input (and bounding it bounds the parser's recursion).
const MAX_ARRAY_DIMS: usize = 6;

/// The deepest nesting of arrays and objects a `json`/`jsonb` value may
/// have (an array of them counts its dimensions too). A deeper value is
/// refused with a clear reason before it is parsed, instead of relying on
/// serde_json's own limit (128): everything that later walks a document
/// recursively (serialization, hashing, redaction, CEL, reading state and
/// outbox entries back, which add a few levels of their own) then stays
/// well inside that limit and the stack.
pub(crate) const MAX_JSON_DEPTH: usize = 100;

/// Why a column's text could not be converted. The value itself is never
/// included (it may be personal data); the type, length and position are.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// The text is not UTF-8.
    #[error("{type_name} value (type OID {type_oid}) is not valid UTF-8 at byte {offset}")]
    InvalidUtf8 {
        /// The column's type.
        type_oid: u32,
        /// A short name of the type (`int4`, `jsonb`, `array`), `column` for others.
        type_name: &'static str,
        /// Position in bytes of the first byte that is not UTF-8.
        offset: usize,
    },
    /// The text is not what the type prints (or nests too deep).
    #[error("invalid {type_name} value (type OID {type_oid}, {len} bytes): {reason}")]
    Invalid {
        /// The column's type.
        type_oid: u32,
        /// A short name of the type (`int4`, `jsonb`, `array`), `column` for others.
        type_name: &'static str,
        /// The text's length in bytes.
        len: usize,
        /// What is wrong with it, without quoting it.
        reason: String,
    },
}

fn invalid(type_oid: u32, text: &str, reason: impl Into<String>) -> ValueError {
    ValueError::Invalid {
        type_oid,
        type_name: type_name(type_oid),
        len: text.len(),
        reason: reason.into(),
    }
}

/// The element type of the array types steward converts element-wise.
pub(crate) fn element_type(array_oid: u32) -> Option<u32> {
    Some(match array_oid {
        1000 => BOOL,
        1001 => BYTEA,
        1002 => CHAR,
        1003 => NAME,
        1005 => INT2,
        1007 => INT4,
        1009 => TEXT,
        1014 => BPCHAR,
        1015 => VARCHAR,
        1016 => INT8,
        1021 => FLOAT4,
        1022 => FLOAT8,
        1028 => OID,
        1115 => TIMESTAMP,
        1182 => DATE,
        1183 => TIME,
        1185 => TIMESTAMPTZ,
        1187 => INTERVAL,
        1231 => NUMERIC,
        1270 => TIMETZ,
        199 => JSON,
        2951 => UUID,
        3807 => JSONB,
        _ => return None,
    })
}

/// A short name for error messages.
fn type_name(type_oid: u32) -> &'static str {
    match type_oid {
        BOOL => "bool",
        BYTEA => "bytea",
        CHAR => "char",
        NAME => "name",
        INT8 => "int8",
        INT2 => "int2",
        INT4 => "int4",
        TEXT => "text",
        OID => "oid",
        JSON => "json",
        FLOAT4 => "float4",
        FLOAT8 => "float8",
        BPCHAR => "bpchar",
        VARCHAR => "varchar",
        DATE => "date",
        TIME => "time",
        TIMESTAMP => "timestamp",
        TIMESTAMPTZ => "timestamptz",
        INTERVAL => "interval",
        TIMETZ => "timetz",
        NUMERIC => "numeric",
        UUID => "uuid",
        JSONB => "jsonb",
        oid if element_type(oid).is_some() => "array",
        _ => "column",
    }
}

/// Converts a column's text output (as pgoutput or a text-format query returns it) to JSON by the column's type OID.
///
/// Integers, numeric and finite floats become JSON numbers with the server's
/// exact digits; non-finite numbers become the strings `"NaN"`,
/// `"Infinity"` and `"-Infinity"` (JSON has no number for them). `bool`
/// becomes a boolean, `json`/`jsonb` the parsed document (at most
/// `MAX_JSON_DEPTH`, 100, levels deep), `bytea` a standard base64 string,
/// `timestamp`/`timestamptz` RFC 3339 (`timestamp` without time zone is
/// taken as UTC, as Odoo stores it), `date` ISO 8601 `YYYY-MM-DD`. Years
/// RFC 3339 cannot write use ISO 8601's expanded form with a sign: BC
/// years are astronomical (1 BC is `0000`, 44 BC is `-0043`), years past
/// 9999 are `+10000`. `infinity` / `-infinity` timestamps and dates stay
/// those words. Known array types become a JSON array of converted
/// elements. Every other type (time, interval, text types, uuid, unknown
/// types) becomes its text as a JSON string.
pub fn text_to_json(type_oid: u32, text: &[u8]) -> Result<Value, ValueError> {
    str_to_json(type_oid, utf8(type_oid, text)?)
}

fn utf8(type_oid: u32, text: &[u8]) -> Result<&str, ValueError> {
    std::str::from_utf8(text).map_err(|e| ValueError::InvalidUtf8 {
        type_oid,
        type_name: type_name(type_oid),
        offset: e.valid_up_to(),
    })
}

/// The value at `path` inside a column's text: for JSON columns the
/// document is walked without building the parts off the path (a
/// translated `name` column holds every language, one is mapped); other
/// types convert whole and step in. Either way the result is what
/// [`text_to_json`] followed by [`follow_path`] gives, errors included.
pub(crate) fn text_to_json_at(
    type_oid: u32,
    text: &[u8],
    path: &[String],
) -> Result<Value, ValueError> {
    if path.is_empty() || !matches!(type_oid, JSON | JSONB) {
        return text_to_json(type_oid, text).map(|v| follow_path(v, path));
    }
    let s = utf8(type_oid, text)?;
    check_json_depth(type_oid, s, MAX_JSON_DEPTH)?;
    let mut de = serde_json::Deserializer::from_str(s);
    serde::de::DeserializeSeed::deserialize(json_walk::AtPath(path), &mut de)
        .and_then(|v| de.end().map(|()| v))
        .map_err(|e| invalid(type_oid, s, format!("not valid JSON: {e}")))
}

/// Steps into `value`: object members by key, array elements by index;
/// anything else (or a missing member) is null.
pub(crate) fn follow_path(mut value: Value, path: &[String]) -> Value {
    for step in path {
        value = match value {
            Value::Object(mut map) => map.remove(step.as_str()).unwrap_or(Value::Null),
            Value::Array(mut items) => match step.parse::<usize>() {
                Ok(i) if i < items.len() => items.swap_remove(i),
                _ => Value::Null,
            },
            _ => Value::Null,
        };
    }
    value
}

mod json_walk {
    //! A serde seed that keeps only the value at a path. Everything else is
    //! still parsed (so invalid JSON is an error) but skipped, not built.
    //! With `arbitrary_precision`, a number reaches `visit_map` as a map
    //! with serde_json's private key: no step matches it, so it is null
    //! like any other scalar.
    use std::fmt;

    use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
    use serde::Deserialize;
    use serde_json::Value;

    pub(crate) struct AtPath<'p>(pub(crate) &'p [String]);

    impl<'de> DeserializeSeed<'de> for AtPath<'_> {
        type Value = Value;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
            match self.0.split_first() {
                None => Value::deserialize(d),
                Some((step, rest)) => d.deserialize_any(Step { step, rest }),
            }
        }
    }

    struct Step<'p> {
        step: &'p str,
        rest: &'p [String],
    }

    macro_rules! scalar_is_null {
        ($($name:ident: $ty:ty),*) => {$(
            fn $name<E: serde::de::Error>(self, _: $ty) -> Result<Value, E> {
                Ok(Value::Null)
            }
        )*};
    }

    impl<'de> Visitor<'de> for Step<'_> {
        type Value = Value;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("any JSON value")
        }

        scalar_is_null!(visit_bool: bool, visit_i64: i64, visit_u64: u64, visit_f64: f64, visit_str: &str);

        fn visit_unit<E: serde::de::Error>(self) -> Result<Value, E> {
            Ok(Value::Null)
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
            // The last of duplicate keys wins, as when the object is built.
            let mut found = Value::Null;
            while let Some(hit) = map.next_key_seed(KeyIs(self.step))? {
                if hit {
                    found = map.next_value_seed(AtPath(self.rest))?;
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(found)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
            let wanted = self.step.parse::<usize>().ok();
            let mut found = Value::Null;
            let mut i = 0usize;
            loop {
                if Some(i) == wanted {
                    match seq.next_element_seed(AtPath(self.rest))? {
                        Some(v) => found = v,
                        None => break,
                    }
                } else if seq.next_element::<IgnoredAny>()?.is_none() {
                    break;
                }
                i += 1;
            }
            Ok(found)
        }
    }

    /// Whether an object key equals the step, without allocating it.
    struct KeyIs<'p>(&'p str);

    impl<'de> DeserializeSeed<'de> for KeyIs<'_> {
        type Value = bool;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
            d.deserialize_str(self)
        }
    }

    impl<'de> Visitor<'de> for KeyIs<'_> {
        type Value = bool;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an object key")
        }

        fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<bool, E> {
            Ok(key == self.0)
        }
    }
}

fn str_to_json(type_oid: u32, s: &str) -> Result<Value, ValueError> {
    match type_oid {
        INT2 | INT4 | INT8 => s
            .parse::<i64>()
            .map(Value::from)
            .map_err(|_| invalid(type_oid, s, "not an integer")),
        OID => s
            .parse::<u32>()
            .map(Value::from)
            .map_err(|_| invalid(type_oid, s, "not an unsigned 32-bit integer")),
        BOOL => match s {
            "t" => Ok(Value::Bool(true)),
            "f" => Ok(Value::Bool(false)),
            _ => Err(invalid(type_oid, s, "expected 't' or 'f'")),
        },
        NUMERIC | FLOAT4 | FLOAT8 => match s {
            "NaN" | "Infinity" | "-Infinity" => Ok(Value::String(s.to_owned())),
            _ => Number::from_str(s)
                .map(Value::Number)
                .map_err(|_| invalid(type_oid, s, "not a decimal number")),
        },
        JSON | JSONB => json(type_oid, s, MAX_JSON_DEPTH),
        DATE => date(s),
        TIMESTAMP => timestamp(type_oid, s, false),
        TIMESTAMPTZ => timestamp(type_oid, s, true),
        BYTEA => bytea(s),
        _ => match element_type(type_oid) {
            Some(elem) => array(type_oid, elem, s),
            None => Ok(Value::String(s.to_owned())),
        },
    }
}

/// A JSON document of at most `max_depth` levels of arrays and objects.
fn json(type_oid: u32, s: &str, max_depth: usize) -> Result<Value, ValueError> {
    check_json_depth(type_oid, s, max_depth)?;
    serde_json::from_str(s).map_err(|e| invalid(type_oid, s, format!("not valid JSON: {e}")))
}

/// Refuses JSON text nested deeper than `max_depth`, in one pass without
/// recursion. Brackets inside strings do not count; for text that is not
/// JSON at all the parser that follows gives the error.
fn check_json_depth(type_oid: u32, s: &str, max_depth: usize) -> Result<(), ValueError> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &c in s.as_bytes() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == b'\\' {
                escaped = true;
            } else if c == b'"' {
                in_string = false;
            }
            continue;
        }
        match c {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max_depth {
                    return Err(invalid(
                        type_oid,
                        s,
                        format!(
                            "nested deeper than {max_depth} levels of arrays and objects, the most steward delivers"
                        ),
                    ));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// Splits a trailing ` BC` off a date or timestamp.
fn strip_bc(s: &str) -> (&str, bool) {
    match s.strip_suffix(" BC") {
        Some(body) => (body, true),
        None => (s, false),
    }
}

/// The ISO 8601 year of a year PostgreSQL prints: BC years count back
/// from year 0 (1 BC).
fn astronomical_year(year: i64, bc: bool) -> i64 {
    if bc {
        1 - year
    } else {
        year
    }
}

/// ISO dates `YYYY-MM-DD` (more digits past 9999, ` BC` after BC dates)
/// become ISO 8601 dates, with the expanded year form where needed (see
/// [`push_year`]); `infinity` / `-infinity` stay those words.
fn date(s: &str) -> Result<Value, ValueError> {
    if s == "infinity" || s == "-infinity" {
        return Ok(Value::String(s.to_owned()));
    }
    let (body, bc) = strip_bc(s);
    let b = body.as_bytes();
    let y_len = b.iter().take_while(|c| c.is_ascii_digit()).count();
    let shape_ok = (4..=7).contains(&y_len)
        && b.len() == y_len + 6
        && b[y_len] == b'-'
        && b[y_len + 3] == b'-'
        && digits(b, y_len + 1, 2).is_some()
        && digits(b, y_len + 4, 2).is_some();
    let year = digits(b, 0, y_len).filter(|_| shape_ok).ok_or_else(|| {
        invalid(
            DATE,
            s,
            "expected ISO format YYYY-MM-DD; is DateStyle set to ISO?",
        )
    })?;
    if y_len == 4 && !bc {
        return Ok(Value::String(s.to_owned()));
    }
    let mut out = String::with_capacity(b.len() + 2);
    push_year(&mut out, astronomical_year(year, bc));
    out.push_str(&body[y_len..]);
    Ok(Value::String(out))
}

/// Reads exactly `n` ASCII digits at `pos`.
fn digits(b: &[u8], pos: usize, n: usize) -> Option<i64> {
    let d = b.get(pos..pos + n)?;
    d.iter().try_fold(0i64, |acc, &c| {
        c.is_ascii_digit().then(|| acc * 10 + i64::from(c - b'0'))
    })
}

/// ISO timestamps: `YYYY-MM-DD HH:MM:SS[.f]` plus, for timestamptz, an
/// offset `+HH[:MM[:SS]]`, and ` BC` after BC dates. The space becomes `T`;
/// a zero offset (always the case under TimeZone=UTC) becomes `Z`, others
/// `+HH:MM`. Offsets with seconds (historical local mean time) have no RFC
/// 3339 form, so those values are shifted to UTC instead. Years outside
/// 0000..=9999 use the expanded form (see [`push_year`]); `infinity` /
/// `-infinity` stay those words.
fn timestamp(type_oid: u32, full: &str, with_tz: bool) -> Result<Value, ValueError> {
    if full == "infinity" || full == "-infinity" {
        return Ok(Value::String(full.to_owned()));
    }
    let (s, bc) = strip_bc(full);
    let bad = || {
        invalid(
            type_oid,
            full,
            "expected ISO format YYYY-MM-DD HH:MM:SS[.ffffff]; is DateStyle set to ISO?",
        )
    };
    let b = s.as_bytes();
    // Years past 9999 print with more digits.
    let y_len = b.iter().take_while(|c| c.is_ascii_digit()).count();
    if !(4..=7).contains(&y_len) {
        return Err(bad());
    }
    let p = y_len;
    let shape_ok = b.get(p) == Some(&b'-')
        && b.get(p + 3) == Some(&b'-')
        && b.get(p + 6) == Some(&b' ')
        && b.get(p + 9) == Some(&b':')
        && b.get(p + 12) == Some(&b':');
    let fields = (
        digits(b, 0, y_len),
        digits(b, p + 1, 2),
        digits(b, p + 4, 2),
        digits(b, p + 7, 2),
        digits(b, p + 10, 2),
        digits(b, p + 13, 2),
    );
    let (Some(year), Some(month), Some(day), Some(hour), Some(minute), Some(second)) = fields
    else {
        return Err(bad());
    };
    if !shape_ok {
        return Err(bad());
    }
    let year = astronomical_year(year, bc);
    // The server's year digits are copied unless the year needs a sign.
    let verbatim_year = y_len == 4 && !bc;
    let mut end = p + 15;
    if b.get(end) == Some(&b'.') {
        let frac = b[end + 1..]
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count();
        if frac == 0 {
            return Err(bad());
        }
        end += 1 + frac;
    }
    let date_time = &s[..end];
    let mut out = String::with_capacity(end + 6);
    if !with_tz {
        if end != b.len() {
            return Err(bad());
        }
        push_iso_t(&mut out, date_time, p, year, verbatim_year);
        out.push('Z');
        return Ok(Value::String(out));
    }

    let sign = match b.get(end) {
        Some(b'+') => 1,
        Some(b'-') => -1,
        _ => return Err(bad()),
    };
    let off_h = digits(b, end + 1, 2).ok_or_else(bad)?;
    let mut off_m = 0;
    let mut off_s = 0;
    let mut q = end + 3;
    if b.get(q) == Some(&b':') {
        off_m = digits(b, q + 1, 2).ok_or_else(bad)?;
        q += 3;
        if b.get(q) == Some(&b':') {
            off_s = digits(b, q + 1, 2).ok_or_else(bad)?;
            q += 3;
        }
    }
    if q != b.len() {
        return Err(bad());
    }
    if off_s == 0 {
        push_iso_t(&mut out, date_time, p, year, verbatim_year);
        if off_h == 0 && off_m == 0 {
            out.push('Z');
        } else {
            let _ = write!(
                out,
                "{}{off_h:02}:{off_m:02}",
                if sign > 0 { '+' } else { '-' }
            );
        }
        return Ok(Value::String(out));
    }
    let offset = sign * (off_h * 3600 + off_m * 60 + off_s);
    let local = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second;
    let utc = local - offset;
    let (y, mo, d) = civil_from_days(utc.div_euclid(86_400));
    let sod = utc.rem_euclid(86_400);
    push_year(&mut out, y);
    let _ = write!(
        out,
        "-{mo:02}-{d:02}T{:02}:{:02}:{:02}{}Z",
        sod / 3600,
        sod / 60 % 60,
        sod % 60,
        &s[p + 15..end]
    );
    Ok(Value::String(out))
}

/// Copies `YYYY-MM-DD HH:MM:SS[.f]` with the date/time separator made `T`.
/// The year is copied as the server wrote it when `verbatim`, else written
/// from `year` by [`push_year`].
fn push_iso_t(out: &mut String, date_time: &str, year_len: usize, year: i64, verbatim: bool) {
    if verbatim {
        out.push_str(&date_time[..year_len]);
    } else {
        push_year(out, year);
    }
    out.push_str(&date_time[year_len..year_len + 6]);
    out.push('T');
    out.push_str(&date_time[year_len + 7..]);
}

/// `bytea_output=hex`: `\x` and two hex digits a byte, delivered as base64.
fn bytea(s: &str) -> Result<Value, ValueError> {
    let Some(hex) = s.strip_prefix("\\x") else {
        return Err(invalid(
            BYTEA,
            s,
            "expected hex format starting with \\x; set bytea_output = hex for the session",
        ));
    };
    let hex = hex.as_bytes();
    if hex.len() % 2 != 0 {
        return Err(invalid(BYTEA, s, "odd number of hex digits"));
    }
    let mut raw = Vec::with_capacity(hex.len() / 2);
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        match (hex_val(pair[0]), hex_val(pair[1])) {
            (Some(h), Some(l)) => raw.push(h << 4 | l),
            _ => {
                return Err(invalid(
                    BYTEA,
                    s,
                    format!("non-hex digit at byte {}", 2 + 2 * i),
                ))
            }
        }
    }
    Ok(Value::String(
        base64::engine::general_purpose::STANDARD.encode(raw),
    ))
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// PostgreSQL array text: an optional `[lo:hi]...=` dimension prefix, then
/// `{...}` with comma-separated elements that are unquoted, `"quoted"` with
/// backslash escapes, `NULL`, or nested `{...}`.
fn array(type_oid: u32, elem: u32, s: &str) -> Result<Value, ValueError> {
    let mut p = ArrayParser {
        s,
        b: s.as_bytes(),
        pos: 0,
        type_oid,
        elem,
        depth: 0,
    };
    p.skip_ws();
    if p.peek() == Some(b'[') {
        p.dimensions()?;
    }
    p.skip_ws();
    let v = p.array(1)?;
    p.skip_ws();
    if p.pos != p.b.len() {
        return Err(p.err("unexpected characters after the closing '}'"));
    }
    Ok(v)
}

struct ArrayParser<'a> {
    s: &'a str,
    b: &'a [u8],
    pos: usize,
    type_oid: u32,
    elem: u32,
    /// Dimensions entered so far: a JSON element's own nesting counts on top.
    depth: usize,
}

impl<'a> ArrayParser<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(|c| c.is_ascii_whitespace()) {
            self.pos += 1;
        }
    }

    fn err(&self, what: &str) -> ValueError {
        invalid(
            self.type_oid,
            self.s,
            format!("{what} at byte {}", self.pos),
        )
    }

    /// `[1:3][0:1]=`: the bounds do not change the JSON, so they are only checked for shape.
    fn dimensions(&mut self) -> Result<(), ValueError> {
        while self.peek() == Some(b'[') {
            self.pos += 1;
            let start = self.pos;
            while self
                .peek()
                .is_some_and(|c| c.is_ascii_digit() || c == b':' || c == b'-')
            {
                self.pos += 1;
            }
            if self.pos == start || self.peek() != Some(b']') {
                return Err(self.err("malformed array dimension"));
            }
            self.pos += 1;
        }
        if self.peek() != Some(b'=') {
            return Err(self.err("expected '=' after the array dimensions"));
        }
        self.pos += 1;
        Ok(())
    }

    fn array(&mut self, depth: usize) -> Result<Value, ValueError> {
        if depth > MAX_ARRAY_DIMS {
            return Err(self.err("more than 6 array dimensions"));
        }
        self.depth = depth;
        if self.peek() != Some(b'{') {
            return Err(self.err("expected '{'"));
        }
        self.pos += 1;
        let mut out = Vec::new();
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(Value::Array(out));
        }
        // PostgreSQL arrays are rectangular: a level holds sub-arrays or scalars, never both.
        let mut nested = None;
        loop {
            self.skip_ws();
            let is_sub = self.peek() == Some(b'{');
            if *nested.get_or_insert(is_sub) != is_sub {
                return Err(self.err("mixed sub-arrays and scalar elements"));
            }
            let value = match self.peek() {
                Some(b'{') => {
                    let sub = self.array(depth + 1)?;
                    self.depth = depth;
                    sub
                }
                Some(b'"') => {
                    let start = self.pos;
                    let text = self.quoted()?;
                    self.element(start, &text)?
                }
                Some(_) => self.unquoted()?,
                None => return Err(self.err("unterminated array")),
            };
            out.push(value);
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(Value::Array(out));
                }
                Some(_) => return Err(self.err("expected ',' or '}'")),
                None => return Err(self.err("unterminated array")),
            }
        }
    }

    /// Converts one element; errors name the element's start, not the array's end.
    fn element(&self, start: usize, text: &str) -> Result<Value, ValueError> {
        let converted = match self.elem {
            JSON | JSONB => json(self.elem, text, MAX_JSON_DEPTH.saturating_sub(self.depth)),
            elem => str_to_json(elem, text),
        };
        converted.map_err(|e| {
            invalid(
                self.type_oid,
                self.s,
                format!("element at byte {start}: {e}"),
            )
        })
    }

    /// A `"..."` element; borrowed unless it contains escapes.
    fn quoted(&mut self) -> Result<Cow<'a, str>, ValueError> {
        self.pos += 1;
        let start = self.pos;
        let mut owned: Option<String> = None;
        let mut run = start;
        loop {
            match self.peek() {
                None => return Err(self.err("unterminated quoted element")),
                Some(b'"') => {
                    let tail = &self.s[run..self.pos];
                    self.pos += 1;
                    return Ok(match owned {
                        Some(mut o) => {
                            o.push_str(tail);
                            Cow::Owned(o)
                        }
                        None => Cow::Borrowed(tail),
                    });
                }
                Some(b'\\') => {
                    let o = owned.get_or_insert_with(String::new);
                    o.push_str(&self.s[run..self.pos]);
                    self.pos += 1;
                    if self.peek().is_none() {
                        return Err(self.err("backslash at the end of the array"));
                    }
                    // The escaped character may be multi-byte; the run restarts at it.
                    run = self.pos;
                    self.pos += self.s[self.pos..].chars().next().map_or(1, char::len_utf8);
                }
                Some(_) => self.pos += 1,
            }
        }
    }

    /// An unquoted element up to `,` or `}`: `NULL` (any case) is SQL null;
    /// surrounding whitespace is not part of the value.
    fn unquoted(&mut self) -> Result<Value, ValueError> {
        let start = self.pos;
        let mut owned: Option<String> = None;
        let mut run = start;
        // End of the value without trailing whitespace; escaped characters count as content.
        let mut content_end = start;
        loop {
            match self.peek() {
                None | Some(b',' | b'}') => break,
                Some(b'{' | b'"') => {
                    return Err(self.err("unexpected '{' or '\"' inside an unquoted element"))
                }
                Some(b'\\') => {
                    let o = owned.get_or_insert_with(String::new);
                    o.push_str(&self.s[run..self.pos]);
                    self.pos += 1;
                    if self.peek().is_none() {
                        return Err(self.err("backslash at the end of the array"));
                    }
                    run = self.pos;
                    self.pos += self.s[self.pos..].chars().next().map_or(1, char::len_utf8);
                    content_end = self.pos;
                }
                Some(c) => {
                    self.pos += 1;
                    if !c.is_ascii_whitespace() {
                        content_end = self.pos;
                    }
                }
            }
        }
        if self.pos == start || content_end == start {
            return Err(self.err("empty unquoted element"));
        }
        let text: Cow<'_, str> = match owned {
            Some(mut o) => {
                o.push_str(&self.s[run..content_end.max(run)]);
                Cow::Owned(o)
            }
            None => {
                let t = &self.s[start..content_end];
                if t.eq_ignore_ascii_case("NULL") {
                    return Ok(Value::Null);
                }
                Cow::Borrowed(t)
            }
        };
        self.element(start, &text)
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The inverse of [`days_from_civil`].
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Four-digit years as RFC 3339 wants; outside 0..=9999 (which RFC 3339
/// cannot express) the ISO 8601 expanded form with an explicit sign.
fn push_year(out: &mut String, y: i64) {
    let _ = if (0..=9999).contains(&y) {
        write!(out, "{y:04}")
    } else if y > 9999 {
        write!(out, "+{y}")
    } else {
        write!(out, "-{:04}", -y)
    };
}

/// Days from 1970-01-01 to PostgreSQL's epoch 2000-01-01.
const PG_EPOCH_DAYS: i64 = 10_957;

/// Commit timestamps in pgoutput are microseconds since 2000-01-01 00:00:00 UTC;
/// returns RFC 3339 UTC, e.g. "2024-05-01T12:00:00.123456Z".
///
/// The fraction always has 6 digits, so the strings are fixed-width and sort
/// in time order. PostgreSQL's `infinity` / `-infinity` sentinels
/// (`i64::MAX` / `i64::MIN`) become those words; years outside 0000..=9999
/// use the ISO 8601 expanded form (`+12345-...`). Never panics.
pub fn pg_micros_to_rfc3339(micros: i64) -> String {
    match micros {
        i64::MAX => return "infinity".to_owned(),
        i64::MIN => return "-infinity".to_owned(),
        _ => {}
    }
    let secs = micros.div_euclid(1_000_000);
    let frac = micros.rem_euclid(1_000_000);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400) + PG_EPOCH_DAYS);
    let sod = secs.rem_euclid(86_400);
    let mut out = String::with_capacity(27);
    push_year(&mut out, y);
    let _ = write!(
        out,
        "-{m:02}-{d:02}T{:02}:{:02}:{:02}.{frac:06}Z",
        sod / 3600,
        sod / 60 % 60,
        sod % 60
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn whole_then_path(oid: u32, text: &str, path: &[String]) -> Result<Value, ValueError> {
        text_to_json(oid, text.as_bytes()).map(|v| follow_path(v, path))
    }

    fn path(steps: &[&str]) -> Vec<String> {
        steps.iter().map(std::string::ToString::to_string).collect()
    }

    #[test]
    fn json_at_a_path_is_what_the_whole_document_gives() {
        let docs = [
            r#"{"en_US": "Bolt", "de_DE": "Schraube \"M8\""}"#,
            r#"{"a": {"b": [1, {"c": 2.50}]}, "a": {"b": [3, 4]}}"#,
            "[1, [2, 3.000], null]",
            "12.5000",
            "\"text\"",
            "null",
            r#"{"n": 123456789012345678901234567890.5, "e": {}}"#,
            r#" {"x": {"y": true}} "#,
        ];
        let paths = [
            path(&[]),
            path(&["en_US"]),
            path(&["de_DE"]),
            path(&["fr_FR"]),
            path(&["a", "b", "1"]),
            path(&["a", "b", "1", "c"]),
            path(&["a", "b", "0"]),
            path(&["1", "1"]),
            path(&["2"]),
            path(&["9"]),
            path(&["n"]),
            path(&["e", "f"]),
            path(&["x", "y", "z"]),
            path(&["x", "y"]),
        ];
        for oid in [JSON, JSONB] {
            for doc in docs {
                for p in &paths {
                    let fast = text_to_json_at(oid, doc.as_bytes(), p).unwrap();
                    assert_eq!(
                        fast,
                        whole_then_path(oid, doc, p).unwrap(),
                        "{doc} at {p:?}"
                    );
                }
            }
            for bad in [
                r#"{"en_US": "x""#,
                r#"{"en_US": "x"} more"#,
                r#"{"a": tru}"#,
                "",
            ] {
                let err = text_to_json_at(oid, bad.as_bytes(), &path(&["en_US"])).unwrap_err();
                assert!(err.to_string().contains("not valid JSON"), "{bad}: {err}");
            }
        }
        // Not JSON: converted whole, then stepped into (always null here).
        assert_eq!(
            text_to_json_at(TEXT, b"abc", &path(&["x"])).unwrap(),
            Value::Null
        );
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            "[a-z\"]{0,4}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::vec(("[a-c]", inner), 0..4)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn any_document_and_path_agree(
            doc in arb_json(),
            steps in proptest::collection::vec(proptest::sample::select(vec!["a", "b", "c", "0", "1", "2"]), 0..4),
        ) {
            let text = doc.to_string();
            let p = path(&steps);
            prop_assert_eq!(
                text_to_json_at(JSONB, text.as_bytes(), &p).unwrap(),
                whole_then_path(JSONB, &text, &p).unwrap()
            );
        }
    }

    fn conv(oid: u32, s: &str) -> Value {
        text_to_json(oid, s.as_bytes()).unwrap_or_else(|e| panic!("{oid} {s:?}: {e}"))
    }

    fn fails(oid: u32, s: &str) -> String {
        match text_to_json(oid, s.as_bytes()) {
            Ok(v) => panic!("{oid} {s:?} converted to {v}"),
            Err(e) => e.to_string(),
        }
    }

    /// The JSON text a target receives.
    fn wire(oid: u32, s: &str) -> String {
        serde_json::to_string(&conv(oid, s)).unwrap()
    }

    #[test]
    fn integers() {
        assert_eq!(conv(INT2, "-32768"), json!(-32768));
        assert_eq!(conv(INT4, "42"), json!(42));
        assert_eq!(conv(INT8, "9223372036854775807"), json!(i64::MAX));
        assert_eq!(conv(INT8, "-9223372036854775808"), json!(i64::MIN));
        assert_eq!(conv(OID, "4294967295"), json!(4_294_967_295u32));
        assert!(fails(INT4, "4.5").contains("not an integer"));
        fails(INT8, "");
        fails(INT8, "9223372036854775808");
        fails(OID, "-1");
    }

    #[test]
    fn booleans() {
        assert_eq!(conv(BOOL, "t"), json!(true));
        assert_eq!(conv(BOOL, "f"), json!(false));
        assert!(fails(BOOL, "true").contains("expected 't' or 'f'"));
    }

    #[test]
    fn numeric_keeps_exact_digits() {
        assert_eq!(wire(NUMERIC, "1234.5600"), "1234.5600");
        assert_eq!(wire(NUMERIC, "0.000"), "0.000");
        assert_eq!(wire(NUMERIC, "-0.001"), "-0.001");
        assert_eq!(wire(NUMERIC, "-12"), "-12");
        let huge =
            "123456789012345678901234567890123456789012345678901234567890.000000000000000000001";
        assert_eq!(wire(NUMERIC, huge), huge);
        assert_eq!(
            wire(NUMERIC, &format!("1{}", "0".repeat(400))),
            format!("1{}", "0".repeat(400))
        );
        // Embedded in a document, the digits survive serialization too.
        let doc = json!({ "amount": conv(NUMERIC, "1234.5600") });
        assert_eq!(doc.to_string(), r#"{"amount":1234.5600}"#);
        assert!(conv(NUMERIC, "1234.5600").is_number());
        for special in ["NaN", "Infinity", "-Infinity"] {
            assert_eq!(conv(NUMERIC, special), json!(special));
        }
        assert!(fails(NUMERIC, "1,5").contains("not a decimal number"));
        fails(NUMERIC, "abc");
        fails(NUMERIC, " 1");
    }

    #[test]
    fn floats() {
        assert_eq!(wire(FLOAT8, "1.5"), "1.5");
        assert_eq!(wire(FLOAT8, "0.30000000000000004"), "0.30000000000000004");
        assert_eq!(wire(FLOAT8, "1e+100"), "1e+100");
        assert_eq!(wire(FLOAT4, "-1.2345e-05"), "-1.2345e-05");
        assert_eq!(
            conv(FLOAT8, "-0")
                .as_number()
                .map(std::string::ToString::to_string),
            Some("-0".into())
        );
        for special in ["NaN", "Infinity", "-Infinity"] {
            assert_eq!(conv(FLOAT8, special), json!(special));
            assert_eq!(conv(FLOAT4, special), json!(special));
        }
        fails(FLOAT8, "inf");
    }

    #[test]
    fn strings() {
        for oid in [
            TEXT, VARCHAR, BPCHAR, NAME, UUID, CHAR, TIME, TIMETZ, INTERVAL,
        ] {
            assert_eq!(conv(oid, "x y"), json!("x y"));
        }
        assert_eq!(
            conv(UUID, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
        );
        assert_eq!(conv(DATE, "2024-05-01"), json!("2024-05-01"));
        assert_eq!(conv(DATE, "infinity"), json!("infinity"));
        assert_eq!(conv(INTERVAL, "P1Y2M3DT4H5M6S"), json!("P1Y2M3DT4H5M6S"));
        assert_eq!(conv(TEXT, ""), json!(""));
        // Unknown types (xml, enums, domains...) are passed as strings.
        assert_eq!(conv(142, "<a/>"), json!("<a/>"));
        assert_eq!(conv(999_999, "whatever"), json!("whatever"));
    }

    #[test]
    fn invalid_utf8_is_an_error() {
        let e = text_to_json(TEXT, b"ab\xffcd").unwrap_err();
        assert_eq!(
            e.to_string(),
            "text value (type OID 25) is not valid UTF-8 at byte 2"
        );
        assert!(text_to_json(999_999, b"\xc3").is_err());
    }

    #[test]
    fn json_types_are_parsed() {
        assert_eq!(
            wire(JSONB, r#"{"a": [1, 2.50, null]}"#),
            r#"{"a":[1,2.50,null]}"#
        );
        assert_eq!(wire(JSONB, r#"{"en_US": 1.10}"#), r#"{"en_US":1.10}"#);
        assert_eq!(conv(JSON, "\"s\""), json!("s"));
        let e = fails(JSONB, "{\"secret\": ");
        assert!(e.contains("not valid JSON") && !e.contains("secret"), "{e}");
    }

    #[test]
    fn timestamps() {
        assert_eq!(
            conv(TIMESTAMP, "2024-05-01 12:00:00.5"),
            json!("2024-05-01T12:00:00.5Z")
        );
        assert_eq!(
            conv(TIMESTAMP, "2024-05-01 12:00:00"),
            json!("2024-05-01T12:00:00Z")
        );
        assert_eq!(
            conv(TIMESTAMP, "12345-01-01 00:00:00"),
            json!("+12345-01-01T00:00:00Z")
        );
        assert_eq!(
            conv(TIMESTAMPTZ, "2024-05-01 12:00:00.5+00"),
            json!("2024-05-01T12:00:00.5Z")
        );
        assert_eq!(
            conv(TIMESTAMPTZ, "2024-05-01 12:00:00.123456+00"),
            json!("2024-05-01T12:00:00.123456Z")
        );
        assert_eq!(
            conv(TIMESTAMPTZ, "2024-05-01 12:00:00+05:30"),
            json!("2024-05-01T12:00:00+05:30")
        );
        assert_eq!(
            conv(TIMESTAMPTZ, "2024-05-01 12:00:00-08"),
            json!("2024-05-01T12:00:00-08:00")
        );
        // Local mean time offsets have seconds: shifted to UTC.
        assert_eq!(
            conv(TIMESTAMPTZ, "1900-01-01 00:00:00.25+00:19:32"),
            json!("1899-12-31T23:40:28.25Z")
        );
        assert_eq!(
            conv(TIMESTAMPTZ, "1900-12-31 23:59:59-00:00:01"),
            json!("1901-01-01T00:00:00Z")
        );
        for unchanged in ["infinity", "-infinity"] {
            assert_eq!(conv(TIMESTAMP, unchanged), json!(unchanged));
            assert_eq!(conv(TIMESTAMPTZ, unchanged), json!(unchanged));
        }
        let e = fails(TIMESTAMP, "05/01/2024 12:00");
        assert!(e.contains("DateStyle"), "{e}");
        fails(TIMESTAMP, "2024-05-01 12:00:00+00");
        fails(TIMESTAMP, "2024-05-01 12:00:00.");
        fails(TIMESTAMPTZ, "2024-05-01 12:00:00");
        fails(TIMESTAMPTZ, "2024-05-01 12:00:00+0");
        fails(TIMESTAMPTZ, "2024-05-01 12:00:00+00:");
        fails(TIMESTAMPTZ, "2024-05-01T12:00:00+00");
    }

    /// Every representation the README documents for values JSON and RFC
    /// 3339 have no plain form for, as the server prints them under
    /// steward's session settings.
    #[test]
    fn documented_representations_of_special_values() {
        let cases: &[(u32, &str, &str)] = &[
            // Non-finite numbers: JSON strings.
            (NUMERIC, "NaN", r#""NaN""#),
            (NUMERIC, "Infinity", r#""Infinity""#),
            (NUMERIC, "-Infinity", r#""-Infinity""#),
            (FLOAT8, "NaN", r#""NaN""#),
            (FLOAT8, "Infinity", r#""Infinity""#),
            (FLOAT8, "-Infinity", r#""-Infinity""#),
            (FLOAT4, "NaN", r#""NaN""#),
            (FLOAT4, "-Infinity", r#""-Infinity""#),
            // Infinite timestamps and dates: the words.
            (TIMESTAMP, "infinity", r#""infinity""#),
            (TIMESTAMP, "-infinity", r#""-infinity""#),
            (TIMESTAMPTZ, "infinity", r#""infinity""#),
            (TIMESTAMPTZ, "-infinity", r#""-infinity""#),
            (DATE, "infinity", r#""infinity""#),
            (DATE, "-infinity", r#""-infinity""#),
            // Ordinary dates stay as they are.
            (DATE, "2024-05-01", r#""2024-05-01""#),
            (DATE, "0001-01-01", r#""0001-01-01""#),
            (DATE, "9999-12-31", r#""9999-12-31""#),
            // Years past 9999: ISO 8601 expanded, with a sign.
            (DATE, "10000-01-01", r#""+10000-01-01""#),
            (DATE, "5874897-12-31", r#""+5874897-12-31""#),
            (
                TIMESTAMP,
                "10000-01-01 00:00:00",
                r#""+10000-01-01T00:00:00Z""#,
            ),
            (
                TIMESTAMPTZ,
                "294276-12-31 23:59:59.999999+00",
                r#""+294276-12-31T23:59:59.999999Z""#,
            ),
            // BC: astronomical years (1 BC is year 0), ISO 8601 expanded.
            (DATE, "0044-03-15 BC", r#""-0043-03-15""#),
            (DATE, "0001-12-31 BC", r#""0000-12-31""#),
            (DATE, "0002-01-01 BC", r#""-0001-01-01""#),
            (DATE, "4714-11-24 BC", r#""-4713-11-24""#),
            (
                TIMESTAMP,
                "0044-03-15 12:00:00 BC",
                r#""-0043-03-15T12:00:00Z""#,
            ),
            (
                TIMESTAMP,
                "0001-12-31 23:59:59.5 BC",
                r#""0000-12-31T23:59:59.5Z""#,
            ),
            (
                TIMESTAMPTZ,
                "0044-03-15 12:00:00+00 BC",
                r#""-0043-03-15T12:00:00Z""#,
            ),
            (
                TIMESTAMPTZ,
                "4714-11-24 00:00:00+00 BC",
                r#""-4713-11-24T00:00:00Z""#,
            ),
            // A BC local mean time offset is shifted to UTC like any other.
            (
                TIMESTAMPTZ,
                "0044-03-15 00:00:00+00:19:32 BC",
                r#""-0043-03-14T23:40:28Z""#,
            ),
        ];
        for (oid, text, expected) in cases {
            assert_eq!(wire(*oid, text), *expected, "{} {text:?}", type_name(*oid));
        }
        // In arrays, element by element.
        assert_eq!(
            wire(1182, "{infinity,\"0044-03-15 BC\",10000-01-01}"),
            r#"["infinity","-0043-03-15","+10000-01-01"]"#
        );
        assert_eq!(
            wire(1115, r#"{"0001-01-01 00:00:00 BC",-infinity}"#),
            r#"["0000-01-01T00:00:00Z","-infinity"]"#
        );
        assert_eq!(
            wire(1231, "{NaN,Infinity,-Infinity}"),
            r#"["NaN","Infinity","-Infinity"]"#
        );
        for bad in [
            "05/01/2024",
            "2024-5-1",
            "2024-05-01 x",
            "2024-05-01 bc",
            "",
            "BC",
        ] {
            let e = fails(DATE, bad);
            assert!(e.contains("DateStyle"), "{bad:?}: {e}");
        }
    }

    /// A number inside `depth` nested arrays.
    fn nested(depth: usize) -> String {
        format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
    }

    #[test]
    fn json_deeper_than_the_limit_is_refused_with_the_reason() {
        for oid in [JSON, JSONB] {
            assert!(conv(oid, &nested(MAX_JSON_DEPTH)).is_array());
            let objects = format!(
                "{}1{}",
                r#"{"a":"#.repeat(MAX_JSON_DEPTH),
                "}".repeat(MAX_JSON_DEPTH)
            );
            assert!(conv(oid, &objects).is_object());
            for depth in [MAX_JSON_DEPTH + 1, 128, 200, 100_000] {
                let e = fails(oid, &nested(depth));
                assert!(
                    e.contains("nested deeper than 100 levels of arrays and objects"),
                    "{depth}: {e}"
                );
                // Also when only a path into it is mapped.
                let e = text_to_json_at(oid, nested(depth).as_bytes(), &path(&["0"]))
                    .unwrap_err()
                    .to_string();
                assert!(e.contains("nested deeper than 100 levels"), "{depth}: {e}");
            }
            // Brackets inside strings are text, not nesting.
            let in_string = format!(r#"["{}\"{}"]"#, "[".repeat(300), "{".repeat(300));
            assert!(conv(oid, &in_string).is_array());
        }
        // A jsonb array's dimensions count on top of its elements' nesting.
        let inner = nested(MAX_JSON_DEPTH - 1).replace('"', "\\\"");
        assert!(conv(3807, &format!("{{\"{inner}\"}}")).is_array());
        let inner = nested(MAX_JSON_DEPTH).replace('"', "\\\"");
        let e = fails(3807, &format!("{{\"{inner}\"}}"));
        assert!(e.contains("nested deeper than 99 levels"), "{e}");
        // What passes stays inside serde_json's own limit when written and
        // read back inside a few levels of envelope.
        let doc = conv(JSONB, &nested(MAX_JSON_DEPTH));
        let envelope = serde_json::json!({"events": [{"data": {"field": doc}}]}).to_string();
        assert!(serde_json::from_str::<Value>(&envelope).is_ok());
    }

    #[test]
    fn bytea_becomes_base64() {
        assert_eq!(conv(BYTEA, "\\x0a0b"), json!("Cgs="));
        assert_eq!(conv(BYTEA, "\\x"), json!(""));
        assert_eq!(conv(BYTEA, "\\xDEADbeef"), json!("3q2+7w=="));
        assert!(fails(BYTEA, "\\x0").contains("odd number"));
        assert!(fails(BYTEA, "\\x0g").contains("non-hex digit at byte 2"));
        assert!(fails(BYTEA, "abc").contains("bytea_output = hex"));
    }

    #[test]
    fn arrays() {
        assert_eq!(conv(1007, "{1,2,3}"), json!([1, 2, 3]));
        assert_eq!(conv(1005, "{}"), json!([]));
        assert_eq!(conv(1016, "{NULL,-5,null}"), json!([null, -5, null]));
        assert_eq!(conv(1000, "{t,f}"), json!([true, false]));
        assert_eq!(wire(1231, "{1.50,NaN,-0.000}"), r#"[1.50,"NaN",-0.000]"#);
        assert_eq!(conv(1022, "{1.5,Infinity}"), json!([1.5, "Infinity"]));
        assert_eq!(
            conv(
                1009,
                r#"{plain,"with, comma","with \"quote\"","back\\slash","NULL",""}"#
            ),
            json!([
                "plain",
                "with, comma",
                "with \"quote\"",
                "back\\slash",
                "NULL",
                ""
            ])
        );
        assert_eq!(conv(1015, r#"{"é ü",日本}"#), json!(["é ü", "日本"]));
        assert_eq!(conv(1009, r#"{a\,b,"\日"}"#), json!(["a,b", "日"]));
        assert_eq!(conv(1009, "{ a b , c }"), json!(["a b", "c"]));
        assert_eq!(conv(1007, "{{1,2},{3,4}}"), json!([[1, 2], [3, 4]]));
        assert_eq!(
            conv(1007, "[0:1][1:2]={{1,2},{3,NULL}}"),
            json!([[1, 2], [3, null]])
        );
        assert_eq!(conv(1007, "[1:3]={1,2,3}"), json!([1, 2, 3]));
        assert_eq!(conv(1007, "[-2:-1]={1,2}"), json!([1, 2]));
        assert_eq!(
            conv(3807, r#"{"{\"a\": 1}","[1, 2]",NULL}"#),
            json!([{"a": 1}, [1, 2], null])
        );
        assert_eq!(
            conv(1182, "{2024-05-01,infinity}"),
            json!(["2024-05-01", "infinity"])
        );
        assert_eq!(
            conv(1115, r#"{"2024-05-01 12:00:00.5"}"#),
            json!(["2024-05-01T12:00:00.5Z"])
        );
        assert_eq!(
            conv(
                1185,
                r#"{"2024-05-01 12:00:00+00","2024-05-01 12:00:00-08"}"#
            ),
            json!(["2024-05-01T12:00:00Z", "2024-05-01T12:00:00-08:00"])
        );
        assert_eq!(conv(1001, r#"{"\\x0a0b"}"#), json!(["Cgs="]));
        // Verbatim PostgreSQL 15 output under steward's session settings.
        assert_eq!(
            conv(1009, r#"{"a\"b","c\\d","","NULL"," x"}"#),
            json!(["a\"b", "c\\d", "", "NULL", " x"])
        );
        assert_eq!(conv(1001, r#"{"\\x0a"}"#), json!(["Cg=="]));
        assert_eq!(
            conv(1185, r#"{"2024-05-01 06:30:00+00"}"#),
            json!(["2024-05-01T06:30:00Z"])
        );
        assert_eq!(conv(1007, "{{{{{{1}}}}}}"), json!([[[[[[1]]]]]]));
    }

    #[test]
    fn malformed_arrays() {
        for bad in [
            "",
            "{",
            "1,2",
            "{1,2",
            "{1,,2}",
            "{1,}",
            "{,}",
            "{1}}",
            "{1} x",
            "{{1},2}",
            "{1,{2}}",
            "{{{{{{{1}}}}}}}",
            "[1:2]{1,2}",
            "[1:2={1}",
            "[]={1}",
            "{\"1}",
            "{1\\",
            "{\"a\"b}",
            "{a\"b\"}",
            "{x}",
        ] {
            let e = fails(1007, bad);
            assert!(
                e.starts_with("invalid array value (type OID 1007"),
                "{bad:?}: {e}"
            );
        }
        let e = fails(1007, "{1,x}");
        assert!(e.contains("element at byte 3: invalid int4 value"), "{e}");
    }

    #[test]
    fn commit_timestamps() {
        assert_eq!(pg_micros_to_rfc3339(0), "2000-01-01T00:00:00.000000Z");
        assert_eq!(
            pg_micros_to_rfc3339(767_880_000_123_456),
            "2024-05-01T12:00:00.123456Z"
        );
        assert_eq!(pg_micros_to_rfc3339(-1), "1999-12-31T23:59:59.999999Z");
        assert_eq!(
            pg_micros_to_rfc3339(-946_684_800_000_000),
            "1970-01-01T00:00:00.000000Z"
        );
        assert_eq!(pg_micros_to_rfc3339(i64::MAX), "infinity");
        assert_eq!(pg_micros_to_rfc3339(i64::MIN), "-infinity");
        assert!(pg_micros_to_rfc3339(i64::MAX - 1).starts_with("+294277-01-09T"));
        assert!(pg_micros_to_rfc3339(i64::MIN + 1).starts_with("-290278-12-22T"));
    }

    const OIDS: &[u32] = &[
        BOOL,
        BYTEA,
        CHAR,
        NAME,
        INT8,
        INT2,
        INT4,
        TEXT,
        OID,
        JSON,
        FLOAT4,
        FLOAT8,
        BPCHAR,
        VARCHAR,
        DATE,
        TIME,
        TIMESTAMP,
        TIMESTAMPTZ,
        INTERVAL,
        TIMETZ,
        NUMERIC,
        UUID,
        JSONB,
        1000,
        1001,
        1002,
        1003,
        1005,
        1007,
        1009,
        1014,
        1015,
        1016,
        1021,
        1022,
        1028,
        1115,
        1182,
        1183,
        1185,
        1187,
        1231,
        1270,
        199,
        2951,
        3807,
        0,
        142,
    ];

    proptest! {
        #[test]
        fn never_panics_on_bytes(
            oid in proptest::sample::select(OIDS),
            bytes in proptest::collection::vec(any::<u8>(), 0..48),
        ) {
            let _ = text_to_json(oid, &bytes);
        }

        #[test]
        fn never_panics_on_near_valid_text(
            oid in proptest::sample::select(OIDS),
            s in r#"[\[\]{}",\\ =:.+\-0-9tfxNULBCaé]{0,40}"#,
        ) {
            let _ = text_to_json(oid, s.as_bytes());
        }

        #[test]
        fn int8_round_trips(i in any::<i64>()) {
            let v = text_to_json(INT8, i.to_string().as_bytes()).unwrap();
            prop_assert_eq!(v.as_i64(), Some(i));
        }

        #[test]
        fn numeric_round_trips_exactly(s in r"-?(0|[1-9][0-9]{0,60})(\.[0-9]{1,60})?") {
            let v = text_to_json(NUMERIC, s.as_bytes()).unwrap();
            prop_assert!(v.is_number());
            prop_assert_eq!(serde_json::to_string(&v).unwrap(), s);
        }

        #[test]
        fn text_arrays_round_trip(items in proptest::collection::vec(proptest::option::of("[^\u{0}]{0,8}"), 0..6)) {
            // Quote every element the way array_out does when needed.
            let body: Vec<String> = items.iter().map(|i| match i {
                None => "NULL".to_owned(),
                Some(s) => format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"")),
            }).collect();
            let text = format!("{{{}}}", body.join(","));
            let expected = Value::Array(items.iter().map(|i| match i {
                None => Value::Null,
                Some(s) => Value::String(s.clone()),
            }).collect());
            prop_assert_eq!(text_to_json(1009, text.as_bytes()).unwrap(), expected);
        }

        #[test]
        fn commit_time_matches_chrono(micros in -62_000_000_000_000_000i64..250_000_000_000_000_000i64) {
            let unix = micros + 946_684_800_000_000;
            let expected = chrono::DateTime::from_timestamp_micros(unix)
                .unwrap()
                .format("%Y-%m-%dT%H:%M:%S%.6fZ")
                .to_string();
            prop_assert_eq!(pg_micros_to_rfc3339(micros), expected);
        }
    }
}
