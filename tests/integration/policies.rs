//! Every file in policies/ parses, rejects an unknown key with an exact
//! message, and holds the facts the enforcement relies on.

use std::path::PathBuf;

use netleash::policy::expansions::{self, PACKAGE_MANAGERS_FILE, SAFETY_BLOCKLIST_FILE};
use netleash::policy::position::{LineColumn, line_column};
use netleash::policy::{self, Dialect, Expansions, Mode, Ports, Proto, Source, Target};

fn examples() -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("policies/examples")
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    found.sort();
    found
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn data_files_on_disk_are_the_embedded_ones_and_parse() {
    let managers =
        expansions::parse_package_managers(&read(PACKAGE_MANAGERS_FILE), PACKAGE_MANAGERS_FILE)
            .unwrap();
    assert_eq!(managers, expansions::package_managers().unwrap());
    let blocklist =
        expansions::parse_safety_blocklist(&read(SAFETY_BLOCKLIST_FILE), SAFETY_BLOCKLIST_FILE)
            .unwrap();
    assert_eq!(blocklist, expansions::safety_blocklist().unwrap());
}

#[test]
fn every_example_loads() {
    let examples = examples();
    assert!(examples.len() >= 11, "{examples:?}");
    for path in &examples {
        let origin = path.display().to_string();
        let policy = policy::load(&read(&origin), &origin, &Expansions::default())
            .unwrap_or_else(|e| panic!("{}", netleash::cli::render_error(&e)));
        assert!(!policy.blocklist.is_empty(), "{origin}");
    }
}

#[test]
fn examples_mean_what_their_platform_pages_say() {
    let load = |name: &str| {
        let origin = format!("policies/examples/{name}.json");
        policy::load(&read(&origin), &origin, &Expansions::default()).unwrap()
    };
    for name in ["qoder-unrestricted", "claude-unrestricted"] {
        let policy = load(name);
        assert_eq!(
            (policy.mode, policy.dialect),
            (Mode::Unrestricted, Dialect::Unrestricted),
            "{name}"
        );
        assert!(policy.rules.is_empty());
    }
    let qoder = load("qoder-allowed-hosts");
    assert_eq!(
        (qoder.mode, qoder.dialect),
        (Mode::Limited, Dialect::AllowedHosts)
    );
    let names: Vec<String> = qoder.rules.iter().map(|r| r.target.to_string()).collect();
    assert_eq!(names, ["api.github.com", "pypi.org", "registry.npmjs.org"]);

    let qoder_limited = load("qoder-limited");
    assert!(qoder_limited.rules.iter().all(|r| {
        r.sources
            .iter()
            .all(|s| matches!(s, Source::PackageManager(_)))
    }));

    let claude = load("claude-limited");
    assert_eq!(claude.dialect, Dialect::Limited);
    assert!(
        claude
            .rules
            .iter()
            .any(|r| r.target == Target::Name("api.example.com".into()))
    );
    assert!(
        claude
            .rules
            .iter()
            .any(|r| r.target == Target::Name("files.pythonhosted.org".into()))
    );
    assert_eq!(
        claude.warnings.len(),
        1,
        "allow_mcp_servers with no server: {:?}",
        claude.warnings
    );

    let sandbase = load("sandbase-environment");
    assert!(sandbase.warnings.is_empty(), "{:?}", sandbase.warnings);

    let demo = load("demo");
    let demo_rules: Vec<(String, String)> = demo
        .rules
        .iter()
        .map(|r| (r.target.to_string(), r.ports.to_string()))
        .collect();
    assert_eq!(
        demo_rules,
        [
            (
                "198.51.100.10".to_string(),
                "80/tcp, 443/tcp, 443/udp".to_string()
            ),
            ("203.0.113.0/28".to_string(), "any".to_string()),
            (
                "2001:db8:100::10".to_string(),
                "443/tcp, 443/udp".to_string()
            ),
        ]
    );
}

#[test]
fn showcase_exercises_every_form() {
    let origin = "policies/examples/netleash-showcase.json";
    let policy = policy::load(&read(origin), origin, &Expansions::default()).unwrap();
    let has = |target: &str, ports: &str| {
        policy
            .rules
            .iter()
            .any(|r| r.target.to_string() == target && r.ports.to_string() == ports)
    };
    assert!(
        has("api.example.com", "443/tcp, 443/udp"),
        "https:// and a duplicate with a trailing /"
    );
    assert!(has("mirror.example.org", "80/tcp"));
    assert!(has("uploads.example.com", "8443/tcp, 8443/udp"));
    assert!(has("legacy.example.net", "8080/tcp"));
    assert!(has("git.example.com", "22/tcp, 22/udp"));
    assert!(has("*.cdn.example.com", "any"));
    assert!(has("*.storage.example.com", "443/tcp, 443/udp"));
    assert!(
        has("docs.example.com", "any"),
        "normalized case and trailing dot"
    );
    assert!(has("xn--bcher-kva.example", "any"), "IDN to punycode");
    assert!(has("203.0.113.7", "any"));
    assert!(has("198.51.100.0/24", "any"));
    assert!(has("2001:db8::443", "443/tcp, 443/udp"));
    assert!(has("2001:db8:1::/48", "any"));
    assert!(has("2001:db8::10", "443/tcp, 443/udp"));
    assert!(policy.warnings.is_empty(), "{:?}", policy.warnings);
}

/// Where a `{` opens the networking object in an example's text, and the
/// JSON path of that object as messages print it (with a trailing dot).
fn networking_object(text: &str) -> (usize, &'static str) {
    let root: serde_json::Value = serde_json::from_str(text).unwrap();
    let (key_at, prefix) = if root.get("config").is_some() {
        (
            text.find("\"networking\"").expect("config.networking"),
            "config.networking.",
        )
    } else if root.get("networking").is_some() {
        (text.find("\"networking\"").unwrap(), "networking.")
    } else {
        (0, "")
    };
    let brace = key_at + text[key_at..].find('{').unwrap();
    (brace, prefix)
}

#[test]
fn an_unknown_key_in_any_example_networking_is_rejected_exactly() {
    for path in examples() {
        let origin = path.display().to_string();
        let text = read(&origin);
        let (brace, prefix) = networking_object(&text);
        let LineColumn { line, column } = line_column(&text, brace);
        let key_column = column + 1;
        let cases = [
            (
                "\"allowed_host\": [], ",
                "allowed_host",
                "did you mean \"allowed_hosts\"?".to_string(),
            ),
            (
                "\"allow_package_manager\": true, ",
                "allow_package_manager",
                "did you mean \"allow_package_managers\"?".to_string(),
            ),
            (
                "\"bogus_key\": 1, ",
                "bogus_key",
                "networking keys are \"type\", \"allowed_hosts\", \"allow_package_managers\" and \"allow_mcp_servers\""
                    .to_string(),
            ),
        ];
        for (injected, key, hint) in cases {
            let bad = format!("{}{injected}{}", &text[..=brace], &text[brace + 1..]);
            let err = policy::load(&bad, &origin, &Expansions::default()).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!(
                    "{origin}:{line}:{key_column}: {prefix}{key}: unknown key \"{key}\"; {hint}"
                ),
                "{origin} with {injected}"
            );
        }
    }
}

/// Inserts `bogus_key = 1` as the first line of the top-level table and of
/// every `[[table]]` of a data file, and checks each exact rejection.
fn bogus_key_in_every_table(
    file: &str,
    parse: fn(&str, &str) -> Result<(), policy::Error>,
    top_fields: &str,
    row_fields: &str,
) {
    let text = read(file);
    let lines: Vec<&str> = text.lines().collect();
    let headers: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.starts_with("[["))
        .map(|(i, _)| i)
        .collect();
    assert!(!headers.is_empty(), "{file} has no table");
    // (line index to insert before, expected fields)
    let mut places = vec![(0, top_fields)];
    places.extend(headers.iter().map(|&h| (h + 1, row_fields)));
    for (insert_at, fields) in places {
        let mut bad: Vec<&str> = lines.clone();
        bad.insert(insert_at, "bogus_key = 1");
        let bad = bad.join("\n");
        let err = parse(&bad, file)
            .expect_err("an unknown key must be rejected")
            .to_string();
        assert_eq!(
            err,
            format!(
                "{file}:{}:1: unknown field `bogus_key`, expected {fields}",
                insert_at + 1
            ),
            "bogus_key before line {}",
            insert_at + 1
        );
    }
}

#[test]
fn an_unknown_key_in_any_data_table_is_rejected_exactly() {
    bogus_key_in_every_table(
        PACKAGE_MANAGERS_FILE,
        |text, origin| expansions::parse_package_managers(text, origin).map(|_| ()),
        "one of `apt`, `cargo`, `gem`, `go`, `npm`, `pip`",
        "`entry` or `purpose`",
    );
    bogus_key_in_every_table(
        SAFETY_BLOCKLIST_FILE,
        |text, origin| expansions::parse_safety_blocklist(text, origin).map(|_| ()),
        "`block`",
        "`net` or `reason`",
    );
}

#[test]
fn the_data_holds_the_facts_enforcement_relies_on() {
    let managers = expansions::package_managers().unwrap();
    let hosts_of = |name: &str| -> Vec<(Target, Ports)> {
        managers
            .iter()
            .find(|m| m.name == name)
            .unwrap()
            .hosts
            .iter()
            .map(|h| (h.spec.target.clone(), h.spec.ports.clone()))
            .collect()
    };
    let named = |hosts: &[(Target, Ports)], name: &str| {
        hosts.iter().any(|(t, _)| *t == Target::Name(name.into()))
    };
    let pip = hosts_of("pip");
    assert!(named(&pip, "pypi.org") && named(&pip, "files.pythonhosted.org"));
    let cargo = hosts_of("cargo");
    assert!(
        named(&cargo, "crates.io")
            && named(&cargo, "index.crates.io")
            && named(&cargo, "static.crates.io")
    );
    for (manager, name) in [
        ("npm", "registry.npmjs.org"),
        ("go", "proxy.golang.org"),
        ("go", "sum.golang.org"),
        ("gem", "rubygems.org"),
        ("gem", "index.rubygems.org"),
    ] {
        assert!(named(&hosts_of(manager), name), "{manager} lacks {name}");
    }
    let apt = hosts_of("apt");
    for mirror in [
        "deb.debian.org",
        "security.debian.org",
        "archive.ubuntu.com",
        "security.ubuntu.com",
        "ports.ubuntu.com",
    ] {
        assert!(
            apt.iter()
                .any(|(t, p)| *t == Target::Name(mirror.into()) && p.admits(Proto::Tcp, Some(80))),
            "{mirror} must be reachable on tcp/80"
        );
    }

    let blocklist = expansions::safety_blocklist().unwrap();
    for must in [
        "169.254.169.254/32",
        "fd00:ec2::254/128",
        "169.254.0.0/16",
        "fe80::/10",
    ] {
        assert!(
            blocklist.iter().any(|b| b.net.to_string() == must),
            "blocklist lacks {must}"
        );
    }
}
