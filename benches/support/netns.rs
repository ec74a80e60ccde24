//! A network namespace a benchmark creates (`ip netns add`) and deletes when
//! it is dropped. Shared by the benchmarks through `#[path]`.

use std::process::Command;

use netleash::netns::Target;

pub struct Netns(pub String);

impl Netns {
    /// Create the namespace `name`; panics if `ip netns add` fails.
    pub fn named(name: String) -> Netns {
        let status = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("run ip");
        assert!(status.success(), "ip netns add {name} failed");
        Netns(name)
    }

    pub fn target(&self) -> Target {
        Target::Name(self.0.clone())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}
