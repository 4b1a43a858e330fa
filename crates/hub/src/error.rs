//! Errors of Hub access, each saying what to do about it, and the translation of the HTTP
//! client's errors into them. No message carries the token: it is never part of a URL, a
//! response the client keeps, or this crate's state that `Debug` prints.

use std::path::PathBuf;

use hf_hub::HFError;

use crate::repo_id::RepoKind;
use crate::settings::Settings;

/// What went wrong talking to the Hub or preparing a push.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(
        "`{id}` is not a Hugging Face Hub id: expected `owner/name` (letters, digits, `-`, `_`, `.`)"
    )]
    InvalidRepoId { id: String },

    #[error("cannot use the Hub at `{endpoint}` (HF_ENDPOINT): {detail}")]
    ClientSetup { endpoint: String, detail: String },

    #[error(
        "{kind} `{repo}` is gated or private (HTTP {status}, {token}): accept the licence on {page} \
         if it asks for one, then set HF_TOKEN to a token of an account with access, or run \
         `huggingface-cli login`"
    )]
    AccessDenied {
        kind: RepoKind,
        repo: String,
        page: String,
        status: u16,
        token: TokenNote,
    },

    #[error(
        "{kind} `{repo}` was not found on {endpoint}: check the id (a private repo also reads as \
         missing without a token: set HF_TOKEN or run `huggingface-cli login`)"
    )]
    RepoNotFound {
        kind: RepoKind,
        repo: String,
        endpoint: String,
    },

    #[error(
        "revision `{revision}` of {kind} `{repo}` was not found: check the branch, tag or commit \
         (and the id)"
    )]
    RevisionNotFound {
        kind: RepoKind,
        repo: String,
        revision: String,
    },

    #[error("`{path}` was not found in {kind} `{repo}` at revision `{revision}`")]
    FileNotFound {
        kind: RepoKind,
        repo: String,
        revision: String,
        path: String,
    },

    #[error(
        "{kind} `{repo}` (revision `{revision}`) is not in the Hub cache {} and HF_HUB_OFFLINE is \
         set: run once online to download it, or unset HF_HUB_OFFLINE",
        cache.display()
    )]
    NotCached {
        kind: RepoKind,
        repo: String,
        revision: String,
        cache: PathBuf,
    },

    #[error(
        "could not reach the Hub at {endpoint}: {detail}. Check the network (or HF_ENDPOINT); to \
         use what is already cached, set HF_HUB_OFFLINE=1"
    )]
    Unreachable { endpoint: String, detail: String },

    #[error("model `{repo}` cannot be loaded by burnish: {reason}")]
    NotAModel { repo: String, reason: String },

    #[error(
        "dataset `{repo}`{} has only Parquet files ({examples}); Parquet is not supported: burnish \
         reads JSON and JSONL. Convert the data, or name a path in the repo that holds JSON files",
        at_path(path)
    )]
    ParquetOnly {
        repo: String,
        path: Option<String>,
        examples: String,
    },

    #[error(
        "dataset `{repo}`{} has no JSON or JSONL files{}",
        at_path(path),
        found_note(found)
    )]
    NoDataFiles {
        repo: String,
        path: Option<String>,
        found: String,
    },

    #[error("--revision applies to Hub ids; `{}` is a local path", dir.display())]
    RevisionOfLocalDir { dir: PathBuf },

    /// `lookup` is the Hub's answer, shown in full (not as a separate cause).
    #[error("`{spec}` is not a local path, so it was looked up on the Hub: {lookup}")]
    NotLocal { spec: String, lookup: Box<HubError> },

    #[error("{}: not a finished run: {reason}", dir.display())]
    NotARun { dir: PathBuf, reason: String },

    #[error(
        "{}: the model card's front matter has no `base_model`; add `base_model: owner/name` (the \
         base model's Hub id) so the Hub links this run to its base",
        path.display()
    )]
    MissingBaseModel { path: PathBuf },

    #[error("HF_HUB_OFFLINE is set: pushing needs the network; unset it, or use --dry-run")]
    OfflinePush,

    #[error(
        "no Hub token found: set HF_TOKEN to a token with write access, or run \
         `huggingface-cli login`. Nothing was pushed"
    )]
    NoToken,

    #[error(
        "the Hub refused to push to `{repo}` (HTTP {status}): set HF_TOKEN to a token with write \
         access to `{owner}`, or run `huggingface-cli login`. Nothing was committed"
    )]
    PushDenied {
        repo: String,
        owner: String,
        status: u16,
    },

    #[error("pushing to `{repo}` failed while {step}: {detail}. Nothing was committed")]
    PushFailed {
        repo: String,
        step: &'static str,
        detail: String,
    },

    #[error("the Hub answered {what} for {kind} `{repo}` without {missing}")]
    BadResponse {
        kind: RepoKind,
        repo: String,
        what: &'static str,
        missing: &'static str,
    },

    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{kind} `{repo}`: {source}")]
    Hub {
        kind: RepoKind,
        repo: String,
        #[source]
        source: HFError,
    },
}

/// Whether a request that was refused carried a token: it changes what the user should fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenNote {
    NoneSet,
    Rejected,
}

impl std::fmt::Display for TokenNote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TokenNote::NoneSet => "no token is set",
            TokenNote::Rejected => "the token sent has no access",
        })
    }
}

fn at_path(path: &Option<String>) -> String {
    path.as_ref()
        .map(|p| format!(" at `{p}`"))
        .unwrap_or_default()
}

fn found_note(found: &str) -> String {
    if found.is_empty() {
        " (no files at all)".to_string()
    } else {
        format!(" (found: {found})")
    }
}

/// What a download request was about, to turn the client's errors into [`HubError`]s.
pub(crate) struct RequestContext<'a> {
    pub kind: RepoKind,
    pub repo: &'a str,
    pub revision: &'a str,
    pub settings: &'a Settings,
}

impl RequestContext<'_> {
    /// The error a download failure means for the user.
    pub(crate) fn error(&self, err: HFError) -> HubError {
        let (kind, repo) = (self.kind, self.repo.to_string());
        let endpoint = self.settings.shown_endpoint();
        let denied = |status| HubError::AccessDenied {
            kind,
            repo: repo.clone(),
            page: kind.page(&endpoint, self.repo),
            status,
            token: if self.settings.token.is_some() {
                TokenNote::Rejected
            } else {
                TokenNote::NoneSet
            },
        };
        match err {
            HFError::AuthRequired { .. } => denied(401),
            HFError::Forbidden { .. } => denied(403),
            HFError::RepoNotFound { .. } => HubError::RepoNotFound {
                kind,
                repo,
                endpoint: endpoint.clone(),
            },
            HFError::RevisionNotFound { context, .. } => {
                // The Hub says which of the two is missing; without that, `main` missing almost
                // always means the repo is.
                let code = context.as_ref().and_then(|c| c.error_code.clone());
                match code.as_deref() {
                    Some("RepoNotFound") => HubError::RepoNotFound {
                        kind,
                        repo,
                        endpoint: endpoint.clone(),
                    },
                    None if self.revision == "main" => HubError::RepoNotFound {
                        kind,
                        repo,
                        endpoint: endpoint.clone(),
                    },
                    _ => HubError::RevisionNotFound {
                        kind,
                        repo,
                        revision: self.revision.to_string(),
                    },
                }
            }
            HFError::EntryNotFound { path, .. } => HubError::FileNotFound {
                kind,
                repo,
                revision: self.revision.to_string(),
                path,
            },
            HFError::Request { .. } => HubError::Unreachable {
                endpoint: endpoint.clone(),
                detail: self.settings.redact(&err.to_string()),
            },
            source => HubError::Hub { kind, repo, source },
        }
    }
}

/// The error a failed push step means for the user; `step` says what was being done.
pub(crate) fn push_error(
    repo: &str,
    step: &'static str,
    err: HFError,
    settings: &Settings,
) -> HubError {
    let denied = |status| HubError::PushDenied {
        repo: repo.to_string(),
        owner: repo.split('/').next().unwrap_or(repo).to_string(),
        status,
    };
    match err {
        HFError::AuthRequired { .. } => denied(401),
        HFError::Forbidden { .. } => denied(403),
        other => HubError::PushFailed {
            repo: repo.to_string(),
            step,
            detail: settings.redact(&other.to_string()),
        },
    }
}

/// Attaches the path to an I/O error.
pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> HubError {
    let path = path.into();
    move |source| HubError::Io { path, source }
}
