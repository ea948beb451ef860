//! Serving the API: [`serve`] runs a [`ControlPlane`]'s router on its own thread and tokio
//! runtime (the gateway is synchronous) and returns a [`ServerHandle`] that stops it.
//!
//! It does not decide what a request does (the router in [`crate::api`] does).

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::watch;

use crate::api::ControlPlane;
use crate::error::ControlError;
/// How long in-flight requests (long-polls included) may run after a shutdown request.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// A running API server (see [`serve`]). Dropping it shuts the server down too.
pub struct ServerHandle {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<std::result::Result<(), String>>>,
}

impl ServerHandle {
    /// The address the server listens on (the real port when asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, lets requests in flight finish for at most [`SHUTDOWN_GRACE`], and
    /// waits for the server thread.
    pub fn shutdown(mut self) -> Result<(), ControlError> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Result<(), ControlError> {
        self.stop.send_replace(true);
        match self.thread.take() {
            None => Ok(()),
            Some(t) => match t.join() {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(ControlError::Runtime(e)),
                Err(_) => Err(ControlError::Runtime("the server thread panicked".into())),
            },
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        let _ = self.stop_and_join();
    }
}

/// Reads a bearer token from a file (`--token-file`), trimmed; refuses an empty one.
pub fn read_token_file(path: &std::path::Path) -> Result<String, ControlError> {
    let bad = |message: String| ControlError::Token {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let t = text.trim();
    if t.is_empty() {
        return Err(bad("the file is empty".into()));
    }
    Ok(t.to_string())
}

/// Serves `plane` on `addr` from its own thread with its own tokio runtime (the gateway is
/// synchronous). Refuses a non-loopback address when the plane has no token. Binding happens
/// before this returns, so a busy port is an error here, and port 0 gets a real port
/// ([`ServerHandle::local_addr`]).
pub fn serve(addr: SocketAddr, plane: ControlPlane) -> Result<ServerHandle, ControlError> {
    if !plane.has_token() && !addr.ip().is_loopback() {
        return Err(ControlError::InsecureBind(addr));
    }
    let bind_err = |e: std::io::Error| ControlError::Bind {
        addr,
        message: e.to_string(),
    };
    let listener = std::net::TcpListener::bind(addr).map_err(bind_err)?;
    listener.set_nonblocking(true).map_err(bind_err)?;
    let local = listener.local_addr().map_err(bind_err)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(8)
        .thread_name("snatgw-api")
        .enable_all()
        .build()
        .map_err(|e| ControlError::Runtime(e.to_string()))?;
    let router = plane.router();
    let (stop, stopped) = watch::channel(false);
    let thread = std::thread::Builder::new()
        .name("snatgw-api".into())
        .spawn(move || {
            let r = rt.block_on(async move {
                let listener =
                    tokio::net::TcpListener::from_std(listener).map_err(|e| e.to_string())?;
                let mut graceful = stopped.clone();
                let server = axum::serve(listener, router).with_graceful_shutdown(async move {
                    let _ = graceful.wait_for(|&v| v).await;
                });
                let mut task = tokio::spawn(server.into_future());
                let mut stopped = stopped;
                tokio::select! {
                    r = &mut task => {
                        return match r {
                            Ok(Ok(())) => Ok(()),
                            Ok(Err(e)) => Err(e.to_string()),
                            Err(e) => Err(e.to_string()),
                        };
                    }
                    _ = stopped.wait_for(|&v| v) => {}
                }
                // In-flight requests get a grace period; long-polls are cut after it.
                let _ = tokio::time::timeout(SHUTDOWN_GRACE, &mut task).await;
                Ok(())
            });
            rt.shutdown_timeout(Duration::from_millis(200));
            r
        })
        .map_err(|e| ControlError::Runtime(e.to_string()))?;
    Ok(ServerHandle {
        addr: local,
        stop,
        thread: Some(thread),
    })
}

