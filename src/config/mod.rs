//! Pipeline files: parsed, overridden from the environment, checked (every error at once,
//! each naming the file and key) and compiled into typed configuration.

//!
//! The steps, each in its own file: [`raw`] is the file as written (serde, with the defaults
//! taken from the typed configs' `Default`, so each default is written once); `schema`
//! checks keys and types and applies `REBALANCER_*` overrides; `compile` turns each section
//! into typed configuration ([`gateway`] and [`docker`] hold their sections' types and
//! compilers); `checker` collects the errors.

mod checker;
mod compile;
pub mod decide;
pub mod docker;
pub mod gateway;
pub mod raw;
mod schema;

use crate::contract::tls::{ConsulEndpoint, RedisEndpoint, TlsFiles};
use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use checker::Checker;
use decide::DecideConfig;
use raw::RawPipeline;
use schema::{apply_env, check_tree, env_name, leaves, schema};

pub use docker::DockerConfig;
pub use gateway::{gateway_env_aliases, GatewayConfig, Limits};

/// Prefix of the environment variables that override pipeline keys.
pub const ENV_PREFIX: &str = "REBALANCER_";

/// One thing wrong with one key of one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(f, "{}: {}: {}", self.file.display(), self.key, self.message)
        }
    }
}

/// Every error found in the files given, in file order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// A validated pipeline.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineConfig {
    pub file: PathBuf,
    pub name: String,
    pub service: String,
    pub dry_run: bool,
    pub consul: ConsulConfig,
    pub redis: RedisConfig,
    pub debounce: DebounceConfig,
    pub decide: DecideConfig,
    pub command_ttl: Duration,
    pub leader_session_ttl: Duration,
    pub metrics_listen: SocketAddr,
    pub docker: Option<DockerConfig>,
    pub gateway: GatewayConfig,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ConsulConfig {
    /// Base address without a trailing slash, e.g. `http://127.0.0.1:8500`.
    pub address: String,
    pub token: Option<crate::contract::secret::Secret>,
    /// `consul.ca_file`, `consul.client_cert`, `consul.client_key`, else `CONSUL_CACERT`,
    /// `CONSUL_CLIENT_CERT`, `CONSUL_CLIENT_KEY`.
    pub tls: TlsFiles,
    pub wait: Duration,
}

impl ConsulConfig {
    /// Where and how to reach Consul, for [`crate::contract::consul::Consul::connect`].
    pub fn endpoint(&self) -> ConsulEndpoint {
        ConsulEndpoint {
            address: self.address.clone(),
            token: self.token.clone(),
            tls: self.tls.clone(),
        }
    }
}

#[derive(Clone, PartialEq)]
pub struct RedisConfig {
    pub url: String,
    /// `redis.username`, else `REDIS_USERNAME`, else the URL's.
    pub username: Option<String>,
    /// `redis.password`, else `REDIS_PASSWORD`, else the URL's.
    pub password: Option<crate::contract::secret::Secret>,
    /// `redis.ca_file`, `redis.client_cert`, `redis.client_key`, else `REDIS_CACERT`,
    /// `REDIS_CLIENT_CERT`, `REDIS_CLIENT_KEY`.
    pub tls: TlsFiles,
    pub reconcile: Duration,
    /// How long a count lives in Redis (servers set it with this TTL): while the sessions
    /// source is down for longer, no count read before is believed.
    pub count_ttl: Duration,
}

/// Shown with the URL's password redacted.
impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &crate::contract::secret::redact_url(&self.url))
            .field("username", &self.username)
            .field("password", &self.password)
            .field("tls", &self.tls)
            .field("reconcile", &self.reconcile)
            .field("count_ttl", &self.count_ttl)
            .finish()
    }
}

impl RedisConfig {
    /// Where and how to reach Redis, for [`RedisEndpoint::client`].
    pub fn endpoint(&self) -> RedisEndpoint {
        RedisEndpoint {
            url: self.url.clone(),
            username: self.username.clone(),
            password: self.password.clone(),
            tls: self.tls.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DebounceConfig {
    pub quiet: Duration,
    pub max_delay: Duration,
}

/// The pipeline name and the Consul service when a file names none.
pub const DEFAULT_NAME: &str = "ws";
/// How long a command stays valid after it is issued (`rebalance.command_ttl`).
pub const DEFAULT_COMMAND_TTL: Duration = Duration::from_secs(10);
/// TTL of the leader lock's Consul session (`leader.session_ttl`).
pub const DEFAULT_LEADER_SESSION_TTL: Duration = Duration::from_secs(15);
/// Where `/metrics` and the topology feed are served (`metrics.listen`).
pub const DEFAULT_METRICS_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9464);

impl Default for ConsulConfig {
    fn default() -> Self {
        ConsulConfig {
            address: "http://127.0.0.1:8500".into(),
            token: None,
            tls: TlsFiles::default(),
            wait: Duration::from_secs(300),
        }
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379/0".into(),
            username: None,
            password: None,
            tls: TlsFiles::default(),
            // At most half a round interval (15 s): no count is older than that at a round.
            reconcile: Duration::from_secs(7),
            // The agent's: `SET … PX` three report intervals of 1 s.
            count_ttl: Duration::from_secs(3),
        }
    }
}

impl Default for DebounceConfig {
    fn default() -> Self {
        DebounceConfig {
            quiet: Duration::from_millis(200),
            max_delay: Duration::from_secs(1),
        }
    }
}

/// Every overridable key as `(dotted.key, ENV_NAME)`, in file order, for docs and `--help`.
pub fn env_overrides() -> Vec<(String, String)> {
    let mut out = Vec::new();
    leaves(&schema(), &mut Vec::new(), &mut |path, _| {
        out.push((path.join("."), env_name(path)));
    });
    out
}

/// Reads, overrides from `env`, checks and compiles the given files. All errors of all files
/// come back together; duplicate pipeline names across files are an error too.
pub fn load_all<P: AsRef<Path>>(
    paths: &[P],
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<PipelineConfig>, ConfigErrors> {
    let mut errors = Vec::new();
    let mut out = Vec::new();
    for p in paths {
        let p = p.as_ref();
        match std::fs::read_to_string(p) {
            Ok(text) => match parse(p, &text, env) {
                Ok(c) => out.push(c),
                Err(mut e) => errors.append(&mut e.0),
            },
            Err(e) => errors.push(ConfigError {
                file: p.to_path_buf(),
                key: String::new(),
                message: format!("cannot read the file: {e}"),
            }),
        }
    }
    let mut seen = BTreeSet::new();
    for c in &out {
        if !seen.insert(c.name.clone()) {
            errors.push(ConfigError {
                file: c.file.clone(),
                key: "name".into(),
                message: format!("pipeline name {:?} is used by another file", c.name),
            });
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// The process environment, for [`load_all`].
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Parses one file's text (the file name is only for messages).
pub fn parse(
    file: &Path,
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<PipelineConfig, ConfigErrors> {
    let mut ck = Checker {
        file,
        errors: Vec::new(),
    };
    let mut value: toml::Table = match text.parse() {
        Ok(v) => v,
        Err(e) => {
            ck.err("", format!("not valid TOML: {}", e.to_string().trim()));
            return Err(ConfigErrors(ck.errors));
        }
    };
    let schema = schema();
    check_tree(&schema, &mut value, &mut Vec::new(), &mut ck);
    apply_env(&schema, &mut value, env, &mut ck);
    let raw: RawPipeline = match toml::Value::Table(value).try_into() {
        Ok(r) => r,
        Err(e) => {
            ck.err("", e.to_string().trim().to_string());
            return Err(ConfigErrors(ck.errors));
        }
    };
    let mut cfg = compile::compile(raw, &mut ck);
    // What the file (or REBALANCER_*) leaves unset comes from the variables the services'
    // own tools read.
    let consul_env = ConsulEndpoint::from_env(&cfg.consul.address, env);
    cfg.consul.token = cfg.consul.token.take().or(consul_env.token);
    cfg.consul.tls = std::mem::take(&mut cfg.consul.tls).or(consul_env.tls);
    let redis_env = RedisEndpoint::from_env(&cfg.redis.url, env);
    cfg.redis.username = cfg.redis.username.take().or(redis_env.username);
    cfg.redis.password = cfg.redis.password.take().or(redis_env.password);
    cfg.redis.tls = std::mem::take(&mut cfg.redis.tls).or(redis_env.tls);
    if ck.errors.is_empty() {
        Ok(cfg)
    } else {
        Err(ConfigErrors(ck.errors))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn errors(text: &str) -> Vec<String> {
        parse(Path::new("p.toml"), text, &no_env)
            .err()
            .map(|e| e.0.iter().map(std::string::ToString::to_string).collect())
            .unwrap_or_default()
    }

    #[test]
    fn an_empty_file_compiles_to_the_typed_defaults_every_section_defines_once() {
        let c = parse(Path::new("p.toml"), "", &no_env).unwrap();
        assert_eq!(
            (c.name.as_str(), c.service.as_str()),
            (DEFAULT_NAME, DEFAULT_NAME)
        );
        assert_eq!(c.consul, ConsulConfig::default());
        assert_eq!(c.redis, RedisConfig::default());
        assert_eq!(c.debounce, DebounceConfig::default());
        assert_eq!(c.decide, DecideConfig::default());
        assert_eq!(c.command_ttl, DEFAULT_COMMAND_TTL);
        assert_eq!(c.leader_session_ttl, DEFAULT_LEADER_SESSION_TTL);
        assert_eq!(c.metrics_listen, DEFAULT_METRICS_LISTEN);
        assert_eq!(c.gateway, GatewayConfig::default());
        let d = parse(
            Path::new("p.toml"),
            "[scale.docker]\nimage = \"i\"\n",
            &no_env,
        )
        .unwrap()
        .docker
        .unwrap();
        let want = DockerConfig {
            image: "i".into(),
            name_prefix: "ws-".into(),
            ..DockerConfig::default()
        };
        assert_eq!(d, want);
    }

    #[test]
    fn the_shipped_default_pipeline_file_says_what_an_empty_one_means() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/default.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let shipped = parse(&path, &text, &no_env).unwrap();
        let empty = parse(&path, "", &no_env).unwrap();
        assert_eq!(shipped, empty);
    }

    #[test]
    fn an_empty_file_gives_the_documented_defaults() {
        let c = parse(Path::new("p.toml"), "", &no_env).unwrap();
        assert_eq!(c.name, "ws");
        assert_eq!(c.consul.address, "http://127.0.0.1:8500");
        assert_eq!(c.debounce.quiet, Duration::from_millis(200));
        assert_eq!(c.decide.rebalance.round_interval, Duration::from_secs(15));
        assert_eq!(c.decide.scale.scale_out_at, 0.70);
        assert_eq!(c.metrics_listen.port(), 9464);
    }

    #[test]
    fn every_unknown_key_and_bad_value_is_reported_at_once() {
        let errs = errors(
            r#"
            nmae = "x"
            [rebalance]
            tolerance = "lots"
            shed_fraction = 0
            round_interval = "soon"
            [scale]
            scale_in_at = 0.8
            colour = "red"
            "#,
        );
        let all = errs.join("\n");
        assert!(all.contains("p.toml: nmae: unknown key"), "{all}");
        assert!(
            all.contains("p.toml: rebalance.tolerance: expected a number, found a string"),
            "{all}"
        );
        assert!(all.contains("p.toml: scale.colour: unknown key"), "{all}");
        assert!(
            all.contains("rebalance.shed_fraction: 0 is outside (0, 1]"),
            "{all}"
        );
        assert!(
            all.contains("rebalance.round_interval: \"soon\" is not a duration"),
            "{all}"
        );
        assert!(
            all.contains("scale.scale_in_at: 0.8 must be below scale.scale_out_at"),
            "{all}"
        );
        assert_eq!(errs.len(), 6, "{all}");
    }

    #[test]
    fn integers_are_accepted_where_numbers_are_expected() {
        let c = parse(
            Path::new("p.toml"),
            "[rebalance]\nshed_fraction = 1\n",
            &no_env,
        )
        .unwrap();
        assert_eq!(c.decide.rebalance.shed_fraction, 1.0);
    }

    #[test]
    fn environment_variables_override_the_file_and_bad_ones_name_the_variable() {
        let env = |k: &str| match k {
            "REBALANCER_REDIS_URL" => Some("redis://127.0.0.1:7000/2".to_string()),
            "REBALANCER_DRY_RUN" => Some("true".to_string()),
            "REBALANCER_SCALE_MIN_SERVERS" => Some("3".to_string()),
            _ => None,
        };
        let c = parse(Path::new("p.toml"), "dry_run = false\n", &env).unwrap();
        assert_eq!(c.redis.url, "redis://127.0.0.1:7000/2");
        assert!(c.dry_run);
        assert_eq!(c.decide.scale.min_servers, 3);

        let bad = |k: &str| (k == "REBALANCER_REBALANCE_MAX_SHED").then(|| "many".to_string());
        let e = parse(Path::new("p.toml"), "", &bad)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(
                "rebalance.max_shed: environment variable REBALANCER_REBALANCE_MAX_SHED=\"many\""
            ),
            "{e}"
        );
    }

    #[test]
    fn the_override_list_names_every_key() {
        let names: Vec<String> = env_overrides().into_iter().map(|(_, e)| e).collect();
        assert!(names.contains(&"REBALANCER_CONSUL_ADDRESS".to_string()));
        assert!(names.contains(&"REBALANCER_SCALE_SCALE_OUT_AT".to_string()));
        assert!(names.contains(&"REBALANCER_METRICS_LISTEN".to_string()));
    }

    #[test]
    fn a_docker_section_is_checked_and_its_maps_are_free_form() {
        let c = parse(
            Path::new("p.toml"),
            "[scale.docker]\nimage = \"srv:1\"\ncommand = [\"demo-server\", \"--id\", \"{id}\"]\n\
             env = { PORT = \"{port}\" }\nlabels = { team = \"a\" }\n",
            &no_env,
        )
        .unwrap();
        let d = c.docker.unwrap();
        assert_eq!(d.socket, "/var/run/docker.sock");
        assert_eq!(d.name_prefix, "ws-");
        assert_eq!(d.ports, 20000..=20999);
        assert_eq!(
            c.decide.scale.provision_timeout,
            Some(Duration::from_secs(60))
        );
        assert!(
            parse(Path::new("p.toml"), "", &no_env)
                .unwrap()
                .docker
                .is_none(),
            "no section, no containers"
        );

        let errs = errors(
            "[scale.docker]\nhost = \"tcp://x\"\nport_range = \"9-1\"\ncommand = [\"{name}\"]\n\
             labels = { \"rebalancer.pipeline\" = \"x\", n = 3 }\nimgae = \"x\"\n",
        );
        let all = errs.join("\n");
        for want in [
            "scale.docker.imgae: unknown key",
            "scale.docker.labels.n: expected a string",
            "scale.docker.host: \"tcp://x\" must be a unix socket",
            "scale.docker.image: is required",
            "scale.docker.port_range: \"9-1\" is not a range",
            "scale.docker.labels.rebalancer.pipeline: labels under rebalancer. are reserved",
            "scale.docker.command[0]: unknown placeholder {name}",
        ] {
            assert!(all.contains(want), "missing {want:?} in\n{all}");
        }
    }

    #[test]
    fn the_gateway_section_has_defaults_and_takes_the_rust_balancers_variable_names() {
        let c = parse(Path::new("p.toml"), "", &no_env).unwrap();
        assert_eq!(c.gateway.listen.port(), 8080);
        assert_eq!(c.gateway.cache_paths, vec!["/static/".to_string()]);
        let env = |k: &str| match k {
            "HOST_PORT_HTTP_BALANCER" => Some("9090".to_string()),
            "CACHE_CAPACITY" => Some("5".to_string()),
            "REQUEST_TIMEOUT" => Some("7".to_string()),
            "TARGET_PORT" => Some("9001".to_string()),
            _ => None,
        };
        let aliased = |k: &str| gateway_env_aliases(&env, k);
        let c = parse(Path::new("p.toml"), "", &aliased).unwrap();
        assert_eq!(c.gateway.listen.to_string(), "127.0.0.1:9090");
        assert_eq!(c.gateway.cache_capacity, 5);
        assert_eq!(c.gateway.request_timeout, Duration::from_secs(7));
        assert_eq!(c.gateway.target_port, Some(9001));
        let bad = |k: &str| {
            gateway_env_aliases(
                &|k2: &str| (k2 == "REQUEST_TIMEOUT").then(|| "soon".to_string()),
                k,
            )
        };
        let e = parse(Path::new("p.toml"), "", &bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("gateway.request_timeout"), "{e}");
    }

    #[test]
    fn the_gateways_limits_have_their_documented_defaults_and_are_checked() {
        let c = parse(Path::new("p.toml"), "", &no_env).unwrap();
        let l = &c.gateway.limits;
        assert_eq!(
            (l.max_connections, l.queue_timeout, l.max_connections_per_ip),
            (10_000, Duration::from_secs(1), 0)
        );
        assert_eq!(
            (l.header_timeout, l.max_header_bytes, l.max_headers),
            (Duration::from_secs(10), 16 * 1024, 100)
        );
        assert_eq!(
            (
                l.max_body_bytes,
                l.body_timeout,
                l.max_response_header_bytes
            ),
            (1 << 20, Duration::from_secs(30), 64 * 1024)
        );
        assert_eq!(
            (l.ws_ping_interval, l.ws_idle_timeout),
            (Duration::from_secs(20), Duration::from_secs(60))
        );
        assert_eq!(
            (l.ws_max_frame_bytes, l.ws_max_message_bytes),
            (1 << 20, 1 << 20)
        );
        assert!(
            c.gateway.trusted_proxies.is_empty(),
            "no proxy is trusted by default"
        );
        let errs = errors(
            "[gateway]\nmax_connections = 0\nmax_header_bytes = 100\nws_max_frame_bytes = 4096\n\
             ws_max_message_bytes = 2048\nws_ping_interval = \"30s\"\nws_idle_timeout = \"30s\"\n\
             trusted_proxies = [\"198.51.100.0/24\", \"198.51.100.0/33\"]\n",
        );
        let all = errs.join("\n");
        for key in [
            "gateway.max_connections",
            "gateway.max_header_bytes",
            "gateway.ws_max_frame_bytes",
            "gateway.ws_idle_timeout",
            "gateway.trusted_proxies[1]",
        ] {
            assert!(all.contains(key), "missing {key} in\n{all}");
        }
    }

    #[test]
    fn tls_takes_a_certificate_and_its_key_or_neither() {
        let parsed = |text: &str| parse(Path::new("p.toml"), text, &no_env).unwrap();
        assert_eq!(parsed("").gateway.tls, None, "off by default");
        let c =
            parsed("[gateway]\ntls_cert = \"/etc/gw/tls.crt\"\ntls_key = \"/etc/gw/tls.key\"\n");
        let tls = c.gateway.tls.unwrap();
        assert_eq!(
            (tls.cert.to_str(), tls.key.to_str()),
            (Some("/etc/gw/tls.crt"), Some("/etc/gw/tls.key"))
        );
        let errs = errors("[gateway]\ntls_cert = \"/etc/gw/tls.crt\"\n").join("\n");
        assert!(errs.contains("gateway.tls_key"), "{errs}");
        assert!(errs.contains("set both"), "{errs}");
        let errs = errors("[gateway]\ntls_key = \"/etc/gw/tls.key\"\n").join("\n");
        assert!(errs.contains("gateway.tls_cert"), "{errs}");
    }

    #[test]
    fn broken_toml_is_one_error_with_a_position() {
        let errs = errors("name = \n");
        assert_eq!(errs.len(), 1);
        assert!(errs[0].starts_with("p.toml: not valid TOML"), "{errs:?}");
    }

    #[test]
    fn duplicate_pipeline_names_across_files_are_refused() {
        let dir = std::env::temp_dir().join(format!("rb-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = dir.join("a.toml");
        let b = dir.join("b.toml");
        std::fs::write(&a, "name = \"x\"\n").unwrap();
        std::fs::write(&b, "name = \"x\"\n").unwrap();
        let e = load_all(&[a, b], &no_env).unwrap_err();
        assert!(
            e.to_string()
                .contains("b.toml: name: pipeline name \"x\" is used by another file"),
            "{e}"
        );
    }
}
