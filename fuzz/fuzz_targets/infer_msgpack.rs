#![no_main]
//! See tickserve_server::fuzzing::infer_msgpack.

libfuzzer_sys::fuzz_target!(|data: &[u8]| tickserve_server::fuzzing::infer_msgpack(data));
