//! sluice: a distributed rate-limit service for Envoy.
//!
//! The crate follows the path of one request, in layers that only look down: [`service`]
//! receives an Envoy RLS v3 `ShouldRateLimit` call, [`matcher`] turns each descriptor into a
//! counter id and a limit from the [`limits`] that [`config`] loaded, [`limiter`] counts in a
//! [`limiter::Store`], and [`service`] turns the outcomes back into Envoy's response.
//! [`limits`] is the vocabulary under all of them and imports nothing of sluice. [`server`]
//! wires the parts to listeners; `main.rs` only parses the command line.

pub mod check;
pub mod clock;
pub mod config;
pub mod envoy_snippets;
pub mod limiter;
pub mod limits;
pub mod matcher;
pub mod metrics;
pub mod proto;
pub mod server;
pub mod service;
