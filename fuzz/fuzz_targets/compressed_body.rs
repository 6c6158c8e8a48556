#![no_main]
//! See tickserve_server::fuzzing::compressed_body.

libfuzzer_sys::fuzz_target!(|data: &[u8]| tickserve_server::fuzzing::compressed_body(data));
