//! Reading a request body without building what no hook reads.
//!
//! A [`Scanner`] walks the bytes of one JSON document. It checks the syntax of every value it
//! passes over and says where each value starts and ends ([`Span`]), so that the few values a hook
//! reads are decoded by serde_json from their own bytes and the rest is never built. The check is
//! the one Go's encoding/json makes of fields it does not know: the grammar, not the range of a
//! number (`1e400`) or whether a `\u` escape is a lone surrogate, which only decoding refuses.
//!
//! It exists for speed: a CanUpdateMachine request is tens of kilobytes, mostly files in the
//! KubeadmConfig that no decision reads, and passing over them was most of what a call cost
//! (`docs/benchmarks.md`, section 1). Two things make it cheaper than serde_json skipping a value:
//! strings are searched eight bytes at a time, and [`Scanner::skip_same`] passes over a value that
//! repeats one already checked with a comparison of bytes. Positions in errors count from the start
//! of the body.

use std::borrow::Cow;
use std::fmt;

use serde::de::DeserializeOwned;

/// Why a body could not be read, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadError(String);

impl fmt::Display for ReadError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.0)
    }
}

impl std::error::Error for ReadError {}

impl ReadError {
    /// `message` before the error's own text, to say what was being read.
    pub fn context(self, message: impl fmt::Display) -> Self {
        Self(format!("{message}: {}", self.0))
    }
}

/// Where a value is in the body: bytes `start..end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    start: usize,
    end: usize,
}

/// Checks that `body` is one JSON value, keeping nothing: the least any reader of a request does.
pub fn check(body: &[u8]) -> Result<(), ReadError> {
    let mut scan = Scanner::new(body);
    scan.skip()?;
    scan.end()
}

/// How deep arrays and objects may nest inside a skipped value: Go's encoding/json's limit. (A
/// value serde_json decodes may nest 127 levels.)
const MAX_DEPTH: usize = 10_000;

/// How many nesting levels one `u128` of open arrays and objects holds.
const LEVELS_PER_WORD: usize = 128;

/// A reading position in a JSON body.
pub struct Scanner<'a> {
    body: &'a [u8],
    at: usize,
}

impl<'a> Scanner<'a> {
    /// A scanner at the start of `body`.
    pub fn new(body: &'a [u8]) -> Self {
        Self { body, at: 0 }
    }

    /// A scanner at the start of a value of `body` scanned before.
    pub fn at(body: &'a [u8], span: Span) -> Self {
        Self {
            body,
            at: span.start,
        }
    }

    /// The bytes of a value.
    pub fn text(&self, span: Span) -> &'a [u8] {
        &self.body[span.start..span.end]
    }

    /// Checks the next value and passes over it. Kept out of line, so that a profile names what
    /// passing over values costs (`scripts/bench-hook-instructions.sh` reports it).
    #[inline(never)]
    pub fn skip(&mut self) -> Result<Span, ReadError> {
        let start = whitespace_end(self.body, self.at);
        match value_end(self.body, start) {
            Ok(end) => {
                self.at = end;
                Ok(Span { start, end })
            }
            Err(bad) => Err(self.error_at(bad.at, bad.what)),
        }
    }

    /// Passes over the next value if the body goes on with `known`, an object, array or string
    /// checked before (as the current side's spec is when the desired side repeats it), comparing
    /// bytes only. Such a value ends at its own closing brace, bracket or quote, so the same bytes
    /// are the same value; this does not hold of a number (`1` is the start of `12`), so nothing
    /// else is ever passed over here.
    pub fn skip_same(&mut self, known: &[u8]) -> Option<Span> {
        self.skip_whitespace();
        let same = matches!(known.first(), Some(b'{' | b'[' | b'"'))
            && self.body[self.at..].starts_with(known);
        same.then(|| {
            let start = self.at;
            self.at += known.len();
            Span {
                start,
                end: self.at,
            }
        })
    }

    /// Where the next value starts, after any whitespace; with [`Scanner::span_from`], the span of
    /// a value read piece by piece.
    pub fn here(&mut self) -> usize {
        self.skip_whitespace();
        self.at
    }

    /// The span from `start` (a [`Scanner::here`]) to where the scanner is.
    pub fn span_from(&self, start: usize) -> Span {
        Span {
            start,
            end: self.at,
        }
    }

    /// Checks the next value and decodes it.
    pub fn decode<T: DeserializeOwned>(&mut self) -> Result<T, ReadError> {
        let span = self.skip()?;
        self.decode_span(span)
    }

    /// As [`Scanner::decode`], to a [`serde_json::Value`]. A string without escapes, the value
    /// most often read, is taken as it is.
    pub fn decode_value(&mut self) -> Result<serde_json::Value, ReadError> {
        let span = self.skip()?;
        let text = self.text(span);
        if let [b'"', inner @ .., b'"'] = text
            && plain_end(text, 1) == text.len() - 1
            && let Ok(text) = std::str::from_utf8(inner)
        {
            return Ok(serde_json::Value::String(text.to_owned()));
        }
        self.decode_span(span)
    }

    /// Decodes a value scanned before; an error's position counts from the start of the body.
    pub fn decode_span<T: DeserializeOwned>(&self, span: Span) -> Result<T, ReadError> {
        serde_json::from_slice(self.text(span)).map_err(|err| {
            let text = err.to_string();
            let suffix = format!(" at line {} column {}", err.line(), err.column());
            let message = text.strip_suffix(&suffix).unwrap_or(&text);
            // serde_json counts lines from 1 and columns from 1 within a line.
            let line_start = self
                .text(span)
                .split_inclusive(|&byte| byte == b'\n')
                .take(err.line().saturating_sub(1))
                .map(<[u8]>::len)
                .sum::<usize>();
            let at = span.start + line_start + err.column().saturating_sub(1);
            self.error_at(at, message)
        })
    }

    /// Whether the next value is `null`, passing over it if so.
    pub fn null(&mut self) -> bool {
        self.skip_whitespace();
        let null = self.body[self.at..].starts_with(b"null");
        if null {
            self.at += 4;
        }
        null
    }

    /// Starts reading the next value's members if it is an object.
    pub fn object(&mut self) -> Option<Members> {
        self.skip_whitespace();
        let object = self.body.get(self.at) == Some(&b'{');
        if object {
            self.at += 1;
        }
        object.then_some(Members { first: true })
    }

    /// Checks that nothing but whitespace is left.
    pub fn end(&mut self) -> Result<(), ReadError> {
        self.skip_whitespace();
        match self.at == self.body.len() {
            true => Ok(()),
            false => Err(self.error_at(self.at, "trailing characters")),
        }
    }

    /// An error at byte `at`, with the line and the column (both from 1) of that byte.
    pub fn error_at(&self, at: usize, message: &str) -> ReadError {
        let before = &self.body[..at.min(self.body.len())];
        let line = 1 + before.iter().filter(|&&byte| byte == b'\n').count();
        let column = 1 + before.len()
            - before
                .iter()
                .rposition(|&byte| byte == b'\n')
                .map_or(0, |newline| newline + 1);
        ReadError(format!("{message} at line {line} column {column}"))
    }

    /// An error at the next value.
    pub fn error_here(&mut self, message: &str) -> ReadError {
        self.skip_whitespace();
        self.error_at(self.at, message)
    }

    fn skip_whitespace(&mut self) {
        self.at = whitespace_end(self.body, self.at);
    }
}

/// The members of an object being read: each [`Members::next_key`] is followed by reading or
/// skipping that member's value.
pub struct Members {
    first: bool,
}

impl Members {
    /// The next member's key, unescaped, or `None` after the object's closing brace. Its bytes as
    /// they are when it has no escape: keys are compared with names, which a key that is not UTF-8
    /// matches none of (Go's encoding/json reads such bytes as U+FFFD).
    pub fn next_key<'a>(
        &mut self,
        scan: &mut Scanner<'a>,
    ) -> Result<Option<Cow<'a, [u8]>>, ReadError> {
        scan.skip_whitespace();
        match scan.body.get(scan.at) {
            Some(b'}') => {
                scan.at += 1;
                return Ok(None);
            }
            Some(b',') if !self.first => {
                scan.at += 1;
                scan.skip_whitespace();
            }
            _ if self.first => {}
            _ => return Err(scan.error_at(scan.at, "expected `,` or `}`")),
        }
        self.first = false;
        let start = scan.at;
        let (end, value_start) =
            key_end(scan.body, start).map_err(|bad| scan.error_at(bad.at, bad.what))?;
        scan.at = value_start;
        // Without an escape, the key's first special byte is its closing quote.
        if plain_end(scan.body, start + 1) == end - 1 {
            return Ok(Some(Cow::Borrowed(&scan.body[start + 1..end - 1])));
        }
        // Rare: a key with escapes is decoded, strictly, as serde_json decodes keys.
        scan.decode_span::<String>(Span { start, end })
            .map(|key| Some(Cow::Owned(key.into_bytes())))
    }
}

/// A syntax error found while scanning: where, and what is wrong. Cheap to pass around; it becomes
/// a [`ReadError`], with a line and column, only at the surface.
struct Bad {
    at: usize,
    what: &'static str,
}

type Scanned = Result<usize, Bad>;

fn bad(at: usize, what: &'static str) -> Scanned {
    Err(Bad { at, what })
}

/// The first byte at or after `at` that is not whitespace.
#[inline(always)]
fn whitespace_end(body: &[u8], mut at: usize) -> usize {
    while let Some(b' ' | b'\n' | b'\t' | b'\r') = body.get(at) {
        at += 1;
    }
    at
}

/// The end of the value that starts at `at` (after any whitespace). One loop with the open arrays
/// and objects in a bit set rather than a recursion, so that a value nested deep cannot overflow
/// the stack.
fn value_end(body: &[u8], mut at: usize) -> Scanned {
    // The innermost open arrays and objects, innermost in bit 0: 1 for an object, 0 for an array;
    // levels further out, 128 to a word, in `outer` (empty but for values nested that deep).
    let mut open: u128 = 0;
    let mut outer: Vec<u128> = Vec::new();
    let mut depth = 0;
    loop {
        // At the start of a value.
        at = whitespace_end(body, at);
        let Some(&first) = body.get(at) else {
            return bad(at, "end of the body, expected a value");
        };
        at += 1;
        match first {
            b'"' => at = string_end(body, at)?,
            b'{' | b'[' => {
                if depth == MAX_DEPTH {
                    return bad(at - 1, "nested too deep");
                }
                let object = first == b'{';
                at = whitespace_end(body, at);
                if body.get(at) == Some(if object { &b'}' } else { &b']' }) {
                    at += 1;
                } else {
                    if depth % LEVELS_PER_WORD == 0 && depth > 0 {
                        outer.push(open);
                        open = 0;
                    }
                    depth += 1;
                    open = open << 1 | u128::from(object);
                    if object {
                        at = key_end(body, at)?.1;
                    }
                    continue;
                }
            }
            b'-' | b'0'..=b'9' => at = number_end(body, at - 1)?,
            b't' => at = literal_end(body, at, b"rue")?,
            b'f' => at = literal_end(body, at, b"alse")?,
            b'n' => at = literal_end(body, at, b"ull")?,
            _ => return bad(at - 1, "expected a value"),
        }
        // After a value: the next member or element, or the end of what it was in.
        loop {
            if depth == 0 {
                return Ok(at);
            }
            at = whitespace_end(body, at);
            let in_object = open & 1 == 1;
            match (body.get(at), in_object) {
                (Some(b','), true) => {
                    at = key_end(body, whitespace_end(body, at + 1))?.1;
                    break;
                }
                (Some(b','), false) => {
                    at += 1;
                    break;
                }
                (Some(b'}'), true) | (Some(b']'), false) => {
                    at += 1;
                    open >>= 1;
                    depth -= 1;
                    if depth % LEVELS_PER_WORD == 0 && depth > 0 {
                        open = outer.pop().unwrap_or_default();
                    }
                }
                (_, true) => return bad(at, "expected `,` or `}`"),
                (_, false) => return bad(at, "expected `,` or `]`"),
            }
        }
    }
}

/// For an object member's key at `at`: where the key ends, and where its value starts (after the
/// colon and any whitespace).
#[inline(always)]
fn key_end(body: &[u8], at: usize) -> Result<(usize, usize), Bad> {
    if body.get(at) != Some(&b'"') {
        return Err(Bad {
            at,
            what: "expected a key (a string)",
        });
    }
    let end = string_end(body, at + 1)?;
    let colon = whitespace_end(body, end);
    match body.get(colon) {
        Some(b':') => Ok((end, whitespace_end(body, colon + 1))),
        _ => Err(Bad {
            at: colon,
            what: "expected `:`",
        }),
    }
}

/// The end of the string whose opening quote is just before `at`. Not inlined: in a function of
/// its own the search keeps its constants in registers, which more than pays for the call.
#[inline(never)]
fn string_end(body: &[u8], mut at: usize) -> Scanned {
    loop {
        at = plain_end(body, at);
        match body.get(at) {
            Some(b'"') => return Ok(at + 1),
            Some(b'\\') => at = escape_end(body, at + 1)?,
            Some(_) => return bad(at, "control character in a string"),
            None => return bad(at, "end of the body in a string"),
        }
    }
}

/// The end of the escape whose backslash is just before `at`.
#[inline(always)]
fn escape_end(body: &[u8], at: usize) -> Scanned {
    match body.get(at) {
        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => Ok(at + 1),
        Some(b'u') => match body.get(at + 1..at + 5) {
            Some(digits) if digits.iter().all(u8::is_ascii_hexdigit) => Ok(at + 5),
            _ => bad(at + 1, "invalid \\u escape"),
        },
        _ => bad(at, "invalid escape"),
    }
}

/// The end of the number that starts at `at`.
fn number_end(body: &[u8], mut at: usize) -> Scanned {
    if body.get(at) == Some(&b'-') {
        at += 1;
    }
    match body.get(at) {
        Some(b'0') => at += 1,
        Some(b'1'..=b'9') => at = digits_end(body, at + 1),
        _ => return bad(at, "invalid number"),
    }
    if body.get(at) == Some(&b'.') {
        at = required_digits_end(body, at + 1)?;
    }
    if let Some(b'e' | b'E') = body.get(at) {
        at += 1;
        if let Some(b'+' | b'-') = body.get(at) {
            at += 1;
        }
        at = required_digits_end(body, at)?;
    }
    Ok(at)
}

fn digits_end(body: &[u8], mut at: usize) -> usize {
    while body.get(at).is_some_and(u8::is_ascii_digit) {
        at += 1;
    }
    at
}

fn required_digits_end(body: &[u8], at: usize) -> Scanned {
    match digits_end(body, at) {
        end if end > at => Ok(end),
        _ => bad(at, "invalid number"),
    }
}

/// The end of `true`, `false` or `null`, whose first letter is just before `at`.
fn literal_end(body: &[u8], at: usize, rest: &[u8]) -> Scanned {
    match body[at..].starts_with(rest) {
        true => Ok(at + rest.len()),
        false => bad(at - 1, "expected a value"),
    }
}

/// The first byte at or after `at` that a string cannot hold as it is: a quote, a backslash or a
/// control character (or the end of the body). Eight bytes at a time, with the classic test for a
/// zero byte in a word: `(word - 0x01…01) & !word & 0x80…80` marks the first byte below 0x01
/// (below `n` with `n` in place of 0x01), and can mark bytes after it, never before. The three
/// bytes sought are all below 0x80, so one `!word` serves the three tests.
#[inline(always)]
fn plain_end(body: &[u8], mut at: usize) -> usize {
    const ONES: u64 = u64::MAX / 255;
    const HIGH: u64 = ONES * 0x80;
    // An index loop rather than `chunks_exact`: most strings are a few words long, and setting up
    // the iterator (and its remainder) cost more than searching them.
    while let Some(chunk) = body.get(at..at + 8) {
        let word = u64::from_le_bytes(chunk.try_into().expect("a slice of eight bytes"));
        let quote = word ^ (ONES * u64::from(b'"'));
        let backslash = word ^ (ONES * u64::from(b'\\'));
        let marked = (quote.wrapping_sub(ONES)
            | backslash.wrapping_sub(ONES)
            | word.wrapping_sub(ONES * 0x20))
            & !word
            & HIGH;
        if marked != 0 {
            return at + (marked.trailing_zeros() / 8) as usize;
        }
        at += 8;
    }
    while let Some(&byte) = body.get(at) {
        if byte == b'"' || byte == b'\\' || byte < 0x20 {
            break;
        }
        at += 1;
    }
    at
}

/// Texts that are not JSON, which serde_json refuses too; each also stays invalid wherever a value
/// may stand in a larger document, so the readers' tests use them there.
#[cfg(test)]
pub(crate) const NOT_JSON: &[&str] = &[
    "",
    " ",
    "[1,]",
    "[1 2]",
    "{\"a\": 1,}",
    "{\"a\" 1}",
    "{a: 1}",
    "{\"a\": }",
    "{,}",
    "[",
    "{\"a\": [1}",
    "[1]]",
    r#""unterminated"#,
    r#""\q""#,
    r#""\u12""#,
    r#""\u12g4""#,
    "\"tab\tinside\"",
    "\"newline\ninside\"",
    "1.",
    "1.e5",
    "1e",
    "-",
    "01",
    "+1",
    ".5",
    "nul",
    "nulls",
    "True",
    "1 2",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_what_serde_json_accepts() {
        for json in [
            "0",
            "-0",
            "-12.5e+3",
            "1E9",
            "1e400",
            "true",
            "false",
            " null ",
            r#""""#,
            r#""plain text that runs past eight bytes""#,
            r#""escapes \" \\ \/ \b \f \n \r \t \u00e9 \ud800 end""#,
            "\"non-ASCII: \u{e9}\u{4e2d}\u{1f600}\"",
            "[]",
            "{}",
            r#"[1, [2, [3, {}]], {"a": {"b": []}}]"#,
            " { \"a\" : 1 , \"b\" :\n[ true , null ] } ",
            r#"{"a": 1, "a": 2}"#,
        ] {
            check(json.as_bytes()).unwrap_or_else(|err| panic!("{json}: {err}"));
            serde_json::from_str::<serde::de::IgnoredAny>(json)
                .unwrap_or_else(|err| panic!("serde_json refuses {json}: {err}"));
        }
    }

    #[test]
    fn refuses_what_serde_json_refuses() {
        for json in NOT_JSON {
            assert!(check(json.as_bytes()).is_err(), "{json:?} passed");
            assert!(
                serde_json::from_str::<serde::de::IgnoredAny>(json).is_err(),
                "serde_json accepts {json:?}"
            );
        }
        let deep = format!("{}{}", "[".repeat(10_001), "]".repeat(10_001));
        assert!(
            check(deep.as_bytes())
                .unwrap_err()
                .to_string()
                .contains("too deep")
        );
        let deepest = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        check(deepest.as_bytes()).unwrap();
    }

    #[test]
    fn nesting_deeper_than_a_word_of_levels_keeps_track_of_each_level() {
        // Objects and arrays by turns, 300 levels: more than two words of open levels.
        let open: String = (0..300)
            .map(|level| if level % 2 == 0 { r#"{"a":"# } else { "[" })
            .collect();
        let close: Vec<char> = (0..300)
            .rev()
            .map(|level| if level % 2 == 0 { '}' } else { ']' })
            .collect();
        let text = |close: &[char]| format!("{open}1{}", close.iter().collect::<String>());
        check(text(&close).as_bytes()).unwrap();
        // A closing bracket of the wrong kind is refused at every depth, around a word's edges too.
        for level in [0, 1, 127, 128, 129, 255, 256, 257, 299] {
            let mut wrong = close.clone();
            let at = close.len() - 1 - level;
            wrong[at] = if wrong[at] == '}' { ']' } else { '}' };
            assert!(check(text(&wrong).as_bytes()).is_err(), "level {level}");
        }
    }

    #[test]
    fn errors_say_where() {
        let error = check(b"{\"a\": 1,\n \"b\": [1,]}").unwrap_err().to_string();
        assert_eq!(error, "expected a value at line 2 column 10");
        let error = check(b"[\"a\x01\"]").unwrap_err().to_string();
        assert_eq!(error, "control character in a string at line 1 column 4");

        // A decoding error counts from the body, not from the value.
        let body = b"{\"a\": [1,\n 2, 1e400]}";
        let mut scan = Scanner::new(body);
        let mut members = scan.object().unwrap();
        members.next_key(&mut scan).unwrap();
        let error = scan.decode::<serde_json::Value>().unwrap_err().to_string();
        assert_eq!(error, "number out of range at line 2 column 9");
    }

    #[test]
    fn strings_end_at_the_first_quote_backslash_or_control_character() {
        let text = b"0123456789abcdef0123456789abcdef";
        for special in [b'"', b'\\', 0x00, 0x1f, b'\n'] {
            for at in 0..text.len() {
                let mut bytes = text.to_vec();
                bytes[at] = special;
                // Bytes with the high bit set, and 0x20 just past the controls, are plain.
                if at + 1 < bytes.len() {
                    bytes[at + 1] = 0xc3;
                }
                if at > 0 {
                    bytes[at - 1] = b' ';
                }
                assert_eq!(plain_end(&bytes, 0), at, "{special:#x} at {at}");
            }
        }
        let plain = b"\xc3\xa9 plain to the end \x7f";
        assert_eq!(plain_end(plain, 0), plain.len());
    }

    #[test]
    fn members_are_read_in_order_with_keys_unescaped() {
        let body = br#" { "a" : 1, "k\u0069nd": "x", "c": {"skipped": [1]} } "#;
        let mut scan = Scanner::new(body);
        let mut members = scan.object().unwrap();
        let mut seen = Vec::new();
        while let Some(key) = members.next_key(&mut scan).unwrap() {
            let span = scan.skip().unwrap();
            seen.push((
                String::from_utf8(key.into_owned()).unwrap(),
                String::from_utf8(scan.text(span).to_vec()).unwrap(),
            ));
        }
        scan.end().unwrap();
        assert_eq!(
            seen,
            [
                ("a".to_owned(), "1".to_owned()),
                ("kind".to_owned(), r#""x""#.to_owned()),
                ("c".to_owned(), r#"{"skipped": [1]}"#.to_owned()),
            ]
        );
        for bad in [r#"{"a": 1 "b": 2}"#, r#"{"a": 1,}"#, r#"{, "a": 1}"#] {
            let mut scan = Scanner::new(bad.as_bytes());
            let mut members = scan.object().unwrap();
            let read = (|| {
                while members.next_key(&mut scan)?.is_some() {
                    scan.skip()?;
                }
                Ok::<_, ReadError>(())
            })();
            assert!(read.is_err(), "{bad}");
        }
    }

    #[test]
    fn a_repeated_object_is_compared_not_checked() {
        let known = br#"{"files": [{"path": "/a"}]}"#;
        let body = br#"[{"files": [{"path": "/a"}]}, {"files": [{"path": "/b"}]}, 12]"#;
        let mut scan = Scanner::new(body);
        scan.at = 1;
        let same = scan.skip_same(known).unwrap();
        assert_eq!(scan.text(same), known);
        scan.at += 1;
        // An object that differs is not passed over.
        let before = scan.here();
        assert_eq!(scan.skip_same(known), None);
        assert_eq!(scan.here(), before);
        let other = scan.skip().unwrap();
        assert_eq!(scan.text(other), br#"{"files": [{"path": "/b"}]}"#);
        // Nor is a number: `1` is the start of `12`.
        scan.at += 1;
        assert_eq!(scan.skip_same(b"1"), None);

        // Arrays and strings end at their own bracket and quote, as objects at their brace.
        for known in [&b"[1, [2]]"[..], br#""a\"b""#] {
            let body = [known, b" , 5"].concat();
            let mut scan = Scanner::new(&body);
            scan.skip_same(known).unwrap();
            // Past the value, before the whitespace and what follows it.
            assert_eq!(scan.at, known.len());
            assert_eq!(scan.here(), known.len() + 1);
        }
        // A value that only starts like the known one is not the same.
        for (known, body) in [(&br#""a""#[..], &br#""ab""#[..]), (b"[1]", b"[1, 2]")] {
            assert_eq!(Scanner::new(body).skip_same(known), None);
        }
    }
}
