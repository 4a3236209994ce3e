//! Bearer tokens with roles. Servers hold [`Tokens`]; an interceptor turns the `authorization`
//! header into [`Roles`] in the request's extensions, and each handler calls [`require`] for the
//! role its call needs, so a refusal names the missing role.

use std::collections::HashMap;
use std::fmt;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Allocate workers, list toolchains, read status, read the shared cache.
    Client,
    /// Upload toolchains (each upload makes every worker fetch it: not for every client).
    ToolchainUpload,
    /// Register as a worker, fetch toolchains, write the shared cache.
    Worker,
    /// Write the shared cache from a client (CI machines).
    CacheWrite,
    /// Everything.
    Admin,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "client" => Some(Role::Client),
            "toolchain-upload" => Some(Role::ToolchainUpload),
            "worker" => Some(Role::Worker),
            "cache-write" => Some(Role::CacheWrite),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Client => "client",
            Role::ToolchainUpload => "toolchain-upload",
            Role::Worker => "worker",
            Role::CacheWrite => "cache-write",
            Role::Admin => "admin",
        })
    }
}

/// The roles of the caller of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Roles(pub Vec<Role>);

/// Who is calling, as far as a server can tell: the blake3 of the caller's token, or `None` when
/// the server takes no tokens (every caller is the same one). Stored in each request's extensions
/// by [`Tokens::interceptor`], next to its [`Roles`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Credential(pub Option<[u8; 32]>);

impl Credential {
    /// The caller of `req` (the open credential when no interceptor ran).
    pub fn of<T>(req: &tonic::Request<T>) -> Credential {
        req.extensions().get::<Credential>().copied().unwrap_or(Credential(None))
    }
}

/// The configured tokens. `Open` is the loopback development default: no token needed, every role.
#[derive(Debug, Clone)]
pub enum Tokens {
    Open,
    /// blake3 of each token → its roles (tokens are not kept in memory in the clear).
    Required(HashMap<[u8; 32], Vec<Role>>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    Missing,
    Unknown,
}

impl Tokens {
    pub fn new(entries: impl IntoIterator<Item = (String, Vec<Role>)>) -> Tokens {
        Tokens::Required(entries.into_iter().map(|(t, r)| (*blake3::hash(t.as_bytes()).as_bytes(), r)).collect())
    }

    /// The roles for an `authorization` header value (`Bearer <token>`).
    pub fn roles(&self, header: Option<&str>) -> Result<Roles, AuthError> {
        self.authenticate(header).map(|(roles, _)| roles)
    }

    /// The roles and the [`Credential`] for an `authorization` header value, the token hashed once.
    fn authenticate(&self, header: Option<&str>) -> Result<(Roles, Credential), AuthError> {
        let map = match self {
            Tokens::Open => return Ok((Roles(vec![Role::Admin]), Credential(None))),
            Tokens::Required(map) => map,
        };
        let token = header.and_then(|h| h.strip_prefix("Bearer ")).ok_or(AuthError::Missing)?;
        let hash = *blake3::hash(token.trim().as_bytes()).as_bytes();
        map.get(&hash).map(|r| (Roles(r.clone()), Credential(Some(hash)))).ok_or(AuthError::Unknown)
    }

    /// A tonic interceptor: authenticates and stores the caller's roles in the request.
    pub fn interceptor(self) -> impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone {
        move |mut req: tonic::Request<()>| {
            let header = req.metadata().get("authorization").and_then(|v| v.to_str().ok());
            match self.authenticate(header) {
                Ok((roles, credential)) => {
                    req.extensions_mut().insert(roles);
                    req.extensions_mut().insert(credential);
                    Ok(req)
                }
                Err(e) => {
                    let (why, message) = match e {
                        AuthError::Missing => (
                            "no bearer token",
                            "this server needs a bearer token; set FERRY_TOKEN (or 'token' in the config file)",
                        ),
                        AuthError::Unknown => (
                            "a bearer token this server does not list",
                            "the bearer token is not known to this server; give the token exactly as the \
                             scheduler's [[tokens]] lists it",
                        ),
                    };
                    // The operator sees refusals where they look: the server's log, with the peer.
                    let peer = req.remote_addr().map_or_else(|| "an unknown address".to_owned(), |a| a.to_string());
                    tracing::warn!(%peer, "refused a call with {why} (the caller's FERRY_TOKEN or 'token')");
                    Err(tonic::Status::unauthenticated(message))
                }
            }
        }
    }
}

/// Builds [`Tokens`] from configured `(token, role names)`; none configured means [`Tokens::Open`].
pub fn tokens_from_config(entries: Vec<(String, Vec<String>)>) -> Result<Tokens, String> {
    if entries.is_empty() {
        return Ok(Tokens::Open);
    }
    let mut out: Vec<(String, Vec<Role>)> = Vec::new();
    for (i, (token, names)) in entries.into_iter().enumerate() {
        if token.len() < 16 {
            return Err("a token must be at least 16 characters".into());
        }
        check_not_placeholder(&token)?;
        if let Some(first) = out.iter().position(|(t, _)| t.trim() == token.trim()) {
            return Err(format!(
                "entries {first} and {i} have the same token: give each caller one entry listing all its roles \
                 (a token listed twice would silently hold the roles of both)"
            ));
        }
        let roles = names
            .iter()
            .map(|r| {
                Role::parse(r)
                    .ok_or_else(|| format!("unknown role '{r}' (client, toolchain-upload, worker, cache-write, admin)"))
            })
            .collect::<Result<Vec<Role>, String>>()?;
        out.push((token, roles));
    }
    Ok(Tokens::new(out))
}

/// Refuses the packaging examples' placeholders (`REPLACE-ME-…`): public values, so a forgotten
/// edit would open the cluster to anyone who read the examples.
pub fn check_not_placeholder(token: &str) -> Result<(), String> {
    if token.to_ascii_uppercase().contains("REPLACE-ME") {
        return Err("a token is still the example's placeholder 'REPLACE-ME-…', which anyone can read: make one \
                    with `openssl rand -hex 32` (packaging/README.md, \"Make the tokens\")"
            .into());
    }
    Ok(())
}

/// The serving rule for every ferry server: the development default (plain, no tokens) holds
/// only on loopback; anywhere else TLS and tokens are required unless `insecure` is configured.
pub fn check_exposure(addr: std::net::SocketAddr, tls: bool, tokens: bool, insecure: bool) -> Result<(), String> {
    if addr.ip().is_loopback() || (tls && tokens) {
        return Ok(());
    }
    if insecure {
        tracing::warn!(%addr, "INSECURE: serving on a non-loopback address without TLS and tokens, as configured");
        return Ok(());
    }
    Err(format!(
        "refusing to listen on {addr} without TLS and tokens: configure 'tls' and 'tokens', \
         listen on 127.0.0.1, or set 'insecure = true' if this network is trusted"
    ))
}

/// Refuses the call unless the caller has `role` (or admin).
pub fn require<T>(req: &tonic::Request<T>, role: Role, call: &str) -> Result<(), tonic::Status> {
    let ok =
        req.extensions().get::<Roles>().is_some_and(|r| r.0.iter().any(|&have| have == role || have == Role::Admin));
    if ok {
        Ok(())
    } else {
        Err(tonic::Status::permission_denied(format!("{call} needs a token with the '{role}' role")))
    }
}

/// Refuses the call unless the caller has one of `roles` (or admin).
pub fn require_any<T>(req: &tonic::Request<T>, roles: &[Role], call: &str) -> Result<(), tonic::Status> {
    if roles.iter().any(|&role| require(req, role, call).is_ok()) {
        return Ok(());
    }
    let names: Vec<String> = roles.iter().map(|r| format!("'{r}'")).collect();
    Err(tonic::Status::permission_denied(format!("{call} needs a token with one of the roles {}", names.join(", "))))
}

/// The `authorization` header value for a token.
pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_and_tokens_listed_twice_are_refused() {
        let entry = |t: &str, r: &str| (t.to_string(), vec![r.to_string()]);
        let err = tokens_from_config(vec![entry("REPLACE-ME-developers-0000000000000000", "client")]).unwrap_err();
        assert!(err.contains("placeholder") && err.contains("openssl rand -hex 32"), "{err}");
        let err =
            tokens_from_config(vec![entry("a-token-of-the-site-1", "client"), entry("a-token-of-the-site-1", "admin")])
                .unwrap_err();
        assert!(err.contains("entries 0 and 1 have the same token"), "{err}");
        assert!(
            tokens_from_config(vec![
                entry("a-token-of-the-site-1", "client"),
                entry("a-token-of-the-site-2", "worker")
            ])
            .is_ok()
        );
    }

    #[test]
    fn roles_follow_tokens() {
        let t = Tokens::new([("c".to_string(), vec![Role::Client]), ("w".to_string(), vec![Role::Worker])]);
        assert_eq!(t.roles(Some("Bearer c")), Ok(Roles(vec![Role::Client])));
        assert_eq!(t.roles(Some("Bearer x")), Err(AuthError::Unknown));
        assert_eq!(t.roles(None), Err(AuthError::Missing));
        assert_eq!(t.roles(Some("c")), Err(AuthError::Missing));
        let mut req = tonic::Request::new(());
        req.extensions_mut().insert(Roles(vec![Role::Worker]));
        assert!(require(&req, Role::Worker, "Register").is_ok());
        let err = require(&req, Role::Client, "Allocate").unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(err.message().contains("'client'"));
        assert!(Tokens::Open.roles(None).is_ok());
    }
}
