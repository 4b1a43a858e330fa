//! The Hub handle: settings from the environment and the blocking HTTP client built from them,
//! plus [`resolve_model`], which picks a local directory or the Hub for a `--model` argument.
//! Downloads live in `download.rs`, pushes in `push.rs`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use hf_hub::{HFClient, HFClientSync};

use crate::error::{HubError, RequestContext};
use crate::repo_id::{RepoKind, is_repo_id};
use crate::settings::Settings;

/// A file about to be downloaded (it was not in the cache), for progress messages.
#[derive(Debug, Clone, Copy)]
pub struct Fetch<'a> {
    pub kind: RepoKind,
    pub repo: &'a str,
    pub file: &'a str,
}

impl std::fmt::Display for Fetch<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "downloading {} {}: {}", self.kind, self.repo, self.file)
    }
}

type FetchHook = Arc<dyn Fn(Fetch<'_>) + Send + Sync>;

/// Access to the Hugging Face Hub configured like every Hub client: `HF_ENDPOINT`, `HF_HOME`,
/// `HF_HUB_CACHE`, `HF_HUB_OFFLINE`, `HF_TOKEN`, `HF_TOKEN_PATH` and `HF_HOME/token`.
///
/// ```no_run
/// let hub = burnish_hub::Hub::from_env()?;
/// let dir = hub.model_dir("HuggingFaceTB/SmolLM2-135M-Instruct", None)?;
/// assert!(dir.join("config.json").exists());
/// # Ok::<(), burnish_hub::HubError>(())
/// ```
pub struct Hub {
    pub(crate) settings: Settings,
    /// The HTTP client; `None` in offline mode, where nothing may touch the network.
    client: Option<HFClientSync>,
    pub(crate) on_fetch: Option<FetchHook>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Hub {
    /// A Hub handle configured from the environment. Makes no request.
    pub fn from_env() -> Result<Self, HubError> {
        Self::with_settings(Settings::from_env())
    }

    /// A Hub handle configured from the variables `var` returns (`Some(value)` when set)
    /// instead of the process environment: for callers that hold their own settings, and tests.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, HubError> {
        Self::with_settings(Settings::from_vars(var))
    }

    fn with_settings(settings: Settings) -> Result<Self, HubError> {
        let client = if settings.offline {
            None
        } else {
            let mut builder = HFClient::builder()
                .endpoint(settings.endpoint.clone())
                .cache_dir(settings.cache_dir.clone())
                .user_agent(format!("burnish/{}", env!("CARGO_PKG_VERSION")));
            if let Some(token) = &settings.token {
                builder = builder.token(token.secret());
            }
            Some(builder.build_sync().map_err(|e| HubError::ClientSetup {
                endpoint: settings.shown_endpoint(),
                detail: settings.redact(&e.to_string()),
            })?)
        };
        Ok(Hub {
            settings,
            client,
            on_fetch: None,
        })
    }

    /// Calls `hook` before each file that has to be downloaded (cached files are not reported).
    pub fn on_fetch(mut self, hook: impl Fn(Fetch<'_>) + Send + Sync + 'static) -> Self {
        self.on_fetch = Some(Arc::new(hook));
        self
    }

    /// Whether `HF_HUB_OFFLINE` is set: only the cache is read.
    pub fn is_offline(&self) -> bool {
        self.settings.offline
    }

    /// The Hub's base URL (`HF_ENDPOINT`, default `https://huggingface.co`) as it may be shown:
    /// credentials in it read `***`.
    pub fn endpoint(&self) -> String {
        self.settings.shown_endpoint()
    }

    /// The cache root (`HF_HUB_CACHE`, default `HF_HOME/hub`).
    pub fn cache_dir(&self) -> &Path {
        &self.settings.cache_dir
    }

    /// Whether a token was found (its value is never exposed).
    pub fn has_token(&self) -> bool {
        self.settings.token.is_some()
    }

    /// The client, when online. Offline callers must not get here.
    pub(crate) fn client(&self) -> Option<&HFClientSync> {
        self.client.as_ref()
    }

    pub(crate) fn context<'a>(
        &'a self,
        kind: RepoKind,
        repo: &'a str,
        revision: &'a str,
    ) -> RequestContext<'a> {
        RequestContext {
            kind,
            repo,
            revision,
            settings: &self.settings,
        }
    }
}

/// The model directory a `--model` argument names: the path itself when it exists or is not
/// shaped like a Hub id, else the Hub snapshot of the repo id (downloaded or taken from the
/// cache) at `revision` (a branch, tag or commit; default `main`). `on_fetch` hears of each
/// file downloaded.
pub fn resolve_model(
    spec: &Path,
    revision: Option<&str>,
    on_fetch: impl Fn(Fetch<'_>) + Send + Sync + 'static,
) -> Result<PathBuf, HubError> {
    if spec.exists() {
        if revision.is_some() {
            return Err(HubError::RevisionOfLocalDir {
                dir: spec.to_path_buf(),
            });
        }
        return Ok(spec.to_path_buf());
    }
    let Some(id) = spec.to_str().filter(|s| is_repo_id(s)) else {
        // Not an id: a local path after all, and the loader names what is missing.
        return Ok(spec.to_path_buf());
    };
    let hub = Hub::from_env()?.on_fetch(on_fetch);
    match hub.model_dir(id, revision) {
        // Where a mistyped local path is the likelier story, say that it was not one.
        Err(err @ (HubError::RepoNotFound { .. } | HubError::Unreachable { .. })) => {
            Err(HubError::NotLocal {
                spec: id.to_string(),
                lookup: Box::new(err),
            })
        }
        other => other,
    }
}
