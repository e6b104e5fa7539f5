//! Every shape error of a TOML document at once, not only the first.
//!
//! serde stops at the first value of the wrong type, so one typo in a policy or in the
//! relay configuration would hide all the others. [`deserialize`] sets each error aside
//! and goes on: the key-value lines the error points at are blanked (spaces, so that every
//! later offset, line and column stays true) and the document is deserialized again, until
//! it goes through or an error cannot be set aside (no location, or the blanking broke the
//! syntax). A `missing field` error about a key that was blanked is not reported again.
//!
//! ```
//! use serde::Deserialize;
//!
//! #[derive(Deserialize)]
//! struct Server { port: Option<u16>, name: Option<String>, workers: Option<u32> }
//!
//! let shape = altroute_policy::toml_errors::deserialize::<Server>(
//!     "port = \"25\"\nname = \"mx\"\nworkers = -1\n",
//! );
//! assert_eq!(shape.errors.len(), 2);
//! assert_eq!(shape.value.unwrap().name.as_deref(), Some("mx"));
//! ```

use serde::de::DeserializeOwned;

/// At most this many errors are collected (each costs one more parse).
const MAX_ERRORS: usize = 100;

/// What [`deserialize`] found.
#[derive(Debug)]
pub struct Shape<T> {
    /// The value deserialized from what was left, if anything was.
    pub value: Option<T>,
    /// Every error; their spans point into the source (and into `text`).
    pub errors: Vec<toml::de::Error>,
    /// The paths of unknown keys (as `serde_ignored` names them: `hosts.1.priority`).
    pub unknown: Vec<String>,
    /// The source with the lines of the errors blanked: what `unknown` refers to.
    pub text: String,
}

/// Deserializes `src` into `T`, collecting every shape error (see the module docs).
pub fn deserialize<T: DeserializeOwned>(src: &str) -> Shape<T> {
    let mut text = src.to_string();
    let mut errors = Vec::new();
    let mut blanked: Vec<String> = Vec::new();
    let mut unknown = Vec::new();
    let done = |value, errors, unknown, text| Shape {
        value,
        errors,
        unknown,
        text,
    };
    loop {
        unknown.clear();
        let de = match toml::de::Deserializer::parse(&text) {
            Ok(de) => de,
            Err(e) => {
                // A syntax error of the source itself, or one that blanking made: only
                // the first kind is the author's.
                if errors.is_empty() {
                    errors.push(e);
                }
                return done(None, errors, unknown, text);
            }
        };
        let e = match serde_ignored::deserialize(de, |path| unknown.push(path.to_string())) {
            Ok(value) => return done(Some(value), errors, unknown, text),
            Err(e) => e,
        };
        let Some(span) = e.span() else {
            errors.push(e);
            return done(None, errors, unknown, text);
        };
        let repeat = blanked
            .iter()
            .any(|key| e.message().contains(&format!("missing field `{key}`")));
        let (start, mut end) = line_bounds(&text, span.start, span.end);
        // An error about a whole table (a missing field) points at its header: set the
        // table aside up to the next header, or its keys would land in the one before.
        if text[start..end].trim_start().starts_with('[') {
            end = next_header(&text, end);
        }
        if let Some(key) = text[start..end].split('=').next() {
            let key = key
                .trim()
                .rsplit('.')
                .next()
                .unwrap_or("")
                .trim_matches('"');
            blanked.push(key.to_string());
        }
        if !repeat {
            errors.push(e);
        }
        let before = text.len();
        let blank: String = text[start..end]
            .chars()
            .map(|c| if c == '\n' { '\n' } else { ' ' })
            .collect();
        if blank == text[start..end] || errors.len() >= MAX_ERRORS {
            return done(None, errors, unknown, text);
        }
        // Same length in bytes only for ASCII: keep offsets exact by padding.
        let pad = text[start..end].len() - blank.len();
        text.replace_range(start..end, &format!("{blank}{}", " ".repeat(pad)));
        debug_assert_eq!(text.len(), before);
    }
}

/// From the start of the line holding `start` to the end of the line holding `end` (the
/// newline excluded).
fn line_bounds(text: &str, start: usize, end: usize) -> (usize, usize) {
    let start = start.min(text.len());
    let end = end.max(start).min(text.len());
    let from = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let to = text[end..].find('\n').map_or(text.len(), |i| end + i);
    (from, to)
}

/// The end of the last line before the next table header after `from` (or of the text).
fn next_header(text: &str, from: usize) -> usize {
    let mut at = from;
    while let Some(i) = text[at..].find('\n') {
        let line = at + i + 1;
        if text[line..].trim_start().starts_with('[') {
            return line - 1;
        }
        at = line;
    }
    text.len()
}
