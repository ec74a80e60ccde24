//! Policy input: the vendor dialects, the `allowed_hosts` grammar and the
//! expansions (package managers, MCP servers, extra hosts, safety blocklist).
//!
//! [`load`] is the one way in: text → [`input`] (dialect, positions) →
//! [`hosts`] (grammar, normalization) → [`expansions`] → a merged, sorted
//! [`Policy`]. Every input error names where it is (`origin:line:column:
//! json.path`) and what to write instead.

pub mod expansions;
pub mod hosts;
mod input;
pub mod position;
mod types;

use std::collections::BTreeMap;
use std::fmt;

pub use expansions::Expansions;
pub use types::*;

use hosts::{HostSpec, InvalidHost};
use input::{Document, Networking};
use position::{Anchor, JsonPath};

/// Where in an input a problem is: `origin:line:column` and, inside a JSON
/// document, the path of the value (`config.networking.allowed_hosts[2]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub origin: String,
    pub line: usize,
    pub column: usize,
    pub path: Option<String>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.origin, self.line, self.column)?;
        if let Some(path) = &self.path {
            write!(f, ": {path}")?;
        }
        Ok(())
    }
}

/// Everything that can be wrong with a policy or its expansions, one variant
/// per stage. Every message names the place and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The policy text is not JSON.
    #[error("{at}: invalid JSON: {message}")]
    Syntax { at: Location, message: String },
    /// The policy is JSON but not a policy: shape, keys, types, dialect.
    #[error("{at}: {message}")]
    Schema { at: Location, message: String },
    /// An `allowed_hosts` entry the grammar rejects.
    #[error("{at}: {reason}")]
    HostEntry { at: Location, reason: InvalidHost },
    /// The embedded expansion data (policies/*.toml) is invalid.
    #[error("{at}: {message}")]
    ExpansionData { at: Location, message: String },
    /// The `--agent` file: not JSON, wrong shape, or a bad MCP server URL.
    #[error("{at}: {message}")]
    AgentFile { at: Location, message: String },
    /// An MCP server URL (`--mcp-server`, or an `Expansions` built by hand).
    #[error("{origin} {reason}")]
    McpServer { origin: String, reason: InvalidHost },
    /// An `--extra-host` the grammar rejects.
    #[error("--extra-host {0}")]
    ExtraHost(InvalidHost),
}

/// Parse, validate, expand and normalize a policy document.
/// `origin` names the input in messages (a file path, or `<stdin>`).
pub fn load(text: &str, origin: &str, expansions: &Expansions) -> Result<Policy, Error> {
    let doc = Document { text, origin };
    let input = input::read(&doc)?;
    let blocklist = expansions::safety_blocklist()?;

    // Flags are validated in every mode: bad input is bad input even when
    // unrestricted makes it moot.
    let extra: Vec<(&str, HostSpec)> = expansions
        .extra_hosts
        .iter()
        .map(|entry| {
            hosts::parse_entry(entry)
                .map(|spec| (entry.as_str(), spec))
                .map_err(Error::ExtraHost)
        })
        .collect::<Result<_, _>>()?;
    let mcp: Vec<(&str, &str, HostSpec)> = expansions
        .mcp_servers
        .iter()
        .map(|(name, url)| {
            hosts::parse_url(url)
                .map(|spec| (name.as_str(), url.as_str(), spec))
                .map_err(|reason| Error::McpServer {
                    origin: format!("MCP server {name:?}:"),
                    reason,
                })
        })
        .collect::<Result<_, _>>()?;

    let mut warnings = Vec::new();
    let (mode, allowed_hosts, allow_package_managers, allow_mcp_servers) = match input.networking {
        Networking::Unrestricted => (Mode::Unrestricted, Vec::new(), false, false),
        Networking::Limited {
            allowed_hosts,
            allow_package_managers,
            allow_mcp_servers,
        } => (
            Mode::Limited,
            allowed_hosts,
            allow_package_managers,
            allow_mcp_servers,
        ),
        Networking::AllowedHosts { allowed_hosts } => (Mode::Limited, allowed_hosts, false, false),
    };
    if mode == Mode::Unrestricted {
        return Ok(Policy {
            mode,
            dialect: input.dialect,
            rules: Vec::new(),
            blocklist,
            warnings,
        });
    }
    let networking_path = input.path.unwrap_or_default();

    let mut rules = RuleMerger::default();
    for entry in &allowed_hosts {
        let spec = hosts::parse_entry(&entry.text).map_err(|reason| Error::HostEntry {
            at: doc.location(&entry.path, Anchor::Value),
            reason,
        })?;
        rules.add(
            spec,
            Source::AllowedHosts,
            &entry.text,
            Provenance::Json(entry.path.clone()),
        );
    }

    if allow_package_managers {
        for manager in expansions::package_managers()? {
            for host in manager.hosts {
                let place = Provenance::Data(format!(
                    "package manager {}: {:?}",
                    manager.name, host.entry
                ));
                rules.add(
                    host.spec,
                    Source::PackageManager(manager.name.clone()),
                    &host.entry,
                    place,
                );
            }
        }
    }

    match (allow_mcp_servers, mcp.is_empty()) {
        (true, true) => warnings.push(format!(
            "{}: is true but no MCP server was given (--agent FILE or --mcp-server URL); no MCP host is allowed",
            doc.location(&networking_path.key("allow_mcp_servers"), Anchor::Value)
        )),
        (true, false) => {
            for (name, url, spec) in mcp {
                rules.add(
                    spec,
                    Source::Mcp(name.to_string()),
                    url,
                    Provenance::Data(format!("MCP server {name:?}")),
                );
            }
        }
        (false, false) => {
            let names: Vec<String> = mcp.iter().map(|(name, _, _)| format!("{name:?}")).collect();
            let why = match input.dialect {
                Dialect::AllowedHosts => "type \"allowed_hosts\" allows only its list",
                _ => "allow_mcp_servers is not true",
            };
            warnings.push(format!(
                "{}: {} MCP server(s) given ({}) but {why}; they are not allowed",
                doc.location(&networking_path, Anchor::Value),
                names.len(),
                names.join(", ")
            ));
        }
        (false, true) => {}
    }

    for (entry, spec) in extra {
        rules.add(
            spec,
            Source::Extra,
            entry,
            Provenance::Data(format!("--extra-host {entry:?}")),
        );
    }

    for (rule, place) in rules.rules.values() {
        let Target::Net(net) = rule.target else {
            continue;
        };
        if let Some(block) = expansions::blocking_entry(&blocklist, &net) {
            warnings.push(format!(
                "{}: {:?} lies inside the safety blocklist entry {} ({}); it stays blocked",
                place.describe(&doc),
                rule.entry,
                block.net,
                block.reason
            ));
        }
    }
    let rules: Vec<HostRule> = rules.rules.into_values().map(|(rule, _)| rule).collect();
    if rules.is_empty() {
        warnings.push(format!(
            "{}: allows no destination; every connection except DNS to the configured resolvers will be blocked",
            doc.location(&networking_path, Anchor::Value)
        ));
    }
    Ok(Policy {
        mode,
        dialect: input.dialect,
        rules,
        blocklist,
        warnings,
    })
}

/// Where a rule's first entry came from, for warnings. A JSON path is only
/// turned into line:column when a warning needs it (locating is a text scan).
enum Provenance {
    Json(JsonPath),
    Data(String),
}

impl Provenance {
    fn describe(&self, doc: &Document) -> String {
        match self {
            Provenance::Json(path) => doc.location(path, Anchor::Value).to_string(),
            Provenance::Data(text) => text.clone(),
        }
    }
}

/// Merges entries by target: ports united (`Any` absorbs), sources united,
/// the first entry written kept. The map keeps rules sorted by target.
#[derive(Default)]
struct RuleMerger {
    rules: BTreeMap<Target, (HostRule, Provenance)>,
}

impl RuleMerger {
    fn add(&mut self, spec: HostSpec, source: Source, entry: &str, place: Provenance) {
        match self.rules.get_mut(&spec.target) {
            Some((rule, _)) => {
                rule.ports = rule.ports.union(&spec.ports);
                rule.sources.insert(source);
            }
            None => {
                let rule = HostRule {
                    target: spec.target.clone(),
                    ports: spec.ports,
                    sources: [source].into(),
                    entry: entry.to_string(),
                };
                self.rules.insert(spec.target, (rule, place));
            }
        }
    }
}

impl Document<'_> {
    /// The location of `path` in this document.
    pub(crate) fn location(&self, path: &JsonPath, anchor: Anchor) -> Location {
        let at = position::locate(self.text, path, anchor);
        Location {
            origin: self.origin.to_string(),
            line: at.line,
            column: at.column,
            path: (!path.is_root()).then(|| path.to_string()),
        }
    }
}

#[cfg(test)]
mod tests;
