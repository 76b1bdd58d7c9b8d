//! SMPP framing and decoding on arbitrary bytes, as a bind reads them: frames are cut with the
//! server's own length checks, each frame goes through the TLV walk and rusmpp's decoder, a
//! decoded message is read (addresses, TLVs, text in its data_coding) and re-encoded
//! (`channels::ussd::pdu::exercise`, which the unit tests also replay the seeds through).
#![no_main]

use libfuzzer_sys::fuzz_target;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME.get_or_init(|| tokio::runtime::Builder::new_current_thread().build().expect("runtime"))
}

fuzz_target!(|data: &[u8]| {
    runtime().block_on(channels::ussd::pdu::exercise(data));
});
