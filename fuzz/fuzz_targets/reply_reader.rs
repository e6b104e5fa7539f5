//! Client reply parser: no panic, bounded, and a parsed reply re-serialises
//! to something that parses to the same reply.
#![no_main]

use altroute_smtp::ReplyReader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut reader = ReplyReader::new();
    let mut rest = data;
    while !rest.is_empty() {
        let Ok((n, reply)) = reader.feed(rest) else {
            return;
        };
        rest = &rest[n..];
        if let Some(reply) = reply {
            let bytes = reply.to_bytes();
            let mut again = ReplyReader::new();
            if let Ok((m, Some(parsed))) = again.feed(&bytes) {
                assert_eq!(m, bytes.len());
                assert_eq!(parsed.code, reply.code);
            }
        }
    }
});
