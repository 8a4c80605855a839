//! The local API's bearer token (proto-notes/security.md): when the agent
//! has one, every request must carry `Authorization: Bearer <token>`; a
//! request without it, or with another, is answered 401 before any handler
//! runs. `GET /v1/health` without the header is the one exception: it
//! answers `{"ok": bool}` and nothing else, for service managers and load
//! balancers.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use crate::keys::ApiToken;
use crate::limits::{Log, LogOnce};
use crate::node::Node;

/// The token requests are checked against (none: the API is open to
/// whoever reaches it, as on loopback by default), and the log-once
/// memory of refused addresses.
pub struct ApiAuth {
    token: Option<ApiToken>,
    log: Mutex<LogOnce>,
}

impl ApiAuth {
    pub fn new(token: Option<ApiToken>) -> Self {
        ApiAuth {
            token,
            log: Mutex::new(LogOnce::default()),
        }
    }

    /// No token: every request passes (a loopback API without
    /// `api_token_file`).
    pub fn open() -> Self {
        Self::new(None)
    }

    pub fn token(&self) -> Option<&ApiToken> {
        self.token.as_ref()
    }

    /// Summaries of the refusals since the last line, per address; call
    /// about once a minute.
    pub fn maintain(&self) {
        let due = match self.log.lock() {
            Ok(mut l) => l.due(Instant::now()),
            Err(_) => return,
        };
        for s in due {
            tracing::warn!(
                remote = %s.who,
                count = s.count,
                "API requests refused again for a missing or wrong token since the last report \
                 (counted in riftmesh_api_errors_total{{code=\"401\"}})"
            );
        }
    }

    /// Log the first refusal per remote address; count the rest for
    /// [`ApiAuth::maintain`].
    fn note_refusal(&self, remote: &str, why: &'static str) {
        let first = match self.log.lock() {
            Ok(mut l) => l.note(remote, "api_token", Instant::now()) == Log::First,
            Err(_) => false,
        };
        if first {
            tracing::warn!(
                remote,
                why,
                "API request refused: no valid token (logged once per address; every refusal \
                 is counted in riftmesh_api_errors_total{{code=\"401\"}})"
            );
        }
    }
}

/// What the middleware needs: the node (for the open health answer) and
/// the token.
#[derive(Clone)]
pub(super) struct AuthState {
    pub node: Arc<Node>,
    pub auth: Arc<ApiAuth>,
}

/// The token in an `Authorization` value: `Bearer <token>` (the scheme in
/// any case, RFC 7235).
fn bearer(v: &HeaderValue) -> Option<&[u8]> {
    let b = v.as_bytes();
    let (scheme, rest) = b.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let t = rest.trim_ascii();
    (!t.is_empty()).then_some(t)
}

fn unauthorized(message: &str) -> Response {
    let mut r = ApiError::new(StatusCode::UNAUTHORIZED, message).into_response();
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"riftmesh\""),
    );
    r
}

const MISSING: &str = "this agent's API needs a token (it is not on loopback, or api_token_file \
    is set): send `Authorization: Bearer <token>` with the content of the agent's token file \
    (its api_token_file, else api.token in its data directory); the CLI takes --api-token-file \
    or RIFTMESH_API_TOKEN_FILE, the Python client token= or RIFTMESH_API_TOKEN_FILE";
const MALFORMED: &str =
    "the Authorization header must be `Bearer <token>`, once, with the content of the agent's \
     token file";
const WRONG: &str = "wrong API token: send the content of the agent's token file (its \
    api_token_file, else api.token in its data directory)";

pub(super) async fn check_token(
    State(st): State<AuthState>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(token) = st.auth.token() else {
        return next.run(req).await;
    };
    let mut given = req.headers().get_all(header::AUTHORIZATION).iter();
    let why = match (given.next(), given.next()) {
        (None, _) => {
            // Open, but says nothing beyond up or not.
            if req.uri().path() == "/v1/health"
                && (req.method() == Method::GET || req.method() == Method::HEAD)
            {
                return super::cluster::health_open(&st.node).into_response();
            }
            "missing"
        }
        (Some(v), None) => match bearer(v) {
            Some(t) if token.matches(t) => return next.run(req).await,
            Some(_) => "wrong",
            None => "malformed",
        },
        (Some(_), Some(_)) => "malformed",
    };
    let remote = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or_else(|| "unknown".to_string(), |c| c.0.ip().to_string());
    st.auth.note_refusal(&remote, why);
    unauthorized(match why {
        "missing" => MISSING,
        "wrong" => WRONG,
        _ => MALFORMED,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_takes_the_scheme_in_any_case_and_nothing_else() {
        let v = |s: &'static str| HeaderValue::from_static(s);
        assert_eq!(bearer(&v("Bearer abc")), Some(&b"abc"[..]));
        assert_eq!(bearer(&v("bearer  abc ")), Some(&b"abc"[..]));
        assert_eq!(bearer(&v("BEARER abc")), Some(&b"abc"[..]));
        for bad in ["Basic abc", "Bearer", "Bearer ", "Bearerabc", "abc", ""] {
            assert_eq!(bearer(&v(bad)), None, "{bad:?}");
        }
    }

    #[test]
    fn a_token_matches_itself_only() {
        let t = ApiToken::new("0123456789abcdef0123", "x".into());
        assert!(t.matches(b"0123456789abcdef0123"));
        for other in [
            &b"0123456789abcdef012"[..],
            b"0123456789abcdef01234",
            b"0123456789abcdef0124",
            b"",
        ] {
            assert!(!t.matches(other));
        }
    }
}
