//! See `porthole_relay::props::capsules` for what is checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| porthole_relay::props::capsules(data));
