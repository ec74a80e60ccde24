//! `netleash-hook`: `netleash hook` as a lean binary of its own, for OCI
//! runtimes that start it at every container creation.

fn main() -> std::process::ExitCode {
    netleash::cli::hook::main()
}
