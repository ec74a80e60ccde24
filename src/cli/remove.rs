//! `netleash remove`: stop enforcing in a sandbox's network namespace.

use std::io::Write;

use super::netns_args::NetnsArgs;
use super::{EXIT_OK, Error};
use crate::kernel;
use crate::ruleset::TABLE_NAME;

/// Delete the `inet netleash` table in the namespace. Egress is then no longer restricted
/// by netleash. A namespace without the table is not an error.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub target: NetnsArgs,
}

pub fn run(args: Args) -> Result<u8, Error> {
    let target = args.target.target();
    let removed = kernel::remove(&target)?;
    let mut out = std::io::stdout().lock();
    if removed {
        writeln!(out, "removed table inet {TABLE_NAME} from the {target}")
    } else {
        writeln!(
            out,
            "no table inet {TABLE_NAME} in the {target}: nothing to remove"
        )
    }
    .map_err(Error::Output)?;
    Ok(EXIT_OK)
}
