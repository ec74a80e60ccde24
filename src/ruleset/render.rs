//! Renderers of the ruleset model: `nft -f` text and libnftables JSON.

use super::model::Ruleset;

/// The ruleset as `nft -f` input that replaces the `netleash` table atomically.
pub fn nft(ruleset: &Ruleset) -> String {
    let _ = ruleset;
    todo!("render::nft")
}

/// The ruleset as libnftables JSON (`nft -j -f`), same semantics as [`nft`].
pub fn json(ruleset: &Ruleset) -> serde_json::Value {
    let _ = ruleset;
    todo!("render::json")
}
