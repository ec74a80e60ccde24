//! Arguments shared by every subcommand that reads a policy, and the one
//! function that turns them into a `Policy` and `CompileOptions`.

use std::io::Read as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use crate::policy::{self, CompileOptions, DEFAULT_NFLOG_GROUP, Expansions, Mode, Policy};

use super::Error;

/// Where DNS servers come from when no `--resolver` is given.
pub const DEFAULT_RESOLV_CONF: &str = "/etc/resolv.conf";

#[derive(Debug, clap::Args)]
pub struct PolicyArgs {
    /// The policy: a JSON file, or `-` for standard input.
    ///
    /// Any of: an Environment object as the platform APIs return it, a
    /// create-request body (`{"name": ..., "config": {...}}`), a bare
    /// `config` object, or a bare `networking` object such as
    /// `{"type": "limited", "allowed_hosts": ["api.example.com"]}`.
    /// A config without `networking` is unrestricted.
    #[arg(value_name = "POLICY")]
    pub policy: String,

    /// Agent definition (JSON) whose `mcp_servers` URLs are allowed when the
    /// policy sets `"allow_mcp_servers": true`.
    ///
    /// The Claude Managed Agents shape: `{"mcp_servers": [{"type": "url",
    /// "name": "docs", "url": "https://mcp.example.com/mcp"}]}`. Only the
    /// scheme, host and port of each URL count.
    #[arg(long, value_name = "FILE")]
    pub agent: Option<PathBuf>,

    /// An MCP server URL to allow when the policy sets
    /// `"allow_mcp_servers": true`, named after its host. Repeatable.
    #[arg(long = "mcp-server", value_name = "URL")]
    pub mcp_servers: Vec<String>,

    /// A platform host every sandbox needs (callback, telemetry), always
    /// allowed in limited mode, in the allowed_hosts grammar
    /// (`host`, `host:port`, `https://host`, CIDR, ...). Repeatable.
    #[arg(long = "extra-host", value_name = "HOST")]
    pub extra_hosts: Vec<String>,

    /// A DNS server the sandbox may query (port 53, UDP and TCP). Repeatable.
    /// Default: the `nameserver` lines of --resolv-conf.
    #[arg(long = "resolver", value_name = "IP")]
    pub resolvers: Vec<IpAddr>,

    /// The resolv.conf to read DNS servers from when no --resolver is given
    /// (for a named network namespace, /etc/netns/NAME/resolv.conf).
    #[arg(long, value_name = "FILE", default_value = DEFAULT_RESOLV_CONF)]
    pub resolv_conf: PathBuf,

    /// The nflog group denied packets are logged to (read them with
    /// `tcpdump -i nflog:N` or ulogd).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_NFLOG_GROUP)]
    pub nflog_group: u16,
}

impl PolicyArgs {
    /// Reads the policy and its expansions, validates them, and prints each
    /// warning to stderr as `warning: ...`.
    pub fn load(&self) -> Result<(Policy, CompileOptions), Error> {
        let (policy, options) = self.load_quietly()?;
        for warning in &policy.warnings {
            eprintln!("warning: {warning}");
        }
        Ok((policy, options))
    }

    /// [`PolicyArgs::load`] without printing; the warnings are in `Policy::warnings`.
    pub fn load_quietly(&self) -> Result<(Policy, CompileOptions), Error> {
        let (text, origin) = read_policy_text(&self.policy)?;

        let mut expansions = Expansions::default();
        if let Some(agent) = &self.agent {
            let (agent_text, path) = read_agent_file(agent)?;
            expansions.add_agent_file(&agent_text, &path)?;
        }
        for url in &self.mcp_servers {
            expansions.add_mcp_server_url(url)?;
        }
        for host in &self.extra_hosts {
            expansions.add_extra_host(host)?;
        }

        let mut policy = policy::load(&text, &origin, &expansions)?;

        let resolvers = configured_resolvers(&self.resolvers, &self.resolv_conf, &mut policy);

        Ok((
            policy,
            CompileOptions {
                resolvers,
                nflog_group: self.nflog_group,
                proxy: None,
            },
        ))
    }
}

/// The DNS servers a policy's sandbox may query: `explicit` (`--resolver`)
/// when given, else the `nameserver` lines of `resolv_conf`. Problems become
/// warnings on `policy`: an unreadable or empty resolv.conf in limited mode
/// (DNS will be blocked), and a resolver inside the safety blocklist.
pub fn configured_resolvers(
    explicit: &[IpAddr],
    resolv_conf: &Path,
    policy: &mut Policy,
) -> Vec<IpAddr> {
    let resolvers = if explicit.is_empty() {
        let resolv_conf = resolv_conf.display().to_string();
        match std::fs::read_to_string(&resolv_conf) {
            Ok(text) => {
                let (found, problems) = parse_resolv_conf(&text);
                policy
                    .warnings
                    .extend(problems.into_iter().map(|p| format!("{resolv_conf}: {p}")));
                if found.is_empty() && policy.mode == Mode::Limited {
                    policy.warnings.push(format!(
                        "{resolv_conf} has no nameserver line; DNS from the sandbox will be blocked (give --resolver IP)"
                    ));
                }
                found
            }
            Err(err) => {
                if policy.mode == Mode::Limited {
                    policy.warnings.push(format!(
                        "cannot read {resolv_conf} ({err}); DNS from the sandbox will be blocked (give --resolver IP)"
                    ));
                }
                Vec::new()
            }
        }
    } else {
        explicit.to_vec()
    };
    for resolver in &resolvers {
        if let Some(block) =
            policy::expansions::blocking_entry(&policy.blocklist, &(*resolver).into())
        {
            policy.warnings.push(format!(
                "resolver {resolver} lies inside the safety blocklist entry {} ({}); DNS to it will be blocked",
                block.net, block.reason
            ));
        }
    }
    resolvers
}

/// The `nameserver` addresses of a resolv.conf (resolv.conf(5)), in order and
/// without duplicates, and a note for each line that could not be used.
/// A zone index (`fe80::1%eth0`) is dropped: rules match addresses only.
pub fn parse_resolv_conf(text: &str) -> (Vec<IpAddr>, Vec<String>) {
    let mut found = Vec::new();
    let mut problems = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(value) = words.next() else {
            problems.push(format!(
                "line {}: nameserver without an address; ignored",
                number + 1
            ));
            continue;
        };
        let address = value.split('%').next().unwrap_or(value);
        match address.parse::<IpAddr>() {
            Ok(addr) if !found.contains(&addr) => found.push(addr),
            Ok(_) => {}
            Err(_) => problems.push(format!(
                "line {}: {value:?} is not an IP address; ignored",
                number + 1
            )),
        }
    }
    (found, problems)
}

/// The text of the policy argument `policy` (a file, or `-` for standard
/// input) and the origin its messages name.
/// The text of an agent definition file (`--agent FILE`) and its path as
/// the origin for error messages.
pub fn read_agent_file(agent: &std::path::Path) -> Result<(String, String), Error> {
    let path = agent.display().to_string();
    let text = std::fs::read_to_string(agent).map_err(|source| Error::ReadInput {
        what: "agent file",
        path: path.clone(),
        source,
    })?;
    Ok((text, path))
}

pub fn read_policy_text(policy: &str) -> Result<(String, String), Error> {
    if policy == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|source| Error::ReadInput {
                what: "policy from",
                path: "standard input".into(),
                source,
            })?;
        Ok((text, "<stdin>".to_string()))
    } else {
        let text = std::fs::read_to_string(policy).map_err(|source| Error::ReadInput {
            what: "policy file",
            path: policy.to_string(),
            source,
        })?;
        Ok((text, policy.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Command {
        #[command(flatten)]
        args: PolicyArgs,
    }

    fn args(argv: &[&str]) -> PolicyArgs {
        Command::try_parse_from(std::iter::once("netleash").chain(argv.iter().copied()))
            .unwrap()
            .args
    }

    #[test]
    fn resolv_conf_nameservers() {
        let text = "# generated\nsearch example.com\nnameserver 192.0.2.53\nnameserver  2001:db8::53 \n\
                    nameserver fe80::1%eth0\nnameserver 192.0.2.53\nnameserver\nnameserver dns.example\n; x\noptions ndots:5\n";
        let (found, problems) = parse_resolv_conf(text);
        let expected: Vec<IpAddr> = ["192.0.2.53", "2001:db8::53", "fe80::1"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(found, expected);
        assert_eq!(
            problems,
            [
                "line 7: nameserver without an address; ignored",
                "line 8: \"dns.example\" is not an IP address; ignored"
            ]
        );
        assert_eq!(parse_resolv_conf(""), (vec![], vec![]));
    }

    #[test]
    fn defaults() {
        let parsed = args(&["policy.json"]);
        assert_eq!(parsed.policy, "policy.json");
        assert_eq!(parsed.nflog_group, DEFAULT_NFLOG_GROUP);
        assert_eq!(parsed.resolv_conf, PathBuf::from(DEFAULT_RESOLV_CONF));
        assert!(
            parsed.resolvers.is_empty()
                && parsed.extra_hosts.is_empty()
                && parsed.mcp_servers.is_empty()
        );
        let parsed = args(&[
            "-",
            "--resolver",
            "192.0.2.53",
            "--resolver",
            "2001:db8::53",
            "--extra-host",
            "a.example",
            "--extra-host",
            "b.example",
            "--mcp-server",
            "https://m.example/x",
            "--nflog-group",
            "7",
        ]);
        assert_eq!(parsed.policy, "-");
        assert_eq!(parsed.resolvers.len(), 2);
        assert_eq!(parsed.extra_hosts, ["a.example", "b.example"]);
        assert_eq!(parsed.nflog_group, 7);
    }

    #[test]
    fn load_reads_files_and_resolvers() {
        let dir = tempfile::tempdir().unwrap();
        let policy = dir.path().join("p.json");
        std::fs::write(
            &policy,
            r#"{"type": "limited", "allowed_hosts": ["a.example"]}"#,
        )
        .unwrap();
        let resolv = dir.path().join("resolv.conf");
        std::fs::write(
            &resolv,
            "nameserver 192.0.2.53\nnameserver 169.254.169.253\n",
        )
        .unwrap();
        let policy = policy.display().to_string();
        let resolv = resolv.display().to_string();

        let (loaded, options) = args(&[&policy, "--resolv-conf", &resolv])
            .load_quietly()
            .unwrap();
        assert_eq!(loaded.rules.len(), 1);
        assert_eq!(
            options.resolvers,
            [
                "192.0.2.53".parse::<IpAddr>().unwrap(),
                "169.254.169.253".parse().unwrap()
            ]
        );
        assert_eq!(loaded.warnings.len(), 1);
        assert!(loaded.warnings[0].starts_with(
            "resolver 169.254.169.253 lies inside the safety blocklist entry 169.254.0.0/16 (IPv4 link-local"
        ));

        let (_, options) = args(&[&policy, "--resolv-conf", &resolv, "--resolver", "192.0.2.1"])
            .load_quietly()
            .unwrap();
        assert_eq!(options.resolvers, ["192.0.2.1".parse::<IpAddr>().unwrap()]);

        let missing = dir.path().join("missing.conf").display().to_string();
        let (loaded, options) = args(&[&policy, "--resolv-conf", &missing])
            .load_quietly()
            .unwrap();
        assert!(options.resolvers.is_empty());
        assert!(
            loaded.warnings[0].starts_with(&format!("cannot read {missing} (")),
            "{:?}",
            loaded.warnings
        );
        assert!(
            loaded.warnings[0]
                .ends_with("); DNS from the sandbox will be blocked (give --resolver IP)")
        );

        let empty = dir.path().join("empty.conf");
        std::fs::write(&empty, "search example\n").unwrap();
        let empty = empty.display().to_string();
        let (loaded, _) = args(&[&policy, "--resolv-conf", &empty])
            .load_quietly()
            .unwrap();
        assert_eq!(
            loaded.warnings,
            [format!(
                "{empty} has no nameserver line; DNS from the sandbox will be blocked (give --resolver IP)"
            )]
        );

        let unrestricted = dir.path().join("u.json");
        std::fs::write(&unrestricted, r#"{"type": "unrestricted"}"#).unwrap();
        let (loaded, _) = args(&[
            &unrestricted.display().to_string(),
            "--resolv-conf",
            &missing,
        ])
        .load_quietly()
        .unwrap();
        assert!(
            loaded.warnings.is_empty(),
            "DNS is open when unrestricted: {:?}",
            loaded.warnings
        );
    }

    #[test]
    fn unreadable_files_are_invalid_input() {
        let err = args(&["/nonexistent/p.json"]).load_quietly().unwrap_err();
        assert_eq!(err.exit_code(), crate::cli::EXIT_INVALID_INPUT);
        assert_eq!(
            crate::cli::render_error(&err),
            "error: cannot read policy file /nonexistent/p.json\n  caused by: No such file or directory (os error 2)"
        );
    }
}
