//! Request bodies and parameters as the API accepts them (issue #20).
//!
//! - [`strict_object`] parses a body that the schema says is an object: anything else (an
//!   array, a number, `null`) is refused, and so are a key given twice at any depth (serde
//!   would keep the last one silently) and a string with leading or trailing whitespace at
//!   any depth (`" 10.0.1.41 "`: every string of the topology is a name, an address, a prefix
//!   or a port range, none of which has meaningful surrounding spaces, so the API refuses
//!   rather than trims: what is stored is exactly what was sent). Each refusal names the
//!   field by its path (`instance[vm1].private_ip`, `rules[0].name`). A string holding a
//!   control character (C0 `U+0000`–`U+001F`, DEL, C1 `U+0080`–`U+009F`) anywhere is refused
//!   as well: no name, address, prefix, port range or path has one, and a name printed by
//!   `snatgw get` must not drive the terminal. [`string_fault`] is that rule, which
//!   `crate::api` also applies to a path's `{name}`, and [`STRING_PATTERN`] is the same rule
//!   as the JSON Schema `pattern` the OpenAPI document states for every such string.
//!   A whole number above `i64::MAX` is refused too: the config file (TOML) cannot hold one,
//!   and the OpenAPI document types numbers as `int64`. A number written with a fraction or
//!   an exponent whose value is whole (`240.0`, `1e2`) is that integer, as in JSON Schema
//!   (where `type: integer` means a number with a zero fractional part); one with a fractional
//!   part stays a float, which serde then refuses for an integer field.
//! - [`bounded`] keeps error messages short: an error never echoes more than a bounded
//!   prefix and suffix of what the client sent (a 10 MB string must not come back as a 10 MB
//!   error body).
//!
//! It does not validate meaning (references, models, SPEC rules): [`snatgw_core::Topology`]
//! does that after the body has been decoded.

use std::cell::RefCell;
use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// Longest error message the API returns, in bytes; longer ones keep their start and end.
pub const MAX_ERROR_LEN: usize = 512;
/// Longest field path the API returns, in bytes.
pub const MAX_FIELD_LEN: usize = 256;

/// `s`, or its first and last parts with the middle replaced by a note of how much was cut,
/// so that the result is at most about `max` bytes.
pub fn bounded(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let tail_len = max / 4;
    let head_len = max.saturating_sub(tail_len + 32);
    let head_end = floor_char(s, head_len);
    let tail_start = ceil_char(s, s.len() - tail_len);
    format!(
        "{}…({} bytes cut)…{}",
        &s[..head_end],
        tail_start - head_end,
        &s[tail_start..]
    )
}

fn floor_char(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn ceil_char(s: &str, mut i: usize) -> usize {
    while i < s.len() && !s.is_char_boundary(i) {
        i += 1;
    }
    i
}

/// The inside of a regex character class naming every control character (C0, DEL, C1).
macro_rules! control {
    () => {
        r"\u0000-\u001F\u007F-\u009F"
    };
}

/// The inside of a regex character class naming every control character and every
/// whitespace character (see [`STRING_PATTERN`]).
macro_rules! space_or_control {
    () => {
        r"\u0000-\u0020\u007F-\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000"
    };
}

/// What the API refuses in every string of a body and in a path `{name}`, as a JSON Schema
/// (ECMA-262) `pattern`: no control character (C0 `U+0000`–`U+001F`, DEL `U+007F`, C1
/// `U+0080`–`U+009F`: Rust's [`char::is_control`], general category Cc) anywhere, and no
/// whitespace (Unicode White_Space: Rust's [`char::is_whitespace`]) at either end. The classes
/// are spelled out rather than written `\s`, whose meaning differs between regex engines
/// (Python's `\s` also matches `U+001C`–`U+001F`, ECMA-262's matches `U+FEFF`, Rust's neither).
/// The whitespace characters that are not controls are space, `U+00A0`, `U+1680`,
/// `U+2000`–`U+200A`, `U+2028`, `U+2029`, `U+202F`, `U+205F` and `U+3000`; the controls among
/// White_Space (tab, line feed, `U+000B`–`U+000D`, `U+0085`) are refused anywhere anyway.
/// The empty string matches; where a value must not be empty the document says `minLength: 1`.
/// [`string_fault`] is the rule the server applies; a test checks that both agree.
pub const STRING_PATTERN: &str = concat!(
    "^(?:[^",
    space_or_control!(),
    "](?:[^",
    control!(),
    "]*[^",
    space_or_control!(),
    "])?)?$"
);

/// The inside of a regex character class naming every control character and every
/// whitespace character: what an HTTP probe path never holds, and a string never starts or
/// ends with.
pub const SPACE_OR_CONTROL_CLASS: &str = space_or_control!();

/// What is wrong with a string of a body or a path `{name}` under the API's rule (see
/// [`STRING_PATTERN`]), or `None` if nothing is.
pub fn string_fault(s: &str) -> Option<String> {
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        return Some(format!(
            "holds the control character U+{:04X}: names, addresses, prefixes, ports and paths have none",
            u32::from(c)
        ));
    }
    if s.trim() != s {
        return Some("has leading or trailing whitespace: send the value without it".into());
    }
    None
}

/// Why a body was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyError {
    /// What is wrong, for people (bounded).
    pub message: String,
    /// The path of the offending field under the caller's prefix, if one is known.
    pub field: Option<String>,
}

/// Parses `body` as a JSON object under the rules of the module docs. `prefix` is the field
/// path the body sits at (`instance[vm1]`, or empty for a whole topology).
pub fn strict_object(body: &[u8], prefix: &str) -> Result<Map<String, Value>, BodyError> {
    let refusal = RefCell::new(None);
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed = StrictSeed {
        path: prefix.to_string(),
        refusal: &refusal,
    }
    .deserialize(&mut de)
    .and_then(|v| de.end().map(|()| v));
    match parsed {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(BodyError {
            message: format!(
                "request body: expected a JSON object, got {}",
                kind_of(&other)
            ),
            field: (!prefix.is_empty()).then(|| prefix.to_string()),
        }),
        Err(e) => Err(match refusal.into_inner() {
            Some((field, message)) => BodyError {
                message: bounded(&format!("request body: {message}"), MAX_ERROR_LEN),
                field: Some(bounded(&field, MAX_FIELD_LEN)),
            },
            None => BodyError {
                message: bounded(&format!("request body: {e}"), MAX_ERROR_LEN),
                field: (!prefix.is_empty()).then(|| prefix.to_string()),
            },
        }),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Parses one value at `path`, recording the first refusal (field, message) in `refusal`.
struct StrictSeed<'r> {
    path: String,
    refusal: &'r RefCell<Option<(String, String)>>,
}

impl<'r> StrictSeed<'r> {
    fn refuse<E: de::Error>(&self, field: String, message: String) -> E {
        let err = E::custom(&message);
        self.refusal.borrow_mut().get_or_insert((field, message));
        err
    }
}

impl<'de, 'r> DeserializeSeed<'de> for StrictSeed<'r> {
    type Value = Value;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, 'r> Visitor<'de> for StrictSeed<'r> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        if v > i64::MAX as u64 {
            return Err(self.refuse(
                self.path.clone(),
                format!("{v} is larger than {} (a signed 64-bit number, as in the config file and the OpenAPI `int64` format)", i64::MAX),
            ));
        }
        Ok(Value::from(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        // A whole value is an integer, however it is written (JSON Schema: `240.0`, `1e2`).
        // 2^63 and above (and below -2^63) are past `i64`, as for numbers written whole.
        const TWO_63: f64 = 9_223_372_036_854_775_808.0;
        if v.is_finite() && v.fract() == 0.0 {
            if (-TWO_63..TWO_63).contains(&v) {
                return Ok(Value::from(v as i64));
            }
            return Err(self.refuse(
                self.path.clone(),
                format!(
                    "{v:e} is a whole number outside {}..={} (a signed 64-bit number, as in the config file and the OpenAPI `int64` format)",
                    i64::MIN,
                    i64::MAX
                ),
            ));
        }
        match serde_json::Number::from_f64(v) {
            Some(n) => Ok(Value::Number(n)),
            None => Err(self.refuse(self.path.clone(), "a number that is not finite".into())),
        }
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        if let Some(fault) = string_fault(v) {
            return Err(self.refuse(
                self.path.clone(),
                format!("`{}` {fault}", bounded(v, 64).escape_debug()),
            ));
        }
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        self.visit_str(&v)
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        loop {
            let seed = StrictSeed {
                path: format!("{}[{}]", self.path, out.len()),
                refusal: self.refusal,
            };
            match seq.next_element_seed(seed)? {
                Some(v) => out.push(v),
                None => return Ok(Value::Array(out)),
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let path = join(&self.path, &key);
            if out.contains_key(&key) {
                return Err(self.refuse(
                    path,
                    format!("the key `{}` is given twice", bounded(&key, 64)),
                ));
            }
            let seed = StrictSeed {
                path,
                refusal: self.refusal,
            };
            let v = map.next_value_seed(seed)?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

/// The query string of a request, parsed with the API's rules: only the parameters a route
/// documents, each at most once; a bad value is refused naming its parameter.
#[derive(Debug, Default)]
pub struct QueryParams(Vec<(String, String)>);

impl QueryParams {
    /// Parses `raw` (the part after `?`), allowing only the parameters in `allowed`.
    pub fn parse(raw: Option<&str>, allowed: &[&str]) -> Result<QueryParams, BodyError> {
        let pairs: Vec<(String, String)> =
            serde_urlencoded::from_str(raw.unwrap_or("")).map_err(|e| BodyError {
                message: bounded(&format!("query: {e}"), MAX_ERROR_LEN),
                field: None,
            })?;
        for (i, (k, _)) in pairs.iter().enumerate() {
            if !allowed.contains(&k.as_str()) {
                return Err(BodyError {
                    message: bounded(
                        &format!(
                            "query: unknown parameter `{k}`; this route takes {}",
                            if allowed.is_empty() {
                                "none".to_string()
                            } else {
                                allowed.join(", ")
                            }
                        ),
                        MAX_ERROR_LEN,
                    ),
                    field: Some(bounded(k, MAX_FIELD_LEN)),
                });
            }
            if pairs[..i].iter().any(|(p, _)| p == k) {
                return Err(BodyError {
                    message: format!("query: the parameter `{k}` is given twice"),
                    field: Some(k.clone()),
                });
            }
        }
        Ok(QueryParams(pairs))
    }

    /// The text of parameter `name`, if given.
    pub fn text(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Parameter `name` as a whole number in `min..=max`, if given.
    pub fn number(&self, name: &str, min: u64, max: u64) -> Result<Option<u64>, BodyError> {
        let Some(v) = self.text(name) else {
            return Ok(None);
        };
        match v.parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => Ok(Some(n)),
            _ => Err(BodyError {
                message: format!(
                    "query: {name} `{}`: expected a whole number in {min}..={max}",
                    bounded(v, 64)
                ),
                field: Some(name.to_string()),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(body: &str, prefix: &str) -> BodyError {
        match strict_object(body.as_bytes(), prefix) {
            Ok(v) => panic!("{body} accepted as {v:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn only_objects_are_accepted() {
        for body in ["[]", "[1]", "1", "null", "\"x\"", "true"] {
            let e = refused(body, "");
            assert!(
                e.message.contains("expected a JSON object"),
                "{body}: {e:?}"
            );
        }
        assert_eq!(refused("[]", "gateway").field.as_deref(), Some("gateway"));
        assert!(strict_object(b"{}", "").is_ok());
        assert!(strict_object(b" {\"a\": [1, {\"b\": null}]} ", "").is_ok());
    }

    #[test]
    fn duplicate_keys_are_refused_at_any_depth_with_their_path() {
        let e = refused(r#"{"a":1,"a":2}"#, "");
        assert_eq!(e.field.as_deref(), Some("a"));
        assert!(e.message.contains("given twice"), "{e:?}");
        let e = refused(
            r#"{"rules":[{"name":"x"},{"name":"y","name":"z"}]}"#,
            "lb[l]",
        );
        assert_eq!(e.field.as_deref(), Some("lb[l].rules[1].name"));
    }

    #[test]
    fn surrounding_whitespace_is_refused_with_the_field() {
        let e = refused(r#"{"private_ip":" 10.0.1.41 "}"#, "instance[vm1]");
        assert_eq!(e.field.as_deref(), Some("instance[vm1].private_ip"));
        let e = refused(r#"{"members":["a","b\t"]}"#, "");
        assert_eq!(e.field.as_deref(), Some("members[1]"));
        assert!(strict_object(br#"{"a":"in side"}"#, "").is_ok());
    }

    #[test]
    fn control_characters_are_refused_anywhere_with_the_field() {
        for (body, field) in [
            ("{\"a\":\"x\\u001fy\"}", "a"),
            ("{\"a\":[\"ok\",\"\\u0000\"]}", "a[1]"),
            ("{\"a\":\"x\\u007f\"}", "a"),
            ("{\"a\":\"x\\u0085y\"}", "a"),
            ("{\"a\":\"\\u009f\"}", "a"),
            ("{\"a\":\"in\\tside\"}", "a"),
        ] {
            let e = refused(body, "");
            assert_eq!(e.field.as_deref(), Some(field), "{body}");
            assert!(e.message.contains("control character"), "{e:?}");
        }
        // Not controls: a no-break space inside, a BOM or a CJK character anywhere.
        assert!(strict_object("{\"a\":\"x\u{a0}y\u{feff}中\"}".as_bytes(), "").is_ok());
    }

    #[test]
    fn whole_numbers_written_as_floats_are_integers() {
        for (body, want) in [
            (r#"{"n":240.0}"#, Value::from(240)),
            (r#"{"n":1e2}"#, Value::from(100)),
            (r#"{"n":-0.0}"#, Value::from(0)),
            (r#"{"n":-3.0}"#, Value::from(-3)),
            (
                r#"{"n":9.2233720368547748e18}"#,
                Value::from(9_223_372_036_854_774_784_i64),
            ),
            (r#"{"n":5.5}"#, serde_json::json!(5.5)),
        ] {
            let m = strict_object(body.as_bytes(), "").expect(body);
            assert_eq!(m["n"], want, "{body}");
        }
        // 2^63 and past: not a signed 64-bit number, however it is written.
        for body in [
            r#"{"n":9.223372036854775807e18}"#,
            r#"{"n":1e19}"#,
            r#"{"n":-1e19}"#,
            r#"{"n":1e300}"#,
        ] {
            assert_eq!(refused(body, "g").field.as_deref(), Some("g.n"), "{body}");
        }
        // serde takes the integer for an integer field, and refuses a fraction.
        #[derive(serde::Deserialize, Debug)]
        struct T {
            #[allow(dead_code)]
            n: u32,
        }
        let ok = |b: &str| {
            serde_json::from_value::<T>(Value::Object(strict_object(b.as_bytes(), "").unwrap()))
        };
        assert!(ok(r#"{"n":240.0}"#).is_ok());
        assert!(ok(r#"{"n":1e2}"#).is_ok());
        assert!(ok(r#"{"n":5.5}"#).is_err());
        assert!(ok(r#"{"n":-1.0}"#).is_err());
    }

    /// The document's pattern for strings is the server's rule, character by character.
    #[test]
    fn string_pattern_is_the_servers_rule() {
        let re = regex::Regex::new(STRING_PATTERN).expect("STRING_PATTERN is a regex");
        let agree = |s: &str| {
            assert_eq!(
                re.is_match(s),
                string_fault(s).is_none(),
                "{s:?}: pattern and server disagree ({:?})",
                string_fault(s)
            );
        };
        let tricky = [
            "",
            "a",
            "vm1",
            "a b",
            "vm1/nic0/ipconfig1",
            " a",
            "a ",
            "\ta",
            "a\t",
            "a\tb",
            "a\n",
            "\na",
            "a\r\n",
            "\u{1c}a",
            "a\u{1d}",
            "a\u{1e}b",
            "a\u{1f}",
            "\u{0}",
            "a\u{7f}",
            "\u{80}a",
            "a\u{85}",
            "a\u{9f}b",
            "\u{a0}a",
            "a\u{a0}",
            "a\u{a0}b",
            "\u{1680}a",
            "a\u{2000}",
            "a\u{200a}",
            "a\u{200b}",
            "\u{2028}",
            "a\u{2028}b",
            "a\u{2029}",
            "\u{202f}a",
            "a\u{205f}",
            "\u{3000}a",
            "a\u{3000}b",
            "\u{feff}a",
            "a\u{feff}",
            "é",
            "中文",
            "😀",
            "a\u{ad}",
            " ",
            "\u{3000}",
            "\u{a0}",
        ];
        for s in tricky {
            agree(s);
        }
        // Every character of the Basic Multilingual Plane alone, at either end and inside.
        for c in (0..=0xffff_u32).filter_map(char::from_u32) {
            agree(&c.to_string());
            agree(&format!("{c}x"));
            agree(&format!("x{c}"));
            agree(&format!("x{c}x"));
        }
    }

    #[test]
    fn numbers_past_i64_are_refused() {
        assert!(strict_object(br#"{"seed":9223372036854775807}"#, "").is_ok());
        let e = refused(r#"{"seed":9223372036854775808}"#, "gateway");
        assert_eq!(e.field.as_deref(), Some("gateway.seed"));
    }

    #[test]
    fn errors_echo_a_bounded_prefix() {
        let long = "x".repeat(10 << 20);
        let e = refused(&format!("{{\"a\":\" {long}\"}}"), "");
        assert!(e.message.len() <= MAX_ERROR_LEN + 64, "{}", e.message.len());
        let e = refused(&format!("{{\"a\":{long}}}"), "");
        assert!(e.message.len() <= MAX_ERROR_LEN + 64, "{}", e.message.len());
        let e = refused(&format!("{{\"{long}\":1,\"{long}\":2}}"), "");
        assert!(e
            .field
            .as_deref()
            .is_some_and(|f| f.len() <= MAX_FIELD_LEN + 64));
    }

    #[test]
    fn query_parameters_are_named_in_every_refusal() {
        let q = QueryParams::parse(Some("limit=5&cursor=7"), &["limit", "cursor"]).unwrap();
        assert_eq!(q.number("limit", 1, 1000), Ok(Some(5)));
        assert_eq!(q.number("after", 0, 9), Ok(None));
        for (raw, field) in [
            ("limit=abc", "limit"),
            ("limit=-1", "limit"),
            ("limit=0", "limit"),
            ("limit=1001", "limit"),
            ("cursor=99999999999999999999", "cursor"),
        ] {
            let q = QueryParams::parse(Some(raw), &["limit", "cursor"]).unwrap();
            let e = q
                .number("limit", 1, 1000)
                .and_then(|_| q.number("cursor", 0, i64::MAX as u64))
                .expect_err(raw);
            assert_eq!(e.field.as_deref(), Some(field), "{raw}");
        }
        let e = QueryParams::parse(Some("limt=5"), &["limit"]).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("limt"));
        let e = QueryParams::parse(Some("limit=5&limit=6"), &["limit"]).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("limit"));
    }

    #[test]
    fn bounded_keeps_both_ends_on_char_boundaries() {
        assert_eq!(bounded("short", 10), "short");
        let s = "é".repeat(1000);
        let b = bounded(&s, 100);
        assert!(b.len() <= 140, "{}", b.len());
        assert!(b.starts_with('é') && b.ends_with('é') && b.contains("bytes cut"));
    }
}
