//! Envelope, recipient states, queue entries and statistics.

use serde::{Deserialize, Serialize};

use crate::{MessageId, Timestamp};

/// The SMTP envelope of a message, as accepted by the SMTP layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Envelope {
    /// Reverse path (`MAIL FROM`), empty for bounces (`<>`).
    pub mail_from: String,
    /// Forward paths (`RCPT TO`), in order; recipient states use the same indices.
    pub rcpt_to: Vec<String>,
    /// `MAIL FROM ... REQUIRETLS` (RFC 8689).
    #[serde(default)]
    pub requiretls: bool,
    /// The message carried `TLS-Required: No` (RFC 8689).
    #[serde(default)]
    pub tls_required_no: bool,
    /// Peer address / HELO name, for `Received:` and loop avoidance.
    #[serde(default)]
    pub received_from: Option<String>,
    /// Reception time (Unix seconds). 0 means "now": `store` fills it from the spool clock.
    #[serde(default)]
    pub received_at: Timestamp,
    /// DSN envelope id (`MAIL FROM ... ENVID=`, RFC 3461).
    #[serde(default)]
    pub env_id: Option<String>,
    /// `MAIL FROM ... SMTPUTF8` (RFC 6531).
    #[serde(default)]
    pub smtputf8: bool,
    /// DSN `RET=` (RFC 3461).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ret: Option<altroute_smtp::dsn::Ret>,
    /// The DSN parameters (`NOTIFY`, `ORCPT`) of each of `rcpt_to` (same order), or
    /// empty: none given. Missing entries are "none given".
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dsn: Vec<altroute_smtp::dsn::RcptDsn>,
}

impl Envelope {
    /// The DSN parameters of recipient `index` (none given when absent).
    pub fn dsn_of(&self, index: usize) -> altroute_smtp::dsn::RcptDsn {
        self.dsn.get(index).cloned().unwrap_or_default()
    }

    /// An envelope with the given sender and recipients and every other field at its
    /// default (no REQUIRETLS, received now).
    pub fn new(mail_from: impl Into<String>, rcpt_to: Vec<String>) -> Self {
        Envelope {
            mail_from: mail_from.into(),
            rcpt_to,
            requiretls: false,
            tls_required_no: false,
            received_from: None,
            received_at: 0,
            env_id: None,
            smtputf8: false,
            ret: None,
            dsn: Vec::new(),
        }
    }
}

/// Where one recipient of a message stands. Survives restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum RecipientState {
    /// Never tried; due immediately.
    Pending,
    /// Temporarily failed; try again at `next_attempt`.
    Deferred {
        /// When to try again (Unix seconds).
        next_attempt: Timestamp,
        /// Failed attempts so far.
        attempts: u32,
        /// Last error (e.g. the remote reply or the TLS verdict).
        reason: String,
    },
    /// Accepted by the next hop.
    Delivered {
        /// When.
        at: Timestamp,
        /// Which host accepted it (and route, for the logs).
        via: String,
    },
    /// Permanently failed (5xx, policy bounce, or an operator's `queue bounce`).
    Bounced {
        /// When.
        at: Timestamp,
        /// Why.
        reason: String,
    },
    /// The queue lifetime ran out while the recipient was deferred.
    Expired {
        /// When.
        at: Timestamp,
        /// Attempts made.
        attempts: u32,
        /// The last temporary error.
        reason: String,
    },
}

impl RecipientState {
    /// Delivered, bounced or expired: no more attempts.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            RecipientState::Delivered { .. }
                | RecipientState::Bounced { .. }
                | RecipientState::Expired { .. }
        )
    }

    /// When the recipient is next due: `Some(0)` for pending (now), `None` when final.
    pub fn due_at(&self) -> Option<Timestamp> {
        match self {
            RecipientState::Pending => Some(0),
            RecipientState::Deferred { next_attempt, .. } => Some(*next_attempt),
            _ => None,
        }
    }

    /// Failed attempts so far.
    pub fn attempts(&self) -> u32 {
        match self {
            RecipientState::Deferred { attempts, .. }
            | RecipientState::Expired { attempts, .. } => *attempts,
            _ => 0,
        }
    }

    /// A short name: pending, deferred, delivered, bounced, expired.
    pub fn name(&self) -> &'static str {
        match self {
            RecipientState::Pending => "pending",
            RecipientState::Deferred { .. } => "deferred",
            RecipientState::Delivered { .. } => "delivered",
            RecipientState::Bounced { .. } => "bounced",
            RecipientState::Expired { .. } => "expired",
        }
    }
}

/// One message in the queue: what `queue list/show` prints and what delivery works on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct QueueEntry {
    /// Queue id.
    pub id: MessageId,
    /// The envelope as stored.
    pub envelope: Envelope,
    /// The `Message-ID` header, if the message had one.
    pub message_id: Option<String>,
    /// Message size in bytes.
    pub size: u64,
    /// One state per `envelope.rcpt_to`, same order.
    pub recipients: Vec<RecipientState>,
    /// When the queue lifetime runs out (reception + lifetime).
    pub expires_at: Timestamp,
}

impl QueueEntry {
    /// All recipients final: the message can be removed (after any DSN was queued).
    pub fn is_finished(&self) -> bool {
        self.recipients.iter().all(RecipientState::is_final)
    }

    /// Earliest time any recipient is due (`Some(0)` = now), `None` when finished.
    pub fn next_due(&self) -> Option<Timestamp> {
        self.recipients
            .iter()
            .filter_map(RecipientState::due_at)
            .min()
    }

    /// Indices of the recipients due at `now`.
    pub fn due_recipients(&self, now: Timestamp) -> Vec<usize> {
        self.recipients
            .iter()
            .enumerate()
            .filter(|(_, s)| s.due_at().is_some_and(|t| t <= now))
            .map(|(i, _)| i)
            .collect()
    }
}

/// Which messages an operator command applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// One message.
    One(MessageId),
    /// Every message in the queue.
    All,
}

/// Queue depth and spool counters, for metrics and `queue list` summaries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct SpoolStats {
    /// Messages in the queue.
    pub messages: u64,
    /// Messages handed out by `claim_due` and not yet released.
    pub in_flight: u64,
    /// Total message bytes in the queue.
    pub bytes: u64,
    /// Recipients by state.
    pub pending: u64,
    /// Recipients by state.
    pub deferred: u64,
    /// Recipients by state.
    pub delivered: u64,
    /// Recipients by state.
    pub bounced: u64,
    /// Recipients by state.
    pub expired: u64,
    /// Successful `store` calls since open.
    pub stored: u64,
    /// Failed `store` calls since open.
    pub store_errors: u64,
    /// fsync/fdatasync calls on message files since open.
    pub file_fsyncs: u64,
    /// fsync calls on the spool's directories since open (one of `msg/` per group commit,
    /// plus one of `corrupt/` when the commit moved a file there).
    pub dir_fsyncs: u64,
    /// Group commits since open.
    pub commit_batches: u64,
    /// Largest group commit seen (operations sharing one directory fsync).
    pub max_batch: u64,
    /// Message files moved to `corrupt/` since open: by recovery
    /// ([`RecoveryReport::corrupt_moved`]) and by [`Spool::set_aside`](crate::Spool::set_aside)
    /// (a body that failed its checksum when delivery read it).
    pub corrupt_moved: u64,
    /// Reception time of the oldest queued message (Unix seconds), `None` when empty.
    pub oldest_received_at: Option<Timestamp>,
}

/// What recovery found when the spool was opened.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct RecoveryReport {
    /// Messages loaded.
    pub messages: u64,
    /// Temporary files (unacknowledged stores) deleted.
    pub temp_files_removed: u64,
    /// Spool files whose torn tail (partial state record) was cut off.
    pub torn_tails_truncated: u64,
    /// Spool files moved to `corrupt/`: corrupt, or unreadable (an I/O error, e.g. a
    /// directory where a file should be).
    pub corrupt_moved: u64,
    /// Entries left where they were: in `msg/`, files that could neither be loaded nor
    /// moved to `corrupt/`; in `tmp/`, entries that are not regular files or could not be
    /// deleted. Each is logged at error level; every other message is recovered.
    pub unreadable_skipped: u64,
}
