//! Access control: who is asking (an [`Identity`]), what a request touches (a [`Scope`]),
//! whether the identity may, and the audit log of what was done and what was refused.
//!
//! Two transports serve the same service:
//!
//! - **The Unix socket is the trusted path, for operators.** It is mode 0600: whoever can
//!   connect is the daemon's owner (or root). Workloads may run as that uid too, so each
//!   connection is classified when accepted ([`crate::peer`]): a process that descends
//!   from the daemon or the keeper (an instance, an exec'd command, their orphans) is
//!   refused, `PERMISSION_DENIED`, audited. Every other request is allowed. The identity
//!   is the peer's uid (`SO_PEERCRED`), recorded as `uid:<n>` in the audit log.
//! - **TCP requires mutual TLS and a token.** The TLS handshake refuses a client without
//!   a certificate signed by the client CA (tonic/rustls; no request is seen, nothing is
//!   audited). Every request must then carry `authorization: Bearer <token>`; the token
//!   is hashed (SHA-256) and compared in constant time with the hashes of the token file
//!   (plaintext tokens are never stored). No valid token: `UNAUTHENTICATED`.
//!
//! [`AuthLayer`] (a tower layer on each server) puts the [`Identity`] into the request's
//! extensions; each service method then calls [`authorize`] with the [`Scope`] it acts
//! on, which answers `PERMISSION_DENIED` when the token does not grant it.
//!
//! Scope rules for a token (`admin: true` grants everything):
//!
//! | request                                             | needs                                  |
//! |-----------------------------------------------------|----------------------------------------|
//! | `ns:<NS>:…` (get, terminate, release, logs, exec), `end-namespace NS`, launch in namespace NS | NS matches `namespaces` |
//! | `session:<SID>:…`, `end-session SID`, launch in session SID (and its `--namespace`, if given) | SID matches `sessions` |
//! | `shared:<W>`: launch, terminate, release, logs, exec | `shared: true`                          |
//! | `shared:<W>`: get                                   | any valid token                         |
//! | `list`, `events` (watch)                            | any valid token; filtered to the instances it may get |
//! | `health`, `workloads`                               | any valid token                         |
//! | `reload`                                            | `admin: true`                           |
//!
//! A pattern is a name, `*` (everything) or a prefix ending in `*` (`team-a-*`).
//!
//! What a caller sees depends on [`is_admin`] too: a token without `admin: true` gets the
//! redacted form of a manifest error (`catalog::EntryError`) and `env` values hidden in
//! specs; the Unix socket and admin tokens see everything.
//!
//! A launch's scope is computed from the catalog's isolation of the workload at the time
//! of the check; a reload between the check and the launch that changes the workload's
//! isolation is not seen (the key is formed again by the launch itself).
//!
//! The audit log ([`AuditLog`]) is `<state>/audit.log`, JSON lines, rotated to
//! `audit.log.1` (and older generations) at the daemon's `--log-max-bytes`. See [`AuditLog`] for what is written
//! and in which order.

use bulkhead_core::time::rfc3339;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bulkhead_core::key::{self, InstanceId, Isolation, Key, DEFAULT_NAMESPACE};
use bulkhead_core::name::{self, NameKind};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;
use tonic::codegen::http;
use tonic::{Code, Request, Status};

use crate::catalog::Catalog;

/// The largest token file read (a request can fail, never exhaust the daemon).
const MAX_TOKEN_FILE_BYTES: u64 = 1024 * 1024;

// ---------------------------------------------------------------------------------------
// Token file

/// The token file could not be used; names the file and, for an entry, the token.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("cannot read token file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("token file {path} is larger than {MAX_TOKEN_FILE_BYTES} bytes")]
    TooLarge { path: PathBuf },
    #[error("invalid token file {path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("invalid token file {path}: token {name:?}: {reason}")]
    Entry {
        path: PathBuf,
        name: String,
        reason: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    tokens: Vec<RawToken>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    name: String,
    token_sha256: String,
    #[serde(default)]
    namespaces: Vec<String>,
    #[serde(default)]
    sessions: Vec<String>,
    #[serde(default)]
    shared: bool,
    #[serde(default)]
    admin: bool,
}

/// A name pattern of a grant: exact, `*`, or a prefix followed by `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Exact(String),
    Prefix(String),
}

impl Pattern {
    fn parse(kind: NameKind, s: &str) -> Result<Pattern, String> {
        match s.strip_suffix('*') {
            Some(prefix) => {
                let ok = prefix
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
                if !ok || prefix.contains('*') {
                    return Err(format!(
                        "pattern {s:?}: only letters, digits, '.', '_', '-' before a final '*'"
                    ));
                }
                Ok(Pattern::Prefix(prefix.to_owned()))
            }
            None => name::validate(kind, s)
                .map(|()| Pattern::Exact(s.to_owned()))
                .map_err(|e| e.to_string()),
        }
    }

    fn matches(&self, name: &str) -> bool {
        match self {
            Pattern::Exact(n) => n == name,
            Pattern::Prefix(p) => name.starts_with(p.as_str()),
        }
    }
}

/// What one token may do.
#[derive(Debug)]
pub struct Grant {
    pub name: String,
    hash: [u8; 32],
    namespaces: Vec<Pattern>,
    sessions: Vec<Pattern>,
    shared: bool,
    admin: bool,
}

impl Grant {
    fn allows(&self, need: &Need) -> bool {
        if self.admin {
            return true;
        }
        match need {
            Need::Nothing => true,
            Need::Admin => false,
            Need::Shared => self.shared,
            Need::Namespace(ns) => self.namespaces.iter().any(|p| p.matches(ns)),
            Need::Session(s) => self.sessions.iter().any(|p| p.matches(s)),
        }
    }
}

/// The tokens of a token file, by SHA-256 of the token.
#[derive(Debug, Default)]
pub struct Tokens {
    grants: Vec<Arc<Grant>>,
}

/// SHA-256 of a token, as lowercase hex (what the token file stores).
pub fn token_sha256_hex(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Equality of two digests in time independent of where they differ.
fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

impl Tokens {
    /// Reads a token file: TOML when its name ends in `.toml`, YAML otherwise.
    pub fn load(path: &Path) -> Result<Tokens, TokenFileError> {
        let read_err = |source| TokenFileError::Read {
            path: path.to_owned(),
            source,
        };
        let len = std::fs::metadata(path).map_err(read_err)?.len();
        if len > MAX_TOKEN_FILE_BYTES {
            return Err(TokenFileError::TooLarge {
                path: path.to_owned(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(read_err)?;
        let toml = path.extension().is_some_and(|e| e == "toml");
        Tokens::parse(path, &text, toml)
    }

    /// Parses a token file's text; `path` only names it in errors.
    pub fn parse(path: &Path, text: &str, toml: bool) -> Result<Tokens, TokenFileError> {
        let parse_err = |reason: String| TokenFileError::Parse {
            path: path.to_owned(),
            reason,
        };
        let raw: RawFile = if toml {
            ::toml::from_str(text).map_err(|e| parse_err(e.to_string().trim().to_owned()))?
        } else {
            serde_saphyr::from_str(text).map_err(|e| parse_err(e.to_string()))?
        };
        let mut names = HashSet::new();
        let mut hashes = HashSet::new();
        let mut grants = Vec::with_capacity(raw.tokens.len());
        for t in raw.tokens {
            let entry_err = |reason: String| TokenFileError::Entry {
                path: path.to_owned(),
                name: t.name.clone(),
                reason,
            };
            if t.name.is_empty()
                || t.name.len() > 63
                || !t.name.chars().all(|c| c.is_ascii_graphic())
                || t.name.starts_with("uid:")
            {
                return Err(entry_err(
                    "name must be 1-63 printable ASCII characters without spaces, not starting with uid:".into(),
                ));
            }
            if !names.insert(t.name.clone()) {
                return Err(entry_err("the name is used twice".into()));
            }
            let hash = parse_hex32(&t.token_sha256).ok_or_else(|| {
                entry_err("token_sha256 must be 64 hex digits (sha256sum of the token)".into())
            })?;
            if !hashes.insert(hash) {
                return Err(entry_err(
                    "token_sha256 is the same as another token's".into(),
                ));
            }
            let namespaces = t
                .namespaces
                .iter()
                .map(|p| Pattern::parse(NameKind::Namespace, p))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| entry_err(format!("namespaces: {e}")))?;
            let sessions = t
                .sessions
                .iter()
                .map(|p| Pattern::parse(NameKind::Session, p))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| entry_err(format!("sessions: {e}")))?;
            grants.push(Arc::new(Grant {
                name: t.name,
                hash,
                namespaces,
                sessions,
                shared: t.shared,
                admin: t.admin,
            }));
        }
        Ok(Tokens { grants })
    }

    pub fn len(&self) -> usize {
        self.grants.len()
    }

    pub fn is_empty(&self) -> bool {
        self.grants.is_empty()
    }

    /// The grant of a presented token. Every entry is compared, in constant time, so the
    /// time taken does not tell which (or whether a) token matched.
    pub fn verify(&self, token: &str) -> Option<Arc<Grant>> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for g in &self.grants {
            if ct_eq(&digest, &g.hash) {
                found = Some(g.clone());
            }
        }
        found
    }
}

// ---------------------------------------------------------------------------------------
// Identity and scope

/// Who sent a request. Put into the request's extensions by [`AuthLayer`].
#[derive(Debug, Clone)]
pub enum Identity {
    /// A peer on the Unix socket (trusted); its uid when the kernel told it.
    Local { uid: Option<u32> },
    /// A TCP client that presented a valid token.
    Token {
        grant: Arc<Grant>,
        peer: Option<SocketAddr>,
    },
}

impl Identity {
    /// How the audit log names it: the token's name, or `uid:<n>`.
    pub fn name(&self) -> String {
        match self {
            Identity::Local { uid: Some(uid) } => format!("uid:{uid}"),
            Identity::Local { uid: None } => "uid:unknown".to_owned(),
            Identity::Token { grant, .. } => grant.name.clone(),
        }
    }

    /// Whether this identity may do what `scope` describes.
    pub fn allows(&self, scope: &Scope) -> bool {
        match self {
            Identity::Local { .. } => true,
            Identity::Token { grant, .. } => scope.needs.iter().all(|n| grant.allows(n)),
        }
    }

    /// Whether the identity is shown lease holder `holder` (on the socket: all; a token:
    /// admin, or the holder is one of its sessions). A shared instance's leases are other
    /// tenants' session ids.
    pub fn sees_lease(&self, holder: &str) -> bool {
        match self {
            Identity::Local { .. } => true,
            Identity::Token { grant, .. } => grant.allows(&Need::Session(holder.to_owned())),
        }
    }

    /// Whether `list` and `watch` show this instance to the identity (it may `get` it).
    pub fn sees(&self, id: &str) -> bool {
        match self {
            Identity::Local { .. } => true,
            Identity::Token { .. } => match InstanceId::parse(id) {
                Ok((id, _)) => self.allows(&Scope::read(&id)),
                Err(_) => false,
            },
        }
    }
}

/// One requirement of a scope.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Need {
    Nothing,
    Admin,
    Shared,
    Namespace(String),
    Session(String),
}

impl fmt::Display for Need {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Need::Nothing => f.write_str("this"),
            Need::Admin => f.write_str("the daemon (admin only)"),
            Need::Shared => f.write_str("shared instances"),
            Need::Namespace(ns) => write!(f, "namespace {ns}"),
            Need::Session(s) => write!(f, "session {s}"),
        }
    }
}

/// What a request acts on: the key or id it names (for the audit log) and what a token
/// needs to be allowed.
#[derive(Debug, Clone)]
pub struct Scope {
    key: Option<String>,
    needs: Vec<Need>,
}

impl Scope {
    /// A daemon-wide read (`health`, `workloads`): any authenticated identity.
    pub fn daemon() -> Scope {
        Scope {
            key: None,
            needs: vec![Need::Nothing],
        }
    }

    /// A daemon-wide change (`reload`): admin only.
    pub fn admin() -> Scope {
        Scope {
            key: None,
            needs: vec![Need::Admin],
        }
    }

    /// Acting on an instance (terminate, release, logs, exec).
    pub fn of_id(id: &InstanceId) -> Scope {
        Scope {
            key: Some(id.to_string()),
            needs: vec![need_of_id(id)],
        }
    }

    /// Releasing `holder`'s lease: like [`Scope::of_id`], and on a shared instance the
    /// holder must be one of the identity's sessions (a tenant cannot drop another's).
    pub fn release(id: &InstanceId, holder: &str) -> Scope {
        let mut s = Scope::of_id(id);
        if s.needs == [Need::Shared] {
            s.needs.push(Need::Session(holder.to_owned()));
        }
        s
    }

    /// Reading an instance (`get`): like [`Scope::of_id`], but shared instances are
    /// visible to every identity.
    pub fn read(id: &InstanceId) -> Scope {
        let need = match need_of_id(id) {
            Need::Shared => Need::Nothing,
            n => n,
        };
        Scope {
            key: Some(id.to_string()),
            needs: vec![need],
        }
    }

    /// Ending a namespace.
    pub fn namespace(ns: &str) -> Scope {
        Scope {
            key: Some(format!("ns:{ns}")),
            needs: vec![Need::Namespace(ns.to_owned())],
        }
    }

    /// Ending a session.
    pub fn session(sid: &str) -> Scope {
        Scope {
            key: Some(format!("session:{sid}")),
            needs: vec![Need::Session(sid.to_owned())],
        }
    }

    /// A launch: the key it will form from the workload's isolation in `catalog` (for a
    /// `docker.share` container: `shared:<workload>`, whatever namespace or session is
    /// given, as `Shared::launch` forms it). A workload that is unknown or invalid (the
    /// launch will fail) needs what was given. On a shared instance the lease holder (the
    /// `lease`, else for a shared container the session) must be one of the identity's
    /// sessions: a tenant holds, and sees, only leases named after its own sessions.
    pub fn launch(
        catalog: &Catalog,
        workload: &str,
        namespace: Option<&str>,
        session: Option<&str>,
        lease: Option<&str>,
    ) -> Scope {
        let namespace = namespace.filter(|s| !s.is_empty());
        let session = session.filter(|s| !s.is_empty());
        let lease = lease.filter(|s| !s.is_empty());
        let spec = catalog.get(workload).and_then(|e| e.spec.as_ref().ok());
        let isolation = spec.map(|s| s.key_isolation());
        let shared_container = spec.is_some_and(|s| s.shared_instance());
        let (key_ns, key_sid) = if shared_container {
            (None, None)
        } else {
            (namespace, session)
        };
        let holder = lease.or(if shared_container { session } else { None });
        let mut needs = Vec::new();
        let key = match isolation {
            Some(iso) => match Key::new(workload, iso, key_ns, key_sid) {
                Ok(k) => {
                    match k.scope() {
                        key::Scope::Shared => {
                            needs.push(Need::Shared);
                            if let Some(h) = holder {
                                needs.push(Need::Session(h.to_owned()));
                            }
                        }
                        key::Scope::Namespace(ns) => needs.push(Need::Namespace(ns.clone())),
                        key::Scope::Session(s) => needs.push(Need::Session(s.clone())),
                    }
                    Some(k.instance_id().to_string())
                }
                Err(_) => None,
            },
            None => None,
        };
        // A namespace given with a session, or to a launch that will fail anyway.
        if let Some(ns) = namespace {
            if !needs.contains(&Need::Namespace(ns.to_owned())) {
                needs.push(Need::Namespace(ns.to_owned()));
            }
        }
        if let Some(s) = session {
            if !needs.contains(&Need::Session(s.to_owned())) {
                needs.push(Need::Session(s.to_owned()));
            }
        }
        if needs.is_empty() {
            // Nothing given to an unknown workload: it would be the default namespace.
            needs.push(match isolation {
                Some(Isolation::None) => Need::Shared,
                _ => Need::Namespace(DEFAULT_NAMESPACE.to_owned()),
            });
        }
        Scope {
            key: key.or_else(|| Some(workload.to_owned())),
            needs,
        }
    }
}

fn need_of_id(id: &InstanceId) -> Need {
    match InstanceId::parse(id.as_str()) {
        Ok((_, k)) => match k.scope() {
            key::Scope::Shared => Need::Shared,
            key::Scope::Namespace(ns) => Need::Namespace(ns.clone()),
            key::Scope::Session(s) => Need::Session(s.clone()),
        },
        // Cannot happen for a parsed id; fail closed.
        Err(_) => Need::Admin,
    }
}

/// Per-request audit state shared between [`AuthLayer`] and [`authorize`].
#[derive(Default)]
pub struct AuditCtx {
    key: Mutex<Option<String>>,
    denied: AtomicBool,
    /// For an audited action: what [`authorize`] writes before the action is done.
    pre: Option<PreAudit>,
    pre_written: AtomicBool,
}

/// The `authorized` line of an audited action, less its key (known in [`authorize`]).
struct PreAudit {
    audit: AuditLog,
    identity: String,
    transport: &'static str,
    peer: Option<SocketAddr>,
    action: String,
}

impl AuditCtx {
    /// Writes the `authorized` line once; an error refuses the request.
    fn write_authorized(&self, key: Option<String>) -> Result<(), Status> {
        let Some(pre) = &self.pre else { return Ok(()) };
        if self.pre_written.load(Ordering::SeqCst) {
            return Ok(());
        }
        let entry = AuditEntry {
            time_ms: now_ms(),
            identity: pre.identity.clone(),
            transport: pre.transport,
            peer: pre.peer,
            action: pre.action.clone(),
            key,
            code: Code::Ok,
            message: String::new(),
            authorized: true,
        };
        match pre.audit.write(&entry) {
            Ok(()) => {
                self.pre_written.store(true, Ordering::SeqCst);
                Ok(())
            }
            Err(e) => {
                tracing::error!("{e}; refusing {} by {}", pre.action, pre.identity);
                Err(Status::unavailable(format!(
                    "{e}; the request was refused (an audited action is never done unrecorded)"
                )))
            }
        }
    }
}

impl AuditCtx {
    fn set_key(&self, key: Option<String>) {
        if key.is_some() {
            *self.key.lock().unwrap_or_else(|e| e.into_inner()) = key;
        }
    }

    fn key(&self) -> Option<String> {
        self.key.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The identity a request carries ([`AuthLayer`] put it there).
pub fn identity<T>(req: &Request<T>) -> Option<&Identity> {
    req.extensions().get::<Identity>()
}

/// Whether the caller may see everything (a manifest's contents in its errors, `env`
/// values): the Unix socket's peer (the daemon's owner) or an `admin: true` token. No
/// identity: no.
pub fn is_admin<T>(req: &Request<T>) -> bool {
    match identity(req) {
        Some(Identity::Local { .. }) => true,
        Some(Identity::Token { grant, .. }) => grant.admin,
        None => false,
    }
}

/// Checks that the request's identity may act on `scope`; records the scope's key for
/// the audit log. `PERMISSION_DENIED` when it may not, `UNAUTHENTICATED` when the request
/// has no identity (a server without [`AuthLayer`]: fail closed).
pub fn authorize<T>(req: &Request<T>, scope: Scope) -> Result<(), Status> {
    let ctx = req.extensions().get::<Arc<AuditCtx>>();
    if let Some(ctx) = ctx {
        ctx.set_key(scope.key.clone());
    }
    let Some(id) = identity(req) else {
        return Err(Status::unauthenticated("the request carries no identity"));
    };
    if id.allows(&scope) {
        // ORDER: the audit line is on disk (page cache) before the service acts.
        if let Some(ctx) = ctx {
            ctx.write_authorized(scope.key.clone())?;
        }
        return Ok(());
    }
    if let Some(ctx) = ctx {
        ctx.denied.store(true, Ordering::SeqCst);
    }
    let what = match id {
        Identity::Token { grant, .. } => scope
            .needs
            .iter()
            .find(|n| !grant.allows(n))
            .map(|n| n.to_string())
            .unwrap_or_default(),
        Identity::Local { .. } => String::new(),
    };
    Err(Status::permission_denied(format!(
        "token {} is not allowed {what}",
        id.name()
    )))
}

/// A checker for `exec`, whose instance id arrives in the request stream: call it with
/// the id before acting on it.
pub fn exec_check<T>(req: &Request<T>) -> impl FnOnce(&InstanceId) -> Result<(), Status> + Send {
    let identity = identity(req).cloned();
    let ctx = req.extensions().get::<Arc<AuditCtx>>().cloned();
    move |id: &InstanceId| {
        let mut r = Request::new(());
        if let Some(i) = identity {
            r.extensions_mut().insert(i);
        }
        if let Some(c) = ctx {
            r.extensions_mut().insert(c);
        }
        authorize(&r, Scope::of_id(id))
    }
}

/// What `list` and `watch` show an identity.
#[derive(Debug, Clone)]
pub struct Visibility(Option<Identity>);

impl Visibility {
    pub fn of<T>(req: &Request<T>) -> Visibility {
        Visibility(identity(req).cloned())
    }

    /// Whether the instance with this id is shown (nothing without an identity).
    pub fn sees(&self, id: &str) -> bool {
        self.0.as_ref().is_some_and(|i| i.sees(id))
    }

    /// Whether lease holder `holder` is shown (see [`Identity::sees_lease`]).
    pub fn sees_lease(&self, holder: &str) -> bool {
        self.0.as_ref().is_some_and(|i| i.sees_lease(holder))
    }
}

// ---------------------------------------------------------------------------------------
// The layer

/// Which transport a server is, and how it authenticates.
#[derive(Debug, Clone)]
enum Transport {
    Unix,
    Tcp(Arc<Tokens>),
}

impl Transport {
    fn name(&self) -> &'static str {
        match self {
            Transport::Unix => "unix",
            Transport::Tcp(_) => "tcp",
        }
    }
}

/// The tower layer that authenticates a server's requests and audits them.
#[derive(Clone)]
pub struct AuthLayer {
    transport: Transport,
    audit: AuditLog,
}

impl AuthLayer {
    /// The Unix socket: every peer is trusted; its uid is the identity.
    pub fn unix(audit: AuditLog) -> AuthLayer {
        AuthLayer {
            transport: Transport::Unix,
            audit,
        }
    }

    /// TCP: a bearer token from `tokens` is required.
    pub fn tcp(tokens: Arc<Tokens>, audit: AuditLog) -> AuthLayer {
        AuthLayer {
            transport: Transport::Tcp(tokens),
            audit,
        }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    layer: AuthLayer,
}

/// The method name of a gRPC path, as the audit log's action (`EndSession` -> `end_session`).
fn action_of(path: &str) -> String {
    snake(path.rsplit('/').next().unwrap_or(path))
}

fn snake(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    for (i, c) in s.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// Actions audited whatever their result; any other request is audited when denied.
const AUDITED: &[&str] = &[
    "launch",
    "terminate",
    "exec",
    "release",
    "end_session",
    "end_namespace",
    "reload",
    "prune_images",
    "restart",
    "rollout",
];

/// The token of an `Authorization: Bearer <token>` header (the API's and the metrics
/// listener's).
pub(crate) fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    let v = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

impl<S, B, RB> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        // The clone is the one not yet polled ready: keep the ready one for this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let audit = self.layer.audit.clone();
        let transport = self.layer.transport.name();
        let action = action_of(req.uri().path());
        let peer = req
            .extensions()
            .get::<tonic::transport::server::TcpConnectInfo>()
            .and_then(|c| c.remote_addr());
        let identity = match &self.layer.transport {
            Transport::Unix => {
                // The connection was classified when it was accepted (`peer`): a
                // workload, or a peer that could not be checked, is refused here.
                let info = req.extensions().get::<crate::peer::PeerInfo>().cloned();
                let uid = info.as_ref().and_then(|i| i.uid);
                let refusal = match info.as_ref().map(|i| &*i.verdict) {
                    Some(crate::peer::Verdict::Operator) => None,
                    Some(v) => Some(format!("the API socket refuses workloads: {v}")),
                    None => Some("the API socket refuses an unchecked connection".to_owned()),
                };
                if let Some(message) = refusal {
                    let status = Status::permission_denied(message);
                    let identity = Identity::Local { uid }.name();
                    return Box::pin(async move {
                        let entry = AuditEntry::refused(identity, transport, peer, action, &status);
                        audit.record_unauthenticated(entry).await;
                        Ok(status.into_http())
                    });
                }
                Some(Identity::Local { uid })
            }
            Transport::Tcp(tokens) => bearer(req.headers())
                .and_then(|t| tokens.verify(t))
                .map(|grant| Identity::Token { grant, peer }),
        };
        let Some(identity) = identity else {
            let missing = bearer(req.headers()).is_none();
            let status = Status::unauthenticated(if missing {
                "a token is required over TCP (authorization: Bearer <token>)"
            } else {
                "the token is not valid"
            });
            return Box::pin(async move {
                let entry =
                    AuditEntry::refused("anonymous".to_owned(), transport, peer, action, &status);
                audit.record_unauthenticated(entry).await;
                Ok(status.into_http())
            });
        };
        let name = identity.name();
        let audited = AUDITED.contains(&action.as_str());
        let ctx = Arc::new(AuditCtx {
            pre: audited.then(|| PreAudit {
                audit: audit.clone(),
                identity: name.clone(),
                transport,
                peer,
                action: action.clone(),
            }),
            ..AuditCtx::default()
        });
        req.extensions_mut().insert(identity);
        req.extensions_mut().insert(ctx.clone());
        Box::pin(async move {
            let resp = inner.call(req).await?;
            // Errors come as trailers-only responses (the status in the headers); a
            // success's status is in the trailers: the call was accepted.
            let status = Status::from_header_map(resp.headers());
            let code = status.as_ref().map_or(Code::Ok, |s| s.code());
            let denied = ctx.denied.load(Ordering::SeqCst)
                || matches!(code, Code::PermissionDenied | Code::Unauthenticated);
            if denied || audited {
                audit
                    .record(AuditEntry {
                        time_ms: now_ms(),
                        identity: name,
                        transport,
                        peer,
                        action,
                        key: ctx.key(),
                        code,
                        message: status.map(|s| s.message().to_owned()).unwrap_or_default(),
                        authorized: false,
                    })
                    .await;
            }
            Ok(resp)
        })
    }
}

// ---------------------------------------------------------------------------------------
// The audit log

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The gRPC code as the audit log writes it (`permission_denied`).
fn code_name(code: Code) -> String {
    snake(&format!("{code:?}"))
}

/// One line of the audit log.
#[derive(Debug, Clone)]
pub struct AuditEntry {
    pub time_ms: u64,
    pub identity: String,
    pub transport: &'static str,
    pub peer: Option<SocketAddr>,
    pub action: String,
    pub key: Option<String>,
    pub code: Code,
    pub message: String,
    /// The line [`authorize`] writes before an audited action is done (`"result":
    /// "authorized"`); the result line follows once the response is known.
    pub authorized: bool,
}

impl AuditEntry {
    /// A request refused before it reached a service method (no identity proven).
    fn refused(
        identity: String,
        transport: &'static str,
        peer: Option<SocketAddr>,
        action: String,
        status: &Status,
    ) -> AuditEntry {
        AuditEntry {
            time_ms: now_ms(),
            identity,
            transport,
            peer,
            action,
            key: None,
            code: status.code(),
            message: status.message().to_owned(),
            authorized: false,
        }
    }

    /// The JSON line (without the newline). String fields are [`bounded`].
    pub fn to_json(&self) -> String {
        self.json().to_string()
    }

    fn json(&self) -> serde_json::Value {
        let ok = self.code == Code::Ok;
        let result = match (self.authorized, ok) {
            (true, _) => "authorized",
            (false, true) => "ok",
            (false, false) => "error",
        };
        let mut v = serde_json::json!({
            "time": rfc3339(self.time_ms),
            "time_ms": self.time_ms,
            "identity": bounded(&self.identity),
            "transport": self.transport,
            "action": bounded(&self.action),
            "key": self.key.as_deref().map(bounded),
            "result": result,
        });
        if let Some(peer) = self.peer {
            v["peer"] = serde_json::json!(peer.to_string());
        }
        if !ok {
            v["code"] = serde_json::json!(code_name(self.code));
            v["message"] = serde_json::json!(bounded(&self.message));
        }
        v
    }

    /// The summary of `count` suppressed refusals like this one since `first_ms`.
    fn summary_json(&self, count: u64, first_ms: u64, peers: &[String]) -> String {
        let mut v = self.json();
        v["action"] = serde_json::json!("refusals_summarised");
        v["key"] = serde_json::Value::Null;
        v["count"] = serde_json::json!(count);
        v["first_ms"] = serde_json::json!(first_ms);
        v["peers"] = serde_json::json!(peers.iter().map(|p| bounded(p)).collect::<Vec<_>>());
        v["message"] = serde_json::json!(format!(
            "{count} more refusals ({}) since {}, one line each suppressed; first: {}",
            code_name(self.code),
            rfc3339(first_ms),
            bounded(&self.message)
        ));
        if let Some(obj) = v.as_object_mut() {
            obj.remove("peer");
        }
        v.to_string()
    }
}

/// The longest string field an audit line carries, in bytes; a longer one (an identity, an
/// action, a key, a message) is cut on a character boundary and ends in
/// [`TRUNCATED_MARKER`]. Lines stay small whatever a request sends.
pub const AUDIT_FIELD_MAX: usize = 256;

/// Appended to a string field that was cut at [`AUDIT_FIELD_MAX`].
pub const TRUNCATED_MARKER: &str = "…[truncated]";

/// How many rotated files are kept besides `audit.log` (`audit.log.1` is the newest).
pub const AUDIT_GENERATIONS: u32 = 8;

/// Refusals of unauthenticated peers (no valid token on TCP, a workload on the socket)
/// written one line each per [`UNAUTHENTICATED_WINDOW_MS`], per kind; the rest of the
/// window's refusals are counted and written as one summary line.
pub const UNAUTHENTICATED_BURST: u32 = 10;

/// The window of [`UNAUTHENTICATED_BURST`].
pub const UNAUTHENTICATED_WINDOW_MS: u64 = 60_000;

/// How many distinct peers a summary line names.
const SUMMARY_PEERS: usize = 8;

/// `s`, cut to at most [`AUDIT_FIELD_MAX`] bytes (marker included) on a char boundary.
pub fn bounded(s: &str) -> std::borrow::Cow<'_, str> {
    if s.len() <= AUDIT_FIELD_MAX {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut cut = AUDIT_FIELD_MAX - TRUNCATED_MARKER.len();
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    std::borrow::Cow::Owned(format!("{}{TRUNCATED_MARKER}", &s[..cut]))
}

/// The audit log could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the audit log {path}: {source}")]
pub struct AuditWriteError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// The audit log: `<state>/audit.log`, one JSON object per line, rotated at the daemon's
/// `--log-max-bytes` through [`AUDIT_GENERATIONS`] files (`audit.log.1` newest).
///
/// - **Written before the answer, and before the action.** An audited action (see
///   `AUDITED`) gets an `authorized` line when [`authorize`] lets it through, before the
///   service acts; if that line cannot be written the request is refused with
///   `UNAVAILABLE` and nothing is done. Every audited request and every refusal then gets
///   its result line, appended by the request's task once the response is known and
///   before it is sent (a failure there is logged: the action already has its line).
/// - **Bounded lines.** Every string field is cut at [`AUDIT_FIELD_MAX`] bytes.
/// - **Not rotated away by strangers.** Refusals of peers that proved nothing (no valid
///   token, a workload on the socket) are limited to [`UNAUTHENTICATED_BURST`] lines per
///   [`UNAUTHENTICATED_WINDOW_MS`] and kind; the rest are counted into one summary line
///   per window (`"action": "refusals_summarised"`, with `count` and up to 8 `peers`). At
///   8 MiB a flood then needs days to rotate one generation, and nine are kept.
#[derive(Clone)]
pub struct AuditLog {
    inner: Arc<AuditInner>,
}

struct AuditInner {
    path: PathBuf,
    max_bytes: u64,
    file: Mutex<AuditFile>,
    limiter: Mutex<HashMap<(&'static str, Code), Window>>,
}

#[derive(Default)]
struct AuditFile {
    file: Option<std::fs::File>,
    size: u64,
}

/// One kind's rate-limit window.
struct Window {
    start_ms: u64,
    written: u32,
    suppressed: u64,
    last_ms: u64,
    peers: Vec<String>,
    /// The refused action of the first suppressed request (for the summary).
    example: Option<AuditEntry>,
}

impl AuditLog {
    /// The audit log in `<dir>/audit.log`. Opened at the first line. Inside a tokio
    /// runtime, a task writes out the summary of a quiet window's suppressed refusals.
    pub fn start(dir: &Path, max_bytes: u64) -> std::io::Result<AuditLog> {
        let log = AuditLog {
            inner: Arc::new(AuditInner {
                path: dir.join("audit.log"),
                max_bytes: max_bytes.max(4096),
                file: Mutex::new(AuditFile::default()),
                limiter: Mutex::new(HashMap::new()),
            }),
        };
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let weak = Arc::downgrade(&log.inner);
            rt.spawn(async move {
                let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
                loop {
                    tick.tick().await;
                    let Some(inner) = weak.upgrade() else { return };
                    AuditLog { inner }.flush_summaries(now_ms(), false);
                }
            });
        }
        Ok(log)
    }

    /// The file written to.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    fn rotated(&self, n: u32) -> PathBuf {
        let mut p = self.inner.path.clone().into_os_string();
        p.push(format!(".{n}"));
        PathBuf::from(p)
    }

    /// Appends one line now (inline, under the file's lock: a small append to the page
    /// cache costs microseconds; a writer thread cost a wake-up per request).
    pub fn write(&self, entry: &AuditEntry) -> Result<(), AuditWriteError> {
        self.write_line(&entry.to_json())
    }

    fn write_line(&self, line: &str) -> Result<(), AuditWriteError> {
        let err = |source| AuditWriteError {
            path: self.inner.path.clone(),
            source,
        };
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        let mut f = self.inner.file.lock().unwrap_or_else(|e| e.into_inner());
        if f.file.is_none() {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.inner.path)
                .map_err(err)?;
            f.size = file.metadata().map_err(err)?.len();
            f.file = Some(file);
        }
        if f.size > 0 && f.size + buf.len() as u64 > self.inner.max_bytes {
            // Oldest first: .7 -> .8, ..., .1 -> .2, then the live file -> .1.
            for n in (1..AUDIT_GENERATIONS).rev() {
                let _ = std::fs::rename(self.rotated(n), self.rotated(n + 1));
            }
            f.file = None;
            std::fs::rename(&self.inner.path, self.rotated(1)).map_err(err)?;
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.inner.path)
                .map_err(err)?;
            f.file = Some(file);
            f.size = 0;
        }
        let file = f.file.as_mut().expect("opened above");
        if let Err(e) = std::io::Write::write_all(file, &buf) {
            // Reopen next time (the file may have been replaced); the size is re-read.
            f.file = None;
            return Err(err(e));
        }
        f.size += buf.len() as u64;
        Ok(())
    }

    /// Appends an entry before the response goes out; a failure is logged with the line.
    pub async fn record(&self, entry: AuditEntry) {
        if let Err(e) = self.write(&entry) {
            tracing::error!("{e}; entry: {}", entry.to_json());
        }
    }

    /// Records the refusal of a peer that proved nothing (no valid token, a workload):
    /// written at most [`UNAUTHENTICATED_BURST`] times per window and kind, counted into
    /// a summary line beyond that.
    pub async fn record_unauthenticated(&self, entry: AuditEntry) {
        let now = entry.time_ms;
        self.flush_summaries(now, false);
        let kind = (entry.transport, entry.code);
        {
            let mut lim = self.inner.limiter.lock().unwrap_or_else(|e| e.into_inner());
            let w = lim.entry(kind).or_insert_with(|| Window {
                start_ms: now,
                written: 0,
                suppressed: 0,
                last_ms: now,
                peers: Vec::new(),
                example: None,
            });
            if w.written >= UNAUTHENTICATED_BURST {
                w.suppressed += 1;
                w.last_ms = now;
                let peer = entry
                    .peer
                    .map(|p| p.ip().to_string())
                    .unwrap_or_else(|| entry.identity.clone());
                if w.peers.len() < SUMMARY_PEERS && !w.peers.contains(&peer) {
                    w.peers.push(peer);
                }
                if w.example.is_none() {
                    w.example = Some(entry);
                }
                return;
            }
            w.written += 1;
        }
        self.record(entry).await;
    }

    /// Writes the summary line of every window that has ended (all of them with `all`,
    /// at shutdown) and had suppressed refusals.
    pub fn flush_summaries(&self, now: u64, all: bool) {
        let ended: Vec<Window> = {
            let mut lim = self.inner.limiter.lock().unwrap_or_else(|e| e.into_inner());
            let keys: Vec<_> = lim
                .iter()
                .filter(|(_, w)| all || now >= w.start_ms + UNAUTHENTICATED_WINDOW_MS)
                .map(|(k, _)| *k)
                .collect();
            keys.into_iter().filter_map(|k| lim.remove(&k)).collect()
        };
        for w in ended {
            let Some(mut e) = w.example else { continue };
            e.time_ms = w.last_ms;
            let line = e.summary_json(w.suppressed, w.start_ms, &w.peers);
            if let Err(err) = self.write_line(&line) {
                tracing::error!("{err}; entry: {line}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// TLS and the TCP listener's configuration

/// Where to listen on TCP and with what (see `Config::tcp`).
#[derive(Debug, Clone)]
pub struct TcpListen {
    pub addr: SocketAddr,
    /// The server's certificate chain and key (PEM).
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    /// The CA that signs client certificates (PEM); clients without one are refused.
    pub client_ca: PathBuf,
    /// The token file (YAML, or TOML when it ends in `.toml`).
    pub tokens: PathBuf,
}

/// The TCP listener could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TcpSetupError {
    #[error(transparent)]
    Tokens(#[from] TokenFileError),
    #[error("cannot read {what} {path}: {source}")]
    ReadTls {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {path} holds no PEM data (expected -----BEGIN ...)")]
    NotPem { what: &'static str, path: PathBuf },
    #[error("invalid TLS configuration (--tls-cert {cert}, --tls-key {key}, --client-ca {ca}): {reason}")]
    Tls {
        cert: PathBuf,
        key: PathBuf,
        ca: PathBuf,
        reason: String,
    },
    #[error("cannot bind TCP API listener {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

fn read_pem(what: &'static str, path: &Path) -> Result<Vec<u8>, TcpSetupError> {
    let data = std::fs::read(path).map_err(|source| TcpSetupError::ReadTls {
        what,
        path: path.to_owned(),
        source,
    })?;
    if !data.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(TcpSetupError::NotPem {
            what,
            path: path.to_owned(),
        });
    }
    Ok(data)
}

/// A TCP listener ready to serve: bound, its TLS server configured, its tokens loaded.
pub struct TcpSetup {
    pub listener: tokio::net::TcpListener,
    pub server: tonic::transport::Server,
    pub tokens: Arc<Tokens>,
}

impl TcpSetup {
    /// Loads the token file and the TLS files, then binds (so a bad file binds nothing).
    pub async fn prepare(cfg: &TcpListen) -> Result<TcpSetup, TcpSetupError> {
        let tokens = Arc::new(Tokens::load(&cfg.tokens)?);
        let cert = read_pem("--tls-cert", &cfg.tls_cert)?;
        let key = read_pem("--tls-key", &cfg.tls_key)?;
        let ca = read_pem("--client-ca", &cfg.client_ca)?;
        let tls = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(cert, key))
            .client_ca_root(tonic::transport::Certificate::from_pem(ca))
            .client_auth_optional(false)
            .timeout(std::time::Duration::from_secs(10));
        let server = tonic::transport::Server::builder()
            .tls_config(tls)
            .map_err(|e| TcpSetupError::Tls {
                cert: cfg.tls_cert.clone(),
                key: cfg.tls_key.clone(),
                ca: cfg.client_ca.clone(),
                reason: error_chain(&e),
            })?;
        let listener = tokio::net::TcpListener::bind(cfg.addr)
            .await
            .map_err(|source| TcpSetupError::Bind {
                addr: cfg.addr,
                source,
            })?;
        Ok(TcpSetup {
            listener,
            server,
            tokens,
        })
    }
}

/// The TCP API server: the same service as the Unix socket, behind mutual TLS and tokens.
pub struct TcpServer {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpServer {
    /// Serves `setup` until [`TcpServer::stop`].
    pub(crate) fn start(
        setup: TcpSetup,
        sh: Arc<crate::Shared>,
        audit: AuditLog,
        standard: &crate::standard::Standard,
    ) -> TcpServer {
        let TcpSetup {
            listener,
            server,
            tokens,
        } = setup;
        let addr = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let n = tokens.len();
        let (stop, stopped) = oneshot::channel::<()>();
        let svc = crate::service::Service { sh };
        let (health, reflection, reflection_alpha) = (
            standard.health(),
            standard.reflection_v1(),
            standard.reflection_v1alpha(),
        );
        let task = tokio::spawn(async move {
            let res = server
                .layer(AuthLayer::tcp(tokens, audit))
                .add_service(bulkhead_api::BulkheadServer::new(svc))
                .add_service(health)
                .add_service(reflection)
                .add_service(reflection_alpha)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async {
                        let _ = stopped.await;
                    },
                )
                .await;
            if let Err(e) = res {
                tracing::error!("TCP API server on {addr} failed: {e}");
            }
        });
        tracing::info!("serving the API on {addr} (mutual TLS, {n} tokens)");
        TcpServer {
            addr,
            stop: Some(stop),
            task,
        }
    }

    /// Stops accepting; open streams get a moment to end (as on the Unix socket).
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if tokio::time::timeout(std::time::Duration::from_secs(2), &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN_A: &str = "secret-a";
    const TOKEN_ADMIN: &str = "secret-admin";

    fn file() -> String {
        format!(
            "tokens:\n\
             - name: team-a\n  token_sha256: {}\n  namespaces: [team-a, 'shared-*']\n  sessions: [s1]\n\
             - name: ops\n  token_sha256: {}\n  admin: true\n",
            token_sha256_hex(TOKEN_A),
            token_sha256_hex(TOKEN_ADMIN)
        )
    }

    fn tokens() -> Tokens {
        Tokens::parse(Path::new("tokens.yaml"), &file(), false).unwrap()
    }

    fn as_token(t: &Tokens, token: &str) -> Identity {
        Identity::Token {
            grant: t.verify(token).expect("valid token"),
            peer: None,
        }
    }

    fn id(s: &str) -> InstanceId {
        InstanceId::parse(s).unwrap().0
    }

    #[test]
    fn sha256_hex_is_sha256sum() {
        // printf %s abc | sha256sum
        assert_eq!(
            token_sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            parse_hex32(&token_sha256_hex("x")).map(|h| h.len()),
            Some(32)
        );
        assert!(parse_hex32("zz").is_none());
        assert!(parse_hex32(&"g".repeat(64)).is_none());
    }

    #[test]
    fn parses_yaml_and_toml_and_verifies() {
        let t = tokens();
        assert_eq!(t.len(), 2);
        assert_eq!(t.verify(TOKEN_A).unwrap().name, "team-a");
        assert_eq!(t.verify(TOKEN_ADMIN).unwrap().name, "ops");
        assert!(t.verify("secret-b").is_none());
        assert!(t.verify("").is_none());

        let toml = format!(
            "[[tokens]]\nname = \"team-b\"\ntoken_sha256 = \"{}\"\nnamespaces = [\"team-b\"]\n",
            token_sha256_hex("b")
        );
        let t = Tokens::parse(Path::new("t.toml"), &toml, true).unwrap();
        assert_eq!(t.verify("b").unwrap().name, "team-b");
    }

    #[test]
    fn token_file_errors_name_the_file_and_token() {
        let p = Path::new("/etc/bulkhead/tokens.yaml");
        let e = Tokens::parse(p, "tokens: [{name: a, token_sha256: abc}]", false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/etc/bulkhead/tokens.yaml") && e.contains("\"a\""),
            "{e}"
        );
        assert!(e.contains("64 hex digits"), "{e}");

        let e = Tokens::parse(p, "tokens: [{name: a, token: plaintext}]", false)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("invalid token file /etc/bulkhead/tokens.yaml"),
            "{e}"
        );

        let h = token_sha256_hex("x");
        let dup =
            format!("tokens: [{{name: a, token_sha256: {h}}}, {{name: b, token_sha256: {h}}}]");
        let e = Tokens::parse(p, &dup, false).unwrap_err().to_string();
        assert!(e.contains("same as another"), "{e}");

        let bad = format!("tokens: [{{name: a, token_sha256: {h}, namespaces: ['a/b']}}]");
        let e = Tokens::parse(p, &bad, false).unwrap_err().to_string();
        assert!(e.contains("namespaces"), "{e}");

        let e = Tokens::load(Path::new("/nonexistent/tokens.yaml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("cannot read token file /nonexistent/tokens.yaml"),
            "{e}"
        );
    }

    #[test]
    fn namespace_and_session_scopes() {
        let t = tokens();
        let a = as_token(&t, TOKEN_A);
        assert!(a.allows(&Scope::of_id(&id("ns:team-a:web"))));
        assert!(!a.allows(&Scope::of_id(&id("ns:team-b:web"))));
        assert!(
            a.allows(&Scope::of_id(&id("ns:shared-x:web"))),
            "prefix pattern"
        );
        assert!(a.allows(&Scope::of_id(&id("session:s1:web"))));
        assert!(!a.allows(&Scope::of_id(&id("session:s2:web"))));
        assert!(a.allows(&Scope::namespace("team-a")));
        assert!(!a.allows(&Scope::namespace("team-b")));
        assert!(a.allows(&Scope::session("s1")));
        assert!(!a.allows(&Scope::session("s10")), "exact, not prefix");
    }

    #[test]
    fn shared_daemon_and_admin_scopes() {
        let t = tokens();
        let a = as_token(&t, TOKEN_A);
        let ops = as_token(&t, TOKEN_ADMIN);
        let local = Identity::Local { uid: Some(0) };
        assert!(!a.allows(&Scope::of_id(&id("shared:db"))));
        assert!(a.allows(&Scope::read(&id("shared:db"))));
        assert!(!a.allows(&Scope::read(&id("ns:team-b:web"))));
        assert!(a.allows(&Scope::daemon()));
        assert!(!a.allows(&Scope::admin()));
        for s in [
            Scope::admin(),
            Scope::of_id(&id("ns:x:y")),
            Scope::of_id(&id("shared:db")),
        ] {
            assert!(ops.allows(&s));
            assert!(local.allows(&s));
        }
        assert!(a.sees("ns:team-a:web") && a.sees("shared:db"));
        assert!(!a.sees("ns:team-b:web") && !a.sees("garbage"));
        assert_eq!(local.name(), "uid:0");
        assert_eq!(a.name(), "team-a");
    }

    #[test]
    fn launch_scope_follows_the_catalog() {
        let dir = tempfile::tempdir().unwrap();
        for (name, iso) in [("web", "namespace"), ("db", "none"), ("sess", "session")] {
            let d = dir.path().join(name);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(
                d.join("manifest.yaml"),
                format!("name: {name}\ncommand: [sleep, '60']\nisolation: {iso}\n"),
            )
            .unwrap();
        }
        let cat = Catalog::scan(dir.path(), &[bulkhead_core::spec::DriverKind::Process]);
        let t = tokens();
        let a = as_token(&t, TOKEN_A);
        let s = Scope::launch(&cat, "web", Some("team-a"), None, None);
        assert_eq!(s.key.as_deref(), Some("ns:team-a:web"));
        assert!(a.allows(&s));
        assert!(!a.allows(&Scope::launch(&cat, "web", Some("team-b"), None, None)));
        // No namespace: the default one.
        let s = Scope::launch(&cat, "web", None, None, None);
        assert_eq!(s.key.as_deref(), Some("ns:default:web"));
        assert!(!a.allows(&s));
        assert!(
            !a.allows(&Scope::launch(&cat, "db", None, None, None)),
            "shared needs shared"
        );
        assert!(a.allows(&Scope::launch(&cat, "sess", None, Some("s1"), None)));
        assert!(!a.allows(&Scope::launch(
            &cat,
            "sess",
            Some("team-b"),
            Some("s1"),
            None
        )));
        assert!(!a.allows(&Scope::launch(&cat, "nope", None, None, None)));
        assert!(a.allows(&Scope::launch(&cat, "nope", Some("team-a"), None, None)));
    }

    #[test]
    fn authorize_records_the_key_and_denial() {
        let t = tokens();
        let mut req = Request::new(());
        let ctx = Arc::new(AuditCtx::default());
        req.extensions_mut().insert(as_token(&t, TOKEN_A));
        req.extensions_mut().insert(ctx.clone());
        assert!(authorize(&req, Scope::of_id(&id("ns:team-a:web"))).is_ok());
        assert!(!ctx.denied.load(Ordering::SeqCst));
        let e = authorize(&req, Scope::of_id(&id("ns:team-b:web"))).unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
        assert_eq!(e.message(), "token team-a is not allowed namespace team-b");
        assert!(ctx.denied.load(Ordering::SeqCst));
        assert_eq!(ctx.key().as_deref(), Some("ns:team-b:web"));
        // No identity: fail closed.
        let e = authorize(&Request::new(()), Scope::daemon()).unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
    }

    #[test]
    fn bearer_header_and_action_names() {
        let mut h = http::HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(http::header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(http::header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h), None);
        assert_eq!(
            action_of("/bulkhead.v1.Bulkhead/EndNamespace"),
            "end_namespace"
        );
        assert_eq!(action_of("/bulkhead.v1.Bulkhead/Launch"), "launch");
        assert_eq!(code_name(Code::PermissionDenied), "permission_denied");
    }

    #[tokio::test]
    async fn audit_lines_are_json_and_written_before_the_answer() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::start(dir.path(), 4096).unwrap();
        for i in 0..3 {
            log.record(AuditEntry {
                time_ms: 951_782_400_123,
                identity: "team-a".into(),
                transport: "tcp",
                peer: Some("127.0.0.1:5000".parse().unwrap()),
                action: "launch".into(),
                key: Some(format!("ns:team-a:w{i}")),
                code: if i == 2 {
                    Code::PermissionDenied
                } else {
                    Code::Ok
                },
                message: "no".into(),
                authorized: false,
            })
            .await;
        }
        let text = std::fs::read_to_string(log.path()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0]["time"], "2000-02-29T00:00:00.123Z");
        assert_eq!(lines[0]["result"], "ok");
        assert_eq!(lines[0]["key"], "ns:team-a:w0");
        assert!(lines[0].get("code").is_none());
        assert_eq!(lines[2]["result"], "error");
        assert_eq!(lines[2]["code"], "permission_denied");
        assert_eq!(lines[2]["peer"], "127.0.0.1:5000");
    }

    fn entry(identity: &str, message: &str, code: Code) -> AuditEntry {
        AuditEntry {
            time_ms: 1_000,
            identity: identity.into(),
            transport: "tcp",
            peer: Some("10.0.0.7:4000".parse().unwrap()),
            action: "launch".into(),
            key: Some("ns:a:web".into()),
            code,
            message: message.into(),
            authorized: false,
        }
    }

    #[test]
    fn audit_fields_are_bounded_on_a_char_boundary() {
        // 3 MB of a 3-byte character, and a 4 KiB identity: neither may reach the line.
        let huge = "\u{202E}".repeat(1_000_000);
        let mut e = entry(&"x".repeat(4096), &huge, Code::InvalidArgument);
        e.key = Some("é".repeat(5000));
        e.action = "a".repeat(300);
        let line = e.to_json();
        assert!(
            line.len() < 4 * AUDIT_FIELD_MAX + 400,
            "{} bytes",
            line.len()
        );
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        for field in ["identity", "action", "key", "message"] {
            let f = v[field].as_str().unwrap();
            assert!(f.len() <= AUDIT_FIELD_MAX, "{field}: {} bytes", f.len());
            assert!(f.ends_with(TRUNCATED_MARKER), "{field}");
        }
        // Short fields are untouched.
        assert_eq!(bounded("team-a"), "team-a");
    }

    #[tokio::test]
    async fn unauthenticated_refusals_cannot_rotate_the_audit_log_away() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::start(dir.path(), 4096).unwrap();
        log.record(entry("team-a", "", Code::Ok)).await;
        for i in 0..10_000u64 {
            let mut e = entry("anonymous", "the token is not valid", Code::Unauthenticated);
            e.time_ms = 1_000 + i;
            e.peer = Some(format!("10.0.0.{}:4000", i % 20).parse().unwrap());
            log.record_unauthenticated(e).await;
        }
        assert!(
            !dir.path().join("audit.log.1").exists(),
            "a flood of unauthenticated requests rotated the audit log"
        );
        log.flush_summaries(u64::MAX, true);
        let text = std::fs::read_to_string(log.path()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(
            lines[0]["identity"], "team-a",
            "the real request's line survives"
        );
        let single = lines
            .iter()
            .filter(|l| l["action"] == "launch" && l["identity"] == "anonymous")
            .count();
        assert_eq!(single, UNAUTHENTICATED_BURST as usize);
        let summary = lines.last().unwrap();
        assert_eq!(summary["action"], "refusals_summarised");
        assert_eq!(summary["count"], 10_000 - u64::from(UNAUTHENTICATED_BURST));
        assert_eq!(summary["peers"].as_array().unwrap().len(), SUMMARY_PEERS);
        assert_eq!(summary["code"], "unauthenticated");

        // A new window writes single lines again, after the old window's summary.
        let mut e = entry("anonymous", "late", Code::Unauthenticated);
        e.time_ms = 1_000 + UNAUTHENTICATED_WINDOW_MS + 20_000;
        log.record_unauthenticated(e).await;
        let text = std::fs::read_to_string(log.path()).unwrap();
        assert!(text.lines().last().unwrap().contains("late"));
    }

    #[tokio::test]
    async fn audit_log_keeps_its_generations() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::start(dir.path(), 4096).unwrap();
        for _ in 0..2_000 {
            log.record(entry("team-a", "", Code::Ok)).await;
        }
        for n in 1..=AUDIT_GENERATIONS {
            assert!(dir.path().join(format!("audit.log.{n}")).exists(), "{n}");
        }
        assert!(!dir
            .path()
            .join(format!("audit.log.{}", AUDIT_GENERATIONS + 1))
            .exists());
    }

    #[tokio::test]
    async fn a_request_whose_audit_line_cannot_be_written_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        // Every write fails as on a full disk.
        std::os::unix::fs::symlink("/dev/full", dir.path().join("audit.log")).unwrap();
        let log = AuditLog::start(dir.path(), 4096).unwrap();
        let ctx = Arc::new(AuditCtx {
            pre: Some(PreAudit {
                audit: log.clone(),
                identity: "uid:0".into(),
                transport: "unix",
                peer: None,
                action: "launch".into(),
            }),
            ..AuditCtx::default()
        });
        let mut req = Request::new(());
        req.extensions_mut()
            .insert(Identity::Local { uid: Some(0) });
        req.extensions_mut().insert(ctx);
        let err = authorize(&req, Scope::of_id(&id("ns:a:web"))).unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
        assert!(
            err.message().starts_with("cannot write the audit log"),
            "{}",
            err.message()
        );
        // Control: with a writable log the same request is authorized, and its line is
        // written first.
        std::fs::remove_file(dir.path().join("audit.log")).unwrap();
        authorize(&req, Scope::of_id(&id("ns:a:web"))).unwrap();
        let text = std::fs::read_to_string(log.path()).unwrap();
        assert!(text.contains(r#""result":"authorized""#), "{text}");
    }

    /// Issue 11: a `docker.share` container was authorised and audited under the key the
    /// request named (`session:s1:box`, allowed to a token of session s1) while the launch
    /// reached `shared:box`; and its leases showed every tenant's session ids.
    #[test]
    fn shared_containers_are_authorised_as_shared_and_hide_other_tenants_leases() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("box");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("manifest.yaml"),
            "name: box\ndriver: docker\ncommand: [sleep, '60']\nisolation: session\n\
             docker:\n  image: busybox\n  share: true\n",
        )
        .unwrap();
        let cat = Catalog::scan(
            dir.path(),
            &[
                bulkhead_core::spec::DriverKind::Process,
                bulkhead_core::spec::DriverKind::Docker,
            ],
        );
        assert!(
            cat.get("box").unwrap().spec.is_ok(),
            "the manifest is valid"
        );
        let t = Tokens::parse(
            Path::new("tokens.yaml"),
            &format!(
                "tokens:\n\
                 - name: a\n  token_sha256: {}\n  sessions: [s1]\n\
                 - name: b\n  token_sha256: {}\n  sessions: [s2]\n  shared: true\n",
                token_sha256_hex("ta"),
                token_sha256_hex("tb")
            ),
            false,
        )
        .unwrap();
        let (a, b) = (as_token(&t, "ta"), as_token(&t, "tb"));
        let local = Identity::Local { uid: Some(0) };

        // The key is the instance the launch really reaches, whatever session is named.
        let s = Scope::launch(&cat, "box", None, Some("s1"), None);
        assert_eq!(s.key.as_deref(), Some("shared:box"));
        assert!(
            !a.allows(&s),
            "a session token without `shared` reaches a shared container"
        );
        assert!(b.allows(&Scope::launch(&cat, "box", None, Some("s2"), None)));
        // A tenant takes leases only in its own sessions' names.
        assert!(!b.allows(&Scope::launch(&cat, "box", None, Some("s2"), Some("s1"))));
        assert!(!b.allows(&Scope::launch(&cat, "box", None, None, Some("s1"))));
        assert!(local.allows(&Scope::launch(&cat, "box", None, Some("s1"), Some("x"))));
        // ... and releases only those.
        let shared = id("shared:box");
        assert!(!b.allows(&Scope::release(&shared, "s1")));
        assert!(b.allows(&Scope::release(&shared, "s2")));
        assert!(a.allows(&Scope::release(&id("session:s1:w"), "anything")));
        // Leases shown: one's own sessions only (all of them on the socket).
        assert!(b.sees_lease("s2") && !b.sees_lease("s1"));
        assert!(local.sees_lease("s1") && local.sees_lease("s2"));

        // The audit key is the shared one.
        let ctx = Arc::new(AuditCtx::default());
        let mut req = Request::new(());
        req.extensions_mut().insert(b.clone());
        req.extensions_mut().insert(ctx.clone());
        authorize(&req, Scope::launch(&cat, "box", None, Some("s2"), None)).unwrap();
        assert_eq!(ctx.key().as_deref(), Some("shared:box"));
    }
}
