//! The crate's error type.

use std::io;
use std::path::PathBuf;

use crate::MessageId;

/// Everything that can go wrong in the spool.
///
/// The SMTP layer maps every variant returned by [`Spool::store`](crate::Spool::store) to a
/// temporary (4xx) reply: the message was *not* accepted, the client keeps it and retries.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A filesystem operation failed (disk full, I/O error, permissions, ...).
    #[error("spool I/O error while {context}: {source}")]
    Io {
        /// What the spool was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Another process holds the spool directory lock.
    #[error("spool directory {0} is locked by another process")]
    Locked(PathBuf),
    /// No message with this id is in the queue.
    #[error("message {0} is not in the queue")]
    NotFound(MessageId),
    /// The message has fewer recipients than the index given.
    #[error("message {id} has no recipient #{index}")]
    NoSuchRecipient {
        /// The message.
        id: MessageId,
        /// The recipient index that was asked for.
        index: usize,
    },
    /// The recipient already reached a final state (delivered, bounced, expired).
    #[error("recipient #{index} of message {id} is already final")]
    AlreadyFinal {
        /// The message.
        id: MessageId,
        /// The recipient index.
        index: usize,
    },
    /// `store` was called with an envelope without recipients.
    #[error("envelope has no recipients")]
    NoRecipients,
    /// A spool file failed its checksum, could not be parsed or ends too soon: waiting
    /// will not repair it (see [`Spool::set_aside`](crate::Spool::set_aside)).
    #[error("spool file for {id} is corrupt: {reason}")]
    Corrupt {
        /// The message.
        id: MessageId,
        /// What is wrong.
        reason: String,
    },
    /// The message is being delivered (claimed) right now; an operator action on it
    /// must wait until the attempt ends.
    #[error("message {0} is being delivered; try again when the attempt ends")]
    InFlight(MessageId),
    /// A message id given by an operator is not well formed.
    #[error("invalid message id {0:?}")]
    InvalidId(String),
    /// The background committer or a blocking task is gone (spool shutting down or a bug).
    #[error("spool internal failure: {0}")]
    Internal(String),
}

impl Error {
    /// An I/O error while the spool was doing `context`.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// True when the error is "no space left on device" (or a quota): the operator frees
    /// space and the spool works again, no restart needed.
    pub fn is_disk_full(&self) -> bool {
        match self {
            Error::Io { source, .. } => {
                matches!(
                    source.kind(),
                    io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
                )
            }
            _ => false,
        }
    }
}
