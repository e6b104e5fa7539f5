//! The crate's error type.

/// Everything that can go wrong when loading or running a plugin.
///
/// A call that ends in [`Error::Trap`], [`Error::Deadline`], [`Error::MemoryLimit`],
/// [`Error::Limit`] or [`Error::Guest`] has discarded the instance it ran on; the plugin
/// rebuilds it (with backoff) and keeps serving.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The engine could not be set up (bad [`HostConfig`](crate::HostConfig), cache directory).
    #[error("engine setup failed: {0}")]
    Engine(String),
    /// The bytes are not a valid WebAssembly module.
    #[error("module does not compile: {0}")]
    Compile(String),
    /// The module imports something this host does not provide, or lacks a required export.
    #[error("module cannot be linked: {0}")]
    Link(String),
    /// The guest trapped (including an SDK panic, which is `unreachable` with panic=abort).
    #[error("guest trapped in {callback}: {message}")]
    Trap {
        /// The callback that was running (`proxy_on_request_headers`, ...).
        callback: &'static str,
        /// Wasmtime's description of the trap, with the guest backtrace when available.
        message: String,
    },
    /// The call ran past its epoch deadline ([`HostConfig::deadline`](crate::HostConfig)).
    #[error("guest exceeded its deadline in {callback}")]
    Deadline {
        /// The callback that was running.
        callback: &'static str,
    },
    /// The guest tried to grow its memory (or a table) beyond the configured cap.
    #[error("guest hit the memory limit ({limit} bytes) in {callback}")]
    MemoryLimit {
        /// The callback that was running.
        callback: &'static str,
        /// The cap in bytes.
        limit: usize,
    },
    /// The guest exceeded a host-side limit (header map size, buffer size, ...).
    #[error("guest exceeded a host limit in {callback}: {what}")]
    Limit {
        /// The callback that was running.
        callback: &'static str,
        /// Which limit.
        what: String,
    },
    /// The guest broke the ABI (out-of-bounds pointer, malformed map, bad allocator result).
    #[error("guest broke the ABI in {callback}: {reason}")]
    Guest {
        /// The callback that was running.
        callback: &'static str,
        /// What it did.
        reason: String,
    },
    /// `proxy_on_vm_start` returned false.
    #[error("plugin refused to start (proxy_on_vm_start returned false)")]
    VmStart,
    /// `proxy_on_configure` returned false: the plugin rejects its configuration.
    #[error("plugin rejected its configuration (proxy_on_configure returned false)")]
    Configure,
    /// No instance became free in time, or rebuilding instances is backing off after faults.
    #[error("plugin unavailable: {0}")]
    Unavailable(String),
    /// The stream was already closed.
    #[error("stream is closed")]
    StreamClosed,
}

impl Error {
    /// True when the error came from the guest misbehaving at run time (the instance was
    /// discarded), as opposed to a load or availability problem.
    pub fn is_guest_fault(&self) -> bool {
        matches!(
            self,
            Error::Trap { .. }
                | Error::Deadline { .. }
                | Error::MemoryLimit { .. }
                | Error::Limit { .. }
                | Error::Guest { .. }
        )
    }
}

/// Raised by a host function to abort the guest call; turned into an [`Error`] at the
/// boundary.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HostAbort {
    #[error("{0}")]
    Limit(String),
    #[error("{0}")]
    Guest(String),
    #[error("guest called proc_exit({0})")]
    Exit(i32),
    /// A host function found the call past its deadline.
    #[error("deadline")]
    Deadline,
}
