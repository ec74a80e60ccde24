//! The integration test binary: one module per topic.

mod fixtures;
mod golden;
mod nft_check;
