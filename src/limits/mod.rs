//! The vocabulary of sluice and the compiled limits: what a limit is, and every domain's
//! limits as one immutable [`LimitSet`].
//!
//! This is the bottom layer. It imports nothing of sluice, so the configuration (which builds
//! a `LimitSet` from files), the matcher (which reads it per descriptor), the counting (which
//! reads thresholds) and the service can all speak it without knowing each other. Plain data
//! and arithmetic on it only: no I/O, no matching, no counting.

mod handles;
mod redis;
mod set;
mod tree;
mod vocabulary;

pub use handles::*;
pub use redis::*;
pub use set::*;
pub use tree::*;
pub use vocabulary::*;
