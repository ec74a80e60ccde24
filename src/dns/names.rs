//! Which names the policy allows: the index over the ruleset's
//! [`NameBinding`]s that the proxy consults on every query and the resolver
//! loop enumerates.

use std::collections::HashMap;

use hickory_proto::rr::Name;

use crate::policy::Target;
use crate::ruleset::NameBinding;

/// The normalized form of a queried name, comparable with the policy's names
/// (lowercase ASCII, no trailing dot; see `policy::types`), or `None` if the
/// name cannot be one the policy allows.
///
/// A label on the wire may hold any byte, including `.` (RFC 2181 §11). Such a
/// name must not be rendered to text and compared, or the 2-label name
/// `["evil.github", "com"]` would print as `evil.github.com` and match
/// `*.github.com` while it is really a child of `com`. Only labels of letters,
/// digits, `-` and `_` are accepted, so text and wire agree.
pub fn normalize_query_name(name: &Name) -> Option<String> {
    if name.is_root() {
        return None;
    }
    let mut out = String::with_capacity(name.len());
    for label in name.iter() {
        if label.is_empty()
            || !label
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
        {
            return None;
        }
        if !out.is_empty() {
            out.push('.');
        }
        out.extend(label.iter().map(|b| char::from(b.to_ascii_lowercase())));
    }
    Some(out)
}

/// The allowed names of one ruleset, indexed so that a lookup costs one hash
/// lookup per label of the queried name instead of a scan over all bindings.
/// Agrees with [`Target::matches_name`] (tested below).
#[derive(Debug, Clone, Default)]
pub struct AllowedNames {
    bindings: Vec<NameBinding>,
    exact: HashMap<String, Vec<usize>>,
    /// Keyed by the wildcard's suffix (`github.com` for `*.github.com`).
    wildcard: HashMap<String, Vec<usize>>,
}

impl AllowedNames {
    pub fn new(bindings: Vec<NameBinding>) -> Self {
        let mut exact: HashMap<String, Vec<usize>> = HashMap::new();
        let mut wildcard: HashMap<String, Vec<usize>> = HashMap::new();
        for (index, binding) in bindings.iter().enumerate() {
            match &binding.target {
                Target::Name(name) => exact.entry(name.clone()).or_default().push(index),
                Target::Wildcard(suffix) => wildcard.entry(suffix.clone()).or_default().push(index),
                Target::Net(_) => {}
            }
        }
        AllowedNames {
            bindings,
            exact,
            wildcard,
        }
    }

    /// Every binding that allows `name` (normalized): its exact binding and
    /// the wildcards of each of its proper suffixes. Empty if not allowed.
    pub fn matching(&self, name: &str) -> Vec<&NameBinding> {
        let mut found: Vec<&NameBinding> = Vec::new();
        if let Some(indexes) = self.exact.get(name) {
            found.extend(indexes.iter().map(|i| &self.bindings[*i]));
        }
        // A wildcard never matches its own apex, only names strictly below it.
        let mut rest = name;
        while let Some((_, suffix)) = rest.split_once('.') {
            if let Some(indexes) = self.wildcard.get(suffix) {
                found.extend(indexes.iter().map(|i| &self.bindings[*i]));
            }
            rest = suffix;
        }
        found
    }

    /// The exact names (wildcards cannot be enumerated), sorted.
    pub fn exact_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.exact.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    pub fn bindings(&self) -> &[NameBinding] {
        &self.bindings
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wildcard.is_empty()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::policy::{PortSpec, Ports, Proto, Source};

    pub(crate) fn binding(target: Target, ports: Ports) -> NameBinding {
        let ported = ports != Ports::Any;
        NameBinding {
            target,
            ports,
            sources: vec![Source::AllowedHosts],
            set_v4: if ported { "dns_v4_ports" } else { "dns_v4" }.into(),
            set_v6: if ported { "dns_v6_ports" } else { "dns_v6" }.into(),
        }
    }

    fn https_only() -> Ports {
        Ports::Only(BTreeSet::from([PortSpec {
            proto: Proto::Tcp,
            port: 443,
        }]))
    }

    fn sample() -> AllowedNames {
        AllowedNames::new(vec![
            binding(Target::Name("api.github.com".into()), https_only()),
            binding(Target::Wildcard("github.com".into()), Ports::Any),
            binding(Target::Name("pypi.org".into()), Ports::Any),
            binding(Target::Wildcard("a.b.example".into()), Ports::Any),
        ])
    }

    fn name(text: &str) -> Name {
        Name::from_ascii(text).unwrap()
    }

    #[test]
    fn case_and_trailing_dot_are_normalized() {
        assert_eq!(
            normalize_query_name(&name("PyPI.Org.")).as_deref(),
            Some("pypi.org")
        );
        assert_eq!(
            normalize_query_name(&name("pypi.org")).as_deref(),
            Some("pypi.org")
        );
        assert_eq!(
            normalize_query_name(&name("_acme-challenge.x.org.")).as_deref(),
            Some("_acme-challenge.x.org")
        );
        assert_eq!(normalize_query_name(&Name::root()), None);
    }

    #[test]
    fn a_label_with_a_dot_or_odd_bytes_is_not_a_policy_name() {
        let dotted = Name::from_labels(vec![b"evil.github".to_vec(), b"com".to_vec()]).unwrap();
        assert_eq!(normalize_query_name(&dotted), None);
        let binary =
            Name::from_labels(vec![vec![0u8, 1, 2], b"github".to_vec(), b"com".to_vec()]).unwrap();
        assert_eq!(normalize_query_name(&binary), None);
        let spaced = Name::from_labels(vec![b"a b".to_vec(), b"com".to_vec()]).unwrap();
        assert_eq!(normalize_query_name(&spaced), None);
    }

    #[test]
    fn exact_and_wildcard_bindings_are_all_found() {
        let names = sample();
        let found = names.matching("api.github.com");
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].target, Target::Name("api.github.com".into()));
        assert_eq!(found[1].target, Target::Wildcard("github.com".into()));
        assert_eq!(names.matching("pypi.org").len(), 1);
        assert_eq!(names.matching("x.y.a.b.example").len(), 1);
    }

    #[test]
    fn wildcard_apex_and_lookalikes_are_not_allowed() {
        let names = sample();
        assert!(names.matching("github.com").is_empty());
        assert!(names.matching("notgithub.com").is_empty());
        assert!(names.matching("github.com.evil").is_empty());
        assert!(names.matching("www.pypi.org").is_empty());
        assert!(names.matching("b.example").is_empty());
        assert!(names.matching("a.b.example").is_empty());
        assert!(names.matching("").is_empty());
    }

    #[test]
    fn index_agrees_with_target_matches_name() {
        let names = sample();
        let candidates = [
            "github.com",
            "api.github.com",
            "x.api.github.com",
            "githubxcom",
            "hub.com",
            "pypi.org",
            "files.pypi.org",
            "org",
            "a.b.example",
            "z.a.b.example",
            "b.example",
            "example",
            "x.y.z",
        ];
        for candidate in candidates {
            let by_index: Vec<&Target> = names
                .matching(candidate)
                .iter()
                .map(|b| &b.target)
                .collect();
            let by_scan: Vec<&Target> = names
                .bindings()
                .iter()
                .filter(|b| b.target.matches_name(candidate))
                .map(|b| &b.target)
                .collect();
            let mut by_index_sorted = by_index.clone();
            by_index_sorted.sort();
            let mut by_scan_sorted = by_scan.clone();
            by_scan_sorted.sort();
            assert_eq!(by_index_sorted, by_scan_sorted, "{candidate}");
        }
    }

    #[test]
    fn only_exact_names_are_enumerated() {
        assert_eq!(sample().exact_names(), vec!["api.github.com", "pypi.org"]);
    }
}
