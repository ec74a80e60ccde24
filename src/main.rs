fn main() -> std::process::ExitCode {
    netleash::cli::main()
}
