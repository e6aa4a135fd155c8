//! Docker as a source: the containers this pipeline owns (by label), listed on every connect,
//! after every container event, and on a reconcile tick. A controller restart in the middle
//! of a scale-out thus adopts what is pending instead of starting it again.

use std::collections::HashMap;
use std::pin::Pin;
use std::time::Duration;

use bollard::models::{ContainerSummary, ContainerSummaryStateEnum, EventMessage};
use bollard::query_parameters::{EventsOptionsBuilder, ListContainersOptionsBuilder};
use bollard::Docker;
use futures::{FutureExt, Stream, StreamExt};

use crate::fleet::topology::{ContainerState, OwnedContainer};

use crate::contract::labels::{LABEL_PIPELINE, LABEL_SERVER};

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("cannot reach the Docker engine at {socket}: {source}")]
    Connect {
        socket: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("cannot list containers on the Docker engine at {socket}: {source}")]
    List {
        socket: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("the Docker event stream from {socket} ended")]
    EventsEnded { socket: String },
}

/// Connects to the engine's unix socket and agrees on an API version it speaks.
pub async fn connect(socket: &str) -> Result<Docker, DockerError> {
    let err = |source| DockerError::Connect {
        socket: socket.to_string(),
        source,
    };
    let docker =
        Docker::connect_with_unix(socket, 60, bollard::API_DEFAULT_VERSION).map_err(err)?;
    docker.negotiate_version().await.map_err(err)
}

/// The containers labelled as `pipeline`'s, every state included.
pub async fn list_owned(
    docker: &Docker,
    socket: &str,
    pipeline: &str,
) -> Result<Vec<ContainerSummary>, DockerError> {
    let filters = HashMap::from([("label", vec![format!("{LABEL_PIPELINE}={pipeline}")])]);
    docker
        .list_containers(Some(
            ListContainersOptionsBuilder::new()
                .all(true)
                .filters(&filters)
                .build(),
        ))
        .await
        .map_err(|source| DockerError::List {
            socket: socket.to_string(),
            source,
        })
}

/// What decisions need of an owned container; `None` without a server label.
pub fn owned_container(c: &ContainerSummary) -> Option<OwnedContainer> {
    let server = c.labels.as_ref()?.get(LABEL_SERVER)?;
    let state = match c.state {
        Some(ContainerSummaryStateEnum::RUNNING | ContainerSummaryStateEnum::PAUSED) => {
            ContainerState::Running
        }
        Some(ContainerSummaryStateEnum::CREATED | ContainerSummaryStateEnum::RESTARTING) => {
            ContainerState::Starting
        }
        _ => ContainerState::Stopped,
    };
    Some(OwnedContainer {
        server: server.as_str().into(),
        state,
        created_s: c.created.unwrap_or(0),
    })
}

type Events = Pin<Box<dyn Stream<Item = Result<EventMessage, bollard::errors::Error>> + Send>>;

enum State {
    Connecting,
    Live {
        docker: Docker,
        events: Events,
        tick: tokio::time::Interval,
    },
}

struct Ctx {
    socket: String,
    pipeline: String,
    reconcile: Duration,
}

async fn snapshot(docker: &Docker, ctx: &Ctx) -> Result<Vec<OwnedContainer>, DockerError> {
    let mut v: Vec<OwnedContainer> = list_owned(docker, &ctx.socket, &ctx.pipeline)
        .await?
        .iter()
        .filter_map(owned_container)
        .collect();
    v.sort_by(|a, b| a.server.cmp(&b.server));
    v.dedup_by(|a, b| a.server == b.server);
    Ok(v)
}

async fn step(state: State, ctx: &Ctx) -> (Result<Vec<OwnedContainer>, DockerError>, State) {
    match state {
        State::Connecting => {
            let docker = match connect(&ctx.socket).await {
                Ok(d) => d,
                Err(e) => return (Err(e), State::Connecting),
            };
            // Subscribe before listing, so no event falls between the two.
            let filters = HashMap::from([
                ("type", vec!["container".to_string()]),
                ("label", vec![format!("{LABEL_PIPELINE}={}", ctx.pipeline)]),
            ]);
            let events: Events = Box::pin(
                docker.events(Some(EventsOptionsBuilder::new().filters(&filters).build())),
            );
            match snapshot(&docker, ctx).await {
                Ok(list) => {
                    let mut tick = tokio::time::interval(ctx.reconcile);
                    tick.reset();
                    (
                        Ok(list),
                        State::Live {
                            docker,
                            events,
                            tick,
                        },
                    )
                }
                Err(e) => (Err(e), State::Connecting),
            }
        }
        State::Live {
            docker,
            mut events,
            mut tick,
        } => {
            tokio::select! {
                ev = events.next() => match ev {
                    Some(Ok(_)) => {
                        // Coalesce a burst of events into one listing.
                        while let Some(Some(Ok(_))) = events.next().now_or_never() {}
                    }
                    Some(Err(source)) => {
                        return (Err(DockerError::Connect { socket: ctx.socket.clone(), source }), State::Connecting)
                    }
                    None => return (Err(DockerError::EventsEnded { socket: ctx.socket.clone() }), State::Connecting),
                },
                _ = tick.tick() => {}
            }
            match snapshot(&docker, ctx).await {
                Ok(list) => (
                    Ok(list),
                    State::Live {
                        docker,
                        events,
                        tick,
                    },
                ),
                Err(e) => (Err(e), State::Connecting),
            }
        }
    }
}

/// Streams the owned containers of `pipeline` each time they may have changed.
pub fn stream(
    socket: &str,
    pipeline: &str,
    reconcile: Duration,
) -> impl Stream<Item = Result<Vec<OwnedContainer>, DockerError>> {
    let ctx = Ctx {
        socket: socket.to_string(),
        pipeline: pipeline.to_string(),
        reconcile,
    };
    futures::stream::unfold((State::Connecting, ctx), |(state, ctx)| async move {
        let (item, next) = step(state, &ctx).await;
        Some((item, (next, ctx)))
    })
}
