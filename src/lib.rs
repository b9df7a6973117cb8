//! wasmfilter-operator: deploys proxy-wasm filters into Envoy and Istio.
//!
//! The reconcile pipeline, one module per stage: [`oci`] resolves and fetches, [`cache`] stores
//! and serves, [`abi`] inspects and checks, [`workloads`] finds each selected pod's Envoy,
//! [`render`] builds children, [`controller`] applies them and writes status, [`xds`] serves
//! plain Envoys over ECDS and hears whether they loaded it.
#![forbid(unsafe_code)]

pub mod abi;
pub mod api;
pub mod cache;
pub mod cli;
pub mod controller;
pub mod error;
pub mod leader;
pub mod metrics;
pub mod names;
pub mod oci;
#[cfg(feature = "preflight")]
pub mod preflight;
pub mod render;
pub mod workloads;
pub mod xds;
