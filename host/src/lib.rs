//! altroute: the relay daemon and CLI (in progress).
