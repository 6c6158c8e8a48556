#![no_main]
//! See tickserve_server::fuzzing::grpc_infer.

libfuzzer_sys::fuzz_target!(|data: &[u8]| tickserve_server::fuzzing::grpc_infer(data));
