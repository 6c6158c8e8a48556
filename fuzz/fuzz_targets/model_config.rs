#![no_main]
//! See tickserve_server::fuzzing::model_config.

libfuzzer_sys::fuzz_target!(|data: &[u8]| tickserve_server::fuzzing::model_config(data));
