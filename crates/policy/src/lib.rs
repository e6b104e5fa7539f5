//! altroute policy (in progress).
