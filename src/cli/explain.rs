//! `netleash explain`.

/// (to be written)
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> Result<u8, super::Error> {
    Err(super::Error::Usage("`explain` is not built yet".into()))
}
