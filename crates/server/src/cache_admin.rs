//! Admin endpoints of the result cache, on the HTTP address:
//!
//! * `GET /v2/cache/stats`: hits and misses per tier, hit rate,
//!   coalesced rows, entries, bytes, capacity, Redis state.
//! * `DELETE /v2/cache/models/{model}[?tier=l1|l2|all]`: removes every
//!   cached row of one model (all versions) from memory and/or Redis
//!   (default both).
//!
//! Both need `Authorization: Bearer <token>`: the admin token
//! (`--admin-token`) when one is set, otherwise any token of
//! `--auth-token`/`--auth-token-file` (crate::auth). With neither the
//! routes do not exist.

use axum::Json;
use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};

use crate::AppState;
use crate::error::ServeError;

pub(crate) fn router(state: AppState) -> Router {
    if state.admin_token.is_none() && !state.auth.enabled() {
        return Router::new();
    }
    Router::new()
        .route("/v2/cache/stats", get(stats))
        .route("/v2/cache/models/{model}", delete(clear_model))
        .with_state(state)
}

/// Compares without an early exit, so the time taken says nothing about
/// how much of the token matched.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorise(state: &AppState, headers: &HeaderMap) -> Result<(), ServeError> {
    let Some(token) = &state.admin_token else {
        // No admin token of their own: the inference tokens open them.
        return match state.auth.enabled() {
            true => state.auth.check(headers),
            false => Err(ServeError::Unauthorized("admin endpoints are off".into())),
        };
    };
    let given = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(given) if same(given.as_bytes(), token.as_bytes()) => Ok(()),
        _ => Err(ServeError::Unauthorized(
            "admin endpoints need 'Authorization: Bearer <admin token>'".into(),
        )),
    }
}

async fn stats(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(e) = authorise(&state, &headers) {
        return e.into_response();
    }
    let Some(layer) = &state.cache else {
        return Json(serde_json::json!({ "enabled": false })).into_response();
    };
    layer.cache.sync().await;
    let mut body = serde_json::to_value(layer.cache.stats()).unwrap_or_default();
    if let Some(object) = body.as_object_mut() {
        object.insert("enabled".into(), true.into());
        object.insert("in_flight".into(), layer.in_flight().into());
    }
    Json(body).into_response()
}

async fn clear_model(
    State(state): State<AppState>,
    Path(model): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let result = async {
        authorise(&state, &headers)?;
        let tier = query
            .as_deref()
            .unwrap_or("")
            .split('&')
            .find_map(|pair| pair.strip_prefix("tier="));
        let (l1, l2) = match tier {
            None | Some("all") => (true, true),
            Some("l1") => (true, false),
            Some("l2") => (false, true),
            Some(other) => {
                return Err(ServeError::Invalid(format!(
                    "tier must be l1, l2 or all, not '{other}'"
                )));
            }
        };
        state.registry()?.get(&model)?;
        let Some(layer) = &state.cache else {
            return Ok(
                serde_json::json!({ "model": model, "l1_cleared": false, "l2_cleared": false }),
            );
        };
        match layer.cache.clear_model(&model, l1, l2).await {
            Ok(deleted) => Ok(serde_json::json!({
                "model": model,
                "l1_cleared": l1,
                "l2_cleared": deleted.is_some(),
                "l2_keys_deleted": deleted,
            })),
            Err(error) => Err(ServeError::NotReady(format!(
                "the in-process cache of '{model}' is cleared but Redis could not be: {error}"
            ))),
        }
    }
    .await;
    match result {
        Ok(body) => {
            tracing::info!(%model, "cache cleared by admin request");
            Json(body).into_response()
        }
        Err(e) => e.into_response(),
    }
}
