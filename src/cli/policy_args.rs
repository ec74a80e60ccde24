//! Arguments shared by every subcommand that reads a policy, and the one
//! function that turns them into a `Policy` and `CompileOptions`.
