#![no_main]

use libfuzzer_sys::fuzz_target;

// The properties checked are in synthome_gateway::fuzzing::duration.
fuzz_target!(|data: &[u8]| synthome_gateway::fuzzing::duration(data));
