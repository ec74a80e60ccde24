//! The one integration test binary; one module per topic.

mod bad_input;
mod cli;
mod fixtures;
mod golden;
mod nft_check;
mod policies;
