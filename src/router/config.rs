//! The router's upstreams: a JSON file of OpenAI-compatible providers, reloaded when it
//! changes (a bad edit is logged and the previous configuration stays in force).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use serde::Deserialize;

/// The file, as written by the operator.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterConfig {
    pub providers: Vec<ProviderConfig>,
    /// Longest `Retry-After` the router waits inside one request before retrying the last
    /// candidate (milliseconds, default 2000); longer ones fail over or fail the request.
    #[serde(default = "default_max_retry_after")]
    pub max_retry_after_ms: u64,
}

fn default_max_retry_after() -> u64 {
    2_000
}
fn default_connect() -> u64 {
    2_000
}
fn default_first_byte() -> u64 {
    60_000
}
fn default_idle() -> u64 {
    60_000
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// The provider's name in the price book (`openai`, `anthropic`, ...).
    pub name: String,
    /// OpenAI-compatible base URL, up to and including `/v1`.
    pub base_url: String,
    /// Environment variable holding the provider's API key (absent: no Authorization).
    pub api_key_env: Option<String>,
    #[serde(default = "default_connect")]
    pub connect_timeout_ms: u64,
    /// Until the response headers arrive.
    #[serde(default = "default_first_byte")]
    pub first_byte_timeout_ms: u64,
    /// Longest silence while reading a body or a stream.
    #[serde(default = "default_idle")]
    pub idle_timeout_ms: u64,
    pub region: Option<String>,
    /// Price-book model name -> the upstream's own name for it.
    pub models: BTreeMap<String, String>,
}

/// One provider, ready to call.
pub struct Provider {
    pub cfg: ProviderConfig,
    pub api_key: Option<String>,
    pub client: reqwest::Client,
    /// `base_url` + `/chat/completions` and `/embeddings`, parsed once (a URL parse per
    /// request was 3% of the router's CPU).
    pub chat_url: reqwest::Url,
    pub embeddings_url: reqwest::Url,
}

/// The loaded configuration.
pub struct Upstreams {
    pub providers: Vec<Provider>,
    /// model -> providers serving it, in file order
    by_model: HashMap<String, Vec<usize>>,
    pub max_retry_after: Duration,
}

impl Upstreams {
    pub fn from_config(cfg: RouterConfig) -> anyhow::Result<Upstreams> {
        let mut providers = Vec::new();
        let mut by_model: HashMap<String, Vec<usize>> = HashMap::new();
        for p in cfg.providers {
            anyhow::ensure!(
                !p.name.is_empty() && !p.name.contains('/'),
                "provider name {:?} must be non-empty and contain no '/'",
                p.name
            );
            anyhow::ensure!(
                providers.iter().all(|x: &Provider| x.cfg.name != p.name),
                "provider {:?} is declared twice",
                p.name
            );
            let url = reqwest::Url::parse(&p.base_url)
                .map_err(|e| anyhow::anyhow!("provider {:?}: base_url: {e}", p.name))?;
            anyhow::ensure!(
                url.scheme() == "http" || url.scheme() == "https",
                "provider {:?}: base_url must be http or https",
                p.name
            );
            let api_key = match &p.api_key_env {
                Some(var) => Some(std::env::var(var).map_err(|_| {
                    anyhow::anyhow!(
                        "provider {:?}: environment variable {var} is not set",
                        p.name
                    )
                })?),
                None => None,
            };
            let under = |path: &str| {
                reqwest::Url::parse(&format!("{}/{path}", p.base_url.trim_end_matches('/')))
                    .map_err(|e| anyhow::anyhow!("provider {:?}: base_url: {e}", p.name))
            };
            let (chat_url, embeddings_url) = (under("chat/completions")?, under("embeddings")?);
            // an upstream's redirect is not followed: the request (and its key) goes only
            // where the configuration says, and the 3xx counts as that upstream failing
            let client = reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .connect_timeout(Duration::from_millis(p.connect_timeout_ms))
                .pool_max_idle_per_host(1024)
                .pool_idle_timeout(Duration::from_secs(90))
                .tcp_nodelay(true)
                .build()?;
            let i = providers.len();
            for m in p.models.keys() {
                by_model.entry(m.clone()).or_default().push(i);
            }
            providers.push(Provider {
                cfg: p,
                api_key,
                client,
                chat_url,
                embeddings_url,
            });
        }
        Ok(Upstreams {
            providers,
            by_model,
            max_retry_after: Duration::from_millis(cfg.max_retry_after_ms),
        })
    }

    pub fn load(path: &Path) -> anyhow::Result<Upstreams> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("router config {}: {e}", path.display()))?;
        let cfg: RouterConfig = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("router config {}: {e}", path.display()))?;
        Upstreams::from_config(cfg)
    }

    pub fn provider(&self, name: &str) -> Option<&Provider> {
        self.providers.iter().find(|p| p.cfg.name == name)
    }

    /// Providers serving a price-book model, in file order.
    pub fn serving(&self, model: &str) -> impl Iterator<Item = &Provider> {
        self.by_model
            .get(model)
            .into_iter()
            .flatten()
            .map(|&i| &self.providers[i])
    }

    /// Every model served, sorted.
    pub fn models(&self) -> Vec<(&str, &str)> {
        let mut v: Vec<(&str, &str)> = self
            .providers
            .iter()
            .flat_map(|p| {
                p.cfg
                    .models
                    .keys()
                    .map(|m| (m.as_str(), p.cfg.name.as_str()))
            })
            .collect();
        v.sort();
        v
    }
}

/// The configuration in force, swapped whole on reload.
#[derive(Clone)]
pub struct Live(Arc<RwLock<Arc<Upstreams>>>);

impl Live {
    pub fn new(u: Upstreams) -> Live {
        Live(Arc::new(RwLock::new(Arc::new(u))))
    }

    pub fn get(&self) -> Arc<Upstreams> {
        self.0.read().expect("router config lock").clone()
    }

    fn set(&self, u: Upstreams) {
        *self.0.write().expect("router config lock") = Arc::new(u);
    }
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Reload the file when its modification time or size changes (checked every second).
pub async fn watch(path: PathBuf, live: Live, cancel: tokio_util::sync::CancellationToken) {
    let mut last = stamp(&path);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let now = stamp(&path);
        if now == last {
            continue;
        }
        last = now;
        match Upstreams::load(&path) {
            Ok(u) => {
                tracing::info!(path = %path.display(), providers = u.providers.len(), "router config reloaded");
                live.set(u);
            }
            Err(e) => {
                tracing::error!(error = %e, "router config not reloaded; the previous one stays in force")
            }
        }
    }
}
