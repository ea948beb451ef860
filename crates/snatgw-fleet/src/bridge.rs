//! Runs etcd's async client behind the synchronous [`crate::Coordinator`] and
//! `snatgw_control::Store` traits: a small tokio runtime owned by the caller, and [`Bridge::run`]
//! which hands a future to it and waits for the result on the calling thread.
//!
//! Waiting on a channel (not `block_on`) makes a call safe from any thread, also from inside
//! another tokio runtime (it blocks that thread, so async callers use `spawn_blocking`, as the
//! control plane already does for its store). This module knows nothing about etcd.

use std::future::Future;
use std::sync::mpsc;

use crate::error::FleetError;

/// A dedicated runtime for the fleet's etcd traffic (one worker thread, its own timers).
pub struct Bridge {
    rt: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for Bridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Bridge")
    }
}

impl Bridge {
    /// Starts the runtime.
    pub fn new() -> Result<Bridge, FleetError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("snatgw-fleet")
            .enable_all()
            .build()
            .map_err(|e| FleetError::Store(format!("cannot start the fleet runtime: {e}")))?;
        Ok(Bridge { rt: Some(rt) })
    }

    /// The runtime's handle (for background tasks such as watches).
    pub fn handle(&self) -> tokio::runtime::Handle {
        match &self.rt {
            Some(rt) => rt.handle().clone(),
            None => unreachable!("the runtime lives until drop"),
        }
    }

    /// Runs `fut` on the runtime and waits for its result.
    pub fn run<T, F>(&self, fut: F) -> Result<T, FleetError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, FleetError>> + Send + 'static,
    {
        let (tx, rx) = mpsc::sync_channel(1);
        self.handle().spawn(async move {
            // The receiver is gone only if the caller's thread died; nothing to tell then.
            let _ = tx.send(fut.await);
        });
        rx.recv()
            .map_err(|_| FleetError::Store("the fleet runtime stopped".into()))?
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        // Dropping a runtime inside another runtime's context panics; this does not wait.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}
