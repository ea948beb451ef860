//! The REST API: an axum router over a [`Backend`] and a [`Store`], bearer auth, JSON errors,
//! ETags, the OpenAPI document, and [`crate::serve`], which runs it on its own thread.
//!
//! The desired topology is a [`ConfigFile`]; every resource (`publicIPAddresses`,
//! `availabilitySets`, `deployments`, `instances`, `loadBalancers`, `gateway`) is a view into
//! it. A write (PUT, DELETE, POST) takes the writer mutex, builds a candidate `ConfigFile`,
//! validates it ([`Topology::from_config`]: references, models, R1.5, R2.8, R2.11...), asks the
//! running engine whether it would apply ([`Backend::check`]: R1.3 designation room, R2.8 pool
//! sizes), saves it ([`Store::save`], generation + 1) and only then applies it
//! ([`Backend::apply`], live: R1.4, R2.9, R2.10, R2.11). A refused change leaves the store
//! and the running state untouched; if the engine refuses after the save (it cannot, since
//! writers are serialised and the same plan was checked), the previous state is saved back.
//!
//! Errors are JSON `{"error", "field", "rule"}`: 400 bad JSON or field, 401 auth, 404 absent,
//! 409 conflict with the rest of the topology or with a change another node of a fleet saved
//! first (rule `R10.1`), 412 `If-Match` mismatch, 500 store or backend failure, 503 a fleet's
//! shared store (etcd) unreachable (rule `R10.5`; nothing changed). Every GET of a resource or collection returns `ETag: "<hex>"`, the FNV-1a 64 hash
//! of its canonical (compact serde) JSON; writes return the new one (a DELETE: the
//! collection's), and `X-Generation`, the accepted-write count.
//!
//! It does not parse the TOML config file (the CLI does) or format tables (the CLI does).

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{DefaultBodyLimit, Path, RawQuery, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use snatgw_core::config::{
    AvailabilitySetCfg, BackendPoolCfg, DeploymentCfg, FrontendCfg, GatewayCfg, InstanceCfg,
    LbRuleCfg, LoadBalancerCfg, NsgAccess, NsgCfg, NsgDirection, NsgProtocol, NsgRuleCfg, ProbeCfg,
    ProbeProtocol, PublicIpCfg, RuleProtocol,
};
use snatgw_core::{ConfigFile, InstanceKind, Model, Topology};
use tokio::sync::watch;
use utoipa::OpenApi;

use crate::backend::{
    Backend, EventRecord, FlowPage, FlowQuery, FlowRecord, InboundFlowPage, InboundFlowRecord,
    InstancePorts, NsgRuleMetrics, PerProtocol, PortRange, ProbeMetrics, DEFAULT_PAGE, MAX_PAGE,
};
use crate::body::QueryParams;
use crate::error::{config_error_body, ApiError, ControlError};
use crate::store::{Store, Stored};

/// Prefix of the resource routes.
pub const PREFIX: &str = "/api/v1";
/// Longest long-poll of `GET /api/v1/events?wait=` (seconds).
pub const MAX_WAIT_SECS: u64 = 30;
/// Largest request body: 4 MiB (a whole topology of a thousand instances is ~150 KB of JSON;
/// see `crate::server::body_budget`, which enforces it).
pub const MAX_BODY: usize = 4 << 20;
/// Header carrying the accepted-write count of the desired state.
pub const GENERATION_HEADER: &str = "x-generation";

/// A named resource of the desired topology, stored as a list in the [`ConfigFile`].
pub trait Resource:
    Serialize + DeserializeOwned + Clone + PartialEq + Send + Sync + 'static
{
    /// Collection path under `/api/v1`, such as `publicIPAddresses`.
    const COLLECTION: &'static str;
    /// The config file's key for it (`public_ip`), used in error field paths.
    const FIELD: &'static str;
    /// Its name.
    fn name(&self) -> &str;
    /// The collection in a config.
    fn list(c: &ConfigFile) -> &Vec<Self>;
    /// The collection in a config, mutably.
    fn list_mut(c: &mut ConfigFile) -> &mut Vec<Self>;
}

/// Body of `POST /api/v1/deployments/{name}/redeploy` (SPEC R2.11).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RedeployRequest {
    /// The pool size the infrastructure reports while redeploying: between the actual size
    /// and twice it (R2.11).
    pub reported_instances: u32,
}

pub use snatgw_core::hash::fnv1a64;

/// The ETag of a value: `"<16 hex digits>"`, FNV-1a 64 of its canonical JSON.
pub fn etag_of<T: Serialize + ?Sized>(v: &T) -> String {
    let bytes = serde_json::to_vec(v).unwrap_or_default();
    format!("\"{:016x}\"", fnv1a64(&bytes))
}

/// Whether an `If-Match` header value matches `current` (`None`: the resource is absent).
fn if_match_ok(header: &str, current: Option<&str>) -> bool {
    let Some(cur) = current else {
        return false;
    };
    header
        .split(',')
        .map(str::trim)
        .any(|t| t == "*" || (!t.starts_with("W/") && t.trim_matches('"') == cur.trim_matches('"')))
}

/// Constant-time comparison (the time depends on the lengths only).
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    let n = a.len().max(b.len());
    let mut diff = (a.len() ^ b.len()) as u64;
    for i in 0..n {
        diff |= u64::from(a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0));
    }
    diff == 0
}

/// An error answer: status and JSON body.
struct Reply(StatusCode, ApiError);

impl Reply {
    fn new(status: StatusCode, e: ApiError) -> Reply {
        Reply(status, e)
    }
    fn bad(e: ApiError) -> Reply {
        Reply(StatusCode::BAD_REQUEST, e)
    }
    fn not_found(what: String) -> Reply {
        Reply(StatusCode::NOT_FOUND, ApiError::msg(what))
    }
    fn internal(what: String) -> Reply {
        Reply(StatusCode::INTERNAL_SERVER_ERROR, ApiError::msg(what))
    }
    /// A failed save: 503 when a shared store (a fleet's etcd) is unreachable (R10.5), 409
    /// Conflict when another node saved a change first (not 412: the client's own If-Match
    /// held; the store moved under it), 500 for anything else.
    fn store(e: crate::error::StoreError) -> Reply {
        use crate::error::StoreError;
        match e {
            StoreError::Unreachable { .. } => Reply(
                StatusCode::SERVICE_UNAVAILABLE,
                ApiError {
                    error: format!(
                        "{e}; the change was not saved or applied (the gateway keeps translating): retry when the store is back"
                    ),
                    field: None,
                    rule: Some("R10.5".into()),
                },
            ),
            StoreError::Conflict { .. } => Reply(
                StatusCode::CONFLICT,
                ApiError {
                    error: e.to_string(),
                    field: None,
                    rule: Some("R10.1".into()),
                },
            ),
            other => Reply::internal(other.to_string()),
        }
    }
    fn config(e: &snatgw_core::ConfigError) -> Reply {
        let (s, body) = config_error_body(e);
        Reply(
            StatusCode::from_u16(s).unwrap_or(StatusCode::BAD_REQUEST),
            body,
        )
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let Reply(status, mut body) = self;
        // Never echo more than a bounded part of what the client sent.
        body.error = crate::body::bounded(&body.error, crate::body::MAX_ERROR_LEN);
        body.field = body
            .field
            .map(|f| crate::body::bounded(&f, crate::body::MAX_FIELD_LEN));
        let mut r = (status, axum::Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

type Result<T, E = Reply> = std::result::Result<T, E>;

/// A JSON answer with its ETag and, if given, the generation.
fn tagged<T: Serialize + ?Sized>(status: StatusCode, v: &T, generation: Option<u64>) -> Response {
    let body = match serde_json::to_vec(v) {
        Ok(b) => b,
        Err(e) => return Reply::internal(format!("cannot encode the answer: {e}")).into_response(),
    };
    let tag = format!("\"{:016x}\"", fnv1a64(&body));
    let mut r = (status, body).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = HeaderValue::from_str(&tag) {
        h.insert(header::ETAG, v);
    }
    if let Some(g) = generation {
        h.insert(GENERATION_HEADER, HeaderValue::from(g));
    }
    r
}

/// Runs blocking work (the gateway lock, the store's fsync) off the async workers; a panic
/// in it becomes a 500, never a crash of the server.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Reply::internal(format!("backend task failed: {e}")))
}

struct Inner {
    backend: Arc<dyn Backend>,
    store: Arc<dyn Store>,
    token: Option<String>,
    /// Serialises writers (validate, check, save, apply).
    writer: tokio::sync::Mutex<()>,
    /// The accepted desired state, for readers.
    current: RwLock<Arc<Stored>>,
}

type Shared = Arc<Inner>;

impl Inner {
    fn current(&self) -> Arc<Stored> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Makes `next` the accepted state readers see.
    fn publish(&self, next: Stored) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
    }
}

/// The control plane: the desired state, the store that keeps it and the backend that runs
/// it. Cheap to clone (shared).
#[derive(Clone)]
pub struct ControlPlane {
    inner: Shared,
}

impl ControlPlane {
    /// A control plane over `backend` and `store`, starting from `initial` (see
    /// [`crate::store::seed`]; the backend must already run `initial.config`). With a `token`,
    /// every route but `/healthz` needs `Authorization: Bearer <token>`.
    pub fn new(
        backend: Arc<dyn Backend>,
        store: Arc<dyn Store>,
        token: Option<String>,
        initial: Stored,
    ) -> ControlPlane {
        ControlPlane {
            inner: Arc::new(Inner {
                backend,
                store,
                token: token.filter(|t| !t.is_empty()),
                writer: tokio::sync::Mutex::new(()),
                current: RwLock::new(Arc::new(initial)),
            }),
        }
    }

    /// The accepted desired state.
    pub fn current(&self) -> Stored {
        (*self.inner.current()).clone()
    }

    /// Whether requests need a bearer token.
    pub fn has_token(&self) -> bool {
        self.inner.token.is_some()
    }

    /// The axum router with every route (for embedding or tests; [`crate::serve`] runs it).
    pub fn router(&self) -> Router {
        let s = self.inner.clone();
        let api = resource_routes(Router::new())
            .route("/api/v1/topology", get(topology_get).put(topology_put))
            .route("/api/v1/gateway", get(gateway_get).put(gateway_put))
            .route("/api/v1/deployments/{name}/redeploy", post(redeploy))
            .route("/api/v1/deployments/{name}/settle", post(settle))
            .route("/api/v1/instances/{name}/ports", get(instance_ports))
            .route("/api/v1/loadBalancers/{name}/probes", get(lb_probes))
            .route(
                "/api/v1/loadBalancers/{name}/inboundFlows",
                get(lb_inbound_flows),
            )
            .route("/api/v1/networkSecurityGroups/{name}/hits", get(nsg_hits))
            .route("/api/v1/flows", get(flows))
            .route("/api/v1/events", get(events))
            .route("/metrics", get(metrics))
            .route("/openapi.json", get(openapi_json))
            .fallback(not_found)
            .method_not_allowed_fallback(method_not_allowed)
            // Bodies are buffered under a per-request cap and a global budget, behind the
            // auth (issue #20, crate::server::body_budget).
            .layer(middleware::from_fn_with_state(
                crate::server::BodyBudget::default(),
                crate::server::body_budget,
            ))
            .layer(middleware::from_fn(json_content_type))
            .layer(middleware::from_fn_with_state(s.clone(), auth));
        Router::new()
            .route("/healthz", get(healthz))
            .merge(api)
            .layer(DefaultBodyLimit::max(MAX_BODY))
            .layer(middleware::from_fn(errors_as_json))
            .with_state(s)
    }

    /// Serves the API on `addr` (see [`crate::serve`]).
    pub fn serve(&self, addr: SocketAddr) -> Result<crate::ServerHandle, ControlError> {
        crate::server::serve(addr, self.clone())
    }

    /// Adopts `next`, a topology another node of a fleet saved to the shared store (R10.1),
    /// by the path a local write takes, less the save: validate, engine check, apply, publish
    /// its generation; serialised with local writes. A record not newer than what runs (this
    /// node's own save coming back through the watch, or an older one) changes nothing, and
    /// so does a refusal (the error says why; the node keeps running what it ran).
    pub async fn adopt(&self, next: Stored) -> std::result::Result<Adopted, ApiError> {
        adopt(&self.inner, next).await
    }

    /// Starts a thread that adopts ([`ControlPlane::adopt`]) every topology `rx` hands out
    /// (a shared store's watch, such as the fleet's `EtcdStore::subscribe`), the current one
    /// first, and calls `report` with each outcome (the caller logs). It ends when the
    /// [`Follower`] is stopped or dropped, or when the sender goes away.
    pub fn follow(
        &self,
        mut rx: watch::Receiver<Option<Stored>>,
        mut report: impl FnMut(&Stored, &std::result::Result<Adopted, ApiError>) + Send + 'static,
    ) -> Result<Follower, ControlError> {
        let plane = self.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ControlError::Runtime(e.to_string()))?;
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("snatgw-follow".into())
            .spawn(move || {
                rt.block_on(async move {
                    loop {
                        let next = rx.borrow_and_update().clone();
                        if let Some(next) = next {
                            let r = plane.adopt(next.clone()).await;
                            report(&next, &r);
                        }
                        tokio::select! {
                            _ = &mut stopped => return,
                            changed = rx.changed() => if changed.is_err() { return },
                        }
                    }
                });
            })
            .map_err(|e| ControlError::Runtime(e.to_string()))?;
        Ok(Follower {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

/// What [`ControlPlane::adopt`] did with a topology another node saved.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Adopted {
    /// The engine runs it and the API serves it now.
    Applied {
        /// Its generation.
        generation: u64,
        /// Whether the default-SNAT designations (R1.3) this engine left differ from the
        /// ones the saving node stored (this node did not apply every generation in
        /// between); a restart starts from the stored ones.
        designations_differ: bool,
    },
    /// Not newer than what this node runs: nothing done.
    Current {
        /// The generation this node runs.
        generation: u64,
    },
}

/// The thread of [`ControlPlane::follow`]; stopping or dropping it ends the thread.
pub struct Follower {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Follower {
    /// Stops the thread and waits for it (an adopt in progress finishes first).
    pub fn stop(mut self) {
        self.end();
    }

    fn end(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.end();
    }
}

/// The body of [`ControlPlane::adopt`].
async fn adopt(s: &Shared, next: Stored) -> std::result::Result<Adopted, ApiError> {
    let _writer = s.writer.lock().await;
    let cur = s.current();
    if next.generation <= cur.generation {
        return Ok(Adopted::Current {
            generation: cur.generation,
        });
    }
    let mut designations_differ = false;
    if next.config != cur.config {
        let topo =
            Topology::from_config(next.config.clone()).map_err(|e| config_error_body(&e).1)?;
        let backend = s.backend.clone();
        let (topo, checked) = blocking(move || {
            let r = backend.check(&topo);
            (topo, r)
        })
        .await
        .map_err(|r| r.1)?;
        let designations = checked.map_err(|e| config_error_body(&e).1)?;
        let stored = next.engine_designations();
        designations_differ = !stored.is_empty()
            && (stored.len() != designations.len()
                || !stored.iter().all(|d| designations.contains(d)));
        let backend = s.backend.clone();
        blocking(move || backend.apply(topo))
            .await
            .map_err(|r| r.1)?
            .map_err(|e| config_error_body(&e).1)?;
    }
    let generation = next.generation;
    s.publish(next);
    Ok(Adopted::Applied {
        generation,
        designations_differ,
    })
}

async fn auth(State(s): State<Shared>, req: Request, next: Next) -> Response {
    if let Some(tok) = &s.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, rest) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            });
        let ok = given.is_some_and(|g| ct_eq(g.as_bytes(), tok.as_bytes()));
        if !ok {
            let msg = if given.is_some() {
                "wrong bearer token"
            } else {
                "missing `Authorization: Bearer <token>`"
            };
            return Reply::new(StatusCode::UNAUTHORIZED, ApiError::msg(msg)).into_response();
        }
    }
    next.run(req).await
}

/// Longest request target (path and query) the API reads, in bytes; a longer one is
/// answered 414 with the JSON error body. (hyper itself answers targets over 64 KiB, and
/// heads over its buffer, with an empty 414/431 before any route runs.)
pub const MAX_URI: usize = 8 << 10;

/// Every error answer carries the JSON error body `{error, field, rule}`, also the ones that
/// axum's extractors and layers produce as plain text (413 from the body limit, 400 from a
/// path that is not UTF-8...); and a request target over [`MAX_URI`] is refused with 414.
async fn errors_as_json(req: Request, next: Next) -> Response {
    let target_len = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if target_len > MAX_URI {
        return Reply::new(
            StatusCode::URI_TOO_LONG,
            ApiError::msg(format!(
                "the request target is {target_len} bytes; at most {MAX_URI}"
            )),
        )
        .into_response();
    }
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let reason = status.canonical_reason().unwrap_or("error");
    let error = if text.trim().is_empty() {
        reason.to_string()
    } else {
        format!("{reason}: {}", text.trim())
    };
    let mut r = Reply::new(status, ApiError::msg(error)).into_response();
    // Keep what the layer said besides the body (Allow, Retry-After, WWW-Authenticate).
    for (k, v) in parts.headers.iter() {
        if k != header::CONTENT_TYPE && k != header::CONTENT_LENGTH {
            r.headers_mut().insert(k.clone(), v.clone());
        }
    }
    r
}

/// A body sent with a media type other than JSON is refused with 415 (a body without a
/// `Content-Type` is read as JSON).
async fn json_content_type(req: Request, next: Next) -> Response {
    if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
        let essence = ct
            .to_str()
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let json = essence == "application/json"
            || (essence.starts_with("application/") && essence.ends_with("+json"));
        let has_body = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            != Some(0)
            && req.method() != axum::http::Method::GET
            && req.method() != axum::http::Method::HEAD
            && req.method() != axum::http::Method::DELETE;
        if has_body && !json {
            return Reply::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                ApiError::field(
                    format!(
                        "request body of type `{}`: send `Content-Type: application/json`",
                        crate::body::bounded(&essence, 64)
                    ),
                    "Content-Type",
                ),
            )
            .into_response();
        }
    }
    next.run(req).await
}

async fn not_found(req: Request) -> Reply {
    Reply::not_found(format!("no route {} {}", req.method(), req.uri().path()))
}

async fn method_not_allowed(req: Request) -> Reply {
    Reply::new(
        StatusCode::METHOD_NOT_ALLOWED,
        ApiError::msg(format!(
            "method {} not allowed on {}",
            req.method(),
            req.uri().path()
        )),
    )
}

/// The `{name}` of a path, under the rule of every string the API takes (no control
/// character, no whitespace at either end: [`crate::body::string_fault`]) and not empty:
/// otherwise 400 naming `name` (no resource can have such a name).
fn path_name(p: Result<Path<String>, PathRejection>) -> Result<String> {
    match p {
        Ok(Path(n)) => {
            let fault = if n.is_empty() {
                Some("is empty".to_string())
            } else {
                crate::body::string_fault(&n)
            };
            match fault {
                None => Ok(n),
                Some(f) => Err(Reply::bad(ApiError::field(
                    format!(
                        "name `{}` {f}; a name is not empty, has no control character and no leading or trailing whitespace",
                        crate::body::bounded(&n, 64).escape_debug()
                    ),
                    "name",
                ))),
            }
        }
        Err(e) => Err(Reply::bad(ApiError::field(e.body_text(), "name"))),
    }
}

fn if_match(h: &HeaderMap) -> Result<Option<String>> {
    match h.get(header::IF_MATCH) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(|s| Some(s.to_string()))
            .map_err(|_| Reply::bad(ApiError::field("If-Match is not text", "If-Match"))),
    }
}

/// The field a serde_json error names (`unknown field `x``, `missing field `x``), under
/// `prefix` (`instance[vm1]`).
fn json_error(e: &serde_json::Error, prefix: &str) -> Reply {
    let msg = e.to_string();
    let named = ["unknown field `", "missing field `", "duplicate field `"]
        .iter()
        .find_map(|p| {
            let rest = msg.split_once(p)?.1;
            Some(rest.split_once('`')?.0.to_string())
        });
    let field = match (named, prefix.is_empty()) {
        (Some(f), true) => Some(f),
        (Some(f), false) => Some(format!("{prefix}.{f}")),
        (None, true) => None,
        (None, false) => Some(prefix.to_string()),
    };
    Reply::bad(ApiError {
        error: format!("request body: {msg}"),
        field,
        rule: None,
    })
}

/// A body refused by [`crate::body::strict_object`], as a 400.
fn body_error(e: crate::body::BodyError) -> Reply {
    Reply::bad(ApiError {
        error: e.message,
        field: e.field,
        rule: None,
    })
}

/// A body the schema says is an object of type `T`, decoded under the API's rules (an object,
/// no duplicate keys, no surrounding whitespace: see [`crate::body`]); errors name the field
/// under `prefix`.
fn decode<T: DeserializeOwned>(body: &[u8], prefix: &str) -> Result<T> {
    let obj = crate::body::strict_object(body, prefix).map_err(body_error)?;
    serde_json::from_value(serde_json::Value::Object(obj)).map_err(|e| json_error(&e, prefix))
}

/// A resource body: the path's name wins and must equal the body's `name`, if given.
fn resource_body<R: Resource>(name: &str, body: &[u8]) -> Result<R> {
    let prefix = format!("{}[{name}]", R::FIELD);
    let mut obj = crate::body::strict_object(body, &prefix).map_err(body_error)?;
    match obj.get("name") {
        None => {
            obj.insert("name".into(), serde_json::Value::String(name.into()));
        }
        Some(serde_json::Value::String(n)) if n == name => {}
        Some(other) => {
            return Err(Reply::bad(ApiError::field(
                format!("the body names {other}, the path names `{name}`: they must match"),
                format!("{prefix}.name"),
            )))
        }
    }
    serde_json::from_value(serde_json::Value::Object(obj)).map_err(|e| json_error(&e, &prefix))
}

/// What a write does to the desired state.
struct Edit<T> {
    /// The target's ETag before the write (`None`: it does not exist yet).
    current_etag: Option<String>,
    /// The new desired state.
    candidate: ConfigFile,
    /// What the answer returns.
    result: T,
}

/// Runs a write: If-Match, validation, engine check, save, apply, publish (see the module
/// docs), all or nothing whatever the client does: the work runs in its own task, which the
/// request does not own, so a client that goes away (hyper then drops the request's future)
/// cannot stop it between the save and the publish. The answer is sent if the client is still
/// there.
async fn write<T: Send + 'static>(
    s: &Shared,
    if_match: Option<String>,
    edit: impl FnOnce(&ConfigFile) -> Result<Edit<T>> + Send + 'static,
) -> Result<(T, u64)> {
    let s = s.clone();
    tokio::spawn(async move { write_to_completion(&s, if_match, edit).await })
        .await
        .map_err(|e| Reply::internal(format!("the write task failed: {e}")))?
}

/// The body of [`write`], run in a task of its own.
async fn write_to_completion<T>(
    s: &Shared,
    if_match: Option<String>,
    edit: impl FnOnce(&ConfigFile) -> Result<Edit<T>>,
) -> Result<(T, u64)> {
    let _writer = s.writer.lock().await;
    let cur = s.current();
    let e = edit(&cur.config)?;
    if let Some(m) = &if_match {
        if !if_match_ok(m, e.current_etag.as_deref()) {
            return Err(Reply::new(
                StatusCode::PRECONDITION_FAILED,
                ApiError::field(
                    format!(
                        "If-Match {m} does not match the current ETag {}",
                        e.current_etag.as_deref().unwrap_or("(absent)")
                    ),
                    "If-Match",
                ),
            ));
        }
    }
    if e.candidate == cur.config {
        return Ok((e.result, cur.generation));
    }
    let topo = Topology::from_config(e.candidate.clone()).map_err(|e| Reply::config(&e))?;
    let backend = s.backend.clone();
    let (topo, checked) = blocking(move || {
        let r = backend.check(&topo);
        (topo, r)
    })
    .await?;
    let designations = checked.map_err(|e| Reply::config(&e))?;
    let mut next = Stored {
        generation: cur.generation + 1,
        config: e.candidate,
        designations: Vec::new(),
    };
    next.set_designations(&designations);
    let store = s.store.clone();
    let saved = next.clone();
    blocking(move || store.save(&saved))
        .await?
        .map_err(Reply::store)?;
    // Saved: from here on the store holds `next`, so every path below ends with the store,
    // the engine and `current` agreeing.
    let backend = s.backend.clone();
    let applied = match blocking(move || backend.apply(topo)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(err)) => Err(Reply::config(&err)),
        Err(panicked) => Err(panicked),
    };
    if let Err(refused) = applied {
        // Not reachable while writers are serialised (the same plan was checked). Put the
        // previous topology back under a new generation, so no generation number is ever
        // given to two different states.
        let restored = Stored {
            generation: next.generation + 1,
            ..(*cur).clone()
        };
        let store = s.store.clone();
        let to_save = restored.clone();
        let saved_back = blocking(move || store.save(&to_save)).await;
        return match saved_back {
            Ok(Ok(())) => {
                s.publish(restored);
                Err(refused)
            }
            Ok(Err(se)) => {
                // The store still holds `next`; the engine runs the previous topology.
                s.publish(next);
                Err(Reply::internal(format!(
                    "the engine refused the change after it was saved ({}), and restoring the previous state failed: {se}; restart the gateway to run the stored topology",
                    refused.1.error
                )))
            }
            Err(r) => Err(r),
        };
    }
    let generation = next.generation;
    s.publish(next);
    Ok((e.result, generation))
}

async fn list_impl<R: Resource>(s: Shared) -> Response {
    let cur = s.current();
    tagged(StatusCode::OK, R::list(&cur.config), Some(cur.generation))
}

async fn get_impl<R: Resource>(s: Shared, name: Result<Path<String>, PathRejection>) -> Response {
    let name = match path_name(name) {
        Ok(n) => n,
        Err(r) => return r.into_response(),
    };
    let cur = s.current();
    match R::list(&cur.config).iter().find(|r| r.name() == name) {
        Some(r) => tagged(StatusCode::OK, r, Some(cur.generation)),
        None => Reply::not_found(format!("{}[{name}] does not exist", R::FIELD)).into_response(),
    }
}

async fn put_impl<R: Resource>(
    s: Shared,
    name: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let go = async {
        let name = path_name(name)?;
        let m = if_match(&headers)?;
        let new: R = resource_body(&name, &body)?;
        let (r, g) = write(&s, m, move |c| {
            let mut candidate = c.clone();
            let list = R::list_mut(&mut candidate);
            let current_etag = match list.iter_mut().find(|r| r.name() == name) {
                Some(slot) => {
                    let tag = etag_of(slot);
                    *slot = new.clone();
                    Some(tag)
                }
                None => {
                    list.push(new.clone());
                    None
                }
            };
            Ok(Edit {
                current_etag,
                candidate,
                result: new,
            })
        })
        .await?;
        Ok::<_, Reply>(tagged(StatusCode::OK, &r, Some(g)))
    };
    go.await.unwrap_or_else(IntoResponse::into_response)
}

async fn delete_impl<R: Resource>(
    s: Shared,
    name: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Response {
    let go = async {
        let name = path_name(name)?;
        let m = if_match(&headers)?;
        let (tag, g) = write(&s, m, move |c| {
            let mut candidate = c.clone();
            let list = R::list_mut(&mut candidate);
            let Some(i) = list.iter().position(|r| r.name() == name) else {
                return Err(Reply::not_found(format!(
                    "{}[{name}] does not exist",
                    R::FIELD
                )));
            };
            let current_etag = Some(etag_of(&list[i]));
            list.remove(i);
            let result = etag_of(R::list(&candidate));
            Ok(Edit {
                current_etag,
                candidate,
                result,
            })
        })
        .await?;
        let mut r = StatusCode::NO_CONTENT.into_response();
        if let Ok(v) = HeaderValue::from_str(&tag) {
            r.headers_mut().insert(header::ETAG, v);
        }
        r.headers_mut()
            .insert(GENERATION_HEADER, HeaderValue::from(g));
        Ok::<_, Reply>(r)
    };
    go.await.unwrap_or_else(IntoResponse::into_response)
}

/// Generates the four handlers of one resource kind, with their OpenAPI descriptions.
macro_rules! resource_handlers {
    ($module:ident, $ty:ident, $coll:tt, $item:tt, $tag:tt) => {
        mod $module {
            use super::*;

            #[utoipa::path(get, path = $coll, tag = $tag,
                operation_id = concat!("list_", stringify!($module)),
                responses(
                    (status = 200, description = "The collection", body = Vec<$ty>,
                        headers(("ETag" = String, description = "FNV-1a 64 of the canonical JSON"))),
                    (status = 401, description = "Missing or wrong bearer token", body = ApiError),
                ),
                security(("bearer" = [])))]
            pub(super) async fn list(State(s): State<Shared>) -> Response {
                list_impl::<$ty>(s).await
            }

            #[utoipa::path(get, path = $item, tag = $tag,
                operation_id = concat!("get_", stringify!($module)),
                params(("name" = String, Path, description = "Resource name (percent-encoded)")),
                responses(
                    (status = 200, description = "The resource", body = $ty,
                        headers(("ETag" = String, description = "FNV-1a 64 of the canonical JSON"))),
                    (status = 401, description = "Missing or wrong bearer token", body = ApiError),
                    (status = 404, description = "No such resource", body = ApiError),
                ),
                security(("bearer" = [])))]
            pub(super) async fn get(
                State(s): State<Shared>,
                name: Result<Path<String>, PathRejection>,
            ) -> Response {
                get_impl::<$ty>(s, name).await
            }

            #[utoipa::path(put, path = $item, tag = $tag,
                operation_id = concat!("put_", stringify!($module)),
                params(
                    ("name" = String, Path, description = "Resource name; wins over the body's, which must match if given"),
                    ("If-Match" = Option<String>, Header, description = "Write only if the resource's current ETag matches"),
                ),
                request_body = $ty,
                responses(
                    (status = 200, description = "Created or replaced; the stored resource", body = $ty,
                        headers(("ETag" = String, description = "The new ETag"))),
                    (status = 400, description = "Bad JSON or field (with field and SPEC rule)", body = ApiError),
                    (status = 401, description = "Missing or wrong bearer token", body = ApiError),
                    (status = 409, description = "Conflicts with the rest of the topology (with field and SPEC rule)", body = ApiError),
                    (status = 412, description = "If-Match does not match", body = ApiError),
                    (status = 500, description = "The store failed", body = ApiError),
                ),
                security(("bearer" = [])))]
            pub(super) async fn put(
                State(s): State<Shared>,
                name: Result<Path<String>, PathRejection>,
                headers: HeaderMap,
                body: Bytes,
            ) -> Response {
                put_impl::<$ty>(s, name, headers, body).await
            }

            #[utoipa::path(delete, path = $item, tag = $tag,
                operation_id = concat!("delete_", stringify!($module)),
                params(
                    ("name" = String, Path, description = "Resource name"),
                    ("If-Match" = Option<String>, Header, description = "Delete only if the resource's current ETag matches"),
                ),
                responses(
                    (status = 204, description = "Deleted",
                        headers(("ETag" = String, description = "The collection's new ETag"))),
                    (status = 401, description = "Missing or wrong bearer token", body = ApiError),
                    (status = 404, description = "No such resource", body = ApiError),
                    (status = 409, description = "Still referenced (with field and SPEC rule)", body = ApiError),
                    (status = 412, description = "If-Match does not match", body = ApiError),
                ),
                security(("bearer" = [])))]
            pub(super) async fn delete(
                State(s): State<Shared>,
                name: Result<Path<String>, PathRejection>,
                headers: HeaderMap,
            ) -> Response {
                delete_impl::<$ty>(s, name, headers).await
            }
        }
    };
}

/// The resource table (issue #16): one row per named resource kind of the desired topology.
/// Each row generates the kind's [`Resource`] impl, its four handlers with their OpenAPI
/// descriptions, its two routes, its OpenAPI paths and schema, and its [`ResourceKind`]
/// variant with the CLI's names. Adding a kind: its struct in `snatgw_core::config` (and its
/// list in `ConfigFile`), its validation in `snatgw_core::topology`, and one row here (see
/// docs/DESIGN.md, "Adding a resource kind").
///
/// Columns: variant, type, handler module, collection (the tag and the route under
/// `/api/v1`), the collection's route, the resource's route, the config file's key, the CLI
/// name, the other names the CLI accepts, and the variant's documentation.
macro_rules! resource_table {
    ($( $variant:ident, $ty:ident, $module:ident, $coll:literal, $coll_route:literal,
        $item_route:literal, $field:ident, $cli:literal, [$($alias:literal),*], $doc:literal; )*) => {
        $(
            impl Resource for $ty {
                const COLLECTION: &'static str = $coll;
                const FIELD: &'static str = stringify!($field);
                fn name(&self) -> &str {
                    &self.name
                }
                fn list(c: &ConfigFile) -> &Vec<Self> {
                    &c.$field
                }
                fn list_mut(c: &mut ConfigFile) -> &mut Vec<Self> {
                    &mut c.$field
                }
            }
            resource_handlers!($module, $ty, $coll_route, $item_route, $coll);
        )*

        /// The routes of every kind of the table.
        fn resource_routes(r: Router<Shared>) -> Router<Shared> {
            r $(
                .route($coll_route, get($module::list))
                .route(
                    $item_route,
                    get($module::get).put($module::put).delete($module::delete),
                )
            )*
        }

        /// A kind of the desired topology, as routes and the CLI name it: the whole topology,
        /// the gateway settings, and one kind per row of the resource table.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum ResourceKind {
            /// The whole topology (`/api/v1/topology`).
            Topology,
            /// The gateway settings (`/api/v1/gateway`).
            Gateway,
            $( #[doc = $doc] $variant, )*
        }

        impl ResourceKind {
            /// Every kind, in the CLI's order.
            pub const ALL: &'static [ResourceKind] =
                &[ResourceKind::Topology, ResourceKind::Gateway, $( ResourceKind::$variant, )*];

            /// The CLI's name: `topology`, `gateway`, `public-ips`, `instances`...
            pub fn cli_name(self) -> &'static str {
                match self {
                    ResourceKind::Topology => "topology",
                    ResourceKind::Gateway => "gateway",
                    $( ResourceKind::$variant => $cli, )*
                }
            }

            /// The route under `/api/v1`.
            pub fn collection(self) -> &'static str {
                match self {
                    ResourceKind::Topology => "topology",
                    ResourceKind::Gateway => "gateway",
                    $( ResourceKind::$variant => $coll, )*
                }
            }

            /// Whether the kind is a collection of named resources (not `topology`, `gateway`).
            pub fn is_named(self) -> bool {
                !matches!(self, ResourceKind::Topology | ResourceKind::Gateway)
            }
        }

        impl std::str::FromStr for ResourceKind {
            type Err = String;
            /// Accepts the CLI names, the route names and the singulars (`public-ip`).
            fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
                match s {
                    "topology" => return Ok(ResourceKind::Topology),
                    "gateway" => return Ok(ResourceKind::Gateway),
                    _ => {}
                }
                $(
                    if s == $cli || s == $coll $(|| s == $alias)* {
                        return Ok(ResourceKind::$variant);
                    }
                )*
                Err(format!(
                    "unknown kind `{s}`: expected one of {}",
                    ResourceKind::ALL
                        .iter()
                        .map(|k| k.cli_name())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            }
        }

        #[derive(OpenApi)]
        #[openapi(
            info(
                title = "snatgw control plane",
                description = "Desired topology (the config file's structure) as ARM-style resources, live ports, flows, events and metrics of a snatgw gateway. Errors are {error, field, rule}.",
            ),
            paths(
                topology_get, topology_put, gateway_get, gateway_put,
                redeploy, settle, instance_ports, lb_probes, lb_inbound_flows, nsg_hits,
                flows, events, metrics, openapi_json, healthz,
                $( $module::list, $module::get, $module::put, $module::delete, )*
            ),
            components(schemas(
                ApiError, ConfigFile, GatewayCfg, InstanceKind, Model, FrontendCfg,
                BackendPoolCfg, LbRuleCfg, RuleProtocol, ProbeCfg, ProbeProtocol, NsgRuleCfg,
                NsgDirection, NsgAccess, NsgProtocol, ProbeMetrics, NsgRuleMetrics,
                InboundFlowPage, InboundFlowRecord, RedeployRequest, InstancePorts, PerProtocol,
                PortRange, FlowPage, FlowRecord, EventRecord,
                $( $ty, )*
            )),
            modifiers(&BearerAuth, &Contract),
        )]
        struct ApiDoc;
    };
}

resource_table! {
    PublicIps, PublicIpCfg, public_ips, "publicIPAddresses", "/api/v1/publicIPAddresses",
        "/api/v1/publicIPAddresses/{name}", public_ip, "public-ips", ["public-ip"],
        "Public IPs (`/api/v1/publicIPAddresses`).";
    AvailabilitySets, AvailabilitySetCfg, availability_sets, "availabilitySets",
        "/api/v1/availabilitySets", "/api/v1/availabilitySets/{name}", availability_set,
        "availability-sets", ["availability-set"], "Availability sets (`/api/v1/availabilitySets`).";
    Deployments, DeploymentCfg, deployments, "deployments", "/api/v1/deployments",
        "/api/v1/deployments/{name}", deployment, "deployments", ["deployment"],
        "Classic deployments (`/api/v1/deployments`).";
    Instances, InstanceCfg, instances, "instances", "/api/v1/instances",
        "/api/v1/instances/{name}", instance, "instances", ["instance"],
        "Instances (`/api/v1/instances`).";
    LoadBalancers, LoadBalancerCfg, load_balancers, "loadBalancers", "/api/v1/loadBalancers",
        "/api/v1/loadBalancers/{name}", load_balancer, "load-balancers", ["load-balancer"],
        "Load balancers (`/api/v1/loadBalancers`).";
    Nsgs, NsgCfg, nsgs, "networkSecurityGroups", "/api/v1/networkSecurityGroups",
        "/api/v1/networkSecurityGroups/{name}", nsg, "nsgs", ["nsg"],
        "Network security groups (`/api/v1/networkSecurityGroups`).";
}

/// Health-probe state of a load balancer's members (SPEC R5.2, R4.5).
#[utoipa::path(get, path = "/api/v1/loadBalancers/{name}/probes", tag = "loadBalancers",
    params(("name" = String, Path, description = "Load balancer name")),
    responses(
        (status = 200, description = "Per (probe, member): up, failures in a row, results", body = Vec<ProbeMetrics>),
        (status = 404, description = "No such load balancer running", body = ApiError),
    ),
    security(("bearer" = [])))]
async fn lb_probes(State(s): State<Shared>, name: Result<Path<String>, PathRejection>) -> Response {
    let go = async {
        let name = path_name(name)?;
        if !s
            .current()
            .config
            .load_balancer
            .iter()
            .any(|l| l.name == name)
        {
            return Err(Reply::not_found(format!(
                "load_balancer[{name}] does not exist"
            )));
        }
        let backend = s.backend.clone();
        let m = blocking(move || backend.metrics()).await?;
        let v: Vec<ProbeMetrics> = m.probes.into_iter().filter(|p| p.lb == name).collect();
        Ok::<_, Reply>(tagged(StatusCode::OK, &v, None))
    };
    go.await.unwrap_or_else(IntoResponse::into_response)
}

/// Query of `GET /api/v1/loadBalancers/{name}/inboundFlows`.
#[derive(Debug, Default, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct PageParams {
    /// Where to continue (`next_cursor` of the previous page; default 0).
    #[param(minimum = 0, maximum = 9_223_372_036_854_775_807_i64)]
    cursor: Option<u64>,
    /// Most flows returned, 1..=1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u64>,
}

impl PageParams {
    fn from_query(raw: Option<&str>) -> Result<PageParams> {
        let q = QueryParams::parse(raw, &["cursor", "limit"]).map_err(body_error)?;
        Ok(PageParams {
            cursor: q.number("cursor", 0, MAX_COUNTER).map_err(body_error)?,
            limit: q.number("limit", 1, MAX_PAGE as u64).map_err(body_error)?,
        })
    }
}

/// Live inbound flows of a load balancer (SPEC R5.1, R6.3): client, frontend and the member
/// each flow sticks to, one bounded page at a time.
#[utoipa::path(get, path = "/api/v1/loadBalancers/{name}/inboundFlows", tag = "loadBalancers",
    params(("name" = String, Path, description = "Load balancer name"), PageParams),
    responses(
        (status = 200, description = "A page of inbound flows and the cursor of the next", body = InboundFlowPage),
        (status = 400, description = "A bad parameter", body = ApiError),
        (status = 404, description = "No such load balancer running", body = ApiError),
    ),
    security(("bearer" = [])))]
async fn lb_inbound_flows(
    State(s): State<Shared>,
    name: Result<Path<String>, PathRejection>,
    RawQuery(q): RawQuery,
) -> Response {
    let go = async {
        let name = path_name(name)?;
        let p = PageParams::from_query(q.as_deref())?;
        let limit = p.limit.map_or(DEFAULT_PAGE, |l| l as usize);
        if !s
            .current()
            .config
            .load_balancer
            .iter()
            .any(|l| l.name == name)
        {
            return Err(Reply::not_found(format!(
                "load_balancer[{name}] does not exist"
            )));
        }
        let backend = s.backend.clone();
        let cursor = p.cursor.unwrap_or(0);
        let page = blocking(move || backend.inbound_flows(&name, cursor, limit)).await?;
        Ok::<_, Reply>(axum::Json(page).into_response())
    };
    go.await.unwrap_or_else(IntoResponse::into_response)
}

/// Hit counters of an NSG's rules, default rules included (SPEC R4.1, R4.2).
#[utoipa::path(get, path = "/api/v1/networkSecurityGroups/{name}/hits", tag = "networkSecurityGroups",
    params(("name" = String, Path, description = "NSG name")),
    responses(
        (status = 200, description = "Per rule, in evaluation order: priority, direction, access, hits", body = Vec<NsgRuleMetrics>),
        (status = 404, description = "No such NSG", body = ApiError),
    ),
    security(("bearer" = [])))]
async fn nsg_hits(State(s): State<Shared>, name: Result<Path<String>, PathRejection>) -> Response {
    let go = async {
        let name = path_name(name)?;
        if !s.current().config.nsg.iter().any(|n| n.name == name) {
            return Err(Reply::not_found(format!("nsg[{name}] does not exist")));
        }
        let backend = s.backend.clone();
        let m = blocking(move || backend.metrics()).await?;
        let v: Vec<NsgRuleMetrics> = m.nsg_rules.into_iter().filter(|h| h.nsg == name).collect();
        Ok::<_, Reply>(tagged(StatusCode::OK, &v, None))
    };
    go.await.unwrap_or_else(IntoResponse::into_response)
}

/// The whole desired topology.
#[utoipa::path(get, path = "/api/v1/topology", tag = "topology",
    responses(
        (status = 200, description = "The desired topology (the config file's structure)", body = ConfigFile,
            headers(("ETag" = String, description = "FNV-1a 64 of the whole config's canonical JSON"),
                    ("X-Generation" = u64, description = "Accepted writes so far"))),
        (status = 401, description = "Missing or wrong bearer token", body = ApiError),
    ),
    security(("bearer" = [])))]
async fn topology_get(State(s): State<Shared>) -> Response {
    let cur = s.current();
    tagged(StatusCode::OK, &cur.config, Some(cur.generation))
}

/// Replaces the whole desired topology.
#[utoipa::path(put, path = "/api/v1/topology", tag = "topology",
    params(("If-Match" = Option<String>, Header, description = "Write only if the topology's current ETag matches")),
    request_body = ConfigFile,
    responses(
        (status = 200, description = "Applied; the new topology", body = ConfigFile,
            headers(("ETag" = String, description = "The new ETag"))),
        (status = 400, description = "Bad JSON or field", body = ApiError),
        (status = 401, description = "Missing or wrong bearer token", body = ApiError),
        (status = 409, description = "Refused by validation or the engine's plan", body = ApiError),
        (status = 412, description = "If-Match does not match", body = ApiError),
        (status = 500, description = "The store failed", body = ApiError),
    ),
    security(("bearer" = [])))]
async fn topology_put(State(s): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let go = async {
        let m = if_match(&headers)?;
        let new: ConfigFile = decode(&body, "")?;
        let (r, g) = write(&s, m, move |c| {
            Ok(Edit {
                current_etag: Some(etag_of(c)),
                candidate: new.clone(),
                result: new,
            })
        })
        .await?;
        Ok::<_, Reply>(tagged(StatusCode::OK, &r, Some(g)))
    };
    go.await.unwrap_or_else(IntoResponse::into_response)
}

/// The gateway settings.
#[utoipa::path(get, path = "/api/v1/gateway", tag = "gateway",
    responses(
        (status = 200, description = "Gateway-wide settings", body = GatewayCfg,
            headers(("ETag" = String, description = "FNV-1a 64 of the canonical JSON"))),
        (status = 401, description = "Missing or wrong bearer token", body = ApiError),
    ),
    security(("bearer" = [])))]
async fn gateway_get(State(s): State<Shared>) -> Response {
    let cur = s.current();
    tagged(StatusCode::OK, &cur.config.gateway, Some(cur.generation))
}

/// Replaces the gateway settings.
#[utoipa::path(put, path = "/api/v1/gateway", tag = "gateway",
    params(("If-Match" = Option<String>, Header, description = "Write only if the settings' current ETag matches")),
    request_body = GatewayCfg,
    responses(
        (status = 200, description = "Applied; the new settings", body = GatewayCfg,
            headers(("ETag" = String, description = "The new ETag"))),
        (status = 400, description = "Bad JSON or field", body = ApiError),
        (status = 401, description = "Missing or wrong bearer token", body = ApiError),
        (status = 409, description = "Refused by validation or the engine's plan", body = ApiError),
        (status = 412, description = "If-Match does not match", body = ApiError),
    ),
    security(("bearer" = [])))]
async fn gateway_put(State(s): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let go = async {
        let m = if_match(&headers)?;
        let new: GatewayCfg = decode(&body, "gateway")?;
        let (r, g) = write(&s, m, move |c| {
            let mut candidate = c.clone();
            candidate.gateway = new.clone();
            Ok(Edit {
                current_etag: Some(etag_of(&c.gateway)),
                candidate,
                result: new,
            })
        })
        .await?;
        Ok::<_, Reply>(tagged(StatusCode::OK, &r, Some(g)))
    };
    go.await.unwrap_or_else(IntoResponse::into_response)
}

async fn set_redeploy(
    s: Shared,
    name: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    reported: Option<u32>,
) -> Result<Response> {
    let name = path_name(name)?;
    let m = if_match(&headers)?;
    let (r, g) = write(&s, m, move |c| {
        let mut candidate = c.clone();
        let Some(d) = candidate.deployment.iter_mut().find(|d| d.name == name) else {
            return Err(Reply::not_found(format!(
                "deployment[{name}] does not exist"
            )));
        };
        let current_etag = Some(etag_of(d));
        d.redeploy_reported_instances = reported;
        let result = d.clone();
        Ok(Edit {
            current_etag,
            candidate,
            result,
        })
    })
    .await?;
    Ok(tagged(StatusCode::OK, &r, Some(g)))
}

/// Starts a redeploy of a Classic deployment (SPEC R2.11): tiers follow the reported size.
#[utoipa::path(post, path = "/api/v1/deployments/{name}/redeploy", tag = "deployments",
    params(
        ("name" = String, Path, description = "Deployment name"),
        ("If-Match" = Option<String>, Header, description = "Only if the deployment's current ETag matches"),
    ),
    request_body = RedeployRequest,
    responses(
        (status = 200, description = "The deployment, redeploying", body = DeploymentCfg,
            headers(("ETag" = String, description = "The new ETag"))),
        (status = 400, description = "Bad JSON or field", body = ApiError),
        (status = 404, description = "No such deployment", body = ApiError),
        (status = 409, description = "Reported size outside the deployment's actual size..twice it (R2.11, with field and rule)", body = ApiError),
        (status = 412, description = "If-Match does not match", body = ApiError),
    ),
    security(("bearer" = [])))]
async fn redeploy(
    State(s): State<Shared>,
    name: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let go = async {
        let req: RedeployRequest = decode(&body, "")?;
        set_redeploy(s, name, headers, Some(req.reported_instances)).await
    };
    go.await.unwrap_or_else(IntoResponse::into_response)
}

/// Ends a redeploy (SPEC R2.11): tiers follow the actual size again (R2.10).
#[utoipa::path(post, path = "/api/v1/deployments/{name}/settle", tag = "deployments",
    params(
        ("name" = String, Path, description = "Deployment name"),
        ("If-Match" = Option<String>, Header, description = "Only if the deployment's current ETag matches"),
    ),
    responses(
        (status = 200, description = "The deployment, settled", body = DeploymentCfg,
            headers(("ETag" = String, description = "The new ETag"))),
        (status = 404, description = "No such deployment", body = ApiError),
        (status = 412, description = "If-Match does not match", body = ApiError),
    ),
    security(("bearer" = [])))]
async fn settle(
    State(s): State<Shared>,
    name: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Response {
    set_redeploy(s, name, headers, None)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// An instance's live ports report (SPEC R6.1).
#[utoipa::path(get, path = "/api/v1/instances/{name}/ports", tag = "instances",
    params(("name" = String, Path, description = "Instance name")),
    responses(
        (status = 200, description = "Scenario, block, pool size, used ports, flows, counters", body = InstancePorts),
        (status = 404, description = "No such instance", body = ApiError),
    ),
    security(("bearer" = [])))]
async fn instance_ports(
    State(s): State<Shared>,
    name: Result<Path<String>, PathRejection>,
) -> Response {
    let go = async {
        let name = path_name(name)?;
        let backend = s.backend.clone();
        let n = name.clone();
        let report = blocking(move || backend.instance(&n)).await?;
        let r =
            report.ok_or_else(|| Reply::not_found(format!("instance[{name}] is not running")))?;
        Ok::<_, Reply>(tagged(StatusCode::OK, &InstancePorts::from(&r), None))
    };
    go.await.unwrap_or_else(IntoResponse::into_response)
}

/// Query of `GET /api/v1/flows`.
#[derive(Debug, Default, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct FlowParams {
    /// Only this instance's flows.
    instance: Option<String>,
    /// Only flows to `ip` or `ip:port`.
    destination: Option<String>,
    /// `tcp` or `udp`.
    #[param(inline, value_type = Option<FlowProtocolParam>)]
    protocol: Option<String>,
    /// `open`, `fin_out`, `fin_in`, `closing` or `reset`.
    #[param(inline, value_type = Option<FlowStateParam>)]
    state: Option<String>,
    /// A page's `next_cursor` (default 0).
    #[param(minimum = 0, maximum = 9_223_372_036_854_775_807_i64)]
    cursor: Option<u64>,
    /// Page size, 1..=1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u64>,
}

/// The protocols `GET /api/v1/flows?protocol=` filters on (documentation only).
#[derive(utoipa::ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)]
enum FlowProtocolParam {
    Tcp,
    Udp,
}

/// The states `GET /api/v1/flows?state=` filters on (documentation only).
#[derive(utoipa::ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)]
enum FlowStateParam {
    Open,
    FinOut,
    FinIn,
    Closing,
    Reset,
}

impl FlowParams {
    fn from_query(raw: Option<&str>) -> Result<FlowParams> {
        let q = QueryParams::parse(
            raw,
            &[
                "instance",
                "destination",
                "protocol",
                "state",
                "cursor",
                "limit",
            ],
        )
        .map_err(body_error)?;
        let text = |k: &str| q.text(k).map(str::to_string);
        Ok(FlowParams {
            instance: text("instance"),
            destination: text("destination"),
            protocol: text("protocol"),
            state: text("state"),
            cursor: q.number("cursor", 0, MAX_COUNTER).map_err(body_error)?,
            limit: q.number("limit", 1, MAX_PAGE as u64).map_err(body_error)?,
        })
    }
}

/// Largest cursor or sequence number a query takes (the largest signed 64-bit number, what
/// the OpenAPI `int64` format allows).
const MAX_COUNTER: u64 = i64::MAX as u64;

/// Lists live translations (SPEC R6.3), one bounded page at a time.
#[utoipa::path(get, path = "/api/v1/flows", tag = "flows",
    params(FlowParams),
    responses(
        (status = 200, description = "A page of flows and the cursor of the next", body = FlowPage),
        (status = 400, description = "A bad filter (field names the query parameter)", body = ApiError),
    ),
    security(("bearer" = [])))]
async fn flows(State(s): State<Shared>, RawQuery(q): RawQuery) -> Response {
    let go = async {
        let p = FlowParams::from_query(q.as_deref())?;
        let fq = FlowQuery {
            instance: p.instance,
            destination: p.destination,
            protocol: p.protocol,
            state: p.state,
            cursor: p.cursor.unwrap_or(0),
            limit: p.limit.map_or(DEFAULT_PAGE, |l| l as usize),
        };
        fq.filter().map_err(Reply::bad)?;
        let backend = s.backend.clone();
        let page = blocking(move || backend.flows(&fq)).await?;
        Ok::<_, Reply>(axum::Json(page).into_response())
    };
    go.await.unwrap_or_else(IntoResponse::into_response)
}

/// Query of `GET /api/v1/events`.
#[derive(Debug, Default, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct EventParams {
    /// Only events with a sequence number greater than this (default 0: all kept).
    #[param(minimum = 0, maximum = 9_223_372_036_854_775_807_i64)]
    after: Option<u64>,
    /// Most events returned, 1..=1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u64>,
    /// Seconds to wait for an event after `after` when there is none yet, 0..=30 (default 0).
    #[param(minimum = 0, maximum = 30)]
    wait: Option<u64>,
}

impl EventParams {
    fn from_query(raw: Option<&str>) -> Result<EventParams> {
        let q = QueryParams::parse(raw, &["after", "limit", "wait"]).map_err(body_error)?;
        Ok(EventParams {
            after: q.number("after", 0, MAX_COUNTER).map_err(body_error)?,
            limit: q.number("limit", 1, MAX_PAGE as u64).map_err(body_error)?,
            wait: q.number("wait", 0, MAX_WAIT_SECS).map_err(body_error)?,
        })
    }
}

/// Events (SPEC R6.2), oldest first; `wait` long-polls for the next one.
#[utoipa::path(get, path = "/api/v1/events", tag = "events",
    params(EventParams),
    responses(
        (status = 200, description = "Events after `after` (empty when `wait` passed without one)", body = Vec<EventRecord>),
        (status = 400, description = "A bad parameter", body = ApiError),
    ),
    security(("bearer" = [])))]
async fn events(State(s): State<Shared>, RawQuery(q): RawQuery) -> Response {
    let go = async {
        let p = EventParams::from_query(q.as_deref())?;
        let after = p.after.unwrap_or(0);
        let limit = p.limit.map_or(DEFAULT_PAGE, |l| l as usize);
        let wait = p.wait.unwrap_or(0);
        let deadline = Instant::now() + Duration::from_secs(wait);
        let mut waiter: Option<watch::Receiver<u64>> = s.backend.event_waiter();
        loop {
            let backend = s.backend.clone();
            let evs = blocking(move || backend.events(after, limit)).await?;
            let now = Instant::now();
            if !evs.is_empty() || now >= deadline {
                return Ok::<_, Reply>(axum::Json(evs).into_response());
            }
            let left = deadline - now;
            match waiter.as_mut() {
                Some(rx) => {
                    let woke = tokio::time::timeout(left, rx.wait_for(|&seq| seq > after))
                        .await
                        .map(|r| r.is_ok());
                    match woke {
                        // Newer than `after` exists: read it (next turn).
                        Ok(true) => tokio::time::sleep(Duration::from_millis(1)).await,
                        // The sender is gone: fall back to polling.
                        Ok(false) => waiter = None,
                        Err(_) => {}
                    }
                }
                None => tokio::time::sleep(left.min(Duration::from_millis(200))).await,
            }
        }
    };
    go.await.unwrap_or_else(IntoResponse::into_response)
}

/// Prometheus metrics (SPEC R6.1).
#[utoipa::path(get, path = "/metrics", tag = "metrics",
    responses((status = 200, description = "Prometheus text format 0.0.4", body = String, content_type = "text/plain")),
    security(("bearer" = [])))]
async fn metrics(State(s): State<Shared>) -> Response {
    let backend = s.backend.clone();
    match blocking(move || backend.metrics()).await {
        Ok(snap) => {
            let text = crate::metrics::render(&snap);
            ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response()
        }
        Err(r) => r.into_response(),
    }
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "meta",
    responses((status = 200, description = "The OpenAPI document", body = Object)),
    security(("bearer" = [])))]
async fn openapi_json() -> Response {
    static DOC: OnceLock<String> = OnceLock::new();
    let doc = DOC.get_or_init(|| openapi().to_json().unwrap_or_default());
    ([(header::CONTENT_TYPE, "application/json")], doc.clone()).into_response()
}

/// Liveness (no auth).
#[utoipa::path(get, path = "/healthz", tag = "meta",
    responses((status = 200, description = "`ok`", body = String, content_type = "text/plain")))]
async fn healthz() -> &'static str {
    "ok"
}

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
        doc.components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "bearer",
                SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
            );
    }
}

/// Regular expressions of the OpenAPI document for the values the server parses (issue #20).
/// Each is a JSON Schema (ECMA-262) `pattern` that Python's `re` (which schemathesis generates
/// from) and Rust's `regex` read the same way: explicit character classes, `\uXXXX` escapes, no
/// `\s`, `\d` or flags. They describe the canonical spelling the server accepts; what they
/// cannot state (a prefix's host bits, a port range's low ≤ high, references, and the other
/// rules of [`snatgw_core::Topology::from_config`]) the server refuses with 400 or 409.
pub mod patterns {
    /// One octet of a dotted quad, 0–255 without leading zeros (as Rust's `Ipv4Addr` parses).
    const OCTET: &str = "(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])";
    /// A prefix length, 0–32.
    const PREFIX_LEN: &str = "(?:3[0-2]|[12]?[0-9])";
    /// A port 1–65535 without leading zeros.
    const PORT: &str =
        "(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})";

    /// A dotted-quad IPv4 address, unanchored.
    fn ipv4() -> String {
        format!(r"{OCTET}(?:\.{OCTET}){{3}}")
    }

    /// `word` in any ASCII case: `[Aa][Nn][Yy]`.
    fn any_case(word: &str) -> String {
        word.chars()
            .map(|c| {
                if c.is_ascii_alphabetic() {
                    format!("[{}{}]", c.to_ascii_uppercase(), c.to_ascii_lowercase())
                } else {
                    c.to_string()
                }
            })
            .collect()
    }

    /// An IPv4 prefix `a.b.c.d/len` (`gateway.vnet_prefixes`, `nsg.subnets`). Host bits set
    /// (`10.0.0.1/16`) match but are refused by the server (400).
    pub fn prefix() -> String {
        format!("^{}/{PREFIX_LEN}$", ipv4())
    }

    /// An NSG rule's port range: `*`, a port `80` or a range `1000-2000` (1–65535). A range
    /// whose low end is above its high end matches but is refused by the server (400).
    pub fn port_range() -> String {
        format!(r"^(?:\*|{PORT}(?:-{PORT})?)$")
    }

    /// An NSG rule's address: `*`, `any`, a service tag (in any case), an address or a prefix.
    pub fn address_match() -> String {
        let tags = ["any", "VirtualNetwork", "Internet", "AzureLoadBalancer"]
            .map(any_case)
            .join("|");
        format!(r"^(?:\*|{tags}|{}(?:/{PREFIX_LEN})?)$", ipv4())
    }

    /// `GET /api/v1/flows?destination=`: `ip` or `ip:port` (port 0–65535).
    pub fn destination() -> String {
        format!("^{}(?::(?:0|{PORT}))?$", ipv4())
    }

    /// An HTTP probe's path: `/`, then no whitespace or control character.
    pub fn probe_path() -> String {
        format!("^/[^{}]*$", crate::body::SPACE_OR_CONTROL_CLASS)
    }

    /// The names of the default NSG rules (SPEC R4.2) in any case, which a rule cannot take.
    pub fn default_rule_name() -> String {
        let names: Vec<String> = snatgw_core::policy::default_rules()
            .iter()
            .map(|r| any_case(&r.name))
            .collect();
        format!("^(?:{})$", names.join("|"))
    }

    /// An `If-Match` header (RFC 9110 §13.1.1): `*`, or entity tags `"…"` (optionally weak,
    /// `W/"…"`) separated by commas.
    pub const IF_MATCH: &str = r#"^(?:\*|(?:W/)?"[\u0021\u0023-\u007E]*"(?:[ \t]*,[ \t]*(?:W/)?"[\u0021\u0023-\u007E]*")*)$"#;
}

/// Makes the document the contract (issue #20): every status a route can answer, and every
/// constraint on a request the server enforces that JSON Schema can state.
///
/// Statuses: 401 on every route but `/healthz`; 414 (request target over [`MAX_URI`]) and 503
/// (connection cap or body budget, see [`crate::server`]) on every route; 500 (store or
/// backend failure) on every API route; 400, 413 and 415 on every route with a body; 400 on
/// every route with query parameters or a `{name}` in its path.
///
/// Values, in every schema a request body reaches (`ConfigFile`, the resources, their parts):
/// the patterns of [`patterns`] where a string is an address list, prefix, port range or path
/// (the scalar addresses have `format: ipv4`, names `minLength: 1`, required lists `minItems:
/// 1`: see `snatgw_core::config`); then [`crate::body::STRING_PATTERN`] on every other string
/// property and string array item (and `minLength: 1` on the items that name a resource); and
/// the cross-field rules an instance and a probe follow (`if`/`then`). The path's `{name}`
/// gets the same pattern and `minLength: 1`; `If-Match` the pattern of an ETag list; the
/// `/flows` filters theirs.
///
/// A resource PUT's body may leave out `name` (the path gives it), so its body schema is the
/// resource's with `name` optional and `readOnly` (a generated client does not send it; the
/// server still accepts a matching one).
struct Contract;

/// The JSON Schema of a request string: a pattern or a format of its own, else
/// [`crate::body::STRING_PATTERN`]; `non_empty` adds `minLength: 1`.
enum StringRule {
    Pattern(String),
    Ipv4,
    NonEmpty,
}

impl Contract {
    /// The string rules of array items, by (schema, property).
    fn item_rules() -> Vec<(&'static str, &'static str, StringRule)> {
        vec![
            (
                "GatewayCfg",
                "vnet_prefixes",
                StringRule::Pattern(patterns::prefix()),
            ),
            ("GatewayCfg", "default_snat_pool", StringRule::Ipv4),
            ("NsgCfg", "subnets", StringRule::Pattern(patterns::prefix())),
            ("NsgCfg", "nics", StringRule::NonEmpty),
            ("BackendPoolCfg", "members", StringRule::NonEmpty),
            (
                "NsgRuleCfg",
                "sources",
                StringRule::Pattern(patterns::address_match()),
            ),
            (
                "NsgRuleCfg",
                "destinations",
                StringRule::Pattern(patterns::address_match()),
            ),
            (
                "NsgRuleCfg",
                "source_ports",
                StringRule::Pattern(patterns::port_range()),
            ),
            (
                "NsgRuleCfg",
                "destination_ports",
                StringRule::Pattern(patterns::port_range()),
            ),
        ]
    }

    /// The cross-field rules of a schema, as JSON Schema `allOf` of `if`/`then`: what an
    /// absent field means (`kind` `vm`, `model` `arm`) is spelled out with `required`.
    fn cross_field_rules(schema: &str) -> Option<serde_json::Value> {
        use serde_json::json;
        match schema {
            // SPEC §0, R1.3, R1.5: a web/worker role is Classic and has no instance-level
            // public IP; a Classic instance names its deployment and no availability set; an
            // ARM instance names no deployment.
            "InstanceCfg" => Some(json!([
                {
                    "if": {"required": ["kind"], "properties": {"kind": {"const": "web_worker_role"}}},
                    "then": {
                        "required": ["model"],
                        "properties": {"model": {"const": "classic"}, "public_ip": {"type": "null"}}
                    }
                },
                {
                    "if": {"required": ["model"], "properties": {"model": {"const": "classic"}}},
                    "then": {
                        "required": ["deployment"],
                        "properties": {"deployment": {"type": "string"}, "availability_set": {"type": "null"}}
                    },
                    "else": {"properties": {"deployment": {"type": "null"}}}
                }
            ])),
            // SPEC R5.2: a TCP probe has no path.
            "ProbeCfg" => Some(json!([
                {
                    "if": {"required": ["protocol"], "properties": {"protocol": {"const": "tcp"}}},
                    "then": {"properties": {"path": {"type": "null"}}}
                }
            ])),
            _ => None,
        }
    }
}

/// Whether `o` is (or may be) a string.
fn is_string(o: &utoipa::openapi::schema::Object) -> bool {
    use utoipa::openapi::schema::{SchemaType, Type};
    match &o.schema_type {
        SchemaType::Type(Type::String) => true,
        SchemaType::Array(ts) => ts.contains(&Type::String),
        _ => false,
    }
}

/// Applies `rule` to the string schema `o` (see [`StringRule`]).
fn constrain_string(o: &mut utoipa::openapi::schema::Object, rule: &StringRule) {
    use utoipa::openapi::schema::{KnownFormat, SchemaFormat};
    match rule {
        StringRule::Pattern(p) => o.pattern = Some(p.clone()),
        StringRule::Ipv4 => o.format = Some(SchemaFormat::KnownFormat(KnownFormat::Ipv4)),
        StringRule::NonEmpty => o.min_length = Some(o.min_length.unwrap_or(0).max(1)),
    }
}

/// Gives every string of `o` without a pattern or format of its own the API's string rule
/// ([`crate::body::STRING_PATTERN`]).
fn default_string_rule(o: &mut utoipa::openapi::schema::Object) {
    if is_string(o) && o.pattern.is_none() && o.format.is_none() && o.enum_values.is_none() {
        o.pattern = Some(crate::body::STRING_PATTERN.to_string());
    }
}

/// The string schema of `s` itself or, for an array, of its items.
fn string_schemas(
    s: &mut utoipa::openapi::RefOr<utoipa::openapi::Schema>,
) -> Option<&mut utoipa::openapi::schema::Object> {
    use utoipa::openapi::schema::ArrayItems;
    use utoipa::openapi::{RefOr, Schema};
    match s {
        RefOr::T(Schema::Object(o)) if is_string(o) => Some(o),
        RefOr::T(Schema::Array(a)) => match &mut a.items {
            ArrayItems::RefOrSchema(item) => match item.as_mut() {
                RefOr::T(Schema::Object(o)) if is_string(o) => Some(o),
                _ => None,
            },
            ArrayItems::False => None,
        },
        _ => None,
    }
}

/// The component schemas a request body reaches (through `$ref`s, transitively).
fn request_schemas(doc: &utoipa::openapi::OpenApi) -> std::collections::BTreeSet<String> {
    fn refs(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(serde_json::Value::String(r)) = m.get("$ref") {
                    if let Some(n) = r.strip_prefix("#/components/schemas/") {
                        out.push(n.to_string());
                    }
                }
                m.values().for_each(|x| refs(x, out));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
            _ => {}
        }
    }
    let mut todo = Vec::new();
    for item in doc.paths.paths.values() {
        for op in [&item.get, &item.put, &item.post, &item.delete]
            .into_iter()
            .flatten()
        {
            if let Some(b) = &op.request_body {
                refs(&serde_json::to_value(b).unwrap_or_default(), &mut todo);
            }
        }
    }
    let schemas = doc.components.as_ref().map(|c| &c.schemas);
    let mut seen = std::collections::BTreeSet::new();
    while let Some(n) = todo.pop() {
        if seen.insert(n.clone()) {
            if let Some(s) = schemas.and_then(|m| m.get(&n)) {
                refs(&serde_json::to_value(s).unwrap_or_default(), &mut todo);
            }
        }
    }
    seen
}

/// Examples, so that schemathesis' examples phase has something to send and the reader a
/// start: the reference topology (`examples/reference.toml`) and its resources.
mod examples {
    use serde_json::{json, Value};

    const REFERENCE: &str = include_str!("../../../examples/reference.toml");

    /// An existing resource's name for a `{name}` under `path`, in the reference topology.
    pub(super) fn name(path: &str) -> Option<&'static str> {
        [
            ("publicIPAddresses", "pip-ilpip"),
            ("availabilitySets", "as1"),
            ("deployments", "cs1"),
            ("instances", "vm-as1"),
            ("loadBalancers", "lb"),
            ("networkSecurityGroups", "nsg-alone"),
        ]
        .into_iter()
        .find(|(c, _)| path.starts_with(&format!("/api/v1/{c}/")))
        .map(|(_, n)| n)
    }

    /// A request body for `method path`.
    pub(super) fn body(method: &str, path: &str) -> Option<Value> {
        let reference = || {
            snatgw_core::ConfigFile::from_toml(REFERENCE)
                .ok()
                .and_then(|c| serde_json::to_value(c).ok())
        };
        Some(match (method, path) {
            ("put", "/api/v1/topology") => reference()?,
            ("put", "/api/v1/gateway") => reference()?.get("gateway")?.clone(),
            ("put", "/api/v1/publicIPAddresses/{name}") => json!({"address": "203.0.113.50"}),
            ("put", "/api/v1/availabilitySets/{name}") => json!({}),
            ("put", "/api/v1/deployments/{name}") => json!({}),
            ("put", "/api/v1/instances/{name}") => {
                json!({"private_ip": "10.0.3.30", "availability_set": "as1"})
            }
            ("put", "/api/v1/loadBalancers/{name}") => json!({
                "frontends": [{"name": "fe1", "public_ip": "pip-fe1"}],
                "backend_pools": [{"name": "web", "members": ["vm-lb1", "vm-lb2"]}],
                "rules": [{"name": "http", "frontend": "fe1", "protocol": "tcp",
                           "frontend_port": 80, "backend_pool": "web", "backend_port": 80,
                           "probe": "hp"}],
                "probes": [{"name": "hp", "protocol": "http", "port": 80, "path": "/healthz"}]
            }),
            ("put", "/api/v1/networkSecurityGroups/{name}") => json!({
                "nics": ["vm-alone"],
                "rules": [{"name": "deny-smtp", "priority": 100, "direction": "outbound",
                           "access": "deny", "protocol": "tcp", "destination_ports": ["25"]}]
            }),
            ("post", "/api/v1/deployments/{name}/redeploy") => json!({"reported_instances": 2}),
            _ => return None,
        })
    }
}

impl utoipa::Modify for Contract {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::path::ParameterIn;
        use utoipa::openapi::schema::{Object, Type};
        use utoipa::openapi::{Content, Ref, RefOr, ResponseBuilder, Schema};
        let error = |description: &str| {
            RefOr::T(
                ResponseBuilder::new()
                    .description(description)
                    .content(
                        "application/json",
                        Content::new(Some(Ref::from_schema_name("ApiError"))),
                    )
                    .build(),
            )
        };
        // The values of request bodies, before the PUT body schemas are copied from them.
        let requested = request_schemas(doc);
        let components = doc.components.get_or_insert_with(Default::default);
        let item_rules = Contract::item_rules();
        for (name, schema) in components.schemas.iter_mut() {
            if !requested.contains(name) {
                continue;
            }
            let RefOr::T(Schema::Object(o)) = schema else {
                continue;
            };
            for (prop, s) in o.properties.iter_mut() {
                let rules = item_rules
                    .iter()
                    .filter(|(sn, pn, _)| sn == name && pn == prop);
                let Some(str_schema) = string_schemas(s) else {
                    continue;
                };
                for (_, _, rule) in rules {
                    constrain_string(str_schema, rule);
                }
                if name == "ProbeCfg" && prop == "path" {
                    str_schema.pattern = Some(patterns::probe_path());
                }
                if name == "NsgRuleCfg" && prop == "name" {
                    str_schema
                        .extensions
                        .get_or_insert_with(Default::default)
                        .insert(
                            "not".into(),
                            serde_json::json!({"pattern": patterns::default_rule_name()}),
                        );
                }
                default_string_rule(str_schema);
            }
            if let Some(rules) = Contract::cross_field_rules(name) {
                o.extensions
                    .get_or_insert_with(Default::default)
                    .insert("allOf".into(), rules);
            }
        }

        let string_param = |min_len: Option<usize>, pattern: String| {
            let mut o = Object::with_type(Type::String);
            o.min_length = min_len;
            o.pattern = Some(pattern);
            RefOr::T(Schema::Object(o))
        };
        let mut body_schemas: Vec<(String, String)> = Vec::new();
        for (path, item) in doc.paths.paths.iter_mut() {
            let ops = [
                ("get", &mut item.get),
                ("put", &mut item.put),
                ("post", &mut item.post),
                ("delete", &mut item.delete),
            ];
            for (method, op) in ops {
                let Some(op) = op.as_mut() else { continue };
                let add = |op: &mut utoipa::openapi::path::Operation, code: u16, d: &str| {
                    op.responses
                        .responses
                        .entry(code.to_string())
                        .or_insert_with(|| error(d));
                };
                let api = path != "/healthz";
                if api {
                    add(op, 401, "Missing or wrong bearer token");
                    add(op, 500, "The store or the running gateway failed");
                }
                add(op, 414, "The request target is longer than 8 KiB");
                let writes = api && matches!(method, "put" | "post" | "delete");
                add(
                    op,
                    503,
                    if writes {
                        "Too many connections or request bodies at once; retry (see Retry-After). Or, in a fleet, the shared store (etcd) is unreachable: nothing changed (rule R10.5)"
                    } else {
                        "Too many connections or request bodies at once; retry (see Retry-After)"
                    },
                );
                if writes {
                    // In a fleet a save can lose to another node's save of the same
                    // generation: a conflict (409, rule R10.1), whatever the route's own 409s.
                    const FLEET_409: &str = "another node of the fleet saved a change first (rule R10.1): read again and retry";
                    let r = op
                        .responses
                        .responses
                        .entry("409".to_string())
                        .or_insert_with(|| error(&format!("Conflict: {FLEET_409}")));
                    if let RefOr::T(r) = r {
                        if !r.description.contains("R10.1") {
                            r.description = format!("{}; or {FLEET_409}", r.description);
                        }
                    }
                }
                let has_query = op.parameters.as_ref().is_some_and(|ps| {
                    ps.iter().any(|p| {
                        matches!(p, RefOr::T(p) if matches!(p.parameter_in, ParameterIn::Query))
                    })
                });
                if has_query {
                    add(op, 400, "A bad query parameter (field names it)");
                }
                if path.contains("{name}") {
                    add(
                        op,
                        400,
                        "A bad `{name}`: empty, a control character, or whitespace at either end (field `name`)",
                    );
                }
                if op.request_body.is_some() || method == "put" || method == "post" {
                    add(op, 400, "Bad JSON or field (with field and SPEC rule)");
                    add(op, 413, "The request body is larger than the limit");
                    add(op, 415, "The request body is not application/json");
                }
                for p in op.parameters.iter_mut().flatten() {
                    let RefOr::T(p) = p else { continue };
                    let schema = match (&p.parameter_in, p.name.as_str(), path.as_str()) {
                        (ParameterIn::Path, "name", _) => {
                            let mut s =
                                string_param(Some(1), crate::body::STRING_PATTERN.to_string());
                            if let (RefOr::T(Schema::Object(o)), Some(n)) =
                                (&mut s, examples::name(path))
                            {
                                o.examples = vec![n.into()];
                            }
                            Some(s)
                        }
                        (ParameterIn::Header, "If-Match", _) => {
                            Some(string_param(None, patterns::IF_MATCH.to_string()))
                        }
                        (ParameterIn::Query, "destination", "/api/v1/flows") => {
                            Some(string_param(None, patterns::destination()))
                        }
                        (ParameterIn::Query, "instance", "/api/v1/flows") => {
                            let mut o = Object::with_type(Type::String);
                            o.min_length = Some(1);
                            Some(RefOr::T(Schema::Object(o)))
                        }
                        _ => None,
                    };
                    if let Some(s) = schema {
                        p.schema = Some(s);
                    }
                }
                if let (Some(RefOr::T(body)), Some(example)) =
                    (op.request_body.as_mut(), examples::body(method, path))
                {
                    for content in body.content.values_mut() {
                        if let RefOr::T(c) = content {
                            c.example = Some(example.clone());
                        }
                    }
                }
                if method == "put" && path.ends_with("/{name}") {
                    if let Some(RefOr::T(body)) = op.request_body.as_mut() {
                        for content in body.content.values_mut() {
                            if let RefOr::T(c) = content {
                                if let Some(RefOr::Ref(r)) = c.schema.as_mut() {
                                    let name = r
                                        .ref_location
                                        .rsplit('/')
                                        .next()
                                        .unwrap_or_default()
                                        .to_string();
                                    let body_name = format!("{name}Body");
                                    *r = Ref::from_schema_name(body_name.clone());
                                    body_schemas.push((name, body_name));
                                }
                            }
                        }
                    }
                }
            }
        }
        let components = doc.components.get_or_insert_with(Default::default);
        for (name, body_name) in body_schemas {
            if let Some(RefOr::T(Schema::Object(o))) = components.schemas.get(&name) {
                let mut o = o.clone();
                o.required.retain(|f| f != "name");
                if let Some(RefOr::T(Schema::Object(n))) = o.properties.get_mut("name") {
                    n.read_only = Some(true);
                }
                o.description = Some(format!(
                    "{}; `name` is read-only: the path gives it (a body may still carry it, equal to the path's).",
                    o.description.as_deref().unwrap_or(&name).trim_end_matches('.')
                ));
                components
                    .schemas
                    .insert(body_name, RefOr::T(Schema::Object(o)));
            }
        }
    }
}

/// The OpenAPI document of every route.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_matches_reference_values() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn if_match_forms() {
        let cur = Some("\"00000000000000ab\"");
        assert!(if_match_ok("\"00000000000000ab\"", cur));
        assert!(if_match_ok("\"x\", \"00000000000000ab\"", cur));
        assert!(if_match_ok("*", cur));
        assert!(!if_match_ok("*", None));
        assert!(!if_match_ok("W/\"00000000000000ab\"", cur));
        assert!(!if_match_ok("\"00000000000000ac\"", cur));
    }

    #[test]
    fn constant_time_compare() {
        assert!(ct_eq(b"secret", b"secret"));
        assert!(!ct_eq(b"secret", b"secreT"));
        assert!(!ct_eq(b"secret", b"secret2"));
        assert!(!ct_eq(b"", b"x"));
        assert!(ct_eq(b"", b""));
    }

    #[test]
    fn body_name_rules() {
        let ok: PublicIpCfg =
            resource_body("p1", br#"{"address":"203.0.113.9"}"#).unwrap_or_else(|_| {
                panic!("body without a name takes the path's");
            });
        assert_eq!(ok.name, "p1");
        assert!(resource_body::<PublicIpCfg>("p1", br#"{"name":"p1","address":"a"}"#).is_ok());
        let Err(Reply(st, e)) =
            resource_body::<PublicIpCfg>("p1", br#"{"name":"p2","address":"a"}"#)
        else {
            panic!("mismatched name accepted");
        };
        assert_eq!(st, StatusCode::BAD_REQUEST);
        assert_eq!(e.field.as_deref(), Some("public_ip[p1].name"));
        let Err(Reply(_, e)) =
            resource_body::<PublicIpCfg>("p1", br#"{"address":"a","colour":"red"}"#)
        else {
            panic!("unknown field accepted");
        };
        assert_eq!(e.field.as_deref(), Some("public_ip[p1].colour"));
        let Err(Reply(_, e)) = resource_body::<PublicIpCfg>("p1", br#"{}"#) else {
            panic!("missing field accepted");
        };
        assert_eq!(e.field.as_deref(), Some("public_ip[p1].address"));
        assert!(resource_body::<PublicIpCfg>("p1", b"[1]").is_err());
        assert!(resource_body::<PublicIpCfg>("p1", b"{").is_err());
    }
}
