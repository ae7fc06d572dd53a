//! The `conduit` command's library: the local demo ([`demo`]) with its workload ([`app`]),
//! top-line figures read from proxies' `/metrics` ([`stat`]), and the commands that ask the
//! controller's public API (`stat`, `routes`, `check`: [`control`]) and the red-line search
//! against real processes ([`redline`]). `main.rs` parses
//! arguments and calls in here, so integration tests can drive the same code.

#![allow(clippy::print_stdout, reason = "a command-line tool prints its output")]

pub mod accept;
pub mod app;
pub mod control;
pub mod demo;
pub mod inject;
pub mod install;
pub mod kube_check;
pub mod redline;
pub mod stat;
pub mod webhook;
