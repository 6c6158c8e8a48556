#![no_main]
//! See tickserve_server::fuzzing::onnx_model.

libfuzzer_sys::fuzz_target!(|data: &[u8]| tickserve_server::fuzzing::onnx_model(data));
