//! The network namespace a kernel subcommand acts in: `--netns NAME|PATH` or `--pid PID`.

use crate::netns::Target;

#[derive(Debug, Clone, clap::Args)]
#[group(required = true, multiple = false)]
pub struct NetnsArgs {
    /// The sandbox's network namespace: a name under /run/netns (`ip netns list`),
    /// or a path to a namespace file (any argument with a '/').
    #[arg(long, value_name = "NAME|PATH")]
    pub netns: Option<String>,

    /// The network namespace of this process (/proc/PID/ns/net).
    #[arg(long, value_name = "PID")]
    pub pid: Option<u32>,
}

impl NetnsArgs {
    pub fn target(&self) -> Target {
        match (&self.netns, self.pid) {
            (Some(netns), _) if netns.contains('/') => Target::Path(netns.into()),
            (Some(name), _) => Target::Name(name.clone()),
            (None, Some(pid)) => Target::Pid(pid),
            // clap's argument group requires exactly one of them.
            (None, None) => unreachable!("clap requires --netns or --pid"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_paths_and_pids() {
        let args = |netns: Option<&str>, pid: Option<u32>| NetnsArgs {
            netns: netns.map(String::from),
            pid,
        };
        assert_eq!(args(Some("sbx"), None).target(), Target::Name("sbx".into()));
        assert_eq!(
            args(Some("/proc/1/ns/net"), None).target(),
            Target::Path("/proc/1/ns/net".into())
        );
        assert_eq!(args(None, Some(7)).target(), Target::Pid(7));
    }
}
