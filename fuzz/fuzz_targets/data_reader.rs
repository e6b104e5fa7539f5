//! DATA reader: ends only at CRLF.CRLF, chunking does not matter, memory
//! stays bounded, and an accepted message survives dot-stuffing round trip.
#![no_main]

use altroute_smtp::data::{DataReader, MAX_TEXT_LINE, dot_stuff};
use libfuzzer_sys::fuzz_target;

const MAX: usize = 4096;

fn run(input: &[u8], chunk: usize) -> (usize, bool, Result<Vec<u8>, altroute_smtp::DataError>) {
    let mut reader = DataReader::new(MAX);
    let mut consumed = 0;
    for piece in input.chunks(chunk.max(1)) {
        let n = reader.feed(piece);
        assert!(reader.buffered() <= MAX);
        consumed += n;
        if reader.is_done() {
            break;
        }
        assert_eq!(n, piece.len());
    }
    let done = reader.is_done();
    (consumed, done, reader.finish())
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, input)) = data.split_first() else {
        return;
    };
    let whole = run(input, input.len());
    let chunked = run(input, usize::from(first % 13) + 1);
    assert_eq!(whole, chunked);
    let (consumed, done, result) = whole;
    // The stream as the server sees it: the DATA command's CRLF comes first.
    let mut framed = b"\r\n".to_vec();
    framed.extend_from_slice(&input[..consumed]);
    let first_end = framed.windows(5).position(|w| w == b"\r\n.\r\n");
    if done {
        assert_eq!(
            first_end,
            Some(framed.len() - 5),
            "ended at a non-terminator"
        );
    } else {
        assert_eq!(first_end, None, "missed a terminator");
    }
    if let (true, Ok(message)) = (done, result) {
        assert!(message.len() <= MAX);
        for (i, &b) in message.iter().enumerate() {
            if b == b'\n' {
                assert_eq!(i.checked_sub(1).map(|j| message[j]), Some(b'\r'));
            }
            if b == b'\r' {
                assert_eq!(message.get(i + 1), Some(&b'\n'));
            }
        }
        assert!(
            message
                .split(|b| *b == b'\n')
                .all(|l| l.len() + 1 <= MAX_TEXT_LINE)
        );
        let wire = dot_stuff(&message);
        let mut again = DataReader::new(MAX);
        assert_eq!(again.feed(&wire), wire.len());
        assert!(again.is_done());
        assert_eq!(again.finish().ok(), Some(message));
    }
});
