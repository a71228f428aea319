//! The outermost crate: the HTTP API and the `billing` binary's commands over the application
//! (`app`). Only this crate knows the wire format.

pub mod cli;
pub mod http;
pub mod web;
