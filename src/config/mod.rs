//! Reading configuration: the server [`settings`], and the limits files into the compiled
//! [`crate::limits::LimitSet`] ([`native`] for sluice's own format, [`envoy`] for
//! envoyproxy/ratelimit's, [`diagnostics`] for telling the operator what is wrong, [`reload`]
//! for swapping a new set in while serving, [`xds`] for limits pushed by a management server).
//!
//! Nothing here touches a request. The vocabulary is re-exported, so `config::Threshold` and
//! `limits::Threshold` are one type.

pub mod diagnostics;
pub mod envoy;
pub mod load;
pub mod native;
pub mod reload;
pub mod settings;
pub mod xds;

pub use crate::limits::*;
pub use diagnostics::{ConfigError, ConfigErrors};
pub use load::{load_dir, load_paths, parse_file};
pub use reload::Limits;
pub use settings::Settings;
