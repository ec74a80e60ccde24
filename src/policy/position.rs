//! JSON paths and where they are in the text.
//!
//! serde_json reports line:column for syntax errors only; once a document is a
//! `serde_json::Value`, positions are gone. Semantic errors (a bad host entry,
//! an unknown key) still have to point at the place in the file, so this module
//! walks the original text along a path to the value (or key) it names.
//!
//! The locator is only run on text serde_json has already accepted, so it can
//! be a plain scanner rather than a parser; it never panics on other input and
//! falls back to the deepest ancestor it could reach.
//!
//! Duplicate keys: serde_json keeps the *last* occurrence of a key, so the
//! locator does too, and points at the value serde_json actually used.

use std::fmt;

/// One step of a [`JsonPath`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Key(String),
    Index(usize),
}

/// A path from the document root to a value, e.g. `config.networking.allowed_hosts[2]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JsonPath(Vec<Segment>);

impl JsonPath {
    pub fn root() -> JsonPath {
        JsonPath(Vec::new())
    }

    pub fn key(&self, key: &str) -> JsonPath {
        let mut segments = self.0.clone();
        segments.push(Segment::Key(key.to_string()));
        JsonPath(segments)
    }

    pub fn index(&self, index: usize) -> JsonPath {
        let mut segments = self.0.clone();
        segments.push(Segment::Index(index));
        JsonPath(segments)
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    pub fn segments(&self) -> &[Segment] {
        &self.0
    }
}

/// `a.b[2].c`; a key that is not a plain identifier is written `["a key"]`.
/// The root renders as `(top level)`.
impl fmt::Display for JsonPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("(top level)");
        }
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Key(key) if is_identifier(key) => {
                    if i > 0 {
                        f.write_str(".")?;
                    }
                    f.write_str(key)?;
                }
                Segment::Key(key) => write!(f, "[{key:?}]")?,
                Segment::Index(index) => write!(f, "[{index}]")?,
            }
        }
        Ok(())
    }
}

fn is_identifier(key: &str) -> bool {
    !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        && !key.as_bytes()[0].is_ascii_digit()
}

/// A 1-based line and column; the column counts characters, not bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineColumn {
    pub line: usize,
    pub column: usize,
}

/// Whether a location points at a member's value or at its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anchor {
    Value,
    /// The key of the last path segment (an unknown or duplicate key);
    /// for an array index this is the element itself.
    Key,
}

/// Line and column of a byte offset into `text` (clamped to the text).
pub fn line_column(text: &str, offset: usize) -> LineColumn {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    LineColumn {
        line: before.matches('\n').count() + 1,
        column: before[line_start..].chars().count() + 1,
    }
}

/// Line and column from serde_json's line and *byte* column, converted to a
/// character column like every other position netleash prints.
pub fn from_serde_position(text: &str, line: usize, byte_column: usize) -> LineColumn {
    let Some(line_text) = text.split('\n').nth(line.saturating_sub(1)) else {
        return LineColumn {
            line,
            column: byte_column.max(1),
        };
    };
    let mut end = byte_column.saturating_sub(1).min(line_text.len());
    while !line_text.is_char_boundary(end) {
        end -= 1;
    }
    LineColumn {
        line: line.max(1),
        column: line_text[..end].chars().count() + 1,
    }
}

/// Where `path` is in `text`: its value, or with [`Anchor::Key`] its key.
/// If the path cannot be followed to the end, the deepest ancestor reached.
pub fn locate(text: &str, path: &JsonPath, anchor: Anchor) -> LineColumn {
    line_column(text, locate_offset(text, path, anchor))
}

fn locate_offset(text: &str, path: &JsonPath, anchor: Anchor) -> usize {
    let mut scanner = Scanner { text, pos: 0 };
    scanner.skip_whitespace();
    let mut best = scanner.pos;
    let last = path.0.len().saturating_sub(1);
    for (depth, segment) in path.0.iter().enumerate() {
        let found = match segment {
            Segment::Key(key) => scanner.find_member(key),
            Segment::Index(index) => scanner.find_element(*index).map(|at| (at, at)),
        };
        let Some((key_at, value_at)) = found else {
            return best;
        };
        if depth == last && anchor == Anchor::Key {
            return key_at;
        }
        scanner.pos = value_at;
        best = value_at;
    }
    best
}

/// Every key of the object at `path`, with the position of each occurrence,
/// in document order (duplicates included). Empty if `path` is not an object.
pub fn object_keys(text: &str, path: &JsonPath) -> Vec<(String, LineColumn)> {
    let offset = locate_offset(text, path, Anchor::Value);
    let mut scanner = Scanner { text, pos: offset };
    let mut keys = Vec::new();
    scanner.each_member(|key, key_at, _| keys.push((key.to_string(), line_column(text, key_at))));
    keys
}

/// A forgiving cursor over JSON text that serde_json has already accepted.
struct Scanner<'a> {
    text: &'a str,
    pos: usize,
}

impl Scanner<'_> {
    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.pos).copied()
    }

    fn skip_whitespace(&mut self) {
        // RFC 8259 §2: the only insignificant whitespace.
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    fn eat(&mut self, byte: u8) -> bool {
        if self.peek() == Some(byte) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    /// Skips a string starting at `pos` (on its opening quote); returns its
    /// raw text including the quotes.
    fn skip_string(&mut self) -> Option<&str> {
        let start = self.pos;
        if !self.eat(b'"') {
            return None;
        }
        let bytes = self.text.as_bytes();
        while self.pos < bytes.len() {
            match bytes[self.pos] {
                b'\\' => self.pos += 2,
                b'"' => {
                    self.pos += 1;
                    return self.text.get(start..self.pos);
                }
                _ => self.pos += 1,
            }
        }
        None
    }

    fn skip_value(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => self.skip_string().map(|_| ()),
            b'{' => self.each_member(|_, _, _| {}).then_some(()),
            b'[' => self.each_element(|_, _| false).map(|_| ()),
            _ => {
                // A number, true, false or null: runs to the next delimiter.
                while let Some(b) = self.peek() {
                    if matches!(b, b',' | b']' | b'}' | b' ' | b'\t' | b'\n' | b'\r') {
                        break;
                    }
                    self.pos += 1;
                }
                Some(())
            }
        }
    }

    /// Walks the object at `pos`, calling `visit(key, key_offset, value_offset)`
    /// for each member, and leaves `pos` after the closing brace.
    /// Returns false if the text is not an object there.
    fn each_member(&mut self, mut visit: impl FnMut(&str, usize, usize)) -> bool {
        if !self.eat(b'{') {
            return false;
        }
        loop {
            self.skip_whitespace();
            if self.eat(b'}') {
                return true;
            }
            let key_at = self.pos;
            let Some(raw) = self.skip_string() else {
                return false;
            };
            let key: String = serde_json::from_str(raw).unwrap_or_else(|_| raw.to_string());
            self.skip_whitespace();
            if !self.eat(b':') {
                return false;
            }
            self.skip_whitespace();
            let value_at = self.pos;
            visit(&key, key_at, value_at);
            if self.skip_value().is_none() {
                return false;
            }
            self.skip_whitespace();
            if !self.eat(b',') {
                return self.eat(b'}');
            }
        }
    }

    /// Walks the array at `pos`, calling `visit(index, offset)` for each
    /// element until it returns true. `Some(Some(offset))`: the element
    /// `visit` stopped at; `Some(None)`: the whole array was walked and `pos`
    /// is after it; `None`: the text is not a well-formed array there.
    fn each_element(
        &mut self,
        mut visit: impl FnMut(usize, usize) -> bool,
    ) -> Option<Option<usize>> {
        if !self.eat(b'[') {
            return None;
        }
        let mut index = 0;
        loop {
            self.skip_whitespace();
            if self.eat(b']') {
                return Some(None);
            }
            let at = self.pos;
            if visit(index, at) {
                return Some(Some(at));
            }
            self.skip_value()?;
            self.skip_whitespace();
            if !self.eat(b',') {
                return self.eat(b']').then_some(None);
            }
            index += 1;
        }
    }

    /// (key offset, value offset) of the last member named `key` of the
    /// object at `pos`.
    fn find_member(&mut self, key: &str) -> Option<(usize, usize)> {
        let mut found = None;
        self.each_member(|k, key_at, value_at| {
            if k == key {
                found = Some((key_at, value_at));
            }
        });
        found
    }

    fn find_element(&mut self, wanted: usize) -> Option<usize> {
        self.each_element(|index, _| index == wanted).flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = r#"{
  "name": "x",
  "config": {
    "type": "cloud",
    "networking": {
      "type": "limited",
      "allowed_hosts": ["a.com", "b.com",
        "https://example.com/v1"]
    }
  }
}"#;

    fn path(keys: &[&str]) -> JsonPath {
        keys.iter().fold(JsonPath::root(), |p, k| p.key(k))
    }

    #[test]
    fn path_display() {
        assert_eq!(JsonPath::root().to_string(), "(top level)");
        let p = path(&["config", "networking", "allowed_hosts"]).index(2);
        assert_eq!(p.to_string(), "config.networking.allowed_hosts[2]");
        assert_eq!(path(&["a b"]).key("c").to_string(), r#"["a b"].c"#);
        assert_eq!(path(&["9x"]).to_string(), r#"["9x"]"#);
    }

    #[test]
    fn locates_values_and_keys() {
        let hosts = path(&["config", "networking", "allowed_hosts"]);
        assert_eq!(
            locate(DOC, &hosts.index(2), Anchor::Value),
            LineColumn { line: 8, column: 9 }
        );
        assert_eq!(
            locate(DOC, &hosts.index(1), Anchor::Value),
            LineColumn {
                line: 7,
                column: 34
            }
        );
        assert_eq!(
            locate(DOC, &hosts, Anchor::Key),
            LineColumn { line: 7, column: 7 }
        );
        assert_eq!(
            locate(DOC, &hosts, Anchor::Value),
            LineColumn {
                line: 7,
                column: 24
            }
        );
        assert_eq!(
            locate(DOC, &JsonPath::root(), Anchor::Value),
            LineColumn { line: 1, column: 1 }
        );
    }

    #[test]
    fn missing_path_falls_back_to_deepest_ancestor() {
        let p = path(&["config", "networking", "nope", "deeper"]);
        assert_eq!(
            locate(DOC, &p, Anchor::Value),
            LineColumn {
                line: 5,
                column: 19
            }
        );
        let p = path(&["config", "networking", "allowed_hosts"]).index(7);
        assert_eq!(
            locate(DOC, &p, Anchor::Value),
            LineColumn {
                line: 7,
                column: 24
            }
        );
    }

    #[test]
    fn skips_strings_with_escapes_and_nested_values() {
        let doc = r#"{"a": "x\"}{[", "b": [{"c": [1, 2]}, {"d": null}], "e\u0041": true}"#;
        assert_eq!(locate(doc, &path(&["eA"]), Anchor::Value).column, 63);
        let p = path(&["b"]).index(1).key("d");
        assert_eq!(locate(doc, &p, Anchor::Value).column, 44);
    }

    #[test]
    fn duplicate_keys_resolve_to_the_last_like_serde_json() {
        let doc = "{\"k\": 1,\n \"k\": 2}";
        assert_eq!(
            locate(doc, &path(&["k"]), Anchor::Key),
            LineColumn { line: 2, column: 2 }
        );
        let keys = object_keys(doc, &JsonPath::root());
        assert_eq!(keys.len(), 2);
        assert_eq!(
            keys[0],
            ("k".to_string(), LineColumn { line: 1, column: 2 })
        );
    }

    #[test]
    fn columns_count_characters() {
        let doc = "{\"é\": \"ü\", \"k\": 1}";
        assert_eq!(
            locate(doc, &path(&["k"]), Anchor::Value),
            LineColumn {
                line: 1,
                column: 17
            }
        );
        // serde_json's byte column 18 of line 1 is the same place.
        assert_eq!(
            from_serde_position(doc, 1, 19),
            LineColumn {
                line: 1,
                column: 17
            }
        );
    }

    #[test]
    fn never_panics_on_truncated_text() {
        for doc in ["", "{", "{\"a\"", "{\"a\": [1,", "[\"\\", "{\"a\": \"é"] {
            let p = path(&["a"]).index(3);
            let at = locate(doc, &p, Anchor::Key);
            assert!(at.line >= 1 && at.column >= 1);
        }
    }
}
