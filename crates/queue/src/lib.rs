//! Durable spool and retry scheduler of the altroute relay.
//!
//! The SMTP layer calls [`Spool::store`] at the end of DATA and answers `250` only when it
//! returns `Ok`: by then the message and its envelope are on stable storage (file fsync and
//! directory fsync). Any error, disk full included, is an `Err` that the SMTP layer turns
//! into a 4xx; the spool holds no half-stored message afterwards and works again as soon as
//! space returns. Delivery then works from the in-memory index ([`Spool::claim_due`],
//! [`Spool::defer`], [`Spool::delivered`], ...), and every state change is written to disk
//! before the call returns, so recipient states survive restarts.
//!
//! # Layout
//!
//! ```text
//! <spool>/lock          flock held while a process has the spool open
//! <spool>/tmp/<id>      a store in progress (deleted at open: never acknowledged)
//! <spool>/msg/<id>      one file per queued message
//! <spool>/corrupt/<id>  files kept for the operator: unreadable or corrupt at open, or
//!                       a body that failed its checksum at delivery (`<id>.<n>` when
//!                       the name is taken)
//! ```
//!
//! A message file is `ALTRQ01\n` followed by frames `[len u32][crc32 u32][kind u8][data]`:
//! an envelope record (JSON: id, [`Envelope`], `Message-ID`), the message body, then any
//! number of appended recipient-state records (JSON list of `(recipient, state)` updates,
//! applied atomically).
//!
//! # Design, and why
//!
//! * **One file per message, written to `tmp/`, fsynced, renamed into `msg/`, then `msg/`
//!   fsynced.** `msg/` therefore only ever holds complete messages; a crash leaves at
//!   worst a temp file, which recovery deletes (its store was never acknowledged).
//! * **Recipient state lives in the same file, as an append-only log.** Appending to an
//!   existing file needs only an `fdatasync` of that file, no directory fsync and no new
//!   inode, so each state change costs one sync. Each record carries length + CRC32 framing:
//!   a record torn by a crash fails the check and recovery cuts it off; everything before
//!   it was acknowledged and stays. A damaged record with whole records after it is not a
//!   torn tail: it is skipped and the records after it are applied and kept. A failed append (disk full) is cut off at once, so a
//!   later record is never hidden behind garbage.
//! * **Group commit.** Writing and fsyncing the message file happens in parallel on the
//!   blocking pool; the rename and the directory fsync are done by one committer thread
//!   that takes every rename queued while the previous fsync ran, applies them and fsyncs
//!   `msg/` once for all. Each `store` awaits a oneshot answer. Removals share the same
//!   batches. [`SpoolStats::dir_fsyncs`] vs [`SpoolStats::stored`] shows the effect.
//! * **Never delete what may be someone's mail.** A file recovery cannot load (torn
//!   envelope, bad magic, or an I/O error: no permission, a directory in its place) and a
//!   message whose body fails its checksum when read ([`Spool::set_aside`]) are moved to
//!   `corrupt/`. An entry that cannot even be moved is logged, counted
//!   ([`RecoveryReport::unreadable_skipped`]) and left alone: one bad entry never keeps
//!   the spool from opening and the other messages from being delivered.
//! * **Memory mirrors disk, never the reverse.** The index is updated only after the
//!   corresponding bytes are synced; at open it is rebuilt from the files alone.
//! * **What is not covered:** a directory fsync that fails after the rename makes the
//!   store fail and the file is unlinked again (best effort); a crash right then can bring
//!   back a message whose client got a 4xx and will resend it (a duplicate, never a loss).
//!
//! # API at a glance
//!
//! * Accept: [`Spool::open`] (recovers), [`Spool::store`] → [`MessageId`] (durable on `Ok`).
//! * Deliver: a scheduler loop waits on [`Spool::changed`] or until [`Spool::next_wakeup`],
//!   takes work with [`Spool::claim_due`], reads [`Spool::read_message`] (one that is
//!   [`Error::Corrupt`] goes to [`Spool::set_aside`], never to removal), records each
//!   recipient with [`Spool::delivered`] / [`Spool::defer`] / [`Spool::bounce`] (or the
//!   raw [`Spool::set_recipient`]), then [`Spool::release`]s the message; finished messages
//!   ([`Spool::finished`]) are deleted with [`Spool::remove`] once any DSN is queued
//!   (delivery also sweeps them at start: a crash may come before the removal). A
//!   message whose results could not be recorded can be held back in memory
//!   ([`Spool::hold`]) so that it is not claimed again at once.
//! * Operate (`altroute queue list|show|retry|bounce`): [`Spool::list`], [`Spool::entry`],
//!   [`Spool::retry_now`], [`Spool::bounce_now`] with a [`Selector`], or [`Spool::claim`] one
//!   message, [`Spool::bounce_open`] it and [`Spool::release`] it (what the relay's admin
//!   endpoint does, so a bounce never races a delivery attempt); [`Spool::stats`] for
//!   metrics (queue depth by state, fsync and group-commit counters).
//!
//! # Retry schedule
//!
//! [`RetrySchedule::default`]: first retry after 5 minutes, doubling (10, 20, 40 min), at
//! most 1 hour apart, for a queue lifetime of 5 days from reception (Postfix's
//! `maximal_queue_lifetime`). [`Spool::defer`] applies it and returns
//! [`RecipientState::Expired`] when the lifetime is used up. Time comes from a [`Clock`]
//! ([`SystemClock`], or [`ManualClock`] in tests).
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use altroute_queue::{Envelope, ManualClock, RecipientState, Spool, SpoolConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let clock = Arc::new(ManualClock::new(1_700_000_000));
//! let rt = tokio::runtime::Runtime::new()?;
//! rt.block_on(async {
//!     let spool = Spool::open(dir.path(), SpoolConfig::default(), clock.clone())?;
//!     let env = Envelope::new("a@example.org", vec!["b@example.net".into()]);
//!     let id = spool.store(env, b"Subject: hi\r\n\r\nhello\r\n".to_vec()).await?;
//!     // Safe to answer 250 now.
//!     let due = spool.claim_due(clock.now(), 100);
//!     assert_eq!(due[0].id, id);
//!     let state = spool.defer(&id, 0, "451 4.3.0 try later").await?;
//!     assert!(matches!(state, RecipientState::Deferred { attempts: 1, .. }));
//!     spool.release(&id);
//!     assert_eq!(spool.next_wakeup(), Some(1_700_000_000 + 300));
//!     Ok::<_, altroute_queue::Error>(())
//! })?;
//! # Ok(()) }
//! # use altroute_queue::Clock;
//! ```

mod clock;
mod error;
mod frame;
mod id;
mod schedule;
mod spool;
mod types;

pub use clock::{Clock, ManualClock, SystemClock, Timestamp};
pub use error::Error;
pub use id::MessageId;
pub use schedule::RetrySchedule;
pub use spool::{Spool, SpoolConfig, create_private_dir_all, open_regular_with};
pub use types::{Envelope, QueueEntry, RecipientState, RecoveryReport, Selector, SpoolStats};
