//! synthome-gateway: a gRPC front for Synthome's execution status API.
//!
//! Backend services ask the gateway, not Synthome, how an execution is doing. The modules,
//! in the order a request meets them:
//!
//! - [`service`]: the gRPC surface (`ExecutionStatusService`): reads the call's credential
//!   and execution id, asks the [`registry`], and turns failures into statuses through
//!   [`grpc_error`], the one table from failure to gRPC code. [`watch`] runs one
//!   `WatchExecution` stream.
//! - [`credential`] and [`execution_id`]: the two inputs of every call, validated before
//!   anything reaches the upstream; the key never appears in a log or an error.
//! - [`registry`]: one shared poller per (credential, execution id), publishing snapshots to
//!   every reader and watcher of it; ended executions, which never change, are remembered.
//! - [`webhook`]: the operations HTTP listener, where Synthome's webhooks make pollers
//!   fetch at once.
//! - [`trace_context`]: W3C `traceparent` carried from a call to the upstream requests it
//!   causes.
//! - [`upstream`]: the HTTP client for `GET {base}/{executionId}/status`, and the tolerant
//!   model of its JSON.
//! - [`execution`] and [`progress`]: the upstream JSON turned into the `Execution` message,
//!   with `PipelineProgress` derived from the jobs because the service does not send it.
//! - [`metrics`]: Prometheus counters, gauges and histograms, and the layer that counts
//!   every gRPC call with the code its client got.
//! - [`server`]: builds and runs the gRPC server (with health, reflection and gRPC-Web);
//!   [`health`], whether the gateway should get traffic; [`admin`], the operations HTTP
//!   listener.
//! - [`telemetry`]: logs, as text or JSON lines.
//! - [`simulator`]: a faithful stand-in for Synthome's API, for demos, tests and benchmarks.
//! - [`cli`]: the `synthome-gateway` command line.

pub mod admin;
pub mod cli;
pub mod credential;
pub mod execution;
pub mod execution_id;
#[doc(hidden)]
pub mod fuzzing;
pub mod grpc_error;
pub mod health;
pub mod json;
pub mod metrics;
pub mod progress;
pub mod registry;
pub mod server;
pub mod service;
pub mod simulator;
pub mod telemetry;
pub mod trace_context;
pub mod upstream;
pub mod watch;
pub mod webhook;

/// Code generated from `proto/synthome/status/v1/execution_status.proto`.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod proto {
    tonic::include_proto!("synthome.status.v1");

    /// The encoded descriptor set of the contract, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("synthome_descriptor");
}
