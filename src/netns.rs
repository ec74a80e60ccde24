//! Run work inside a network namespace without changing the caller's own.
