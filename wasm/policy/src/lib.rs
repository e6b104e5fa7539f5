//! Standard policy module (in progress).
