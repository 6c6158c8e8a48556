//! The shared test helpers (crates/test-support): a real server on
//! 127.0.0.1:0 with the real engine, fixtures, repositories and a real
//! redis-server.
#![allow(unused_imports)]

pub use tickserve_test_support::*;
