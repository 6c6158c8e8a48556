//! Triton's model repository extension, protocol-neutral: the load and
//! unload requests HTTP and gRPC both forward here. Loads run off the async
//! runtime (engine loading and warm-up block) and answer once the model
//! serves or its load failed.

use crate::AppState;
use crate::error::ServeError;
use crate::registry::ControlMode;

fn explicit_only(state: &AppState, what: &str) -> Result<(), ServeError> {
    let mode = state.registry()?.control().mode;
    if mode != ControlMode::Explicit {
        return Err(ServeError::Invalid(format!(
            "explicit model {what} is not allowed: the server runs with --model-control-mode {} (start it with --model-control-mode explicit)",
            mode.as_str()
        )));
    }
    Ok(())
}

/// Loads or reloads `model`, with `config` (Triton's JSON model
/// configuration) in place of its folder's file when given.
pub(crate) async fn load(
    state: &AppState,
    model: String,
    config: Option<String>,
) -> Result<(), ServeError> {
    explicit_only(state, "load")?;
    let loading = state.clone();
    let name = model.clone();
    tokio::task::spawn_blocking(move || {
        loading
            .registry()?
            .load_model(&name, config.as_deref())
            .map_err(|e| ServeError::Invalid(format!("failed to load '{name}': {e}")))
    })
    .await
    .map_err(|e| ServeError::Internal(format!("the load task failed: {e}")))??;
    forget_cached(state, &model).await;
    Ok(())
}

/// Drops the in-process cached results of a model that was loaded anew:
/// a file replaced under the same version number keeps the cache key
/// (model, version, engine variant), so its old answers must not be
/// served. Redis keeps its entries until their TTL (other replicas may
/// still serve the old file).
pub(crate) async fn forget_cached(state: &AppState, model: &str) {
    if let Some(layer) = &state.cache
        && let Err(error) = layer.cache.clear_model(model, true, false).await
    {
        tracing::warn!(%model, %error, "cannot clear the model's cached results after its load");
    }
}

/// Stops serving `model`; requests it is answering finish first.
pub(crate) async fn unload(state: &AppState, model: String) -> Result<(), ServeError> {
    explicit_only(state, "unload")?;
    let state = state.clone();
    tokio::task::spawn_blocking(move || state.registry()?.unload_model(&model))
        .await
        .map_err(|e| ServeError::Internal(format!("the unload task failed: {e}")))?
}
