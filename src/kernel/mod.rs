//! The only module that talks netlink: applies a [`crate::ruleset::Ruleset`]
//! as one nftnl batch, reads it back, and updates set elements.
