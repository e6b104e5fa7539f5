//! Test guest (in progress).
