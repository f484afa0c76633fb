//! Tokens: any string given as a staff or table token is refused or yields
//! a well-formed identity; the verifier never panics.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use wsgateway::Config;
use wsgateway::auth::Verifier;

fuzz_target!(|data: &[u8]| {
    static VERIFIER: OnceLock<Verifier> = OnceLock::new();
    let verifier = VERIFIER.get_or_init(|| Verifier::new(&Config::with_secrets("fuzz-staff", "fuzz-table")).unwrap());
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = verifier.staff(Some(token)) {
        assert!(!id.branch_ids.is_empty());
    }
    let _ = verifier.table(Some(token));
});
