//! Command framing + smtp-proto parsing: no panic, bounded buffer, every
//! line within 512 octets, and chunking does not change the result.
#![no_main]

use altroute_smtp::command::{CommandLine, CommandReader, MAX_COMMAND_LINE, parse_command};
use libfuzzer_sys::fuzz_target;

fn run(input: &[u8], chunk: usize) -> Vec<CommandLine> {
    let mut reader = CommandReader::new();
    let mut out = Vec::new();
    for mut piece in input.chunks(chunk.max(1)) {
        while !piece.is_empty() {
            let (n, line) = reader.feed(piece);
            assert!(n > 0 && n <= piece.len());
            assert!(reader.buffered() < MAX_COMMAND_LINE);
            piece = &piece[n..];
            out.extend(line);
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, input)) = data.split_first() else {
        return;
    };
    let whole = run(input, input.len());
    let chunked = run(input, usize::from(first % 17) + 1);
    assert_eq!(whole, chunked);
    for line in &whole {
        if let CommandLine::Line(l) = line {
            assert!(l.len() + 2 <= MAX_COMMAND_LINE);
            let _ = parse_command(l);
        }
    }
});
