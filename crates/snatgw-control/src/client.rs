//! The blocking API client (ureq) the `snatgw` CLI uses: one typed method per route.
//!
//! [`Client`] speaks plain HTTP to the control plane (by default `http://127.0.0.1:7070`),
//! sends the bearer token when it has one, percent-encodes resource names (instance names
//! such as `vm/nic/ipconfig` contain slashes), and returns what the server returned: typed
//! values with their ETag and generation ([`Tagged`]), or [`ClientError::Api`] carrying the
//! server's `{error, field, rule}` (for example a refused change naming `R2.8`).
//! Resources are typed through [`Resource`] (`client.get::<InstanceCfg>("vm1")`) or chosen
//! at run time by [`ResourceKind`] with JSON values (`snatgw get <kind>`).
//!
//! It does not format tables or read config files (the CLI does), and it does not retry.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use snatgw_core::config::{DeploymentCfg, GatewayCfg, InstanceCfg};
use snatgw_core::ConfigFile;
use ureq::Agent;

use crate::api::{RedeployRequest, Resource, GENERATION_HEADER, MAX_WAIT_SECS};
use crate::backend::FlowQuery;
use crate::error::{ApiError, ClientError};
use crate::view::{
    EventRecord, FlowPage, FlowRecord, InboundFlowPage, InboundFlowRecord, InstancePorts,
    NsgRuleMetrics, ProbeMetrics,
};

/// The API address the CLI uses by default.
pub const DEFAULT_URL: &str = "http://127.0.0.1:7070";
/// Timeout of one request (long-polls get their wait on top).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest answer read (a full topology or a page of flows is far smaller).
const MAX_ANSWER: u64 = 64 << 20;

/// A value and the validators the server sent with it.
#[derive(Debug, Clone, PartialEq)]
pub struct Tagged<T> {
    /// The value.
    pub value: T,
    /// Its `ETag` (pass it as `if_match` to write only if nobody changed it meanwhile).
    pub etag: Option<String>,
    /// The desired state's generation (accepted writes so far), when the route reports it.
    pub generation: Option<u64>,
}

pub use crate::api::ResourceKind;

/// Percent-encodes one path segment (everything but unreserved characters).
pub fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A blocking client of the control plane's API.
#[derive(Clone)]
pub struct Client {
    agent: Agent,
    base: String,
    token: Option<String>,
}

enum Body<'a> {
    None,
    Json(&'a [u8]),
}

impl Client {
    /// A client of the API at `base_url` (such as `http://127.0.0.1:7070`), sending
    /// `Authorization: Bearer <token>` when a token is given.
    pub fn new(base_url: &str, token: Option<String>) -> Client {
        let agent: Agent = Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(REQUEST_TIMEOUT))
            .build()
            .into();
        Client {
            agent,
            base: base_url.trim_end_matches('/').to_string(),
            token: token.filter(|t| !t.is_empty()),
        }
    }

    /// The base URL.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends one request; returns status, headers and body of a 2xx answer, else the error.
    fn send(
        &self,
        method: &str,
        path: &str,
        query: &[(&str, String)],
        if_match: Option<&str>,
        body: Body<'_>,
        timeout: Option<Duration>,
    ) -> Result<(u16, ureq::http::HeaderMap, Vec<u8>), ClientError> {
        let url = self.url(path);
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        macro_rules! prepare {
            ($rb:expr) => {{
                let mut rb = $rb;
                for (k, v) in query {
                    rb = rb.query(*k, v);
                }
                if let Some(a) = &auth {
                    rb = rb.header("authorization", a);
                }
                if let Some(m) = if_match {
                    rb = rb.header("if-match", m);
                }
                if let Some(t) = timeout {
                    rb = rb.config().timeout_global(Some(t)).build();
                }
                rb
            }};
        }
        let resp = match (method, body) {
            ("GET", _) => prepare!(self.agent.get(&url)).call(),
            ("DELETE", _) => prepare!(self.agent.delete(&url)).call(),
            ("PUT", Body::Json(b)) => prepare!(self.agent.put(&url))
                .header("content-type", "application/json")
                .send(b),
            ("POST", Body::Json(b)) => prepare!(self.agent.post(&url))
                .header("content-type", "application/json")
                .send(b),
            ("POST", Body::None) => prepare!(self.agent.post(&url)).send_empty(),
            ("PUT", Body::None) => prepare!(self.agent.put(&url)).send_empty(),
            _ => return Err(ClientError::Request(format!("method {method}"))),
        };
        let mut resp = resp.map_err(|e| ClientError::Transport(format!("{method} {url}: {e}")))?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp
            .body_mut()
            .with_config()
            .limit(MAX_ANSWER)
            .read_to_vec()
            .map_err(|e| {
                ClientError::Transport(format!("{method} {url}: reading the answer: {e}"))
            })?;
        if !(200..300).contains(&status) {
            let body = serde_json::from_slice::<ApiError>(&bytes).unwrap_or_else(|_| {
                let text = String::from_utf8_lossy(&bytes).trim().to_string();
                ApiError::msg(if text.is_empty() {
                    format!("{method} {path}: HTTP {status}")
                } else {
                    text
                })
            });
            return Err(ClientError::Api { status, body });
        }
        Ok((status, headers, bytes))
    }

    fn decode<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, ClientError> {
        serde_json::from_slice(bytes).map_err(|e| ClientError::Decode(format!("{what}: {e}")))
    }

    fn tagged<T: DeserializeOwned>(
        headers: &ureq::http::HeaderMap,
        bytes: &[u8],
        what: &str,
    ) -> Result<Tagged<T>, ClientError> {
        Ok(Tagged {
            value: Self::decode(bytes, what)?,
            etag: headers
                .get("etag")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            generation: headers
                .get(GENERATION_HEADER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok()),
        })
    }

    fn get_tagged<T: DeserializeOwned>(&self, path: &str) -> Result<Tagged<T>, ClientError> {
        let (_, h, b) = self.send("GET", path, &[], None, Body::None, None)?;
        Self::tagged(&h, &b, path)
    }

    fn put_tagged<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        if_match: Option<&str>,
    ) -> Result<Tagged<T>, ClientError> {
        let json = serde_json::to_vec(body).map_err(|e| ClientError::Request(e.to_string()))?;
        let (_, h, b) = self.send("PUT", path, &[], if_match, Body::Json(&json), None)?;
        Self::tagged(&h, &b, path)
    }

    fn item_path(collection: &str, name: &str) -> String {
        format!("/api/v1/{collection}/{}", encode_segment(name))
    }

    /// `GET /api/v1/topology`: the whole desired topology.
    pub fn topology(&self) -> Result<Tagged<ConfigFile>, ClientError> {
        self.get_tagged("/api/v1/topology")
    }

    /// `PUT /api/v1/topology`: replaces the whole topology (what `snatgw apply -f` does).
    pub fn put_topology(
        &self,
        config: &ConfigFile,
        if_match: Option<&str>,
    ) -> Result<Tagged<ConfigFile>, ClientError> {
        self.put_tagged("/api/v1/topology", config, if_match)
    }

    /// `GET /api/v1/gateway`: the gateway settings.
    pub fn gateway(&self) -> Result<Tagged<GatewayCfg>, ClientError> {
        self.get_tagged("/api/v1/gateway")
    }

    /// `PUT /api/v1/gateway`: replaces the gateway settings.
    pub fn put_gateway(
        &self,
        gateway: &GatewayCfg,
        if_match: Option<&str>,
    ) -> Result<Tagged<GatewayCfg>, ClientError> {
        self.put_tagged("/api/v1/gateway", gateway, if_match)
    }

    /// `GET /api/v1/<collection>`: every resource of a kind
    /// (`client.list::<InstanceCfg>()`).
    pub fn list<R: Resource>(&self) -> Result<Tagged<Vec<R>>, ClientError> {
        self.get_tagged(&format!("/api/v1/{}", R::COLLECTION))
    }

    /// `GET /api/v1/<collection>/{name}`: one resource.
    pub fn get<R: Resource>(&self, name: &str) -> Result<Tagged<R>, ClientError> {
        self.get_tagged(&Self::item_path(R::COLLECTION, name))
    }

    /// `PUT /api/v1/<collection>/{name}` with the resource's own name: creates or replaces it;
    /// returns the stored resource.
    pub fn put<R: Resource>(
        &self,
        resource: &R,
        if_match: Option<&str>,
    ) -> Result<Tagged<R>, ClientError> {
        self.put_tagged(
            &Self::item_path(R::COLLECTION, resource.name()),
            resource,
            if_match,
        )
    }

    /// `DELETE /api/v1/<collection>/{name}`; returns the collection's new ETag.
    pub fn delete<R: Resource>(
        &self,
        name: &str,
        if_match: Option<&str>,
    ) -> Result<Option<String>, ClientError> {
        self.delete_kind_path(&Self::item_path(R::COLLECTION, name), if_match)
    }

    fn delete_kind_path(
        &self,
        path: &str,
        if_match: Option<&str>,
    ) -> Result<Option<String>, ClientError> {
        let (_, h, _) = self.send("DELETE", path, &[], if_match, Body::None, None)?;
        Ok(h.get("etag")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string))
    }

    /// `GET` of a kind chosen at run time, as JSON: the collection (`name` = `None`) or one
    /// resource. `topology` and `gateway` take no name.
    pub fn get_json(
        &self,
        kind: ResourceKind,
        name: Option<&str>,
    ) -> Result<Tagged<serde_json::Value>, ClientError> {
        match (kind.is_named(), name) {
            (true, Some(n)) => self.get_tagged(&Self::item_path(kind.collection(), n)),
            (false, Some(_)) => Err(ClientError::Request(format!(
                "{} takes no name",
                kind.cli_name()
            ))),
            (_, None) => self.get_tagged(&format!("/api/v1/{}", kind.collection())),
        }
    }

    /// `PUT` of a kind chosen at run time, with a JSON body (`snatgw put <kind> NAME -f`).
    /// `topology` and `gateway` take no name.
    pub fn put_json(
        &self,
        kind: ResourceKind,
        name: Option<&str>,
        body: &serde_json::Value,
        if_match: Option<&str>,
    ) -> Result<Tagged<serde_json::Value>, ClientError> {
        match (kind.is_named(), name) {
            (true, Some(n)) => {
                self.put_tagged(&Self::item_path(kind.collection(), n), body, if_match)
            }
            (false, None) => {
                self.put_tagged(&format!("/api/v1/{}", kind.collection()), body, if_match)
            }
            (true, None) => Err(ClientError::Request(format!(
                "{} needs a name",
                kind.cli_name()
            ))),
            (false, Some(_)) => Err(ClientError::Request(format!(
                "{} takes no name",
                kind.cli_name()
            ))),
        }
    }

    /// `DELETE` of a named resource of a kind chosen at run time.
    pub fn delete_json(
        &self,
        kind: ResourceKind,
        name: &str,
        if_match: Option<&str>,
    ) -> Result<Option<String>, ClientError> {
        if !kind.is_named() {
            return Err(ClientError::Request(format!(
                "{} cannot be deleted",
                kind.cli_name()
            )));
        }
        self.delete_kind_path(&Self::item_path(kind.collection(), name), if_match)
    }

    /// `POST /api/v1/deployments/{name}/redeploy`: a redeploy reporting `reported` instances
    /// (SPEC R2.11); returns the deployment.
    pub fn redeploy(
        &self,
        deployment: &str,
        reported: u32,
        if_match: Option<&str>,
    ) -> Result<Tagged<DeploymentCfg>, ClientError> {
        let path = format!("{}/redeploy", Self::item_path("deployments", deployment));
        let json = serde_json::to_vec(&RedeployRequest {
            reported_instances: reported,
        })
        .map_err(|e| ClientError::Request(e.to_string()))?;
        let (_, h, b) = self.send("POST", &path, &[], if_match, Body::Json(&json), None)?;
        Self::tagged(&h, &b, &path)
    }

    /// `POST /api/v1/deployments/{name}/settle`: the redeploy is over (R2.11, R2.10).
    pub fn settle(
        &self,
        deployment: &str,
        if_match: Option<&str>,
    ) -> Result<Tagged<DeploymentCfg>, ClientError> {
        let path = format!("{}/settle", Self::item_path("deployments", deployment));
        let (_, h, b) = self.send("POST", &path, &[], if_match, Body::None, None)?;
        Self::tagged(&h, &b, &path)
    }

    /// `GET /api/v1/instances/{name}/ports`: the instance's live report (R6.1).
    pub fn instance_ports(&self, name: &str) -> Result<InstancePorts, ClientError> {
        let path = format!("{}/ports", Self::item_path("instances", name));
        let (_, _, b) = self.send("GET", &path, &[], None, Body::None, None)?;
        Self::decode(&b, &path)
    }

    /// `GET /api/v1/loadBalancers/{name}/probes`: health-probe state of its members (R5.2).
    pub fn lb_probes(&self, name: &str) -> Result<Vec<ProbeMetrics>, ClientError> {
        let path = format!("{}/probes", Self::item_path("loadBalancers", name));
        let (_, _, b) = self.send("GET", &path, &[], None, Body::None, None)?;
        Self::decode(&b, &path)
    }

    /// `GET /api/v1/loadBalancers/{name}/inboundFlows`, every page: the load balancer's live
    /// inbound flows (R5.1, R6.3).
    pub fn lb_inbound_flows(&self, name: &str) -> Result<Vec<InboundFlowRecord>, ClientError> {
        let base = format!("{}/inboundFlows", Self::item_path("loadBalancers", name));
        let mut out = Vec::new();
        let mut cursor = 0u64;
        loop {
            let path = format!("{base}?cursor={cursor}&limit=1000");
            let (_, _, b) = self.send("GET", &path, &[], None, Body::None, None)?;
            let page: InboundFlowPage = Self::decode(&b, &path)?;
            out.extend(page.flows);
            match page.next_cursor {
                Some(n) => cursor = n,
                None => return Ok(out),
            }
        }
    }

    /// `GET /api/v1/networkSecurityGroups/{name}/hits`: hits per rule (R4.1, R4.2).
    pub fn nsg_hits(&self, name: &str) -> Result<Vec<NsgRuleMetrics>, ClientError> {
        let path = format!("{}/hits", Self::item_path("networkSecurityGroups", name));
        let (_, _, b) = self.send("GET", &path, &[], None, Body::None, None)?;
        Self::decode(&b, &path)
    }

    /// Every instance's live report (`snatgw ports`): the instances, then each one's ports.
    /// An instance deleted in between is skipped.
    pub fn all_instance_ports(&self) -> Result<Vec<InstancePorts>, ClientError> {
        let list = self.list::<InstanceCfg>()?.value;
        let mut out = Vec::with_capacity(list.len());
        for i in list {
            match self.instance_ports(&i.name) {
                Ok(p) => out.push(p),
                Err(ClientError::Api { status: 404, .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// `GET /api/v1/flows`: one page of live translations (R6.3). Continue with
    /// `q.cursor = page.next_cursor` until it is `None`.
    pub fn flows(&self, q: &FlowQuery) -> Result<FlowPage, ClientError> {
        let mut query: Vec<(&str, String)> = vec![
            ("cursor", q.cursor.to_string()),
            ("limit", q.limit.to_string()),
        ];
        for (k, v) in [
            ("instance", &q.instance),
            ("destination", &q.destination),
            ("protocol", &q.protocol),
            ("state", &q.state),
        ] {
            if let Some(v) = v {
                query.push((k, v.clone()));
            }
        }
        let (_, _, b) = self.send("GET", "/api/v1/flows", &query, None, Body::None, None)?;
        Self::decode(&b, "/api/v1/flows")
    }

    /// Every live translation matching `q` (`snatgw flows --all`), page after page.
    pub fn all_flows(&self, q: &FlowQuery) -> Result<Vec<FlowRecord>, ClientError> {
        let mut q = q.clone();
        let mut out = Vec::new();
        loop {
            let page = self.flows(&q)?;
            out.extend(page.flows);
            match page.next_cursor {
                Some(c) => q.cursor = c,
                None => return Ok(out),
            }
        }
    }

    /// `GET /api/v1/events?after=&limit=&wait=`: events after sequence number `after`; with
    /// `wait_secs` > 0 (at most 30) the server waits that long for one (`snatgw events --follow`).
    pub fn events(
        &self,
        after: u64,
        limit: usize,
        wait_secs: u64,
    ) -> Result<Vec<EventRecord>, ClientError> {
        let wait = wait_secs.min(MAX_WAIT_SECS);
        let query = [
            ("after", after.to_string()),
            ("limit", limit.to_string()),
            ("wait", wait.to_string()),
        ];
        let timeout = REQUEST_TIMEOUT + Duration::from_secs(wait);
        let (_, _, b) = self.send(
            "GET",
            "/api/v1/events",
            &query,
            None,
            Body::None,
            Some(timeout),
        )?;
        Self::decode(&b, "/api/v1/events")
    }

    /// `GET /metrics`: the Prometheus text.
    pub fn metrics_text(&self) -> Result<String, ClientError> {
        let (_, _, b) = self.send("GET", "/metrics", &[], None, Body::None, None)?;
        String::from_utf8(b).map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// `GET /openapi.json`: the OpenAPI document.
    pub fn openapi(&self) -> Result<serde_json::Value, ClientError> {
        let (_, _, b) = self.send("GET", "/openapi.json", &[], None, Body::None, None)?;
        Self::decode(&b, "/openapi.json")
    }

    /// `GET /healthz` (needs no token): `ok` when the server runs.
    pub fn healthz(&self) -> Result<String, ClientError> {
        let (_, _, b) = self.send("GET", "/healthz", &[], None, Body::None, None)?;
        String::from_utf8(b).map_err(|e| ClientError::Decode(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_encoded() {
        assert_eq!(encode_segment("vm1/nic0/ip-1"), "vm1%2Fnic0%2Fip-1");
        assert_eq!(encode_segment("a b%"), "a%20b%25");
        assert_eq!(encode_segment("é"), "%C3%A9");
    }

    #[test]
    fn kinds_parse() {
        for &k in ResourceKind::ALL {
            assert_eq!(k.cli_name().parse::<ResourceKind>(), Ok(k));
            assert_eq!(k.collection().parse::<ResourceKind>(), Ok(k));
        }
        assert!("widgets".parse::<ResourceKind>().is_err());
    }
}
