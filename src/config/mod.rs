//! Configuration: the server settings (`settings`) and the limits (`schema` as written,
//! `model` as served, `load` in between; `envoy_compat` for files in the envoyproxy/ratelimit
//! format).
//!
//! Nothing here touches a request; the matcher reads the [`model`] types.

pub mod envoy_compat;
pub mod load;
pub mod model;
pub mod reload;
pub mod schema;
pub mod settings;

pub use load::{ConfigError, ConfigErrors, load_dir, load_paths, parse_file};
pub use model::*;
pub use settings::Settings;
