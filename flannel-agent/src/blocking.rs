//! Blocking work (syscall loops over a map, iptables commands) called from async code.

/// Runs `work` from async code without stalling the runtime: on a multi-thread runtime the
/// worker hands its other tasks off first (the work stays on this thread, in this thread's
/// network namespace, which `spawn_blocking` would not guarantee); on a current-thread
/// runtime it simply runs.
pub fn blocking<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|handle| handle.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(work),
        _ => work(),
    }
}
