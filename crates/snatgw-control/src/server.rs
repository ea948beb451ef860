//! Serving the API: [`serve`] / [`serve_with`] run a [`ControlPlane`]'s router on its own
//! thread and tokio runtime (the gateway is synchronous) and return a [`ServerHandle`] that
//! stops it; [`body_budget`] bounds the memory request bodies take (issue #20).
//!
//! The server is our own accept loop over hyper's HTTP/1.1 connection driver, so that no
//! client — authenticated or not — can take the API or the gateway's file descriptors away:
//!
//! - **Header-read and keep-alive idle timeout** ([`ServerLimits::header_read_timeout`],
//!   default [`HEADER_READ_TIMEOUT`] = 10 s): hyper 1.12 arms this timer whenever a connection
//!   waits for a request head — a new connection, a keep-alive connection between two requests
//!   (hyper's `Conn::idle` re-arms it) and a slow client sending its head (slowloris). So it
//!   is the idle timeout too: a connection with no request in flight is closed after 10 s. A
//!   request in flight (a long-poll `GET /api/v1/events?wait=30` included) is not timed by it.
//!   A request is in flight from its parsed head until its response body is handed to
//!   hyper. Request heads are capped at [`ServerLimits::max_header_size`] (16 KiB; over it
//!   hyper answers 431 with an empty body and closes).
//! - **Connection cap** ([`ServerLimits::connection_cap`]): at most `min(max_connections
//!   (default [`MAX_CONNECTIONS`] = 1024), soft RLIMIT_NOFILE / 2)` connections at once (the
//!   limit is read from `/proc/self/limits` at start), so the gateway keeps descriptors for its TUN
//!   queues, the store and the stats file. At the cap a new connection is still served: the
//!   connection idle the longest (no request in flight; a half-sent head counts as idle) is
//!   closed to make room. A connection with a request in flight is never evicted; if every
//!   connection has one, the new client gets a canned `503` with `Connection: close`,
//!   `Retry-After: 1` and the JSON error body, and is closed (at most 64 such answers linger
//!   up to 1 s for the client to read them; beyond, the answer is written without waiting).
//! - **Accept errors** (EMFILE, ENFILE, ENOBUFS...): the loop closes up to 4 connections
//!   idle for 100 ms at least, longest-idle first, and backs off [`ACCEPT_BACKOFF`] (20 ms)
//!   instead of spinning; connections waiting in the listen backlog (4096) are accepted as
//!   room comes back. At the process's open-file limit accept keeps failing, so idle API
//!   connections are shed (4 per 20 ms) to give descriptors back to the gateway.
//! - **Body memory** ([`body_budget`], wired in [`ControlPlane::router`] behind the bearer
//!   auth, so unauthenticated clients never make it buffer anything): each body is read
//!   chunk by chunk, capped at [`crate::api::MAX_BODY`] (4 MiB) per request (413, JSON body)
//!   and by a global budget of [`BODY_BUDGET`] = 4 × `MAX_BODY` = 16 MiB buffered at once
//!   across all requests (a semaphore counting KiB, taken as chunks arrive, and held until
//!   the response is produced). With a `Content-Length` the whole amount is taken at once,
//!   before any of the body is read, so a client sending `Expect: 100-continue` gets its 413
//!   or 503 before it sends the body. A request that finds the budget taken waits at most
//!   [`BODY_BUDGET_WAIT`] (1 s), then gets `503` with `Retry-After: 1`. A body must arrive
//!   within [`BODY_READ_TIMEOUT`] (30 s, else 408). The buffered body then replaces the
//!   request body, so the handlers' `Bytes` extractor is a cheap clone.
//! - **Shutdown** ([`ServerHandle::shutdown`]): stop accepting, close idle connections, let
//!   requests in flight finish for at most [`SHUTDOWN_GRACE`], then cut the rest.
//!
//! It does not decide what a request does (the router in [`crate::api`] does), does not
//! speak HTTP/2 or TLS, does not limit request rates or per-client connection counts (an
//! attacker can still churn connections; it only costs it the oldest idle ones), and does not
//! time out writing a response to a client that does not read it (only authenticated routes
//! answer with more than a few hundred bytes).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use http_body::Body as _;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};

use crate::api::{ControlPlane, MAX_BODY};
use crate::error::{ApiError, ControlError};

/// How long in-flight requests (long-polls included) may run after a shutdown request.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// Default [`ServerLimits::header_read_timeout`]: the time a connection may wait for (the
/// rest of) a request head, which is also the keep-alive idle timeout.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default [`ServerLimits::max_connections`] (before the open-file limit is applied).
pub const MAX_CONNECTIONS: usize = 1024;
/// Default [`ServerLimits::max_header_size`]: request line and headers, in bytes.
pub const MAX_HEADER_SIZE: usize = 16 << 10;
/// Global budget of request-body bytes buffered at once, across all requests.
pub const BODY_BUDGET: usize = 4 * MAX_BODY;
/// Longest wait for room in the body budget before answering 503.
pub const BODY_BUDGET_WAIT: Duration = Duration::from_secs(1);
/// Longest time a request body may take to arrive once its head is read.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause after an accept error (such as EMFILE) before accepting again.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(20);

/// Idle connections closed per accept error (EMFILE...), so that the pause after it is
/// followed by a few accepts.
const EVICT_ON_ACCEPT_ERROR: usize = 4;
/// After an accept error, only connections idle this long are closed: one accepted a moment
/// ago has its first request on the way (closing it would only trade one new client for
/// another, and reset it).
const EVICT_MIN_IDLE: Duration = Duration::from_millis(100);
/// Backlog of the listening socket (the kernel caps it at `net.core.somaxconn`).
const LISTEN_BACKLOG: u32 = 4096;
/// hyper's buffer per connection (reads and queued writes): small, since heads are capped
/// and bodies are streamed into [`body_budget`] chunk by chunk.
const CONN_BUF: usize = 64 << 10;
/// Rejected connections (every connection busy) answered at once; beyond, the 503 is written
/// without waiting and the socket closed.
const REJECTERS: usize = 64;
/// How long a rejected connection may take to read its 503.
const REJECT_LINGER: Duration = Duration::from_secs(1);
/// Bit of [`ConnState::busy`] marking a connection chosen for eviction.
const EVICTED: u32 = 1 << 31;

/// Connection limits of the API server (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerLimits {
    /// Most connections open at once, before the open-file limit is applied: the server
    /// holds at most [`ServerLimits::connection_cap`]. Default [`MAX_CONNECTIONS`].
    pub max_connections: usize,
    /// How long a connection may wait for a complete request head: on a new connection, on a
    /// keep-alive connection between requests (so this is the idle timeout) and while a slow
    /// client sends its head. Requests in flight are not timed. Default
    /// [`HEADER_READ_TIMEOUT`].
    pub header_read_timeout: Duration,
    /// Largest request head (request line and headers) in bytes; larger gets 431. Default
    /// [`MAX_HEADER_SIZE`].
    pub max_header_size: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            max_connections: MAX_CONNECTIONS,
            header_read_timeout: HEADER_READ_TIMEOUT,
            max_header_size: MAX_HEADER_SIZE,
        }
    }
}

impl ServerLimits {
    /// The connection cap the server applies: `max_connections`, but at most half the soft
    /// open-file limit ([`open_file_limit`]) so the rest of the process keeps descriptors;
    /// at least 1.
    pub fn connection_cap(&self) -> usize {
        let fd_half = open_file_limit()
            .map(|n| usize::try_from(n / 2).unwrap_or(usize::MAX))
            .unwrap_or(usize::MAX);
        self.max_connections.min(fd_half).max(1)
    }
}

/// The soft limit on open files of this process (RLIMIT_NOFILE), read from
/// `/proc/self/limits`; `None` if unlimited or unknown (not Linux).
pub fn open_file_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let rest = text
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))?;
    rest.split_whitespace().next()?.parse().ok()
}

/// A running API server (see [`serve`]). Dropping it shuts the server down too.
pub struct ServerHandle {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    conns: Arc<Conns>,
    cap: usize,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ServerHandle {
    /// The address the server listens on (the real port when asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections open now (not counting ones being closed or answered 503).
    pub fn open_connections(&self) -> usize {
        self.conns.len()
    }

    /// The connection cap in force ([`ServerLimits::connection_cap`] at start).
    pub fn connection_cap(&self) -> usize {
        self.cap
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
                Ok(()) => Ok(()),
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
/// synchronous), with the default [`ServerLimits`]. Refuses a non-loopback address when the
/// plane has no token. Binding happens before this returns, so a busy port is an error here,
/// and port 0 gets a real port ([`ServerHandle::local_addr`]).
pub fn serve(addr: SocketAddr, plane: ControlPlane) -> Result<ServerHandle, ControlError> {
    serve_with(addr, plane, ServerLimits::default())
}

/// [`serve`] with the given connection limits.
pub fn serve_with(
    addr: SocketAddr,
    plane: ControlPlane,
    limits: ServerLimits,
) -> Result<ServerHandle, ControlError> {
    if !plane.has_token() && !addr.ip().is_loopback() {
        return Err(ControlError::InsecureBind(addr));
    }
    let bind_err = |e: std::io::Error| ControlError::Bind {
        addr,
        message: e.to_string(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(8)
        .thread_name("snatgw-api")
        .enable_all()
        .build()
        .map_err(|e| ControlError::Runtime(e.to_string()))?;
    let listener = {
        // Registering the listener with the runtime's reactor needs its context.
        let _enter = rt.enter();
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }
        .map_err(bind_err)?;
        socket.set_reuseaddr(true).map_err(bind_err)?;
        socket.bind(addr).map_err(bind_err)?;
        socket.listen(LISTEN_BACKLOG).map_err(bind_err)?
    };
    let local = listener.local_addr().map_err(bind_err)?;
    let cap = limits.connection_cap();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(limits.max_header_size)
        .max_buf_size(CONN_BUF.max(limits.max_header_size).max(8192))
        .keep_alive(true);
    let server = Arc::new(Server {
        router: plane.router(),
        builder,
        conns: Arc::new(Conns::new()),
        cap,
        rejecters: Arc::new(Semaphore::new(REJECTERS)),
        busy_answer: busy_answer(),
    });
    let conns = server.conns.clone();
    let (stop, stopped) = watch::channel(false);
    let thread = std::thread::Builder::new()
        .name("snatgw-api".into())
        .spawn(move || {
            rt.block_on(accept_loop(listener, server, stopped));
            // Whatever still runs after the grace period (long-polls, half-sent heads) is
            // cut here: shutting the runtime down drops every task and its socket.
            rt.shutdown_timeout(Duration::from_millis(200));
        })
        .map_err(|e| ControlError::Runtime(e.to_string()))?;
    Ok(ServerHandle {
        addr: local,
        stop,
        conns,
        cap,
        thread: Some(thread),
    })
}

/// What every connection task shares.
struct Server {
    router: Router,
    builder: http1::Builder,
    conns: Arc<Conns>,
    cap: usize,
    rejecters: Arc<Semaphore>,
    busy_answer: Arc<[u8]>,
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    server: Arc<Server>,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stopped.wait_for(|&v| v) => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, _peer)) => admit(&server, stream, &stopped),
            Err(e) => match e.kind() {
                // The peer gave up before we accepted: nothing to back off from.
                std::io::ErrorKind::ConnectionAborted
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::Interrupted => {}
                // EMFILE, ENFILE, ENOBUFS, ENOMEM...: make room and do not spin.
                _ => {
                    for _ in 0..EVICT_ON_ACCEPT_ERROR {
                        if !server.conns.evict_idlest(EVICT_MIN_IDLE) {
                            break;
                        }
                    }
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
    // Stop accepting; idle connections close now (graceful shutdown), requests in flight
    // get the grace period.
    drop(listener);
    let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
    while server.conns.len() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Starts serving `stream`, making room at the cap, or answers 503 if every connection has
/// a request in flight.
fn admit(server: &Arc<Server>, stream: TcpStream, stopped: &watch::Receiver<bool>) {
    let _ = stream.set_nodelay(true);
    if server.conns.len() >= server.cap && !server.conns.evict_idlest(Duration::ZERO) {
        reject_busy(server, stream);
        return;
    }
    let conn = server.conns.insert();
    tokio::spawn(serve_conn(server.clone(), stream, conn, stopped.clone()));
}

async fn serve_conn(
    server: Arc<Server>,
    stream: TcpStream,
    conn: Arc<ConnState>,
    mut stopped: watch::Receiver<bool>,
) {
    let _registered = Registered {
        conns: server.conns.clone(),
        id: conn.id,
    };
    let svc = Tracked {
        router: server.router.clone(),
        conn: conn.clone(),
        conns: server.conns.clone(),
    };
    let http = server.builder.serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(http);
    tokio::select! {
        _ = http.as_mut() => return,
        // Evicted: drop the connection (and its socket) now.
        _ = conn.close.notified() => return,
        _ = stopped.wait_for(|&v| v) => {}
    }
    // Shutting down: an idle connection closes at once, a request in flight finishes (the
    // accept loop's grace period, then the runtime's shutdown, bound it).
    http.as_mut().graceful_shutdown();
    tokio::select! {
        _ = http.as_mut() => {}
        _ = conn.close.notified() => {}
    }
}

/// Answers a connection that cannot be served with the canned 503 and closes it.
fn reject_busy(server: &Server, stream: TcpStream) {
    let answer = server.busy_answer.clone();
    match server.rejecters.clone().try_acquire_owned() {
        Ok(permit) => {
            tokio::spawn(async move {
                let _permit = permit;
                let _ =
                    tokio::time::timeout(REJECT_LINGER, write_then_drain(&stream, &answer)).await;
            });
        }
        // Too many rejections at once: write what fits without waiting, close.
        Err(_) => {
            let _ = stream.try_write(&answer);
        }
    }
}

/// Writes `answer`, then reads (and drops) what the client sends until it closes, so that
/// closing does not reset the connection before the client read the answer.
async fn write_then_drain(stream: &TcpStream, answer: &[u8]) -> std::io::Result<()> {
    let mut off = 0;
    while off < answer.len() {
        stream.writable().await?;
        match stream.try_write(&answer[off..]) {
            Ok(n) => off += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    let mut buf = [0u8; 4096];
    let mut drained = 0usize;
    while drained < (64 << 10) {
        stream.readable().await?;
        match stream.try_read(&mut buf) {
            Ok(0) => break,
            Ok(n) => drained += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The raw HTTP/1.1 answer to a connection refused because every connection is busy.
fn busy_answer() -> Arc<[u8]> {
    let body = serde_json::to_string(&ApiError::msg(
        "the API server is at its connection limit and every connection has a request in \
         flight; retry shortly",
    ))
    .unwrap_or_default();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         connection: close\r\nretry-after: 1\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
    .into()
}

/// The open connections: for the cap, eviction and shutdown.
struct Conns {
    map: Mutex<HashMap<u64, Arc<ConnState>>>,
    next_id: AtomicU64,
    epoch: Instant,
}

/// One open connection as the accept loop sees it.
struct ConnState {
    id: u64,
    /// Requests in flight (head read, response body not yet handed to hyper), plus
    /// [`EVICTED`] once chosen for eviction.
    busy: AtomicU32,
    /// Milliseconds since [`Conns::epoch`] of the last request start or end (or accept);
    /// ties go to the older connection (lower `id`).
    last_active: AtomicU64,
    /// Notified to close the connection at once.
    close: Notify,
}

impl Conns {
    fn new() -> Conns {
        Conns {
            map: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<ConnState>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn len(&self) -> usize {
        self.lock().len()
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn insert(&self) -> Arc<ConnState> {
        let conn = Arc::new(ConnState {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            busy: AtomicU32::new(0),
            last_active: AtomicU64::new(self.now_ms()),
            close: Notify::new(),
        });
        self.lock().insert(conn.id, conn.clone());
        conn
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Closes the connection idle the longest (no request in flight), if it has been idle
    /// for `min_idle` at least; false if there is none.
    fn evict_idlest(&self, min_idle: Duration) -> bool {
        let now = self.now_ms();
        let min_idle = u64::try_from(min_idle.as_millis()).unwrap_or(u64::MAX);
        let mut map = self.lock();
        // A connection may turn busy between the scan and the claim: then scan again.
        for _ in 0..8 {
            let Some(victim) = map
                .values()
                .filter(|c| {
                    c.busy.load(Ordering::Acquire) == 0
                        && now.saturating_sub(c.last_active.load(Ordering::Relaxed)) >= min_idle
                })
                .min_by_key(|c| (c.last_active.load(Ordering::Relaxed), c.id))
                .cloned()
            else {
                return false;
            };
            if victim
                .busy
                .compare_exchange(0, EVICTED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                map.remove(&victim.id);
                victim.close.notify_one();
                return true;
            }
        }
        false
    }
}

/// Removes its connection from [`Conns`] when the connection task ends (or is dropped).
struct Registered {
    conns: Arc<Conns>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.conns.remove(self.id);
    }
}

/// The router as a hyper service that counts the requests in flight on its connection.
#[derive(Clone)]
struct Tracked {
    router: Router,
    conn: Arc<ConnState>,
    conns: Arc<Conns>,
}

/// One request in flight on a connection: counted from its head until its response body is
/// handed to hyper (or dropped).
struct InFlight {
    conn: Arc<ConnState>,
    conns: Arc<Conns>,
}

impl InFlight {
    fn new(conn: Arc<ConnState>, conns: Arc<Conns>) -> InFlight {
        conn.busy.fetch_add(1, Ordering::AcqRel);
        conn.last_active.store(conns.now_ms(), Ordering::Relaxed);
        InFlight { conn, conns }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.conn
            .last_active
            .store(self.conns.now_ms(), Ordering::Relaxed);
        self.conn.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

impl hyper::service::Service<hyper::Request<hyper::body::Incoming>> for Tracked {
    type Response = hyper::Response<TrackedBody>;
    type Error = Infallible;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn call(&self, req: hyper::Request<hyper::body::Incoming>) -> Self::Future {
        let guard = InFlight::new(self.conn.clone(), self.conns.clone());
        let mut router = self.router.clone();
        Box::pin(async move {
            use tower_service::Service;
            type In = hyper::Request<hyper::body::Incoming>;
            // The router is always ready; its error type is Infallible.
            let Ok(()) =
                std::future::poll_fn(|cx| Service::<In>::poll_ready(&mut router, cx)).await;
            let Ok(res) = router.call(req).await;
            Ok(res.map(|body| TrackedBody {
                inner: body,
                _guard: guard,
            }))
        })
    }
}

/// A response body that keeps its request counted in flight until hyper is done with it.
struct TrackedBody {
    inner: Body,
    _guard: InFlight,
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The budget [`body_budget`] reads request bodies under: a cap per request and a global
/// budget of bytes buffered at once. Cheap to clone (shared); one per router.
#[derive(Clone)]
pub struct BodyBudget {
    inner: Arc<BudgetInner>,
}

struct BudgetInner {
    per_request: usize,
    total_kib: u32,
    kib: Arc<Semaphore>,
    wait: Duration,
    read_timeout: Duration,
}

impl Default for BodyBudget {
    /// [`MAX_BODY`] per request, [`BODY_BUDGET`] in all, [`BODY_BUDGET_WAIT`],
    /// [`BODY_READ_TIMEOUT`].
    fn default() -> Self {
        BodyBudget::new(MAX_BODY, BODY_BUDGET, BODY_BUDGET_WAIT, BODY_READ_TIMEOUT)
    }
}

impl BodyBudget {
    /// A budget of `per_request` bytes per body and `total` bytes buffered at once (raised to
    /// `per_request` if smaller, counted in KiB); a request waits at most `wait` for room and
    /// its body must arrive within `read_timeout`.
    pub fn new(
        per_request: usize,
        total: usize,
        wait: Duration,
        read_timeout: Duration,
    ) -> BodyBudget {
        let total_kib = u32::try_from(kib(total.max(per_request))).unwrap_or(u32::MAX >> 4);
        BodyBudget {
            inner: Arc::new(BudgetInner {
                per_request,
                total_kib,
                kib: Arc::new(Semaphore::new(total_kib as usize)),
                wait,
                read_timeout,
            }),
        }
    }

    /// Bytes of the global budget free now (a multiple of 1024).
    pub fn available(&self) -> usize {
        self.inner.kib.available_permits() * 1024
    }

    /// The whole global budget in bytes.
    pub fn total(&self) -> usize {
        self.inner.total_kib as usize * 1024
    }
}

fn kib(bytes: usize) -> usize {
    bytes.div_ceil(1024)
}

/// A JSON error answer `{"error", "field": null, "rule": null}`.
fn budget_error(status: StatusCode, msg: String, close: bool) -> Response {
    let body = serde_json::to_vec(&ApiError::msg(msg)).unwrap_or_default();
    let mut res = (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        res.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    if close {
        // The rest of the body is not read: the connection cannot carry another request.
        res.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    res
}

/// Axum middleware that buffers each request body under `budget` (see the module
/// documentation): over the per-request cap → 413, budget taken for longer than its wait →
/// 503 with `Retry-After: 1`, body too slow → 408, unreadable body → 400, all with the JSON
/// error body. The permits are held until the inner service has produced its response.
/// Requests without a body pass through untouched.
pub async fn body_budget(State(budget): State<BodyBudget>, req: Request, next: Next) -> Response {
    let b = &*budget.inner;
    let (parts, mut body) = req.into_parts();
    if body.is_end_stream() {
        return next.run(Request::from_parts(parts, body)).await;
    }
    let too_large = || {
        budget_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body larger than {} bytes", b.per_request),
            true,
        )
    };
    let declared = body
        .size_hint()
        .exact()
        .map(|n| usize::try_from(n).unwrap_or(usize::MAX));
    if declared.is_some_and(|n| n > b.per_request) {
        return too_large();
    }
    let budget_deadline = tokio::time::Instant::now() + b.wait;
    let read_deadline = tokio::time::Instant::now() + b.read_timeout;
    let mut held: Option<OwnedSemaphorePermit> = None;
    let held_kib = |h: &Option<OwnedSemaphorePermit>| h.as_ref().map_or(0, |p| p.num_permits());
    // Takes room for `bytes` in all (all at once: no partial hold while waiting).
    let reserve = |held: &mut Option<OwnedSemaphorePermit>, bytes: usize| {
        let more = kib(bytes).saturating_sub(held_kib(held));
        let sem = b.kib.clone();
        async move {
            if more == 0 {
                return Ok(None);
            }
            let n = u32::try_from(more).unwrap_or(u32::MAX);
            match tokio::time::timeout_at(budget_deadline, sem.acquire_many_owned(n)).await {
                Ok(Ok(p)) => Ok(Some(p)),
                _ => Err(()),
            }
        }
    };
    let busy = |close: bool| {
        budget_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many request bodies are being received at once; retry shortly".into(),
            close,
        )
    };
    let mut buf: Vec<u8> = Vec::new();
    if let Some(n) = declared {
        match reserve(&mut held, n).await {
            Ok(p) => merge(&mut held, p),
            Err(()) => return busy(true),
        }
        buf.reserve_exact(n);
    }
    loop {
        let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx));
        let frame = match tokio::time::timeout_at(read_deadline, frame).await {
            Err(_) => {
                return budget_error(
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "request body not received within {} s",
                        b.read_timeout.as_secs()
                    ),
                    true,
                )
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return budget_error(
                    StatusCode::BAD_REQUEST,
                    format!("request body could not be read: {e}"),
                    true,
                )
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers: not used by any route
        };
        let len = buf.len() + data.len();
        if len > b.per_request {
            return too_large();
        }
        match reserve(&mut held, len).await {
            Ok(p) => merge(&mut held, p),
            Err(()) => return busy(true),
        }
        buf.extend_from_slice(&data);
    }
    let req = Request::from_parts(parts, Body::from(Bytes::from(buf)));
    let res = next.run(req).await;
    drop(held);
    res
}

fn merge(held: &mut Option<OwnedSemaphorePermit>, more: Option<OwnedSemaphorePermit>) {
    match (held.as_mut(), more) {
        (_, None) => {}
        (None, Some(p)) => *held = Some(p),
        (Some(h), Some(p)) => h.merge(p),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::put;

    /// A body of `chunks` chunks of `size` bytes, length unknown (chunked).
    struct Chunked {
        left: usize,
        size: usize,
    }

    impl http_body::Body for Chunked {
        type Data = Bytes;
        type Error = Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
            if self.left == 0 {
                return Poll::Ready(None);
            }
            self.left -= 1;
            Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from(vec![
                b'x';
                self.size
            ])))))
        }
    }

    fn app(budget: BodyBudget) -> Router {
        Router::new()
            .route(
                "/",
                put(|body: Bytes| async move { body.len().to_string() }),
            )
            .route(
                "/hold",
                put(|body: Bytes| async move {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    body.len().to_string()
                }),
            )
            .layer(axum::middleware::from_fn_with_state(budget, body_budget))
    }

    async fn call(router: &Router, path: &str, body: Body) -> (StatusCode, Response) {
        use tower_service::Service as _;
        let req = Request::put(path).body(body).expect("request");
        let Ok(res) = router.clone().call(req).await;
        (res.status(), res)
    }

    async fn json(res: Response) -> ApiError {
        let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .expect("body");
        serde_json::from_slice(&bytes).expect("JSON error body")
    }

    fn budget(per: usize, total: usize) -> BodyBudget {
        BodyBudget::new(
            per,
            total,
            Duration::from_millis(100),
            Duration::from_secs(5),
        )
    }

    #[tokio::test]
    async fn bodies_under_the_cap_reach_the_handler_and_release_the_budget() {
        let b = budget(64 << 10, 128 << 10);
        let r = app(b.clone());
        let (s, res) = call(
            &r,
            "/",
            Body::new(Chunked {
                left: 8,
                size: 8 << 10,
            }),
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        let text = axum::body::to_bytes(res.into_body(), 1024)
            .await
            .expect("body");
        assert_eq!(&text[..], b"65536");
        let (s, _) = call(&r, "/", Body::from(vec![1u8; 1000])).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(b.available(), b.total(), "permits are given back");
    }

    #[tokio::test]
    async fn over_the_cap_is_413_json_declared_or_chunked() {
        let b = budget(64 << 10, 128 << 10);
        let r = app(b.clone());
        let (s, res) = call(&r, "/", Body::from(vec![1u8; (64 << 10) + 1])).await;
        assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(
            res.headers()[header::CONTENT_TYPE],
            HeaderValue::from_static("application/json")
        );
        let e = json(res).await;
        assert!(e.error.contains("larger than"), "{e:?}");
        assert_eq!((e.field, e.rule), (None, None));
        let (s, res) = call(
            &r,
            "/",
            Body::new(Chunked {
                left: 9,
                size: 8 << 10,
            }),
        )
        .await;
        assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
        json(res).await;
        assert_eq!(b.available(), b.total());
    }

    #[tokio::test]
    async fn a_taken_budget_is_503_with_retry_after_then_frees() {
        let b = budget(64 << 10, 64 << 10);
        let r = app(b.clone());
        let holder = {
            let r = r.clone();
            tokio::spawn(async move { call(&r, "/hold", Body::from(vec![1u8; 60 << 10])).await.0 })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(b.available() < 8 << 10, "the holder holds the budget");
        let (s, res) = call(&r, "/", Body::from(vec![1u8; 10 << 10])).await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            res.headers()[header::RETRY_AFTER],
            HeaderValue::from_static("1")
        );
        json(res).await;
        assert_eq!(holder.await.expect("holder"), StatusCode::OK);
        let (s, _) = call(&r, "/", Body::from(vec![1u8; 10 << 10])).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(b.available(), b.total());
    }

    #[test]
    fn the_cap_is_at_most_half_the_open_file_limit() {
        let l = ServerLimits {
            max_connections: usize::MAX,
            ..ServerLimits::default()
        };
        match open_file_limit() {
            Some(n) => assert_eq!(l.connection_cap() as u64, (n / 2).max(1)),
            None => assert_eq!(l.connection_cap(), usize::MAX),
        }
        let small = ServerLimits {
            max_connections: 3,
            ..ServerLimits::default()
        };
        assert_eq!(small.connection_cap(), 3);
    }
}
