//! See `porthole_relay::props::chunked` for what is checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| porthole_relay::props::chunked(data));
