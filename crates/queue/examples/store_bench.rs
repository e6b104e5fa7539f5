//! Spool store throughput: N concurrent "sessions" each storing messages back to back.
//!
//! `cargo run -p altroute-queue --example store_bench -- [DIR] [SESSIONS=20] [MESSAGES=4000] [SIZE=4096]`
//! DIR defaults to a fresh temporary directory (under $TMPDIR). Prints stores/s and how many
//! directory fsyncs the group commit needed.

use std::sync::Arc;
use std::time::Instant;

use altroute_queue::{Envelope, Spool, SpoolConfig, SystemClock};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let tmp = tempfile::tempdir()?;
    let dir = args
        .first()
        .map(Into::into)
        .unwrap_or(tmp.path().to_owned());
    let sessions: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(20);
    let messages: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(4000);
    let size: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(4096);

    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let spool = Spool::open(&dir, SpoolConfig::default(), Arc::new(SystemClock))?;
        let body: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
        let start = Instant::now();
        let mut tasks = Vec::new();
        for s in 0..sessions {
            let spool = spool.clone();
            let body = body.clone();
            let n = messages / sessions + usize::from(s < messages % sessions);
            tasks.push(tokio::spawn(async move {
                for _ in 0..n {
                    let env = Envelope::new("bench@example.org", vec!["r@example.net".into()]);
                    spool.store(env, body.clone()).await?;
                }
                Ok::<(), altroute_queue::Error>(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        let secs = start.elapsed().as_secs_f64();
        let st = spool.stats();
        println!(
            "{} stores of {size} B from {sessions} sessions in {secs:.2} s: {:.0} stores/s; \
             {} file fsyncs, {} directory fsyncs ({:.1} stores per directory fsync, largest batch {})",
            st.stored,
            st.stored as f64 / secs,
            st.file_fsyncs,
            st.dir_fsyncs,
            st.stored as f64 / st.dir_fsyncs.max(1) as f64,
            st.max_batch
        );
        Ok::<(), Box<dyn std::error::Error>>(())
    })
}
