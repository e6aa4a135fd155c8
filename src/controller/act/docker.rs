//! The Docker scaler (bollard): starts containers for new servers, stops and removes the
//! ones that are reaped or discarded. It only ever touches containers that carry this
//! pipeline's ownership label, looked up by label and acted on by container ID — never by
//! name, so a look-alike container is safe.

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::atomic::{AtomicI64, Ordering};

use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, RemoveContainerOptionsBuilder, StopContainerOptionsBuilder,
};
use bollard::Docker;
use futures::future::BoxFuture;
use rand::Rng;

use super::scaler::{ScaleError, Scaler};
use crate::config::DockerConfig;
use crate::contract::labels::{LABEL_PIPELINE, LABEL_PORT, LABEL_SERVER, LABEL_SERVICE};
use crate::fleet::source::docker::{connect, list_owned};

pub struct DockerScaler {
    cfg: DockerConfig,
    pipeline: String,
    service: String,
    docker: tokio::sync::Mutex<Option<Docker>>,
    stopping: AtomicI64,
}

/// Replaces `{id}` and `{port}`.
pub fn substitute(template: &str, id: &str, port: u16) -> String {
    template
        .replace("{id}", id)
        .replace("{port}", &port.to_string())
}

fn is_not_found_or_done(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404 | 304,
            ..
        }
    )
}

impl DockerScaler {
    pub fn new(cfg: DockerConfig, pipeline: &str, service: &str) -> DockerScaler {
        DockerScaler {
            cfg,
            pipeline: pipeline.to_string(),
            service: service.to_string(),
            docker: tokio::sync::Mutex::new(None),
            stopping: AtomicI64::new(0),
        }
    }

    /// The engine, connected on first use and again after a failure.
    async fn client(&self) -> Result<Docker, String> {
        let mut slot = self.docker.lock().await;
        if let Some(d) = slot.as_ref() {
            return Ok(d.clone());
        }
        let d = connect(&self.cfg.socket).await.map_err(|e| e.to_string())?;
        *slot = Some(d.clone());
        Ok(d)
    }

    async fn forget_client(&self) {
        *self.docker.lock().await = None;
    }

    /// A port of the range that no owned container holds and nothing listens on.
    fn free_port(&self, used: &HashSet<u16>) -> Option<u16> {
        let range = self.cfg.ports.clone();
        let len = u32::from(*range.end() - *range.start()) + 1;
        let offset = rand::rng().random_range(0..len);
        (0..len)
            .map(|i| *range.start() + ((offset + i) % len) as u16)
            .find(|p| {
                !used.contains(p)
                    && (self.cfg.network_mode != "host"
                        || TcpListener::bind(("127.0.0.1", *p)).is_ok())
            })
    }

    async fn start_ids(&self, ids: &[String]) -> Result<(), ScaleError> {
        let count = ids.len() as u32;
        let fail = |message: String| ScaleError::Start { count, message };
        let docker = self.client().await.map_err(fail)?;
        let owned = list_owned(&docker, &self.cfg.socket, &self.pipeline)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let mut used: HashSet<u16> = owned
            .iter()
            .filter_map(|c| c.labels.as_ref()?.get(LABEL_PORT)?.parse().ok())
            .collect();
        for id in ids.iter().take(self.cfg.max_per_round as usize) {
            // An earlier attempt at this action got as far as creating it: adopt it.
            let existing = owned
                .iter()
                .find(|c| c.labels.as_ref().and_then(|l| l.get(LABEL_SERVER)) == Some(id));
            if let Some(c) = existing {
                let created = c.state == Some(bollard::models::ContainerSummaryStateEnum::CREATED);
                if let (true, Some(cid)) = (created, c.id.as_deref()) {
                    docker
                        .start_container(cid, None)
                        .await
                        .map_err(|e| fail(format!("start {id}: {e}")))?;
                }
                tracing::info!(pipeline = %self.pipeline, server = %id, "container adopted from an earlier attempt");
                continue;
            }
            let port = self
                .free_port(&used)
                .ok_or_else(|| fail(format!("no free port left in {:?}", self.cfg.ports)))?;
            used.insert(port);
            let id = id.clone();
            let mut labels = self.cfg.labels.clone();
            labels.insert(LABEL_PIPELINE.into(), self.pipeline.clone());
            labels.insert(LABEL_SERVICE.into(), self.service.clone());
            labels.insert(LABEL_SERVER.into(), id.clone());
            labels.insert(LABEL_PORT.into(), port.to_string());
            let body = ContainerCreateBody {
                image: Some(self.cfg.image.clone()),
                cmd: (!self.cfg.command.is_empty()).then(|| {
                    self.cfg
                        .command
                        .iter()
                        .map(|a| substitute(a, &id, port))
                        .collect()
                }),
                env: Some(
                    self.cfg
                        .env
                        .iter()
                        .map(|(k, v)| format!("{k}={}", substitute(v, &id, port)))
                        .collect(),
                ),
                labels: Some(labels.into_iter().collect()),
                host_config: Some(HostConfig {
                    network_mode: Some(self.cfg.network_mode.clone()),
                    ..HostConfig::default()
                }),
                ..ContainerCreateBody::default()
            };
            let created = docker
                .create_container(
                    Some(CreateContainerOptionsBuilder::new().name(&id).build()),
                    body,
                )
                .await
                .map_err(|e| fail(format!("create {id} from {}: {e}", self.cfg.image)))?;
            if let Err(e) = docker.start_container(&created.id, None).await {
                let _ = docker
                    .remove_container(
                        &created.id,
                        Some(RemoveContainerOptionsBuilder::new().force(true).build()),
                    )
                    .await;
                return Err(fail(format!("start {id}: {e}")));
            }
            tracing::info!(pipeline = %self.pipeline, server = %id, port, image = %self.cfg.image, "container started");
        }
        Ok(())
    }

    /// Stops (with the grace period) and removes the owned container of `server`.
    async fn stop_remove(&self, server: &str) -> Result<(), ScaleError> {
        let fail = |message: String| ScaleError::Reap {
            server: server.to_string(),
            message,
        };
        let docker = self.client().await.map_err(fail)?;
        let owned = list_owned(&docker, &self.cfg.socket, &self.pipeline)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let mine: Vec<String> = owned
            .iter()
            .filter(|c| {
                c.labels
                    .as_ref()
                    .and_then(|l| l.get(LABEL_SERVER))
                    .map(String::as_str)
                    == Some(server)
            })
            .filter_map(|c| c.id.clone())
            .collect();
        if mine.is_empty() {
            return Err(fail(format!(
                "no container labelled as pipeline {}'s runs it",
                self.pipeline
            )));
        }
        self.stopping.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!(crate::telemetry::CONTAINERS, "pipeline" => self.pipeline.clone(), "state" => "stopping")
            .set(self.stopping.load(Ordering::Relaxed) as f64);
        let grace = self.cfg.stop_grace.as_secs().max(1) as i32;
        let mut result = Ok(());
        for id in mine {
            if let Err(e) = docker
                .stop_container(
                    &id,
                    Some(StopContainerOptionsBuilder::new().t(grace).build()),
                )
                .await
            {
                if !is_not_found_or_done(&e) {
                    result = Err(fail(format!("stop: {e}")));
                    continue;
                }
            }
            if let Err(e) = docker
                .remove_container(
                    &id,
                    Some(RemoveContainerOptionsBuilder::new().force(true).build()),
                )
                .await
            {
                if !is_not_found_or_done(&e) {
                    result = Err(fail(format!("remove: {e}")));
                }
            }
        }
        self.stopping.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!(crate::telemetry::CONTAINERS, "pipeline" => self.pipeline.clone(), "state" => "stopping")
            .set(self.stopping.load(Ordering::Relaxed) as f64);
        if result.is_ok() {
            tracing::info!(pipeline = %self.pipeline, server, "container stopped and removed");
        }
        result
    }
}

impl Scaler for DockerScaler {
    fn stop_grace(&self) -> std::time::Duration {
        self.cfg.stop_grace
    }

    fn new_ids(&self, count: u32) -> Vec<String> {
        (0..count.min(self.cfg.max_per_round))
            .map(|_| {
                format!(
                    "{}{:06x}",
                    self.cfg.name_prefix,
                    rand::rng().random_range(0..0x100_0000u32)
                )
            })
            .collect()
    }

    fn start<'a>(&'a self, ids: &'a [String]) -> BoxFuture<'a, Result<(), ScaleError>> {
        Box::pin(async move {
            let r = self.start_ids(ids).await;
            if r.is_err() {
                self.forget_client().await;
            }
            r
        })
    }

    fn reap<'a>(&'a self, server: &'a str) -> BoxFuture<'a, Result<(), ScaleError>> {
        Box::pin(self.stop_remove(server))
    }

    fn discard<'a>(&'a self, server: &'a str) -> BoxFuture<'a, Result<(), ScaleError>> {
        Box::pin(self.stop_remove(server))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_replaced_everywhere() {
        assert_eq!(
            substitute("--id={id} --listen 127.0.0.1:{port} {id}", "ws-1", 20001),
            "--id=ws-1 --listen 127.0.0.1:20001 ws-1"
        );
        assert_eq!(substitute("plain", "x", 1), "plain");
    }
}
