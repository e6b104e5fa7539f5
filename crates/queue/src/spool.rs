//! The spool: message files, recovery, group commit, recipient state.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak, mpsc};

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, oneshot};

use crate::frame::{self, HEADER_LEN, KIND_BODY, KIND_ENVELOPE, KIND_STATE, MAGIC};
use crate::id::{IdGen, header_message_id};
use crate::{
    Clock, Envelope, Error, MessageId, QueueEntry, RecipientState, RecoveryReport, RetrySchedule,
    Selector, SpoolStats, Timestamp,
};

/// Spool settings.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SpoolConfig {
    /// Backoff and lifetime. Defaults to [`RetrySchedule::default`] (5 min doubling to 1 h, 5 days).
    pub retry: RetrySchedule,
    /// Most operations folded into one group commit (one directory fsync). Defaults to 1024.
    pub max_batch: usize,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            retry: RetrySchedule::default(),
            max_batch: 1024,
        }
    }
}

impl SpoolConfig {
    /// Defaults with another retry schedule.
    pub fn with_retry(retry: RetrySchedule) -> Self {
        SpoolConfig {
            retry,
            ..SpoolConfig::default()
        }
    }
}

/// The first frame of a spool file.
#[derive(Debug, Serialize, Deserialize)]
struct StoredHeader {
    id: MessageId,
    envelope: Envelope,
    message_id: Option<String>,
}

/// One recipient update inside a state record; a record holds several, applied atomically.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StateUpdate {
    r: usize,
    s: RecipientState,
}

/// Per-file write state; its mutex serialises appends to one message file.
#[derive(Debug)]
struct MsgFile {
    path: PathBuf,
    /// Length of the valid prefix of the file: the next record goes here.
    good_len: u64,
    /// A failed append may have left bytes past `good_len` that could not be cut off yet.
    dirty: bool,
    removed: bool,
}

#[derive(Debug)]
struct Slot {
    entry: QueueEntry,
    body_off: u64,
    body_len: u64,
    body_crc: u32,
    file: Arc<Mutex<MsgFile>>,
    in_flight: bool,
    /// Not handed out by [`Spool::claim_due`] before this time (memory only, see
    /// [`Spool::hold`]); 0 = no hold.
    hold_until: Timestamp,
}

impl Slot {
    /// When the message is next due for delivery, its hold included.
    fn due(&self) -> Option<Timestamp> {
        self.entry.next_due().map(|t| t.max(self.hold_until))
    }
}

#[derive(Debug, Default)]
struct Counters {
    stored: AtomicU64,
    store_errors: AtomicU64,
    file_fsyncs: AtomicU64,
    dir_fsyncs: AtomicU64,
    commit_batches: AtomicU64,
    max_batch: AtomicU64,
    set_aside: AtomicU64,
}

/// Work for the committer thread: directory changes that share one directory fsync.
enum Op {
    /// Rename a fully written and fsynced temp file into `msg/` and index it.
    Link {
        tmp: PathBuf,
        dst: PathBuf,
        slot: Box<Slot>,
        done: oneshot::Sender<Result<MessageId, Error>>,
    },
    /// Delete a message file.
    Unlink {
        path: PathBuf,
        done: oneshot::Sender<io::Result<()>>,
    },
    /// Move a message file to `corrupt/` (answered with its new path).
    Aside {
        path: PathBuf,
        done: oneshot::Sender<io::Result<PathBuf>>,
    },
}

struct Inner {
    root: PathBuf,
    msg_dir: PathBuf,
    tmp_dir: PathBuf,
    corrupt_dir: PathBuf,
    config: SpoolConfig,
    clock: Arc<dyn Clock>,
    index: Mutex<BTreeMap<MessageId, Slot>>,
    counters: Counters,
    ids: IdGen,
    notify: Notify,
    commit_tx: mpsc::Sender<Op>,
    recovery: RecoveryReport,
    /// Ids of the entries recovery left in `msg/` (unreadable, and not movable to
    /// `corrupt/`): never given to a new message, whose rename would replace them.
    skipped: BTreeSet<MessageId>,
    /// Held for the spool's life: a second process on the same directory would corrupt it.
    _lock: File,
}

/// The durable queue. Cheap to clone (shared state); see the crate docs for the design.
#[derive(Clone)]
pub struct Spool {
    inner: Arc<Inner>,
}

impl fmt::Debug for Spool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Spool")
            .field("root", &self.inner.root)
            .finish_non_exhaustive()
    }
}

/// Lock a mutex, ignoring poisoning: every critical section leaves the data consistent
/// before anything that can panic, so a poisoned lock still guards valid data.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn join_error(e: tokio::task::JoinError) -> Error {
    Error::Internal(format!("blocking spool task failed: {e}"))
}

fn committer_gone() -> Error {
    Error::Internal("spool committer stopped".into())
}

impl Spool {
    /// Open (or create) the spool in `dir` and recover it: temp files of unacknowledged
    /// stores are deleted, torn state records are cut off, corrupt or unreadable files
    /// are moved to `corrupt/`. One entry that cannot be read nor moved is logged,
    /// counted ([`RecoveryReport::unreadable_skipped`]) and left where it is: only an
    /// error listing `msg/` or `tmp/` themselves fails the open. Blocking: call it before
    /// serving, or from `spawn_blocking`.
    pub fn open(dir: &Path, config: SpoolConfig, clock: Arc<dyn Clock>) -> Result<Spool, Error> {
        let msg_dir = dir.join("msg");
        let tmp_dir = dir.join("tmp");
        let corrupt_dir = dir.join("corrupt");
        if !dir.exists() {
            create_private_dir_all(dir)
                .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
            // A new spool directory must not vanish in a crash either.
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                fsync_dir(parent).map_err(|e| Error::io("syncing the spool's parent", e))?;
            }
        }
        for d in [&msg_dir, &tmp_dir, &corrupt_dir] {
            create_private_dir_all(d)
                .map_err(|e| Error::io(format!("creating {}", d.display()), e))?;
            // Whole messages live here: no other local user may list or read them, in a
            // spool made before files were created private too (an audit read every
            // queued message as `nobody`: the umask's 0644 and 0755). Changed only when
            // needed (a directory made immutable by its operator stays as it is).
            let mode = fs::metadata(d)
                .map_err(|e| Error::io(format!("reading {}", d.display()), e))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                fs::set_permissions(d, fs::Permissions::from_mode(PRIVATE_DIR))
                    .map_err(|e| Error::io(format!("making {} private", d.display()), e))?;
            }
        }
        // The subdirectory entries themselves must survive a crash.
        fsync_dir(dir).map_err(|e| Error::io("syncing the spool directory", e))?;

        let lock_path = dir.join("lock");
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(PRIVATE_FILE)
            .open(&lock_path)
            .map_err(|e| Error::io("opening the spool lock file", e))?;
        match lock_file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(Error::Locked(dir.to_owned())),
            Err(fs::TryLockError::Error(e)) => {
                return Err(Error::io("locking the spool directory", e));
            }
        }

        let Recovered {
            index,
            skipped,
            report: recovery,
        } = recover(&msg_dir, &tmp_dir, &corrupt_dir, &config.retry)?;
        tracing::info!(
            spool = %dir.display(),
            messages = recovery.messages,
            temp_files_removed = recovery.temp_files_removed,
            torn_tails_truncated = recovery.torn_tails_truncated,
            corrupt_moved = recovery.corrupt_moved,
            unreadable_skipped = recovery.unreadable_skipped,
            "spool recovered"
        );

        let (tx, rx) = mpsc::channel();
        let inner = Arc::new(Inner {
            root: dir.to_owned(),
            msg_dir,
            tmp_dir,
            corrupt_dir,
            config,
            clock,
            index: Mutex::new(index),
            counters: Counters::default(),
            ids: IdGen::new(),
            notify: Notify::new(),
            commit_tx: tx,
            recovery,
            skipped,
            _lock: lock_file,
        });
        let weak = Arc::downgrade(&inner);
        let dirs = (inner.msg_dir.clone(), inner.corrupt_dir.clone());
        let max_batch = inner.config.max_batch.max(1);
        std::thread::Builder::new()
            .name("altroute-spool-commit".into())
            .spawn(move || committer(rx, weak, dirs, max_batch))
            .map_err(|e| Error::io("starting the spool committer thread", e))?;
        Ok(Spool { inner })
    }

    /// The spool directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The spool's clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.inner.clock
    }

    /// The retry schedule in force.
    pub fn schedule(&self) -> &RetrySchedule {
        &self.inner.config.retry
    }

    /// What recovery found at open.
    pub fn recovery(&self) -> &RecoveryReport {
        &self.inner.recovery
    }

    /// Where the file of message `id` lives (for operators and tests).
    pub fn message_path(&self, id: &MessageId) -> PathBuf {
        self.inner.msg_dir.join(id.as_str())
    }

    /// Store a message. Returns only once the message file and its directory entry are
    /// on stable storage; any failure (disk full included) is an `Err`, and then nothing
    /// of the message is left in the queue. All recipients start [`RecipientState::Pending`].
    pub async fn store(&self, envelope: Envelope, message: Vec<u8>) -> Result<MessageId, Error> {
        let inner = self.inner.clone();
        let result = async {
            if envelope.rcpt_to.is_empty() {
                return Err(Error::NoRecipients);
            }
            // The blocking part also hands the file to the committer, so a caller that
            // gives up waiting (client gone) cannot leave a half-stored message behind.
            let done = tokio::task::spawn_blocking(move || inner.prepare_store(envelope, message))
                .await
                .map_err(join_error)??;
            done.await.map_err(|_| committer_gone())?
        }
        .await;
        let counter = match result {
            Ok(_) => &self.inner.counters.stored,
            Err(_) => &self.inner.counters.store_errors,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        result
    }

    /// The message bytes, checked against their checksum. [`Error::Corrupt`] when they do
    /// not match or the file ends before the body does: that will not change by itself
    /// (see [`set_aside`](Self::set_aside)). Any other failure (EIO, EMFILE) is an
    /// [`Error::Io`] and may pass.
    pub fn read_message(&self, id: &MessageId) -> Result<Vec<u8>, Error> {
        let (path, off, len, crc) = {
            let index = lock(&self.inner.index);
            let slot = index.get(id).ok_or_else(|| Error::NotFound(id.clone()))?;
            (
                self.message_path(id),
                slot.body_off,
                slot.body_len,
                slot.body_crc,
            )
        };
        // Non-blocking and only a regular file: a FIFO put in its place once blocked the
        // delivery worker, and the whole relay with it, until someone wrote to it.
        let file = open_regular(&path, true).map_err(|e| Error::io(format!("opening {id}"), e))?;
        let mut body = vec![0u8; len as usize];
        file.read_exact_at(&mut body, off).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                Error::Corrupt {
                    id: id.clone(),
                    reason: "message body truncated".into(),
                }
            } else {
                Error::io(format!("reading {id}"), e)
            }
        })?;
        let mut h = crc32fast::Hasher::new();
        h.update(&[KIND_BODY]);
        h.update(&body);
        if h.finalize() != crc {
            return Err(Error::Corrupt {
                id: id.clone(),
                reason: "message body checksum mismatch".into(),
            });
        }
        Ok(body)
    }

    /// One message with its recipient states.
    pub fn entry(&self, id: &MessageId) -> Option<QueueEntry> {
        lock(&self.inner.index).get(id).map(|s| s.entry.clone())
    }

    /// Every message, oldest first (for `queue list`).
    pub fn list(&self) -> Vec<QueueEntry> {
        lock(&self.inner.index)
            .values()
            .map(|s| s.entry.clone())
            .collect()
    }

    /// Messages with a recipient due at `now` that are not claimed, oldest first.
    pub fn due(&self, now: Timestamp) -> Vec<QueueEntry> {
        lock(&self.inner.index)
            .values()
            .filter(|s| !s.in_flight && s.due().is_some_and(|t| t <= now))
            .map(|s| s.entry.clone())
            .collect()
    }

    /// Like [`due`](Self::due), and marks the messages in flight so the next call does not
    /// hand them out again until [`release`](Self::release). In flight is memory only:
    /// after a restart every message is available again.
    pub fn claim_due(&self, now: Timestamp, limit: usize) -> Vec<QueueEntry> {
        let mut index = lock(&self.inner.index);
        let mut out = Vec::new();
        for slot in index.values_mut() {
            if out.len() >= limit {
                break;
            }
            if !slot.in_flight && slot.due().is_some_and(|t| t <= now) {
                slot.in_flight = true;
                out.push(slot.entry.clone());
            }
        }
        out
    }

    /// Claim one message for an operator action (`queue bounce`), so that delivery does
    /// not take it meanwhile. [`Error::InFlight`] when an attempt holds it,
    /// [`Error::NotFound`] when it is not queued. End with [`release`](Self::release).
    pub fn claim(&self, id: &MessageId) -> Result<QueueEntry, Error> {
        let mut index = lock(&self.inner.index);
        let slot = index
            .get_mut(id)
            .ok_or_else(|| Error::NotFound(id.clone()))?;
        if slot.in_flight {
            return Err(Error::InFlight(id.clone()));
        }
        slot.in_flight = true;
        Ok(slot.entry.clone())
    }

    /// True while the message is claimed (a delivery attempt or an operator action).
    pub fn is_in_flight(&self, id: &MessageId) -> bool {
        lock(&self.inner.index).get(id).is_some_and(|s| s.in_flight)
    }

    /// End a claim made by [`claim_due`](Self::claim_due) or [`claim`](Self::claim).
    pub fn release(&self, id: &MessageId) {
        if let Some(slot) = lock(&self.inner.index).get_mut(id) {
            slot.in_flight = false;
        }
    }

    /// Keep message `id` from being claimed for delivery ([`due`](Self::due),
    /// [`claim_due`](Self::claim_due), [`next_wakeup`](Self::next_wakeup)) before
    /// `until`, whatever its recipients' due times say. For a message whose delivery
    /// results could not be recorded: its recipients still look due on disk, and without
    /// a hold it would be claimed and delivered again at once, in a loop. Memory only,
    /// like the claim; a later hold replaces an earlier one, and
    /// [`retry_now`](Self::retry_now) lifts it.
    pub fn hold(&self, id: &MessageId, until: Timestamp) {
        if let Some(slot) = lock(&self.inner.index).get_mut(id) {
            slot.hold_until = until;
        }
    }

    /// Messages whose recipients are all final: remove them once any DSN is queued.
    pub fn finished(&self) -> Vec<MessageId> {
        lock(&self.inner.index)
            .values()
            .filter(|s| !s.in_flight && s.entry.is_finished())
            .map(|s| s.entry.id.clone())
            .collect()
    }

    /// When the scheduler should next look at the queue: the earliest due time of an
    /// unclaimed message (0 = now), `None` if nothing is waiting.
    pub fn next_wakeup(&self) -> Option<Timestamp> {
        lock(&self.inner.index)
            .values()
            .filter(|s| !s.in_flight)
            .filter_map(Slot::due)
            .min()
    }

    /// Resolves when the queue got new work (a store, a forced retry). Meant for one
    /// scheduler loop: a wake-up that happens while nobody waits is kept for the next call.
    pub async fn changed(&self) {
        self.inner.notify.notified().await;
    }

    /// Queue depth by state and the spool's counters.
    pub fn stats(&self) -> SpoolStats {
        let c = &self.inner.counters;
        let mut s = SpoolStats {
            stored: c.stored.load(Ordering::Relaxed),
            store_errors: c.store_errors.load(Ordering::Relaxed),
            file_fsyncs: c.file_fsyncs.load(Ordering::Relaxed),
            dir_fsyncs: c.dir_fsyncs.load(Ordering::Relaxed),
            commit_batches: c.commit_batches.load(Ordering::Relaxed),
            max_batch: c.max_batch.load(Ordering::Relaxed),
            corrupt_moved: self.inner.recovery.corrupt_moved + c.set_aside.load(Ordering::Relaxed),
            ..SpoolStats::default()
        };
        for slot in lock(&self.inner.index).values() {
            s.messages += 1;
            s.bytes += slot.entry.size;
            s.in_flight += u64::from(slot.in_flight);
            let at = slot.entry.envelope.received_at;
            s.oldest_received_at = Some(s.oldest_received_at.map_or(at, |o| o.min(at)));
            for r in &slot.entry.recipients {
                *match r {
                    RecipientState::Pending => &mut s.pending,
                    RecipientState::Deferred { .. } => &mut s.deferred,
                    RecipientState::Delivered { .. } => &mut s.delivered,
                    RecipientState::Bounced { .. } => &mut s.bounced,
                    RecipientState::Expired { .. } => &mut s.expired,
                } += 1;
            }
        }
        s
    }

    /// Set one recipient's state, durably (fdatasync of the message file) before returning.
    /// No transition checks: this is the raw operation.
    pub async fn set_recipient(
        &self,
        id: &MessageId,
        index: usize,
        state: RecipientState,
    ) -> Result<(), Error> {
        self.update(id, move |entry, _now, _sched| {
            check_index(entry, index)?;
            Ok(vec![StateUpdate { r: index, s: state }])
        })
        .await
        .map(|_| ())
    }

    /// Record that recipient `index` was accepted by `via`.
    pub async fn delivered(&self, id: &MessageId, index: usize, via: &str) -> Result<(), Error> {
        let via = via.to_owned();
        self.update(id, move |entry, now, _| {
            check_open(entry, index)?;
            Ok(vec![StateUpdate {
                r: index,
                s: RecipientState::Delivered { at: now, via },
            }])
        })
        .await
        .map(|_| ())
    }

    /// Record a permanent failure of recipient `index`.
    pub async fn bounce(&self, id: &MessageId, index: usize, reason: &str) -> Result<(), Error> {
        let reason = reason.to_owned();
        self.update(id, move |entry, now, _| {
            check_open(entry, index)?;
            Ok(vec![StateUpdate {
                r: index,
                s: RecipientState::Bounced { at: now, reason },
            }])
        })
        .await
        .map(|_| ())
    }

    /// Record a temporary failure of recipient `index`: it is deferred per the retry
    /// schedule, or expires if the queue lifetime is used up. Returns the new state.
    pub async fn defer(
        &self,
        id: &MessageId,
        index: usize,
        reason: &str,
    ) -> Result<RecipientState, Error> {
        let reason = reason.to_owned();
        let mut ups = self
            .update(id, move |entry, now, sched| {
                check_open(entry, index)?;
                let attempts = entry.recipients[index].attempts().saturating_add(1);
                let s = match sched.next_attempt(attempts, entry.envelope.received_at, now) {
                    Some(next_attempt) => RecipientState::Deferred {
                        next_attempt,
                        attempts,
                        reason,
                    },
                    None => RecipientState::Expired {
                        at: now,
                        attempts,
                        reason,
                    },
                };
                Ok(vec![StateUpdate { r: index, s }])
            })
            .await?;
        ups.pop()
            .map(|u| u.s)
            .ok_or_else(|| Error::Internal("defer produced no update".into()))
    }

    /// Make deferred recipients due now (`altroute queue retry ID|all`). Attempt counts
    /// are kept. Returns how many recipients were rescheduled.
    pub async fn retry_now(&self, selector: &Selector) -> Result<usize, Error> {
        let mut n = 0;
        for id in self.select(selector)? {
            let ups = self
                .update(&id, |entry, now, _| {
                    Ok(entry
                        .recipients
                        .iter()
                        .enumerate()
                        .filter_map(|(r, s)| match s {
                            RecipientState::Deferred {
                                next_attempt,
                                attempts,
                                reason,
                            } if *next_attempt > now => Some(StateUpdate {
                                r,
                                s: RecipientState::Deferred {
                                    next_attempt: now,
                                    attempts: *attempts,
                                    reason: reason.clone(),
                                },
                            }),
                            _ => None,
                        })
                        .collect())
                })
                .await;
            match ups {
                Ok(ups) => n += ups.len(),
                // Removed meanwhile (delivered and cleaned up): nothing to retry.
                Err(Error::NotFound(_)) if *selector == Selector::All => {}
                Err(e) => return Err(e),
            }
            // The operator asked for an attempt now: that overrides a hold too.
            self.hold(&id, 0);
        }
        self.inner.notify.notify_one();
        Ok(n)
    }

    /// Bounce every recipient that is not final (`altroute queue bounce ID|all`).
    /// Returns how many recipients were bounced; the caller queues the DSNs.
    pub async fn bounce_now(&self, selector: &Selector, reason: &str) -> Result<usize, Error> {
        let mut n = 0;
        for id in self.select(selector)? {
            match self.bounce_open(&id, reason).await {
                Ok(bounced) => n += bounced.len(),
                Err(Error::NotFound(_)) if *selector == Selector::All => {}
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }

    /// Bounce every recipient of one message that is not final, in one durable record.
    /// Returns the indices bounced (empty when all were final already), so that the
    /// caller can build the DSN for exactly those.
    pub async fn bounce_open(&self, id: &MessageId, reason: &str) -> Result<Vec<usize>, Error> {
        let reason = reason.to_owned();
        let ups = self
            .update(id, move |entry, now, _| {
                Ok(entry
                    .recipients
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| !s.is_final())
                    .map(|(r, _)| StateUpdate {
                        r,
                        s: RecipientState::Bounced {
                            at: now,
                            reason: reason.clone(),
                        },
                    })
                    .collect())
            })
            .await?;
        Ok(ups.into_iter().map(|u| u.r).collect())
    }

    /// Delete a message from the queue, durably (the unlink shares a group commit).
    pub async fn remove(&self, id: &MessageId) -> Result<(), Error> {
        let inner = self.inner.clone();
        let id = id.clone();
        tokio::task::spawn_blocking(move || inner.remove_blocking(&id))
            .await
            .map_err(join_error)?
    }

    /// Take message `id` out of the queue and keep its file, as it is, in `corrupt/` for
    /// the operator (under another name if `corrupt/` has one of that name already):
    /// what to do with a message [`read_message`](Self::read_message) found
    /// [`Error::Corrupt`], which recovery would set aside too. Never delete what may be
    /// someone's mail. Durable like [`remove`](Self::remove): the rename goes through the
    /// group commit (so no store or removal races it), then `corrupt/` and `msg/` are
    /// fsynced. Logged at error level with `reason`, counted in
    /// [`SpoolStats::corrupt_moved`]. Returns the file's new path.
    pub async fn set_aside(&self, id: &MessageId, reason: &str) -> Result<PathBuf, Error> {
        let inner = self.inner.clone();
        let id = id.clone();
        let reason = reason.to_owned();
        tokio::task::spawn_blocking(move || inner.set_aside_blocking(&id, &reason))
            .await
            .map_err(join_error)?
    }

    fn select(&self, selector: &Selector) -> Result<Vec<MessageId>, Error> {
        let index = lock(&self.inner.index);
        match selector {
            Selector::All => Ok(index.keys().cloned().collect()),
            Selector::One(id) if index.contains_key(id) => Ok(vec![id.clone()]),
            Selector::One(id) => Err(Error::NotFound(id.clone())),
        }
    }

    async fn update<F>(&self, id: &MessageId, f: F) -> Result<Vec<StateUpdate>, Error>
    where
        F: FnOnce(&QueueEntry, Timestamp, &RetrySchedule) -> Result<Vec<StateUpdate>, Error>
            + Send
            + 'static,
    {
        let inner = self.inner.clone();
        let id = id.clone();
        tokio::task::spawn_blocking(move || inner.update_blocking(&id, f))
            .await
            .map_err(join_error)?
    }
}

fn check_index(entry: &QueueEntry, index: usize) -> Result<(), Error> {
    if index < entry.recipients.len() {
        Ok(())
    } else {
        Err(Error::NoSuchRecipient {
            id: entry.id.clone(),
            index,
        })
    }
}

fn check_open(entry: &QueueEntry, index: usize) -> Result<(), Error> {
    check_index(entry, index)?;
    if entry.recipients[index].is_final() {
        return Err(Error::AlreadyFinal {
            id: entry.id.clone(),
            index,
        });
    }
    Ok(())
}

impl Inner {
    /// Write the message to `tmp/<id>`, fsync it and queue it for the group commit.
    fn prepare_store(
        &self,
        mut envelope: Envelope,
        message: Vec<u8>,
    ) -> Result<oneshot::Receiver<Result<MessageId, Error>>, Error> {
        let now = self.clock.now();
        if envelope.received_at == 0 {
            envelope.received_at = now;
        }
        let id = {
            let index = lock(&self.index);
            let mut id = self.ids.next(now);
            while index.contains_key(&id) || self.skipped.contains(&id) {
                id = self.ids.next(now);
            }
            id
        };
        let message_id = header_message_id(&message);
        let header = StoredHeader {
            id: id.clone(),
            envelope,
            message_id,
        };
        let header_json = serde_json::to_vec(&header)
            .map_err(|e| Error::Internal(format!("encoding the envelope: {e}")))?;
        let env_frame =
            frame::encode(KIND_ENVELOPE, &header_json).map_err(|e| Error::io("framing", e))?;
        let body_prefix =
            frame::prefix(KIND_BODY, &message).map_err(|e| Error::io("framing", e))?;

        let tmp = self.tmp_dir.join(id.as_str());
        let write = || -> io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(PRIVATE_FILE)
                .open(&tmp)?;
            let mut head = Vec::with_capacity(MAGIC.len() + env_frame.len() + body_prefix.len());
            head.extend_from_slice(MAGIC);
            head.extend_from_slice(&env_frame);
            head.extend_from_slice(&body_prefix);
            f.write_all(&head)?;
            f.write_all(&message)?;
            // fdatasync covers the data and the file size, which is all a new file needs.
            f.sync_data()
        };
        if let Err(e) = write() {
            // Free the space now: a half-written temp file must not keep the disk full.
            let _ = fs::remove_file(&tmp);
            return Err(Error::io(format!("writing message {id}"), e));
        }
        self.counters.file_fsyncs.fetch_add(1, Ordering::Relaxed);

        let body_off = (MAGIC.len() + env_frame.len() + body_prefix.len()) as u64;
        let body_crc = u32::from_le_bytes([
            body_prefix[4],
            body_prefix[5],
            body_prefix[6],
            body_prefix[7],
        ]);
        let dst = self.msg_dir.join(id.as_str());
        let size = message.len() as u64;
        let slot = Slot {
            entry: QueueEntry {
                id: id.clone(),
                recipients: vec![RecipientState::Pending; header.envelope.rcpt_to.len()],
                expires_at: self.config.retry.expires_at(header.envelope.received_at),
                envelope: header.envelope,
                message_id: header.message_id,
                size,
            },
            body_off,
            body_len: size,
            body_crc,
            file: Arc::new(Mutex::new(MsgFile {
                path: dst.clone(),
                good_len: body_off + size,
                dirty: false,
                removed: false,
            })),
            in_flight: false,
            hold_until: 0,
        };
        let (done, rx) = oneshot::channel();
        let op = Op::Link {
            tmp: tmp.clone(),
            dst,
            slot: Box::new(slot),
            done,
        };
        if self.commit_tx.send(op).is_err() {
            let _ = fs::remove_file(&tmp);
            return Err(committer_gone());
        }
        Ok(rx)
    }

    fn update_blocking<F>(&self, id: &MessageId, f: F) -> Result<Vec<StateUpdate>, Error>
    where
        F: FnOnce(&QueueEntry, Timestamp, &RetrySchedule) -> Result<Vec<StateUpdate>, Error>,
    {
        let not_found = || Error::NotFound(id.clone());
        let file = lock(&self.index)
            .get(id)
            .ok_or_else(not_found)?
            .file
            .clone();
        // Lock order: message file, then index. Holding the file lock across the write
        // keeps the in-memory state in the same order as the records on disk.
        let mut mf = lock(&file);
        if mf.removed {
            return Err(not_found());
        }
        let now = self.clock.now();
        let updates = {
            let index = lock(&self.index);
            let slot = index.get(id).ok_or_else(not_found)?;
            f(&slot.entry, now, &self.config.retry)?
        };
        if updates.is_empty() {
            return Ok(updates);
        }
        let payload = serde_json::to_vec(&updates)
            .map_err(|e| Error::Internal(format!("encoding a state record: {e}")))?;
        let record = frame::encode(KIND_STATE, &payload).map_err(|e| Error::io("framing", e))?;

        let fh =
            open_regular(&mf.path, false).map_err(|e| Error::io(format!("opening {id}"), e))?;
        if mf.dirty {
            fh.set_len(mf.good_len)
                .and_then(|()| fh.sync_data())
                .map_err(|e| Error::io(format!("repairing {id}"), e))?;
            mf.dirty = false;
        }
        let written = fh
            .write_all_at(&record, mf.good_len)
            .and_then(|()| fh.sync_data());
        if let Err(e) = written {
            // Cut the failed record off so it can neither hide later records behind a
            // torn frame nor come back after a crash as a state nobody acknowledged.
            if fh
                .set_len(mf.good_len)
                .and_then(|()| fh.sync_data())
                .is_err()
            {
                mf.dirty = true;
            }
            return Err(Error::io(format!("recording state of {id}"), e));
        }
        self.counters.file_fsyncs.fetch_add(1, Ordering::Relaxed);
        mf.good_len += record.len() as u64;

        let mut index = lock(&self.index);
        if let Some(slot) = index.get_mut(id) {
            apply(id, &mut slot.entry.recipients, &updates);
        }
        Ok(updates)
    }

    fn remove_blocking(&self, id: &MessageId) -> Result<(), Error> {
        self.retire(id, |path, done| Op::Unlink { path, done })?
            .map_err(|e| Error::io(format!("removing {id}"), e))
    }

    fn set_aside_blocking(&self, id: &MessageId, reason: &str) -> Result<PathBuf, Error> {
        match self.retire(id, |path, done| Op::Aside { path, done })? {
            Ok(dst) => {
                self.counters.set_aside.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%id, %reason, path = %dst.display(), "corrupt message moved to corrupt/ for the operator");
                Ok(dst)
            }
            Err(e) => Err(Error::io(format!("moving {id} to corrupt/"), e)),
        }
    }

    /// Takes message `id`'s file out of `msg/` through the committer (`op`: unlink it or
    /// move it aside), holding its lock until done, so that no state record can be
    /// appended meanwhile, and none after (`removed`). If the file left `msg/` but the
    /// directory fsync failed, it is out of `msg/` all the same: it leaves the index,
    /// and the error is returned.
    fn retire<T>(
        &self,
        id: &MessageId,
        op: impl FnOnce(PathBuf, oneshot::Sender<io::Result<T>>) -> Op,
    ) -> Result<io::Result<T>, Error> {
        let file = lock(&self.index)
            .get(id)
            .ok_or_else(|| Error::NotFound(id.clone()))?
            .file
            .clone();
        let mut mf = lock(&file);
        if mf.removed {
            return Err(Error::NotFound(id.clone()));
        }
        let (done, rx) = oneshot::channel();
        self.commit_tx
            .send(op(mf.path.clone(), done))
            .map_err(|_| committer_gone())?;
        let result = rx.blocking_recv().map_err(|_| committer_gone())?;
        if result.is_ok() || !mf.path.exists() {
            mf.removed = true;
            lock(&self.index).remove(id);
        }
        Ok(result)
    }
}

fn apply(id: &MessageId, recipients: &mut [RecipientState], updates: &[StateUpdate]) {
    for u in updates {
        match recipients.get_mut(u.r) {
            Some(r) => *r = u.s.clone(),
            None => tracing::warn!(
                %id,
                index = u.r,
                "state record for a recipient that does not exist (ignored)"
            ),
        }
    }
}

/// The committer thread: takes every operation queued while the previous directory fsync
/// ran, applies the renames/unlinks, fsyncs `msg/` once (and `corrupt/` first, when a
/// file moved there), and answers them all.
fn committer(
    rx: mpsc::Receiver<Op>,
    inner: Weak<Inner>,
    (msg_dir, corrupt_dir): (PathBuf, PathBuf),
    max_batch: usize,
) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        // Step 1: the directory changes.
        let mut linked = Vec::new();
        let mut unlinked = Vec::new();
        let mut aside = Vec::new();
        for op in batch {
            match op {
                Op::Link {
                    tmp,
                    dst,
                    slot,
                    done,
                } => match fs::rename(&tmp, &dst) {
                    Ok(()) => linked.push((dst, slot, done)),
                    Err(e) => {
                        let _ = fs::remove_file(&tmp);
                        let _ = done.send(Err(Error::io("moving the message into the spool", e)));
                    }
                },
                Op::Unlink { path, done } => match fs::remove_file(&path) {
                    Ok(()) => unlinked.push(done),
                    Err(e) => {
                        let _ = done.send(Err(e));
                    }
                },
                Op::Aside { path, done } => match move_aside(&path, &corrupt_dir) {
                    Ok(dst) => aside.push((dst, done)),
                    Err(e) => {
                        let _ = done.send(Err(e));
                    }
                },
            }
        }
        if linked.is_empty() && unlinked.is_empty() && aside.is_empty() {
            continue;
        }
        // Step 2: one directory fsync makes all of them durable. A file set aside has its
        // new name synced first, then its old one's removal.
        let aside_synced = if aside.is_empty() {
            None
        } else {
            Some(fsync_dir(&corrupt_dir))
        };
        let synced = fsync_dir(&msg_dir);
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let c = &inner.counters;
        c.dir_fsyncs
            .fetch_add(1 + u64::from(aside_synced.is_some()), Ordering::Relaxed);
        c.commit_batches.fetch_add(1, Ordering::Relaxed);
        c.max_batch.fetch_max(
            (linked.len() + unlinked.len() + aside.len()) as u64,
            Ordering::Relaxed,
        );
        match &synced {
            Ok(()) => {
                let mut acks = Vec::with_capacity(linked.len());
                {
                    let mut index = lock(&inner.index);
                    for (_, slot, done) in linked {
                        let id = slot.entry.id.clone();
                        index.insert(id.clone(), *slot);
                        acks.push((id, done));
                    }
                }
                inner.notify.notify_one();
                // Let go of the spool before answering: a caller that drops its last
                // handle right after its answer must find the spool (and its lock) released.
                drop(inner);
                for (id, done) in acks {
                    let _ = done.send(Ok(id));
                }
                for done in unlinked {
                    let _ = done.send(Ok(()));
                }
            }
            Err(e) => {
                drop(inner);
                tracing::error!(error = %e, "spool directory fsync failed");
                for (dst, _, done) in linked {
                    // Not acknowledged, so it must not be delivered either.
                    let _ = fs::remove_file(&dst);
                    let _ = done.send(Err(Error::io(
                        "syncing the spool directory",
                        io::Error::new(e.kind(), e.to_string()),
                    )));
                }
                for done in unlinked {
                    let _ = done.send(Err(io::Error::new(e.kind(), e.to_string())));
                }
            }
        }
        let aside_result = match (aside_synced, &synced) {
            (Some(Err(e)), _) => {
                tracing::error!(error = %e, "fsync of the spool's corrupt/ failed");
                Err(e)
            }
            (_, Err(e)) => Err(io::Error::new(e.kind(), e.to_string())),
            _ => Ok(()),
        };
        for (dst, done) in aside {
            let _ = done.send(match &aside_result {
                Ok(()) => Ok(dst),
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            });
        }
    }
}

/// Move `path` (a file or anything else that sits in `msg/`) into `corrupt_dir`, under its
/// own name or, when `corrupt/` has that name already (set aside before, and a copy put
/// back into `msg/` since, or an id that came round again), the first free `<name>.<n>`. No fsync: the caller syncs both
/// directories. Only recovery and then the committer thread write to `corrupt/`, one
/// at a time, so the name found free stays free until the rename.
fn move_aside(path: &Path, corrupt_dir: &Path) -> io::Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let free =
        |p: &Path| matches!(fs::symlink_metadata(p), Err(e) if e.kind() == io::ErrorKind::NotFound);
    let mut dst = corrupt_dir.join(name);
    let mut n = 0u32;
    while !free(&dst) {
        n += 1;
        if n > 1000 {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} has 1000 files of that name", corrupt_dir.display()),
            ));
        }
        let mut alt = name.to_owned();
        alt.push(format!(".{n}"));
        dst = corrupt_dir.join(alt);
    }
    fs::rename(path, &dst)?;
    Ok(dst)
}

/// What [`recover`] rebuilt.
struct Recovered {
    index: BTreeMap<MessageId, Slot>,
    /// The ids of the entries left in `msg/` (see [`RecoveryReport::unreadable_skipped`]).
    skipped: BTreeSet<MessageId>,
    report: RecoveryReport,
}

/// Rebuild the index from `msg/`, cleaning up after a crash.
///
/// One entry's I/O error (a directory where a message file should be, a file without
/// read permission, a bad sector) is handled like corruption: the entry is moved to
/// `corrupt/`, or, if even that fails, logged, counted and left alone, so that it cannot
/// keep every other message from being delivered. Only listing `msg/` or `tmp/`, or
/// syncing them, fails recovery.
fn recover(
    msg_dir: &Path,
    tmp_dir: &Path,
    corrupt_dir: &Path,
    schedule: &RetrySchedule,
) -> Result<Recovered, Error> {
    let mut report = RecoveryReport::default();
    let read_dir =
        |d: &Path| fs::read_dir(d).map_err(|e| Error::io(format!("listing {}", d.display()), e));

    // Temp files belong to stores that were never acknowledged. Only regular files are
    // ours: anything else was put there by someone else, and is not deleted.
    for ent in read_dir(tmp_dir)? {
        let ent = ent.map_err(|e| Error::io("listing tmp/", e))?;
        let path = ent.path();
        let removed = match ent.file_type() {
            Ok(t) if t.is_file() => fs::remove_file(&path),
            Ok(_) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            )),
            Err(e) => Err(e),
        };
        match removed {
            Ok(()) => report.temp_files_removed += 1,
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "leaving an entry of the spool's tmp/ that is not a temp file or cannot be removed");
                report.unreadable_skipped += 1;
            }
        }
    }
    if report.temp_files_removed > 0 {
        fsync_dir(tmp_dir).map_err(|e| Error::io("syncing tmp/", e))?;
    }

    let mut index = BTreeMap::new();
    let mut skipped = BTreeSet::new();
    for ent in read_dir(msg_dir)? {
        let ent = ent.map_err(|e| Error::io("listing msg/", e))?;
        let path = ent.path();
        let Some(id) = ent
            .file_name()
            .to_str()
            .and_then(|n| MessageId::parse(n).ok())
        else {
            tracing::warn!(path = %path.display(), "ignoring a foreign file in the spool");
            continue;
        };
        let reason = match load(&path, &id, schedule) {
            Ok(Ok((slot, torn))) => {
                report.torn_tails_truncated += u64::from(torn);
                report.messages += 1;
                index.insert(id, slot);
                continue;
            }
            Ok(Err(reason)) => reason,
            Err(e) => {
                // Not known to be corrupt (permissions, an I/O error, not a file): left
                // where it is for the operator, who may fix it and restart. Moved aside,
                // such mail once left the queue with no DSN.
                tracing::error!(%id, path = %path.display(), error = %e, "a spool file cannot be read; left in msg/ (not delivered until the relay can read it at a start)");
                report.unreadable_skipped += 1;
                skipped.insert(id);
                continue;
            }
        };
        // Never delete what may be someone's mail: keep it aside for the operator.
        match move_aside(&path, corrupt_dir) {
            Ok(dst) => {
                tracing::error!(%id, %reason, path = %dst.display(), "spool file moved to corrupt/ for the operator");
                report.corrupt_moved += 1;
            }
            Err(e) => {
                tracing::error!(%id, %reason, path = %path.display(), error = %e, "cannot move an unreadable spool file to corrupt/; skipping it");
                report.unreadable_skipped += 1;
                skipped.insert(id);
            }
        }
    }
    if report.corrupt_moved > 0 {
        // The new names first: once synced, a file moved aside cannot be lost.
        fsync_dir(corrupt_dir).map_err(|e| Error::io("syncing corrupt/", e))?;
        fsync_dir(msg_dir).map_err(|e| Error::io("syncing msg/", e))?;
    }
    Ok(Recovered {
        index,
        skipped,
        report,
    })
}

/// Opens a spool file for reading (`read`) or writing without blocking (a FIFO in its
/// place once blocked recovery, so the relay never started, and a state write, so a
/// message never finished), and only if it is a regular file.
fn open_regular(path: &Path, read: bool) -> io::Result<File> {
    open_regular_with(path, OpenOptions::new().read(read).write(!read))
}

/// Mode of the spool's directories (and of the relay's other directories).
const PRIVATE_DIR: u32 = 0o700;
/// Mode of a file the spool or the relay creates: messages, state, audit log, TLS results.
const PRIVATE_FILE: u32 = 0o600;

/// `fs::create_dir_all`, with mode 0700 for each directory it creates: the spool holds
/// whole messages and the relay's other directories what they say of mail, for no other
/// local user to read.
pub fn create_private_dir_all(path: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR)
        .create(path)
}

/// `options` (read, write, append, create...) opened non-blocking: the file if it is a
/// regular file, else an `InvalidInput` error (`not a regular file`). A file it creates
/// has mode 0600. The relay opens its own other files (audit log, MTA-STS cache, TLS-RPT
/// results, watched policies) so too.
pub fn open_regular_with(path: &Path, options: &mut OpenOptions) -> io::Result<File> {
    let file = options
        .custom_flags(libc::O_NONBLOCK)
        .mode(PRIVATE_FILE)
        .open(path)?;
    if file.metadata()?.is_file() {
        Ok(file)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ))
    }
}

/// Load one spool file. Outer error: I/O. Inner error: the file is corrupt (reason).
/// A torn tail (partial or garbled state records) is cut off; the bool says so.
fn load(
    path: &Path,
    id: &MessageId,
    schedule: &RetrySchedule,
) -> io::Result<Result<(Slot, bool), String>> {
    // Read-only until a torn tail must be cut: a file the relay may read but not write
    // (restored by root, say) is still mail to deliver.
    let file = open_regular(path, true)?;
    let len = file.metadata()?.len();
    let mut magic = [0u8; 8];
    if len < magic.len() as u64 {
        return Ok(Err("shorter than the file header".into()));
    }
    file.read_exact_at(&mut magic, 0)?;
    if &magic != MAGIC {
        return Ok(Err("not a spool file (bad magic)".into()));
    }
    let mut off = MAGIC.len() as u64;
    let Some((h, kind, data)) = frame::read_frame(&file, off, len)? else {
        return Ok(Err("envelope record torn or corrupt".into()));
    };
    if kind != KIND_ENVELOPE {
        return Ok(Err("first record is not an envelope".into()));
    }
    let header: StoredHeader = match serde_json::from_slice(&data) {
        Ok(h) => h,
        Err(e) => return Ok(Err(format!("envelope record unreadable: {e}"))),
    };
    if header.id != *id {
        return Ok(Err(format!("file holds message {}", header.id)));
    }
    off = h.end(off);
    // The body is checked when read (read_message), not here: recovery stays fast with
    // large queues.
    let Some(bh) = frame::read_header(&file, off, len)? else {
        return Ok(Err("message body truncated".into()));
    };
    let mut k = [0u8; 1];
    file.read_exact_at(&mut k, off + HEADER_LEN)?;
    if k[0] != KIND_BODY {
        return Ok(Err("second record is not a message body".into()));
    }
    let body_off = off + HEADER_LEN + 1;
    let body_len = u64::from(bh.len) - 1;
    off = bh.end(off);

    let mut recipients = vec![RecipientState::Pending; header.envelope.rcpt_to.len()];
    // A torn write can only be the last record. A bad record that whole, readable
    // records follow is damage in the middle: it is skipped, and what follows is applied
    // and kept. Recovery once took the first bad record for a torn tail and cut off every
    // record after it, a "delivered" one among them, and an audit's mail went out twice.
    let mut bad_from: Option<u64> = None;
    let mut skipped = 0usize;
    while off < len {
        let Some(h) = frame::read_header(&file, off, len)? else {
            break;
        };
        let updates = frame::read_frame(&file, off, len)?
            .filter(|(_, kind, _)| *kind == KIND_STATE)
            .and_then(|(_, _, data)| serde_json::from_slice::<Vec<StateUpdate>>(&data).ok());
        match updates {
            Some(updates) => {
                if bad_from.take().is_some() {
                    skipped += 1;
                }
                apply(id, &mut recipients, &updates);
            }
            None => {
                bad_from.get_or_insert(off);
            }
        }
        off = h.end(off);
    }
    if skipped > 0 {
        tracing::warn!(%id, skipped, "damaged state records in the middle of a message file skipped; the records after them are applied");
    }
    let off = bad_from.unwrap_or(off);
    let torn = off < len;
    if torn {
        // What follows the body is cut only once the body itself is known good: its
        // length is read from the file, and a damaged one once made recovery cut off the
        // end of the body and every state record after it. Otherwise the file goes aside
        // as it was found.
        let mut body = vec![0u8; usize::try_from(body_len).unwrap_or(usize::MAX)];
        let intact = file.read_exact_at(&mut body, body_off).is_ok() && {
            let mut h = crc32fast::Hasher::new();
            h.update(&[KIND_BODY]);
            h.update(&body);
            h.finalize() == bh.crc
        };
        if !intact {
            return Ok(Err(
                "garbled after the envelope, and the message body fails its checksum".into(),
            ));
        }
        tracing::warn!(%id, cut = len - off, "cutting a torn state record off");
        let file = open_regular(path, false)?;
        file.set_len(off)?;
        file.sync_data()?;
    }
    let slot = Slot {
        entry: QueueEntry {
            id: id.clone(),
            expires_at: schedule.expires_at(header.envelope.received_at),
            envelope: header.envelope,
            message_id: header.message_id,
            size: body_len,
            recipients,
        },
        body_off,
        body_len,
        body_crc: bh.crc,
        file: Arc::new(Mutex::new(MsgFile {
            path: path.to_owned(),
            good_len: off,
            dirty: false,
            removed: false,
        })),
        in_flight: false,
        hold_until: 0,
    };
    Ok(Ok((slot, torn)))
}
