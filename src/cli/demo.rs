//! `netleash demo`: enforce the bundled example policy in a throwaway sandbox
//! and show, with real connections, what gets out and what does not.

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_proto::rr::RecordType;

use super::Error;
use crate::policy::{self, CompileOptions, Mode, Policy, Proto, Target};
use crate::testbed::{self, Outcome, Testbed, Transport, Verdict, ZoneRecord};
use crate::{kernel, netns, ruleset};

/// Show enforcement at work: the bundled example policy in a throwaway sandbox (needs root).
///
/// Builds a sandbox and a world (two network namespaces joined by a veth
/// pair, all inside this machine; no packet leaves them), applies
/// policies/examples/demo.json to the sandbox, and tries real connections from
/// inside it: which destinations are allowed and which are blocked, including
/// a cloud metadata address no policy can allow. Exits 0 only if every
/// observation matches the policy.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Leave both namespaces (and the rules in the sandbox) in place for
    /// inspection, e.g. `ip netns exec NAME nft list ruleset`. The world's
    /// servers stop when the demo ends.
    #[arg(long)]
    pub keep: bool,
}

/// The bundled example policy.
pub const POLICY: &str = include_str!("../../policies/examples/demo.json");
const POLICY_ORIGIN: &str = "policies/examples/demo.json (built in)";
/// A name the world's DNS server answers, to show DNS to the resolver works.
const DEMO_NAME: &str = "demo.test";
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// One connection the demo tries from the sandbox.
#[derive(Debug, Clone, Copy)]
struct Probe {
    destination: SocketAddr,
    proto: Proto,
}

/// The destinations tried, in display order: each test address on an allowed
/// and a disallowed port, addresses outside the policy, the metadata
/// stand-ins, and DNS to the resolver.
fn probes() -> Vec<Probe> {
    let tcp = |ip: &str, port| Probe {
        destination: SocketAddr::new(parse(ip), port),
        proto: Proto::Tcp,
    };
    vec![
        tcp("198.51.100.10", 80),
        tcp("198.51.100.10", 443),
        tcp("198.51.100.10", 8443),
        tcp("198.51.100.11", 443),
        tcp("203.0.113.5", 443),
        tcp("203.0.113.5", 8443),
        tcp("203.0.113.20", 443),
        tcp("2001:db8:100::10", 443),
        tcp("2001:db8:100::10", 80),
        tcp("2001:db8:100::11", 443),
        Probe {
            destination: SocketAddr::new(testbed::METADATA_V4, 80),
            proto: Proto::Tcp,
        },
        Probe {
            destination: SocketAddr::new(testbed::METADATA_V6, 80),
            proto: Proto::Tcp,
        },
        Probe {
            destination: SocketAddr::new(testbed::RESOLVER_V4, testbed::DNS_PORT),
            proto: Proto::Udp,
        },
    ]
}

fn parse(ip: &str) -> IpAddr {
    ip.parse()
        .expect("the demo's destinations are valid addresses")
}

/// What the policy says about a destination, and why. Worked out from the
/// policy itself, independently of the compiled ruleset, so the demo checks
/// the compiler and the kernel against the policy's meaning.
fn expectation(policy: &Policy, options: &CompileOptions, probe: &Probe) -> (bool, String) {
    let (ip, port) = (probe.destination.ip(), probe.destination.port());
    let most_specific = policy
        .blocklist
        .iter()
        .filter(|block| block.net.contains(&ip))
        .max_by_key(|block| block.net.prefix_len());
    if let Some(block) = most_specific {
        return (false, format!("safety blocklist: {}", block.reason));
    }
    if port == 53 || port == 853 {
        let resolver = port == 53 && options.resolvers.contains(&ip);
        return (
            resolver,
            if resolver {
                "resolver".into()
            } else {
                "DNS only to the resolvers".into()
            },
        );
    }
    if policy.mode == Mode::Unrestricted {
        return (true, "unrestricted".into());
    }
    let allowing = policy.rules.iter().find(|rule| {
        matches!(&rule.target, Target::Net(net) if net.contains(&ip))
            && rule.ports.admits(probe.proto, Some(port))
    });
    match allowing {
        Some(rule) => (true, rule.entry.clone()),
        None => (false, "not in the policy".into()),
    }
}

/// Try `probe` from the calling thread, which is in the sandbox.
fn observe(probe: &Probe) -> Result<Outcome, testbed::Error> {
    match probe.proto {
        Proto::Tcp => testbed::probe::tcp_connect(probe.destination, PROBE_TIMEOUT),
        Proto::Udp => {
            let exchange = testbed::dns_query(
                probe.destination,
                DEMO_NAME,
                RecordType::A,
                Transport::Udp,
                PROBE_TIMEOUT,
            )?;
            Ok(exchange.outcome)
        }
    }
}

/// The OBSERVED column: for UDP (DNS), a reply is an answer, not a connection.
fn observed_label(probe: &Probe, verdict: Verdict) -> String {
    match (probe.proto, verdict) {
        (Proto::Udp, Verdict::Connected) => "answered".to_string(),
        (_, verdict) => verdict.to_string(),
    }
}

/// An allowed destination must connect; a blocked one must be rejected, not
/// left to time out.
fn matches(allowed: bool, verdict: Verdict) -> bool {
    if allowed {
        verdict == Verdict::Connected
    } else {
        verdict.is_rejected()
    }
}

pub fn run(args: Args) -> Result<u8, Error> {
    testbed::require_root()?;
    let policy = policy::load(POLICY, POLICY_ORIGIN, &policy::Expansions::default())?;
    let options = CompileOptions {
        resolvers: vec![testbed::RESOLVER_V4],
        ..CompileOptions::default()
    };
    let ruleset = ruleset::compile(&policy, &options);

    let bed = Testbed::new()?;
    bed.zone().set(
        DEMO_NAME,
        &[ZoneRecord::A("198.51.100.10".parse().expect("valid"))],
        60,
    );
    let applied = kernel::apply(&netns::Target::Name(bed.sandbox().to_string()), &ruleset)?;

    let probes = probes();
    let observed =
        bed.in_sandbox(|| probes.iter().map(observe).collect::<Result<Vec<_>, _>>())??;

    let mut out = std::io::stdout().lock();
    let mut table = String::new();
    table.push_str(&format!(
        "netleash demo: {POLICY_ORIGIN}\n{}\napplied to sandbox {} (digest {}), resolver {}\n\n",
        POLICY.trim(),
        bed.sandbox(),
        applied.digest,
        testbed::RESOLVER_V4,
    ));
    table.push_str(&format!(
        "{:<22} {:<9} {:<9} {:<26} {:>9}  {:<5} {}\n",
        "DESTINATION", "PORT", "EXPECTED", "OBSERVED", "TIME", "MATCH", "BECAUSE"
    ));
    let mut mismatches = 0;
    for (probe, outcome) in probes.iter().zip(&observed) {
        let (allowed, because) = expectation(&policy, &options, probe);
        let matched = matches(allowed, outcome.verdict);
        mismatches += usize::from(!matched);
        table.push_str(&format!(
            "{:<22} {:<9} {:<9} {:<26} {:>6.1} ms  {:<5} {}\n",
            probe.destination.ip().to_string(),
            format!("{}/{}", probe.destination.port(), probe.proto),
            if allowed { "allowed" } else { "blocked" },
            observed_label(probe, outcome.verdict),
            outcome.elapsed.as_secs_f64() * 1e3,
            if matched { "yes" } else { "NO" },
            because,
        ));
    }
    table.push('\n');
    out.write_all(table.as_bytes()).map_err(Error::Output)?;

    if args.keep {
        let (sandbox, world) = bed.keep()?;
        let kept = format!(
            "Kept the namespaces {sandbox} and {world} (the world's servers have stopped).\n\
             Inspect:  ip netns exec {sandbox} nft list table inet netleash\n\
             Delete:   ip netns delete {sandbox}; ip netns delete {world}\n"
        );
        out.write_all(kept.as_bytes()).map_err(Error::Output)?;
    } else {
        bed.close()?;
    }

    if mismatches > 0 {
        return Err(Error::DemoMismatch {
            mismatches,
            total: probes.len(),
        });
    }
    let summary = format!("All {} observations match the policy.\n", probes.len());
    out.write_all(summary.as_bytes()).map_err(Error::Output)?;
    Ok(super::EXIT_OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expectations_follow_the_bundled_policy() {
        let policy = policy::load(POLICY, POLICY_ORIGIN, &policy::Expansions::default()).unwrap();
        let options = CompileOptions {
            resolvers: vec![testbed::RESOLVER_V4],
            ..CompileOptions::default()
        };
        let expected: Vec<bool> = probes()
            .iter()
            .map(|probe| expectation(&policy, &options, probe).0)
            .collect();
        // 198.51.100.10: 80 and 443 yes, 8443 no; .11 no; 203.0.113.5 any port;
        // .20 is outside the /28; v6 ::10 on 443 only; ::11 no; metadata no; DNS yes.
        let want = [
            true, true, false, false, true, true, false, true, false, false, false, false, true,
        ];
        assert_eq!(expected, want);
        // The most specific blocklist entry explains a block.
        let (_, because) = expectation(&policy, &options, &probes()[10]);
        assert!(because.contains("instance metadata"), "{because}");
    }

    #[test]
    fn a_timeout_never_passes_for_a_block() {
        assert!(matches(false, Verdict::Refused));
        assert!(matches(
            false,
            Verdict::Unreachable {
                errno: libc::EHOSTUNREACH
            }
        ));
        assert!(!matches(false, Verdict::TimedOut));
        assert!(!matches(false, Verdict::Connected));
        assert!(matches(true, Verdict::Connected));
        assert!(!matches(true, Verdict::Refused));
    }

    #[test]
    fn the_bundled_policy_is_the_documented_example() {
        let json: serde_json::Value = serde_json::from_str(POLICY).unwrap();
        assert_eq!(json["type"], "limited");
        let hosts: Vec<&str> = json["allowed_hosts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|host| host.as_str().unwrap())
            .collect();
        assert_eq!(
            hosts,
            [
                "http://198.51.100.10",
                "https://198.51.100.10",
                "[2001:db8:100::10]:443",
                "203.0.113.0/28"
            ]
        );
    }
}
