//! What the control plane's end-to-end tests share: the plane over a real `Gateway` (seeded
//! store, engine at time 0, a `GatewayBackend` on a settable clock) and the parser of raw HTTP
//! answers for the tests that speak HTTP over a bare socket.
//!
//! Each test file uses only part of it (`mod common;`), hence the `dead_code` allowance.

#![allow(dead_code)]

use std::io::{self, Read as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use snatgw_control::{
    serve, ApiError, Backend, ClientError, ControlPlane, EventLog, GatewayBackend, SeedSource,
    ServerHandle, Store, Stored,
};
use snatgw_core::{ConfigFile, Engine, Topology};
use snatgw_dataplane::Gateway;

/// A seeded store and the gateway running its topology, before a server is started.
pub struct Plane {
    /// The store, holding the seed (generation 1).
    pub store: Arc<dyn Store>,
    /// What the seed stored.
    pub stored: Stored,
    /// Where the seed came from.
    pub source: SeedSource,
    /// The gateway over an engine started at time 0.
    pub gateway: Arc<Mutex<Gateway>>,
    /// The event log the backend publishes to.
    pub log: Arc<EventLog>,
    /// The engine time [`Plane::backend`]'s clock reads.
    pub now: Arc<AtomicU32>,
}

impl Plane {
    /// Seeds `store` with the TOML topology `toml` and starts a gateway on it.
    pub fn seed(toml: &str, store: Arc<dyn Store>) -> Plane {
        let file = ConfigFile::from_toml(toml).expect("test topology parses");
        let seeded = snatgw_control::seed(&*store, &file).expect("seed");
        let topo = Topology::from_config(seeded.stored.config.clone()).expect("valid");
        let gateway = Arc::new(Mutex::new(Gateway::new(
            Engine::new(topo, 0).expect("engine"),
        )));
        Plane {
            store,
            stored: seeded.stored,
            source: seeded.source,
            gateway,
            log: Arc::new(EventLog::new()),
            now: Arc::new(AtomicU32::new(0)),
        }
    }

    /// The real backend over the gateway, applying changes at the time [`Plane::now`] holds.
    pub fn backend(&self) -> GatewayBackend {
        let now = self.now.clone();
        GatewayBackend::new(self.gateway.clone(), self.log.clone(), move || {
            now.load(Ordering::SeqCst)
        })
    }

    /// The control plane over `backend` with bearer token `token`.
    pub fn control(&self, backend: Arc<dyn Backend>, token: Option<&str>) -> ControlPlane {
        ControlPlane::new(
            backend,
            self.store.clone(),
            token.map(str::to_string),
            self.stored.clone(),
        )
    }

    /// [`Plane::control`] served on 127.0.0.1:0 with the default limits.
    pub fn serve(&self, backend: Arc<dyn Backend>, token: Option<&str>) -> ServerHandle {
        serve(localhost(), self.control(backend, token)).expect("serve")
    }
}

/// 127.0.0.1:0.
pub fn localhost() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

/// The address `s` as a `u32`.
pub fn ip(s: &str) -> u32 {
    u32::from(s.parse::<Ipv4Addr>().expect("ip"))
}

/// The status and `{error, field, rule}` body of a client call that must fail with an API
/// error.
pub fn api_err(r: Result<impl std::fmt::Debug, ClientError>) -> (u16, ApiError) {
    match r {
        Err(ClientError::Api { status, body }) => (status, body),
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// One HTTP answer read off a raw socket.
#[derive(Debug)]
pub struct Answer {
    /// The status code.
    pub status: u16,
    /// The status line and headers.
    pub head: String,
    /// The body (lossy UTF-8: the API answers JSON or text).
    pub body: String,
}

impl Answer {
    /// An answer from its head (status line and headers) and body.
    fn new(head: String, body: &[u8]) -> Answer {
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("bad status line: {head}"));
        Answer {
            status,
            head,
            body: String::from_utf8_lossy(body).into_owned(),
        }
    }

    /// The value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    /// The JSON error body every error status must carry.
    pub fn error(&self) -> ApiError {
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "status {} head:\n{}\nbody: {}",
            self.status,
            self.head,
            self.body
        );
        serde_json::from_str(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {}: not the error body ({e}): {}",
                self.status, self.body
            )
        })
    }
}

/// Reads one answer (head and a `Content-Length` body) from `s`, leaving the connection
/// usable for the next; 1xx answers are returned like the others.
pub fn read_answer(s: &mut TcpStream) -> io::Result<Answer> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("closed after {} bytes of head", head.len()),
            ));
        }
        head.push(byte[0]);
        assert!(head.len() < 64 << 10, "head too long");
    }
    let head = String::from_utf8_lossy(&head[..head.len() - 4]).into_owned();
    let len: usize = Answer::new(head.clone(), b"")
        .header("content-length")
        .map_or(0, |v| v.parse().expect("content-length"));
    let mut body = vec![0; len];
    s.read_exact(&mut body)?;
    Ok(Answer::new(head, &body))
}

/// Reads the answer to a `Connection: close` request: everything until the server closes.
pub fn read_to_close(s: &mut TcpStream) -> Answer {
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no answer: {:?}", String::from_utf8_lossy(&out)));
    Answer::new(
        String::from_utf8_lossy(&out[..split]).into_owned(),
        &out[split + 4..],
    )
}
