//! The shared fixture helpers (crates/test-support): the repository root
//! and the `.npy` files `tools/export_reference.py` wrote.
#![allow(unused_imports)]

pub use tickserve_test_support::{argmax, read_npy, root};
