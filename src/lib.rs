//! sluice: a distributed rate-limit service for Envoy.
//!
//! The crate follows the path of one request (DESIGN.md §1): [`service`] receives an Envoy
//! RLS v3 `ShouldRateLimit` call, [`matcher`] turns each descriptor into a counter id and a
//! limit using the [`config`] loaded at start, [`limiter`] counts in a [`limiter::Store`], and
//! [`service`] turns the outcomes back into Envoy's response. [`server`] wires the parts to
//! listeners; `main.rs` only parses the command line.

pub mod check;
pub mod clock;
pub mod config;
pub mod limiter;
pub mod matcher;
pub mod metrics;
pub mod proto;
pub mod server;
pub mod service;
