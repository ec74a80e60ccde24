//! The ruleset model, the pure compiler that produces it, its renderers and
//! the evaluator behind `check`.

pub mod compile;
pub mod evaluate;
mod model;
pub mod render;

pub use compile::compile;
pub use model::*;
