//! `GET /api/admin/migrations` (behind `--admin-token`): the client
//! migrations this server hands out and every client's last report on
//! each; and the per-client summary `GET /api/admin/clients` shows.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use crate::schema_migrations::catalog::{reports, ClientReport};
use crate::state::AppState;

pub(crate) fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/api/admin/migrations", get(list))
        .with_state(state)
}

#[derive(Serialize)]
struct Stored {
    version: i64,
    name: String,
    rolled_back: bool,
}

#[derive(Serialize)]
struct Answer {
    /// The client schema version replicas are brought to.
    schema_version: i64,
    migrations: Vec<Stored>,
    clients: Vec<ClientReport>,
}

async fn list(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(refused) = super::admin::authorize(&state, &headers) {
        return refused;
    }
    let catalog = state.client_catalog.borrow().clone();
    let clients = match read_reports(&state).await {
        Ok(clients) => clients,
        Err(refused) => return refused,
    };
    Json(Answer {
        schema_version: catalog.current(),
        migrations: catalog
            .entries()
            .map(|(version, name, rolled_back)| Stored {
                version,
                name: name.to_owned(),
                rolled_back,
            })
            .collect(),
        clients,
    })
    .into_response()
}

#[allow(clippy::result_large_err)] // built once per failed request
async fn read_reports(state: &AppState) -> Result<Vec<ClientReport>, Response> {
    let failed = |e: crate::ServerError| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"code": "database_unavailable", "message": e.to_string()})),
        )
            .into_response()
    };
    let client = state.log_reader.client().await.map_err(failed)?;
    reports(&client).await.map_err(failed)
}

/// A client's migrations in one line of `admin clients`.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct ClientSchema {
    /// The newest client migration it reported applied.
    pub(crate) schema_version: i64,
    /// Migrations whose last attempt failed, with the error.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) failed_migrations: Vec<FailedMigration>,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct FailedMigration {
    pub(crate) version: i64,
    pub(crate) attempts: i32,
    pub(crate) error: String,
}

/// Per client id; empty when the reports cannot be read (the client list
/// is still worth answering).
pub(crate) async fn by_client(state: &AppState) -> BTreeMap<String, ClientSchema> {
    let mut out: BTreeMap<String, ClientSchema> = BTreeMap::new();
    let Ok(all) = read_reports(state).await else {
        return out;
    };
    for r in all {
        let entry = out.entry(r.client_id.clone()).or_default();
        match r.state.as_str() {
            "applied" => entry.schema_version = entry.schema_version.max(r.version),
            "failed" => entry.failed_migrations.push(FailedMigration {
                version: r.version,
                attempts: r.attempts,
                error: r.error.unwrap_or_default(),
            }),
            _ => {}
        }
    }
    out
}
