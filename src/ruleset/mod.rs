//! The ruleset model, the pure compiler that produces it, and its renderers.

pub mod compile;
mod model;
pub mod render;

pub use compile::compile;
pub use model::*;
