//! What a policy is expanded with besides its own `allowed_hosts`:
//! - the package-manager registries (`policies/package-managers.toml`);
//! - the safety blocklist (`policies/safety-blocklist.toml`), in both modes;
//! - MCP servers of the agent (`--agent FILE`, `--mcp-server URL`);
//! - extra platform hosts (`--extra-host HOST`).
//!
//! The two data files are embedded at build time, so the binary works from
//! any directory; their loaders are public so tests can parse the files on
//! disk and variants of them.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::Deserialize;
use serde_json::Value;
use toml::Spanned;

use super::hosts::{self, HostSpec};
use super::input::{Document, describe};
use super::position::{self, Anchor, JsonPath};
use super::{BlockEntry, Error, Location};

/// Where the embedded data comes from, as named in messages.
pub const PACKAGE_MANAGERS_FILE: &str = "policies/package-managers.toml";
pub const SAFETY_BLOCKLIST_FILE: &str = "policies/safety-blocklist.toml";

const PACKAGE_MANAGERS_TOML: &str = include_str!("../../policies/package-managers.toml");
const SAFETY_BLOCKLIST_TOML: &str = include_str!("../../policies/safety-blocklist.toml");

/// What a policy is expanded with, besides the policy object itself.
#[derive(Debug, Clone, Default)]
pub struct Expansions {
    /// MCP servers of the agent (`--agent FILE`, `--mcp-server URL`): (name, url).
    pub mcp_servers: Vec<(String, String)>,
    /// Platform hosts every sandbox needs (`--extra-host`), in the allowed_hosts grammar.
    pub extra_hosts: Vec<String>,
}

impl Expansions {
    /// Adds the MCP servers of an agent file: a JSON agent object whose
    /// `mcp_servers` is an array of `{"type": "url", "name": "...", "url": "https://..."}`
    /// (Claude Managed Agents' shape). Other keys are ignored; a missing
    /// `mcp_servers` adds nothing. Errors name `origin`, line:column and path.
    pub fn add_agent_file(&mut self, text: &str, origin: &str) -> Result<(), Error> {
        let doc = Document { text, origin };
        let agent_error = |path: &JsonPath, message: String| Error::AgentFile {
            at: doc.location(path, Anchor::Value),
            message,
        };
        let root = doc.parse_json().map_err(|(at, message)| Error::AgentFile {
            at,
            message: format!("invalid JSON: {message}"),
        })?;
        let root_path = JsonPath::root();
        let Value::Object(agent) = &root else {
            return Err(agent_error(
                &root_path,
                format!(
                    "expected an agent object with \"mcp_servers\"; found {}",
                    describe(&root)
                ),
            ));
        };
        let servers_path = root_path.key("mcp_servers");
        let servers = match agent.get("mcp_servers") {
            None => return Ok(()),
            Some(Value::Array(servers)) => servers,
            Some(other) => {
                return Err(agent_error(
                    &servers_path,
                    format!(
                        "must be an array of {{\"type\": \"url\", \"name\": \"...\", \"url\": \"https://...\"}} objects; found {}",
                        describe(other)
                    ),
                ));
            }
        };
        let mut added = Vec::new();
        for (i, server) in servers.iter().enumerate() {
            let path = servers_path.index(i);
            let Value::Object(server) = server else {
                return Err(agent_error(
                    &path,
                    format!(
                        "must be an object such as {{\"type\": \"url\", \"name\": \"docs\", \"url\": \"https://mcp.example.com/mcp\"}}; found {}",
                        describe(server)
                    ),
                ));
            };
            match server.get("type") {
                None => {}
                Some(Value::String(t)) if t == "url" => {}
                Some(other) => {
                    return Err(agent_error(
                        &path.key("type"),
                        format!(
                            "must be \"url\" (the only MCP server type with a network destination); found {}",
                            describe(other)
                        ),
                    ));
                }
            }
            let string = |key: &str| match server.get(key) {
                Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
                Some(other) => Err(agent_error(
                    &path.key(key),
                    format!("must be a non-empty string; found {}", describe(other)),
                )),
                None => Err(agent_error(&path, format!("MCP server has no {key:?}"))),
            };
            let name = string("name")?;
            let url = string("url")?;
            hosts::parse_url(&url)
                .map_err(|reason| agent_error(&path.key("url"), reason.to_string()))?;
            added.push((name, url));
        }
        self.mcp_servers.extend(added);
        Ok(())
    }

    /// Adds `--mcp-server URL`; the server is named after its host.
    pub fn add_mcp_server_url(&mut self, url: &str) -> Result<(), Error> {
        let spec = hosts::parse_url(url).map_err(|reason| Error::McpServer {
            origin: "--mcp-server".into(),
            reason,
        })?;
        self.mcp_servers
            .push((spec.target.to_string(), url.to_string()));
        Ok(())
    }

    /// Adds `--extra-host HOST` after checking it against the grammar.
    pub fn add_extra_host(&mut self, host: &str) -> Result<(), Error> {
        hosts::parse_entry(host).map_err(Error::ExtraHost)?;
        self.extra_hosts.push(host.to_string());
        Ok(())
    }
}

/// One registry host of a package manager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryHost {
    /// As written in the data file, in the allowed_hosts grammar.
    pub entry: String,
    /// What the package manager fetches from it.
    pub purpose: String,
    pub spec: HostSpec,
}

/// A package manager and the registry hosts it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageManager {
    pub name: String,
    pub hosts: Vec<RegistryHost>,
}

/// The file's shape: one array of tables per package manager the platforms
/// support (Claude Managed Agents' `packages`: apt, cargo, gem, go, npm, pip).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PackageManagersFile {
    apt: Vec<RegistryHostRow>,
    cargo: Vec<RegistryHostRow>,
    gem: Vec<RegistryHostRow>,
    go: Vec<RegistryHostRow>,
    npm: Vec<RegistryHostRow>,
    pip: Vec<RegistryHostRow>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryHostRow {
    entry: Spanned<String>,
    purpose: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BlocklistFile {
    block: Vec<BlockRow>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BlockRow {
    net: Spanned<String>,
    reason: Spanned<String>,
}

fn data_error(text: &str, origin: &str, offset: usize, message: String) -> Error {
    let at = position::line_column(text, offset);
    Error::ExpansionData {
        at: Location {
            origin: origin.into(),
            line: at.line,
            column: at.column,
            path: None,
        },
        message,
    }
}

fn parse_toml<T: for<'de> Deserialize<'de>>(text: &str, origin: &str) -> Result<T, Error> {
    toml::from_str(text).map_err(|e| {
        let offset = e.span().map_or(0, |span| span.start);
        data_error(text, origin, offset, e.message().trim_end().to_string())
    })
}

fn non_empty(text: &str, origin: &str, field: &Spanned<String>, what: &str) -> Result<(), Error> {
    if field.get_ref().trim().is_empty() {
        return Err(data_error(
            text,
            origin,
            field.span().start,
            format!("{what} is empty; say why the entry is here"),
        ));
    }
    Ok(())
}

/// Parses a package-managers file (see `policies/package-managers.toml`).
pub fn parse_package_managers(text: &str, origin: &str) -> Result<Vec<PackageManager>, Error> {
    let file: PackageManagersFile = parse_toml(text, origin)?;
    let managers = [
        ("apt", file.apt),
        ("cargo", file.cargo),
        ("gem", file.gem),
        ("go", file.go),
        ("npm", file.npm),
        ("pip", file.pip),
    ];
    managers
        .into_iter()
        .map(|(name, rows)| {
            let hosts = rows
                .into_iter()
                .map(|row| {
                    let spec = hosts::parse_entry(row.entry.get_ref()).map_err(|e| {
                        data_error(text, origin, row.entry.span().start, format!("entry {e}"))
                    })?;
                    non_empty(text, origin, &row.purpose, "purpose")?;
                    Ok(RegistryHost {
                        entry: row.entry.into_inner(),
                        purpose: row.purpose.into_inner(),
                        spec,
                    })
                })
                .collect::<Result<Vec<_>, Error>>()?;
            Ok(PackageManager {
                name: name.to_string(),
                hosts,
            })
        })
        .collect()
}

/// Parses a safety-blocklist file (see `policies/safety-blocklist.toml`).
pub fn parse_safety_blocklist(text: &str, origin: &str) -> Result<Vec<BlockEntry>, Error> {
    let file: BlocklistFile = parse_toml(text, origin)?;
    file.block
        .into_iter()
        .map(|row| {
            let written = row.net.get_ref();
            let fail = |message: String| data_error(text, origin, row.net.span().start, message);
            let net = match written.parse::<IpAddr>() {
                Ok(addr) => IpNet::from(addr),
                Err(_) => written.parse::<IpNet>().map_err(|_| {
                    fail(format!(
                        "net {written:?} is neither an IP address nor a CIDR"
                    ))
                })?,
            };
            if net.trunc() != net {
                return Err(fail(format!(
                    "net {written:?} has host bits set; write {}",
                    net.trunc()
                )));
            }
            non_empty(text, origin, &row.reason, "reason")?;
            Ok(BlockEntry {
                net,
                reason: row.reason.into_inner(),
            })
        })
        .collect()
}

/// The embedded package-manager data.
pub fn package_managers() -> Result<Vec<PackageManager>, Error> {
    parse_package_managers(PACKAGE_MANAGERS_TOML, PACKAGE_MANAGERS_FILE)
}

/// The embedded safety blocklist.
pub fn safety_blocklist() -> Result<Vec<BlockEntry>, Error> {
    parse_safety_blocklist(SAFETY_BLOCKLIST_TOML, SAFETY_BLOCKLIST_FILE)
}

/// The most specific blocklist entry that contains all of `net`, if any.
pub fn blocking_entry<'a>(blocklist: &'a [BlockEntry], net: &IpNet) -> Option<&'a BlockEntry> {
    blocklist
        .iter()
        .filter(|b| b.net.contains(net))
        .max_by_key(|b| b.net.prefix_len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Target;

    fn manager<'a>(managers: &'a [PackageManager], name: &str) -> &'a PackageManager {
        managers.iter().find(|m| m.name == name).unwrap()
    }

    fn has_name(manager: &PackageManager, name: &str) -> bool {
        manager
            .hosts
            .iter()
            .any(|h| h.spec.target == Target::Name(name.into()))
    }

    #[test]
    fn embedded_package_managers_parse_and_hold_the_real_registries() {
        let managers = package_managers().unwrap();
        let names: Vec<&str> = managers.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["apt", "cargo", "gem", "go", "npm", "pip"]);
        for m in &managers {
            assert!(!m.hosts.is_empty(), "{} has no host", m.name);
        }
        // The facts enforcement relies on are asserted in tests/integration/policies.rs.
        assert!(has_name(
            manager(&managers, "pip"),
            "files.pythonhosted.org"
        ));
    }

    #[test]
    fn embedded_blocklist_parses() {
        let blocklist = safety_blocklist().unwrap();
        let nets: Vec<String> = blocklist.iter().map(|b| b.net.to_string()).collect();
        for net in [
            "169.254.0.0/16",
            "169.254.169.254/32",
            "100.100.100.200/32",
            "168.63.129.16/32",
            "fd00:ec2::254/128",
            "fe80::/10",
        ] {
            assert!(nets.contains(&net.to_string()), "blocklist lacks {net}");
        }
        assert!(blocklist.iter().all(|b| !b.reason.is_empty()));
    }

    #[test]
    fn blocking_entry_picks_the_most_specific() {
        let blocklist = safety_blocklist().unwrap();
        let imds: IpNet = "169.254.169.254/32".parse().unwrap();
        assert_eq!(blocking_entry(&blocklist, &imds).unwrap().net, imds);
        let other: IpNet = "169.254.1.0/24".parse().unwrap();
        assert_eq!(
            blocking_entry(&blocklist, &other).unwrap().net.to_string(),
            "169.254.0.0/16"
        );
        let wider: IpNet = "169.0.0.0/8".parse().unwrap();
        assert!(blocking_entry(&blocklist, &wider).is_none());
        let public: IpNet = "192.0.2.1/32".parse().unwrap();
        assert!(blocking_entry(&blocklist, &public).is_none());
    }

    #[test]
    fn data_errors_name_file_and_position() {
        let bad = "[[block]]\nnet = \"10.0.0.1/8\"\nreason = \"x\"\n";
        let err = parse_safety_blocklist(bad, "b.toml")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "b.toml:2:7: net \"10.0.0.1/8\" has host bits set; write 10.0.0.0/8"
        );
        let bad = "[[block]]\nnet = \"10.0.0.0/8\"\nreason = \" \"\n";
        let err = parse_safety_blocklist(bad, "b.toml")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "b.toml:3:10: reason is empty; say why the entry is here"
        );
        let bad = PACKAGE_MANAGERS_TOML.replace("https://pypi.org", "https://pypi.org/simple");
        let err = parse_package_managers(&bad, "p.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(": entry \"https://pypi.org/simple\" has a path (\"/simple\")"),
            "{err}"
        );
        let err = parse_package_managers("apt = []", "p.toml")
            .unwrap_err()
            .to_string();
        assert_eq!(err, "p.toml:1:1: missing field `cargo`");
    }

    #[test]
    fn agent_file_adds_url_servers() {
        let mut expansions = Expansions::default();
        let agent = r#"{"name": "a", "model": "m", "mcp_servers": [
            {"type": "url", "name": "docs", "url": "https://mcp.example.com/mcp"},
            {"name": "tools", "url": "http://tools.example.com:8080/sse", "authorization_token": "x"}]}"#;
        expansions.add_agent_file(agent, "agent.json").unwrap();
        assert_eq!(
            expansions.mcp_servers,
            [
                (
                    "docs".to_string(),
                    "https://mcp.example.com/mcp".to_string()
                ),
                (
                    "tools".to_string(),
                    "http://tools.example.com:8080/sse".to_string()
                )
            ]
        );
        expansions
            .add_agent_file(r#"{"name": "no servers"}"#, "a.json")
            .unwrap();
        assert_eq!(expansions.mcp_servers.len(), 2);
    }

    #[test]
    fn agent_file_errors() {
        let cases = [
            ("{", "a.json:1:1: invalid JSON: EOF while parsing an object"),
            (
                "[]",
                "a.json:1:1: expected an agent object with \"mcp_servers\"; found an array",
            ),
            (
                r#"{"mcp_servers": {}}"#,
                "a.json:1:17: mcp_servers: must be an array of {\"type\": \"url\", \"name\": \"...\", \"url\": \"https://...\"} objects; found an object",
            ),
            (
                r#"{"mcp_servers": ["x"]}"#,
                "a.json:1:18: mcp_servers[0]: must be an object such as {\"type\": \"url\", \"name\": \"docs\", \"url\": \"https://mcp.example.com/mcp\"}; found the string \"x\"",
            ),
            (
                r#"{"mcp_servers": [{"type": "stdio", "name": "n", "url": "https://a.com"}]}"#,
                "a.json:1:27: mcp_servers[0].type: must be \"url\" (the only MCP server type with a network destination); found the string \"stdio\"",
            ),
            (
                r#"{"mcp_servers": [{"url": "https://a.com"}]}"#,
                "a.json:1:18: mcp_servers[0]: MCP server has no \"name\"",
            ),
            (
                r#"{"mcp_servers": [{"name": "n", "url": 5}]}"#,
                "a.json:1:39: mcp_servers[0].url: must be a non-empty string; found the number 5",
            ),
            (
                r#"{"mcp_servers": [{"name": "n", "url": "ftp://a.com/x"}]}"#,
                "a.json:1:39: mcp_servers[0].url: \"ftp://a.com/x\" uses the scheme \"ftp://\"; an MCP server URL starts with https:// or http://",
            ),
        ];
        for (text, expected) in cases {
            let mut expansions = Expansions::default();
            let err = expansions
                .add_agent_file(text, "a.json")
                .unwrap_err()
                .to_string();
            assert_eq!(err, expected, "{text}");
            assert!(expansions.mcp_servers.is_empty());
        }
    }

    #[test]
    fn flags() {
        let mut expansions = Expansions::default();
        expansions
            .add_mcp_server_url("https://MCP.example.com/sse")
            .unwrap();
        assert_eq!(
            expansions.mcp_servers,
            [(
                "mcp.example.com".to_string(),
                "https://MCP.example.com/sse".to_string()
            )]
        );
        let err = expansions
            .add_mcp_server_url("mcp.example.com")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "--mcp-server \"mcp.example.com\" has no scheme; an MCP server URL starts with https:// or http://, as in \"https://mcp.example.com\""
        );
        expansions
            .add_extra_host("telemetry.example.com:4317")
            .unwrap();
        assert_eq!(expansions.extra_hosts, ["telemetry.example.com:4317"]);
        let err = expansions.add_extra_host("a b").unwrap_err().to_string();
        assert_eq!(
            err,
            "--extra-host \"a b\" contains a space; a host name cannot"
        );
    }
}
