//! The input dialects: finding the `networking` object in what the platform
//! APIs send and return, and reading it with errors a user can act on.
//!
//! Accepted documents (see the API pages in the seeds):
//! - an Environment object (`{"id": "env_…", "type": "environment", "config": {…}}`)
//!   or a create/update request body (`{"name": …, "config": {…}}`): `config.networking`;
//! - a bare config object (`{"type": "cloud", "networking": {…}}`): `networking`;
//! - a bare networking object (`{"type": "limited", …}`): the document itself.
//!
//! A config without `networking`, or a request without `config`, is
//! unrestricted, as the APIs define. Keys outside `networking` are ignored
//! (the platforms add fields), except a near-miss of `config` or
//! `networking`: that typo would silently turn a limited policy into an
//! unrestricted one, so it is an error.
//!
//! Inside `networking` everything is checked: unknown and duplicate keys,
//! the `type`, the value types, and fields that mean nothing for the type.

use serde_json::{Map, Value};

use super::position::{self, Anchor, JsonPath, LineColumn};
use super::{Dialect, Error, Location};

/// A JSON document and the name it is known by in messages.
pub(crate) struct Document<'a> {
    pub text: &'a str,
    pub origin: &'a str,
}

/// One `allowed_hosts` string and where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HostEntryInput {
    pub text: String,
    pub path: JsonPath,
}

/// The networking object, read and checked; entries not yet parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Networking {
    Unrestricted,
    Limited {
        allowed_hosts: Vec<HostEntryInput>,
        allow_package_managers: bool,
        allow_mcp_servers: bool,
    },
    AllowedHosts {
        allowed_hosts: Vec<HostEntryInput>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Input {
    pub dialect: Dialect,
    pub networking: Networking,
    /// Where the networking object is; `None` when the document has none.
    pub path: Option<JsonPath>,
}

pub(crate) const NETWORKING_TYPES: [&str; 3] = ["unrestricted", "limited", "allowed_hosts"];
const NETWORKING_KEYS: [&str; 4] = [
    "type",
    "allowed_hosts",
    "allow_package_managers",
    "allow_mcp_servers",
];
/// `config.type` values (Claude Managed Agents: `cloud`, `self_hosted`).
const CONFIG_TYPES: [&str; 2] = ["cloud", "self_hosted"];
/// `type` of an Environment object as the APIs return it.
const ENVIRONMENT_TYPE: &str = "environment";

const EXAMPLE_LIMITED: &str = r#"{"type": "limited", "allowed_hosts": ["api.example.com"]}"#;

impl Document<'_> {
    pub(crate) fn schema_error(
        &self,
        path: &JsonPath,
        anchor: Anchor,
        message: impl Into<String>,
    ) -> Error {
        Error::Schema {
            at: self.location(path, anchor),
            message: message.into(),
        }
    }

    fn location_at(&self, at: LineColumn, path: &JsonPath) -> Location {
        Location {
            origin: self.origin.to_string(),
            line: at.line,
            column: at.column,
            path: (!path.is_root()).then(|| path.to_string()),
        }
    }

    /// Where a serde_json syntax error is, and its message without serde_json's
    /// own " at line L column C" suffix (the location is printed in front).
    pub(crate) fn syntax_location(&self, err: &serde_json::Error) -> (Location, String) {
        let at = position::from_serde_position(self.text, err.line(), err.column());
        let mut message = err.to_string();
        let suffix = format!(" at line {} column {}", err.line(), err.column());
        if let Some(stripped) = message.strip_suffix(&suffix) {
            message = stripped.to_string();
        }
        // serde_json's words for "this is not where a value can start".
        if message == "expected ident" || message == "expected value" {
            message = "expected a JSON value: an object, an array, a string, a number, true, false or null".into();
        }
        (self.location_at(at, &JsonPath::root()), message)
    }

    /// Parse the document as JSON; a syntax error names line and column.
    pub(crate) fn parse_json(&self) -> Result<Value, (Location, String)> {
        serde_json::from_str(self.text).map_err(|e| self.syntax_location(&e))
    }
}

/// How a value reads in a message: `null`, `true`, `the number 3`, `the string "x"`, ...
pub(crate) fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string {s:?}"),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

/// Find and read the networking object of a policy document.
pub(crate) fn read(doc: &Document) -> Result<Input, Error> {
    let root = doc
        .parse_json()
        .map_err(|(at, message)| Error::Syntax { at, message })?;
    let root_path = JsonPath::root();
    let Value::Object(top) = &root else {
        return Err(doc.schema_error(
            &root_path,
            Anchor::Value,
            format!(
                "expected a JSON object (an Environment, a create request, a config or a networking object); found {}",
                describe(&root)
            ),
        ));
    };

    if let Some(config) = top.get("config") {
        let config_path = root_path.key("config");
        let Value::Object(config) = config else {
            return Err(doc.schema_error(
                &config_path,
                Anchor::Value,
                format!(
                    "must be an object such as {{\"type\": \"cloud\", \"networking\": {EXAMPLE_LIMITED}}}; found {}",
                    describe(config)
                ),
            ));
        };
        return match config.get("networking") {
            Some(networking) => read_networking(doc, networking, &config_path.key("networking")),
            None => {
                reject_near_miss(doc, config, &config_path, &["networking"])?;
                Ok(unrestricted_by_default())
            }
        };
    }
    if let Some(networking) = top.get("networking") {
        return read_networking(doc, networking, &root_path.key("networking"));
    }
    match top.get("type") {
        Some(Value::String(t)) if CONFIG_TYPES.contains(&t.as_str()) => {
            reject_near_miss(doc, top, &root_path, &["networking"])?;
            Ok(unrestricted_by_default())
        }
        Some(Value::String(t)) if t == ENVIRONMENT_TYPE => {
            reject_near_miss(doc, top, &root_path, &["config", "networking"])?;
            Ok(unrestricted_by_default())
        }
        Some(_) => read_networking(doc, &root, &root_path),
        None if top.is_empty()
            || top.keys().any(|k| {
                NETWORKING_KEYS.contains(&k.as_str()) || closest(k, &NETWORKING_KEYS).is_some()
            }) =>
        {
            read_networking(doc, &root, &root_path)
        }
        None => {
            // A create request with no `config`: the platforms default to unrestricted.
            reject_near_miss(doc, top, &root_path, &["config", "networking"])?;
            Ok(unrestricted_by_default())
        }
    }
}

fn unrestricted_by_default() -> Input {
    Input {
        dialect: Dialect::Unrestricted,
        networking: Networking::Unrestricted,
        path: None,
    }
}

/// Errors on a key that looks like a misspelt `wanted` key whose absence
/// would make the policy unrestricted.
fn reject_near_miss(
    doc: &Document,
    object: &Map<String, Value>,
    path: &JsonPath,
    wanted: &[&str],
) -> Result<(), Error> {
    for key in object.keys() {
        if let Some(near) = closest(key, wanted) {
            return Err(doc.schema_error(
                &path.key(key),
                Anchor::Key,
                format!(
                    "unknown key {key:?} looks like a misspelt {near:?}; without {near:?} the policy would be unrestricted, so netleash will not guess: rename it to {near:?}, or remove it"
                ),
            ));
        }
    }
    Ok(())
}

/// The known name `key` is most likely a misspelling of, if any: the same
/// once case and `-`/`_` are ignored, or within a small edit distance.
pub(crate) fn closest<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    let squash = |s: &str| s.to_lowercase().replace(['-', '_'], "");
    if known.contains(&key) {
        return None;
    }
    if let Some(same) = known.iter().find(|k| squash(k) == squash(key)) {
        return Some(same);
    }
    let lower = key.to_lowercase();
    known
        .iter()
        .map(|k| (strsim::osa_distance(&lower, k), *k))
        .filter(|&(distance, k)| distance <= (k.len() / 5).max(2) && lower.len() >= 3)
        .min_by_key(|&(distance, _)| distance)
        .map(|(_, k)| k)
}

fn read_networking(doc: &Document, value: &Value, path: &JsonPath) -> Result<Input, Error> {
    let object = match value {
        Value::Object(object) => object,
        Value::String(shorthand) => {
            let object_form = match shorthand.as_str() {
                "unrestricted" => r#"{"type": "unrestricted"}"#,
                "allowed_hosts" => {
                    r#"{"type": "allowed_hosts", "allowed_hosts": ["api.example.com"]}"#
                }
                _ => EXAMPLE_LIMITED,
            };
            return Err(doc.schema_error(
                path,
                Anchor::Value,
                format!(
                    "the string shorthand {shorthand:?} is not accepted (the platform APIs reject it with 400); write the object form {object_form}"
                ),
            ));
        }
        other => {
            return Err(doc.schema_error(
                path,
                Anchor::Value,
                format!(
                    "must be an object such as {{\"type\": \"unrestricted\"}} or {EXAMPLE_LIMITED}; found {}",
                    describe(other)
                ),
            ));
        }
    };

    // Duplicate keys: JSON parsers disagree on which one wins (RFC 8259 §4),
    // so a policy that relies on one of them is ambiguous.
    let keys = position::object_keys(doc.text, path);
    for (i, (key, at)) in keys.iter().enumerate() {
        if let Some((_, first)) = keys[..i].iter().find(|(k, _)| k == key) {
            return Err(Error::Schema {
                at: doc.location_at(*at, &path.key(key)),
                message: format!(
                    "duplicate key {key:?} (first at line {}, column {}); JSON parsers disagree on which one counts, so write it once",
                    first.line, first.column
                ),
            });
        }
    }

    for (key, at) in &keys {
        if NETWORKING_KEYS.contains(&key.as_str()) {
            continue;
        }
        let message = match closest(key, &NETWORKING_KEYS) {
            Some(near) => format!("unknown key {key:?}; did you mean {near:?}?"),
            None => format!(
                "unknown key {key:?}; networking keys are \"type\", \"allowed_hosts\", \"allow_package_managers\" and \"allow_mcp_servers\""
            ),
        };
        return Err(Error::Schema {
            at: doc.location_at(*at, &path.key(key)),
            message,
        });
    }

    let type_path = path.key("type");
    let dialect = match object.get("type") {
        None => {
            return Err(doc.schema_error(
                path,
                Anchor::Value,
                format!(
                    "missing \"type\"; networking is {{\"type\": \"unrestricted\"}}, {EXAMPLE_LIMITED}, or {{\"type\": \"allowed_hosts\", \"allowed_hosts\": [...]}}"
                ),
            ));
        }
        Some(Value::String(t)) => match t.as_str() {
            "unrestricted" => Dialect::Unrestricted,
            "limited" => Dialect::Limited,
            "allowed_hosts" => Dialect::AllowedHosts,
            other => {
                let hint = closest_type(other)
                    .map(|t| format!(" (did you mean {t:?}?)"))
                    .unwrap_or_default();
                return Err(doc.schema_error(
                    &type_path,
                    Anchor::Value,
                    format!(
                        "unknown networking type {other:?}{hint}; valid types are \"unrestricted\", \"limited\" and \"allowed_hosts\""
                    ),
                ));
            }
        },
        Some(other) => {
            return Err(doc.schema_error(
                &type_path,
                Anchor::Value,
                format!(
                    "must be one of the strings \"unrestricted\", \"limited\" and \"allowed_hosts\"; found {}",
                    describe(other)
                ),
            ));
        }
    };

    let hosts_path = path.key("allowed_hosts");
    let allowed_hosts = match object.get("allowed_hosts") {
        None => None,
        Some(Value::Array(items)) => Some(
            items
                .iter()
                .enumerate()
                .map(|(i, item)| match item {
                    Value::String(text) => Ok(HostEntryInput {
                        text: text.clone(),
                        path: hosts_path.index(i),
                    }),
                    other => Err(doc.schema_error(
                        &hosts_path.index(i),
                        Anchor::Value,
                        format!(
                            "must be a host string such as \"api.example.com\"; found {}",
                            describe(other)
                        ),
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
        Some(other) => {
            return Err(doc.schema_error(
                &hosts_path,
                Anchor::Value,
                format!(
                    "must be an array of host strings, such as [\"api.example.com\"]; found {}",
                    describe(other)
                ),
            ));
        }
    };
    let flag = |key: &str| -> Result<bool, Error> {
        match object.get(key) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(doc.schema_error(
                &path.key(key),
                Anchor::Value,
                format!("must be true or false; found {}", describe(other)),
            )),
        }
    };
    let allow_package_managers = flag("allow_package_managers")?;
    let allow_mcp_servers = flag("allow_mcp_servers")?;

    let networking = match dialect {
        Dialect::Unrestricted => {
            // The defaults ([] and false) are tolerated: an API may echo them.
            if allowed_hosts.as_ref().is_some_and(|h| !h.is_empty()) {
                return Err(doc.schema_error(
                    &hosts_path,
                    Anchor::Key,
                    "has no effect with type \"unrestricted\", which allows every destination; to allow only these hosts, use {\"type\": \"limited\", \"allowed_hosts\": [...]}",
                ));
            }
            for key in ["allow_package_managers", "allow_mcp_servers"] {
                if flag(key)? {
                    return Err(doc.schema_error(
                        &path.key(key),
                        Anchor::Key,
                        format!(
                            "has no effect with type \"unrestricted\", which allows every destination; remove it, or use {{\"type\": \"limited\", \"{key}\": true}} to allow only what the policy lists"
                        ),
                    ));
                }
            }
            Networking::Unrestricted
        }
        Dialect::Limited => Networking::Limited {
            allowed_hosts: allowed_hosts.unwrap_or_default(),
            allow_package_managers,
            allow_mcp_servers,
        },
        Dialect::AllowedHosts => {
            for key in ["allow_package_managers", "allow_mcp_servers"] {
                if flag(key)? {
                    return Err(doc.schema_error(
                        &path.key(key),
                        Anchor::Key,
                        format!(
                            "belongs to type \"limited\"; type \"allowed_hosts\" allows only its list. To keep the list and add this, use {{\"type\": \"limited\", \"allowed_hosts\": [...], \"{key}\": true}}"
                        ),
                    ));
                }
            }
            let Some(allowed_hosts) = allowed_hosts else {
                return Err(doc.schema_error(
                    path,
                    Anchor::Value,
                    "type \"allowed_hosts\" needs an \"allowed_hosts\" list, as in {\"type\": \"allowed_hosts\", \"allowed_hosts\": [\"api.github.com\"]}",
                ));
            };
            Networking::AllowedHosts { allowed_hosts }
        }
    };
    Ok(Input {
        dialect,
        networking,
        path: Some(path.clone()),
    })
}

/// A networking type the user probably meant: only case, separators or one
/// typo away, so "restricted" is never "corrected" to "unrestricted".
fn closest_type(written: &str) -> Option<&'static str> {
    let squash = |s: &str| s.to_lowercase().replace(['-', '_', ' '], "");
    NETWORKING_TYPES.into_iter().find(|t| {
        squash(t) == squash(written) || strsim::osa_distance(&written.to_lowercase(), t) <= 1
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_text(text: &str) -> Result<Input, String> {
        read(&Document {
            text,
            origin: "p.json",
        })
        .map_err(|e| e.to_string())
    }

    fn entries(input: &Input) -> Vec<&str> {
        match &input.networking {
            Networking::Limited { allowed_hosts, .. }
            | Networking::AllowedHosts { allowed_hosts } => {
                allowed_hosts.iter().map(|h| h.text.as_str()).collect()
            }
            Networking::Unrestricted => Vec::new(),
        }
    }

    #[test]
    fn finds_networking_in_every_document_shape() {
        let shapes = [
            (
                r#"{"id": "env_1", "type": "environment", "config": {"type": "cloud", "networking": {"type": "limited"}}}"#,
                "config.networking",
            ),
            (
                r#"{"name": "n", "config": {"type": "cloud", "networking": {"type": "limited"}}}"#,
                "config.networking",
            ),
            (
                r#"{"type": "cloud", "networking": {"type": "limited"}}"#,
                "networking",
            ),
            (r#"{"type": "limited"}"#, "(top level)"),
        ];
        for (text, path) in shapes {
            let input = read_text(text).unwrap();
            assert_eq!(input.dialect, Dialect::Limited, "{text}");
            assert_eq!(input.path.unwrap().to_string(), path);
        }
    }

    #[test]
    fn no_networking_is_unrestricted() {
        for text in [
            r#"{"name": "n", "config": {"type": "cloud", "packages": {"pip": ["x"]}}}"#,
            r#"{"type": "cloud"}"#,
            r#"{"id": "env_1", "type": "environment", "name": "x"}"#,
            r#"{"name": "only-a-name", "description": "d"}"#,
        ] {
            let input = read_text(text).unwrap();
            assert_eq!(input, unrestricted_by_default(), "{text}");
        }
    }

    #[test]
    fn dialects_and_defaults() {
        let input = read_text(r#"{"type": "limited"}"#).unwrap();
        assert_eq!(
            input.networking,
            Networking::Limited {
                allowed_hosts: vec![],
                allow_package_managers: false,
                allow_mcp_servers: false
            }
        );
        let input = read_text(
            r#"{"type": "limited", "allowed_hosts": ["a.com"], "allow_package_managers": true, "allow_mcp_servers": true}"#,
        )
        .unwrap();
        assert!(matches!(
            input.networking,
            Networking::Limited {
                allow_package_managers: true,
                allow_mcp_servers: true,
                ..
            }
        ));
        assert_eq!(entries(&input), ["a.com"]);
        let input =
            read_text(r#"{"type": "allowed_hosts", "allowed_hosts": ["a.com", "b.com"]}"#).unwrap();
        assert_eq!(input.dialect, Dialect::AllowedHosts);
        assert_eq!(entries(&input), ["a.com", "b.com"]);
        let input = read_text(r#"{"type": "unrestricted"}"#).unwrap();
        assert_eq!(input.networking, Networking::Unrestricted);
        // Defaults echoed by an API are fine with unrestricted.
        let input = read_text(
            r#"{"type": "unrestricted", "allowed_hosts": [], "allow_mcp_servers": false}"#,
        )
        .unwrap();
        assert_eq!(input.networking, Networking::Unrestricted);
    }

    #[test]
    fn entry_paths_are_recorded() {
        let input = read_text(
            r#"{"config": {"networking": {"type": "limited", "allowed_hosts": ["a", "b"]}}}"#,
        )
        .unwrap();
        let Networking::Limited { allowed_hosts, .. } = input.networking else {
            panic!()
        };
        assert_eq!(
            allowed_hosts[1].path.to_string(),
            "config.networking.allowed_hosts[1]"
        );
    }

    #[test]
    fn unknown_keys_outside_networking_are_ignored() {
        let text = r#"{"name": "x", "extra": {"anything": 1}, "config": {"type": "cloud", "base_template": "hermes",
            "networking": {"type": "allowed_hosts", "allowed_hosts": ["a.com"]}}}"#;
        assert_eq!(read_text(text).unwrap().dialect, Dialect::AllowedHosts);
    }

    #[test]
    fn schema_errors() {
        let cases = [
            (
                "[1]",
                "p.json:1:1: expected a JSON object (an Environment, a create request, a config or a networking object); found an array",
            ),
            (
                r#"{"config": "x"}"#,
                "p.json:1:12: config: must be an object such as {\"type\": \"cloud\", \"networking\": {\"type\": \"limited\", \"allowed_hosts\": [\"api.example.com\"]}}; found the string \"x\"",
            ),
            (
                r#"{"networking": "unrestricted"}"#,
                "p.json:1:16: networking: the string shorthand \"unrestricted\" is not accepted (the platform APIs reject it with 400); write the object form {\"type\": \"unrestricted\"}",
            ),
            (
                r#"{"networking": null}"#,
                "p.json:1:16: networking: must be an object such as {\"type\": \"unrestricted\"} or {\"type\": \"limited\", \"allowed_hosts\": [\"api.example.com\"]}; found null",
            ),
            (
                r#"{"type": "limited", "allowed_host": []}"#,
                "p.json:1:21: allowed_host: unknown key \"allowed_host\"; did you mean \"allowed_hosts\"?",
            ),
            (
                r#"{"type": "limited", "allowedHosts": []}"#,
                "p.json:1:21: allowedHosts: unknown key \"allowedHosts\"; did you mean \"allowed_hosts\"?",
            ),
            (
                r#"{"type": "limited", "zzz": 1}"#,
                "p.json:1:21: zzz: unknown key \"zzz\"; networking keys are \"type\", \"allowed_hosts\", \"allow_package_managers\" and \"allow_mcp_servers\"",
            ),
            (
                r#"{"type": "limited", "type": "unrestricted"}"#,
                "p.json:1:21: type: duplicate key \"type\" (first at line 1, column 2); JSON parsers disagree on which one counts, so write it once",
            ),
            (
                r#"{"allowed_hosts": []}"#,
                "p.json:1:1: missing \"type\"; networking is {\"type\": \"unrestricted\"}, {\"type\": \"limited\", \"allowed_hosts\": [\"api.example.com\"]}, or {\"type\": \"allowed_hosts\", \"allowed_hosts\": [...]}",
            ),
            (
                r#"{}"#,
                "p.json:1:1: missing \"type\"; networking is {\"type\": \"unrestricted\"}, {\"type\": \"limited\", \"allowed_hosts\": [\"api.example.com\"]}, or {\"type\": \"allowed_hosts\", \"allowed_hosts\": [...]}",
            ),
            (
                r#"{"type": "Limited"}"#,
                "p.json:1:10: type: unknown networking type \"Limited\" (did you mean \"limited\"?); valid types are \"unrestricted\", \"limited\" and \"allowed_hosts\"",
            ),
            (
                r#"{"type": "restricted"}"#,
                "p.json:1:10: type: unknown networking type \"restricted\"; valid types are \"unrestricted\", \"limited\" and \"allowed_hosts\"",
            ),
            (
                r#"{"type": 3}"#,
                "p.json:1:10: type: must be one of the strings \"unrestricted\", \"limited\" and \"allowed_hosts\"; found the number 3",
            ),
            (
                r#"{"type": "limited", "allowed_hosts": "a.com"}"#,
                "p.json:1:38: allowed_hosts: must be an array of host strings, such as [\"api.example.com\"]; found the string \"a.com\"",
            ),
            (
                r#"{"type": "limited", "allowed_hosts": ["a.com", 7]}"#,
                "p.json:1:48: allowed_hosts[1]: must be a host string such as \"api.example.com\"; found the number 7",
            ),
            (
                r#"{"type": "limited", "allow_package_managers": "yes"}"#,
                "p.json:1:47: allow_package_managers: must be true or false; found the string \"yes\"",
            ),
            (
                r#"{"type": "unrestricted", "allowed_hosts": ["a.com"]}"#,
                "p.json:1:26: allowed_hosts: has no effect with type \"unrestricted\", which allows every destination; to allow only these hosts, use {\"type\": \"limited\", \"allowed_hosts\": [...]}",
            ),
            (
                r#"{"type": "allowed_hosts"}"#,
                "p.json:1:1: type \"allowed_hosts\" needs an \"allowed_hosts\" list, as in {\"type\": \"allowed_hosts\", \"allowed_hosts\": [\"api.github.com\"]}",
            ),
            (
                r#"{"config": {"type": "cloud", "netwroking": {"type": "limited"}}}"#,
                "p.json:1:30: config.netwroking: unknown key \"netwroking\" looks like a misspelt \"networking\"; without \"networking\" the policy would be unrestricted, so netleash will not guess: rename it to \"networking\", or remove it",
            ),
            (
                r#"{"name": "x", "Config": {}}"#,
                "p.json:1:15: Config: unknown key \"Config\" looks like a misspelt \"config\"; without \"config\" the policy would be unrestricted, so netleash will not guess: rename it to \"config\", or remove it",
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(read_text(text).unwrap_err(), expected, "{text}");
        }
    }

    #[test]
    fn syntax_errors_have_positions() {
        let err = read_text("{\n  \"type\": \"limited\",\n}").unwrap_err();
        assert_eq!(err, "p.json:3:1: invalid JSON: trailing comma");
        let err = read_text("{\"é\": \"ü\" x}").unwrap_err();
        assert_eq!(err, "p.json:1:11: invalid JSON: expected `,` or `}`");
        let err = read_text("").unwrap_err();
        assert_eq!(err, "p.json:1:1: invalid JSON: EOF while parsing a value");
        let err = read_text("type: limited").unwrap_err();
        assert_eq!(
            err,
            "p.json:1:2: invalid JSON: expected a JSON value: an object, an array, a string, a number, true, false or null"
        );
    }

    #[test]
    fn closest_names() {
        assert_eq!(
            closest("allowed_host", &NETWORKING_KEYS),
            Some("allowed_hosts")
        );
        assert_eq!(
            closest("allow_package_manager", &NETWORKING_KEYS),
            Some("allow_package_managers")
        );
        assert_eq!(
            closest("ALLOW-MCP-SERVERS", &NETWORKING_KEYS),
            Some("allow_mcp_servers")
        );
        assert_eq!(closest("typ", &NETWORKING_KEYS), Some("type"));
        assert_eq!(closest("bogus_key", &NETWORKING_KEYS), None);
        assert_eq!(closest("packages", &["config", "networking"]), None);
        assert_eq!(closest("name", &["config", "networking"]), None);
        assert_eq!(closest_type("allowed-hosts"), Some("allowed_hosts"));
        assert_eq!(closest_type("limitd"), Some("limited"));
        assert_eq!(closest_type("restricted"), None);
    }
}
