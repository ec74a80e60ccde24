//! `netleash explain`: what a policy allows, entry by entry, and why.

use std::fmt::Write as _;
use std::io::Write as _;

use super::policy_args::PolicyArgs;
use ipnet::IpNet;

use crate::policy::{CompileOptions, Dialect, HostRule, Mode, Policy, Target};
use crate::ruleset::compile::LOG_PREFIX;

const AFTER_HELP: &str = "\
Columns: ENTRY as written in the policy or expansion data; KIND (name,
wildcard, address, cidr); PORTS (`any`, or protocol/port pairs); SOURCE
(allowed_hosts, package managers: NAME, mcp: NAME, extra). Entries that were
written more than once are merged: their ports and sources are united.

Examples:
  netleash explain policy.json
  netleash explain policy.json --resolver 192.0.2.53";

/// Show what a policy allows, entry by entry, and why.
#[derive(Debug, clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct Args {
    #[command(flatten)]
    pub policy: PolicyArgs,
}

pub fn run(args: Args) -> Result<u8, super::Error> {
    // The warnings are part of the explanation, so they are not also printed to stderr.
    let (policy, options) = args.policy.load_quietly()?;
    let text = explain(&policy, &options);
    std::io::stdout()
        .lock()
        .write_all(text.as_bytes())
        .map_err(super::Error::Output)?;
    Ok(super::EXIT_OK)
}

/// `name`, `wildcard`, `address` or `cidr`.
pub fn kind(target: &Target) -> &'static str {
    match target {
        Target::Name(_) => "name",
        Target::Wildcard(_) => "wildcard",
        Target::Net(net) if net.prefix_len() == net.max_prefix_len() => "address",
        Target::Net(_) => "cidr",
    }
}

/// The entry as written, and what it was normalized to when that is not
/// visible in it (`Docs.Example.COM.` → `docs.example.com`, IDN → punycode).
pub(crate) fn entry_text(rule: &HostRule) -> String {
    let target = rule.target.to_string();
    if rule.entry.contains(&target) {
        rule.entry.clone()
    } else {
        format!("{} (as {target})", rule.entry)
    }
}

/// An address without its /32 or /128, a network with its prefix length.
fn net_text(net: &IpNet) -> String {
    Target::Net(*net).to_string()
}

/// Rows as aligned columns, two spaces apart, the last column unpadded.
fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::from("  ");
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<width$}  ", width = widths[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The whole explanation, as printed.
pub fn explain(policy: &Policy, options: &CompileOptions) -> String {
    let mut out = String::new();
    let dialect = match policy.dialect {
        Dialect::Unrestricted => "type unrestricted",
        Dialect::Limited => "type limited",
        Dialect::AllowedHosts => "type allowed_hosts",
    };
    match policy.mode {
        Mode::Unrestricted => {
            let _ = writeln!(
                out,
                "Mode: unrestricted ({dialect}): everything is allowed except the safety blocklist."
            );
        }
        Mode::Limited => {
            let _ = writeln!(
                out,
                "Mode: limited ({dialect}): only the entries below are allowed; everything else is \
                 rejected and logged."
            );
            let _ = writeln!(out);
            if policy.rules.is_empty() {
                let _ = writeln!(
                    out,
                    "Allowed: nothing but loopback and DNS to the resolvers below."
                );
            } else {
                let _ = writeln!(out, "Allowed ({} entries):", policy.rules.len());
                let mut rows = vec![vec![
                    "ENTRY".into(),
                    "KIND".into(),
                    "PORTS".into(),
                    "SOURCE".into(),
                ]];
                for rule in &policy.rules {
                    let sources: Vec<String> =
                        rule.sources.iter().map(ToString::to_string).collect();
                    rows.push(vec![
                        entry_text(rule),
                        kind(&rule.target).into(),
                        rule.ports.to_string(),
                        sources.join("; "),
                    ]);
                }
                out.push_str(&table(&rows));
            }
        }
    }

    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Safety blocklist (always denied, checked before any allow rule):"
    );
    if policy.blocklist.is_empty() {
        let _ = writeln!(out, "  (empty)");
    } else {
        let rows: Vec<Vec<String>> = policy
            .blocklist
            .iter()
            .map(|b| vec![net_text(&b.net), b.reason.clone()])
            .collect();
        out.push_str(&table(&rows));
    }

    let _ = writeln!(out);
    match policy.mode {
        Mode::Unrestricted => {
            let _ = writeln!(out, "DNS: not restricted in unrestricted mode.");
        }
        Mode::Limited if options.resolvers.is_empty() => {
            let _ = writeln!(
                out,
                "DNS resolvers: none configured, so the sandbox cannot resolve names (give --resolver IP)."
            );
        }
        Mode::Limited => {
            let resolvers: Vec<String> =
                options.resolvers.iter().map(ToString::to_string).collect();
            let _ = writeln!(
                out,
                "DNS resolvers (UDP and TCP 53; DNS and DNS over TLS anywhere else are denied): {}",
                resolvers.join(", ")
            );
        }
    }
    let _ = writeln!(
        out,
        "Denied packets are counted, logged to nflog group {} with the prefix \"{LOG_PREFIX}\", and rejected.",
        options.nflog_group
    );

    if !policy.warnings.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(out, "Warnings:");
        for warning in &policy.warnings {
            let _ = writeln!(out, "  - {warning}");
        }
    }

    if policy.mode == Mode::Limited
        && policy
            .rules
            .iter()
            .any(|r| !matches!(r.target, Target::Net(_)))
    {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "Note: names and wildcards are not resolved now. Their addresses are learned at run time \
             from the sandbox's DNS answers and allowed, on the listed ports, until the answer expires."
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{BlockEntry, Ports, Proto, Source};
    use crate::ruleset::evaluate::tests as policies;

    fn rule(entry: &str, target: Target, ports: Ports, sources: &[Source]) -> HostRule {
        HostRule {
            entry: entry.into(),
            target,
            ports,
            sources: sources.iter().cloned().collect(),
        }
    }

    fn limited() -> Policy {
        let https = policies::only(&[(Proto::Tcp, 443), (Proto::Udp, 443)]);
        Policy {
            mode: Mode::Limited,
            dialect: Dialect::Limited,
            rules: vec![
                rule(
                    "files.pythonhosted.org",
                    Target::Name("files.pythonhosted.org".into()),
                    https.clone(),
                    &[Source::AllowedHosts, Source::PackageManager("pip".into())],
                ),
                rule(
                    "*.example.com",
                    Target::Wildcard("example.com".into()),
                    Ports::Any,
                    &[Source::Extra],
                ),
                rule(
                    "https://mcp.example.org",
                    Target::Name("mcp.example.org".into()),
                    https,
                    &[Source::Mcp("docs".into())],
                ),
                rule(
                    "198.51.100.7",
                    Target::Net("198.51.100.7/32".parse().unwrap()),
                    Ports::Any,
                    &[Source::AllowedHosts],
                ),
                rule(
                    "10.0.0.0/8",
                    Target::Net("10.0.0.0/8".parse().unwrap()),
                    Ports::Any,
                    &[Source::AllowedHosts],
                ),
            ],
            blocklist: vec![BlockEntry {
                net: "169.254.0.0/16".parse().unwrap(),
                reason: "link-local, cloud metadata".into(),
            }],
            warnings: vec!["allow_mcp_servers is true but no MCP server was given".into()],
        }
    }

    #[test]
    fn the_table_is_aligned_and_names_kind_ports_and_every_source() {
        let options = CompileOptions {
            resolvers: vec!["192.0.2.53".parse().unwrap()],
            nflog_group: 7,
            proxy: None,
        };
        let text = explain(&limited(), &options);
        let expected_table = "\
  ENTRY                    KIND      PORTS             SOURCE
  files.pythonhosted.org   name      443/tcp, 443/udp  allowed_hosts; package managers: pip
  *.example.com            wildcard  any               extra
  https://mcp.example.org  name      443/tcp, 443/udp  mcp: docs
  198.51.100.7             address   any               allowed_hosts
  10.0.0.0/8               cidr      any               allowed_hosts
";
        assert!(text.contains(expected_table), "{text}");
        assert!(text.starts_with("Mode: limited (type limited)"), "{text}");
        assert!(
            text.contains("  169.254.0.0/16  link-local, cloud metadata\n"),
            "{text}"
        );
        assert!(
            text.contains("DNS over TLS anywhere else are denied): 192.0.2.53\n"),
            "{text}"
        );
        assert!(
            text.contains("nflog group 7 with the prefix \"netleash deny \""),
            "{text}"
        );
        assert!(
            text.contains("Warnings:\n  - allow_mcp_servers is true but no MCP server was given\n"),
            "{text}"
        );
        assert!(text.contains("learned at run time"), "{text}");
    }

    #[test]
    fn unrestricted_and_empty_policies_say_so() {
        let mut policy = limited();
        policy.rules.clear();
        policy.warnings.clear();
        let text = explain(&policy, &CompileOptions::default());
        assert!(
            text.contains("Allowed: nothing but loopback and DNS"),
            "{text}"
        );
        assert!(text.contains("DNS resolvers: none configured"), "{text}");
        assert!(!text.contains("Warnings"), "{text}");
        assert!(!text.contains("learned at run time"), "{text}");

        policy.mode = Mode::Unrestricted;
        policy.dialect = Dialect::Unrestricted;
        let text = explain(&policy, &CompileOptions::default());
        assert!(
            text.starts_with(
                "Mode: unrestricted (type unrestricted): everything is allowed except"
            ),
            "{text}"
        );
        assert!(text.contains("DNS: not restricted"), "{text}");
    }
}
