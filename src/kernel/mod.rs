//! The only module that talks netlink: applies a [`crate::ruleset::Ruleset`]
//! as one nftnl batch, reads it back, and updates set elements.

use crate::netns;
use crate::ruleset::Ruleset;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kernel apply is not built yet")]
    NotBuilt,
}

/// What `apply` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    /// The digest of the ruleset now in force, as read back from the kernel.
    pub digest: String,
}

/// Replace the `inet netleash` table in `target` with `ruleset`, in one
/// netlink transaction, then read it back and verify it.
pub fn apply(target: &netns::Target, ruleset: &Ruleset) -> Result<ApplyReport, Error> {
    let _ = (target, ruleset);
    Err(Error::NotBuilt)
}

/// Delete the `inet netleash` table in `target`. Returns whether it existed.
pub fn remove(target: &netns::Target) -> Result<bool, Error> {
    let _ = target;
    Err(Error::NotBuilt)
}
