//! Downloads into the standard Hub cache (`<cache>/models--owner--name/snapshots/<sha>/`, blobs
//! shared, `refs/<revision>` naming the commit), so other Hub clients share what burnish
//! fetches and the other way round. Only the files burnish reads are fetched (see
//! `selection.rs`); files already in the snapshot are not fetched again. With
//! `HF_HUB_OFFLINE` the cache alone answers.

use std::path::{Path, PathBuf};

use hf_hub::repository::RepoTreeEntry;
use hf_hub::{HFRepositorySync, RepoType};

use crate::error::{HubError, RequestContext, io_err};
use crate::hub::{Fetch, Hub};
use crate::repo_id::{RepoKind, is_commit_sha, is_repo_id};
use crate::selection::{
    DataSelection, WEIGHTS_INDEX, Weights, is_safe_repo_path, select_data_files,
    select_model_files, shards_from_index,
};

/// The revision used when none is given.
const DEFAULT_REVISION: &str = "main";

impl Hub {
    /// The local snapshot directory of model `repo` (`owner/name`) at `revision` (branch, tag or
    /// commit; default `main`), holding `config.json`, the safetensors weights (and their index)
    /// and the tokenizer and chat-template files the repo has. Downloads what the cache lacks;
    /// offline, returns the cached snapshot or [`HubError::NotCached`].
    pub fn model_dir(&self, repo: &str, revision: Option<&str>) -> Result<PathBuf, HubError> {
        check_id(repo)?;
        let kind = RepoKind::Model;
        let revision = revision.unwrap_or(DEFAULT_REVISION);
        let Some(client) = self.client() else {
            let dir = self.cached_snapshot(kind, repo, revision)?;
            // Another client may have cached only part of the model (its config, say).
            if !is_complete_model(&dir)? {
                return Err(self.not_cached(kind, repo, revision));
            }
            return Ok(dir);
        };
        let ctx = self.context(kind, repo, revision);
        let (owner, name) = split(repo);
        let handle = client.model(owner, name);
        let info = handle
            .info()
            .revision(revision)
            .send()
            .map_err(|e| ctx.error(e))?;
        let sha = commit_of(info.sha, &ctx, "the model's revision")?;
        let listing = list_files(&handle, &sha, false, &ctx)?;
        let not_a_model = |reason: String| HubError::NotAModel {
            repo: repo.to_string(),
            reason,
        };
        let selection = select_model_files(&listing).map_err(not_a_model)?;
        let mut fetched = Vec::new();
        for file in &selection.files {
            fetched.push(self.fetch(&handle, &ctx, &sha, file)?);
        }
        let weights = match selection.weights {
            Weights::Files(files) => files,
            Weights::Sharded => {
                let index = fetched
                    .iter()
                    .find(|p| p.ends_with(WEIGHTS_INDEX))
                    .ok_or_else(|| not_a_model("the weights index was not fetched".into()))?;
                let text = std::fs::read_to_string(index).map_err(io_err(index))?;
                let shards = shards_from_index(&text).map_err(not_a_model)?;
                if let Some(missing) = shards.iter().find(|s| !listing.contains(s)) {
                    return Err(not_a_model(format!(
                        "its weights index names `{missing}`, which the repo does not have"
                    )));
                }
                shards
            }
        };
        for file in &weights {
            self.fetch(&handle, &ctx, &sha, file)?;
        }
        self.write_ref(kind, repo, revision, &sha)?;
        Ok(self.snapshot_dir(kind, repo, &sha))
    }

    /// The local JSON and JSONL files of dataset `repo` at `revision` (default `main`) that are
    /// `path` or lie under it (the whole repo without a path), sorted. Parquet is not supported:
    /// a path with only Parquet files is [`HubError::ParquetOnly`]. Offline, the cached files
    /// under `path` are returned, or [`HubError::NotCached`].
    pub fn dataset_files(
        &self,
        repo: &str,
        revision: Option<&str>,
        path: Option<&str>,
    ) -> Result<Vec<PathBuf>, HubError> {
        check_id(repo)?;
        let kind = RepoKind::Dataset;
        let revision = revision.unwrap_or(DEFAULT_REVISION);
        let path_owned = path.map(str::to_string);
        let Some(client) = self.client() else {
            let dir = self.cached_snapshot(kind, repo, revision)?;
            let listing = walk(&dir)?;
            return match select_data_files(&listing, path) {
                DataSelection::Files(files) => Ok(files.iter().map(|f| dir.join(f)).collect()),
                _ => Err(self.not_cached(kind, repo, revision)),
            };
        };
        let ctx = self.context(kind, repo, revision);
        let (owner, name) = split(repo);
        let handle = client.dataset(owner, name);
        let info = handle
            .info()
            .revision(revision)
            .send()
            .map_err(|e| ctx.error(e))?;
        let sha = commit_of(info.sha, &ctx, "the dataset's revision")?;
        let listing = list_files(&handle, &sha, true, &ctx)?;
        let files = match select_data_files(&listing, path) {
            DataSelection::Files(files) => files,
            DataSelection::ParquetOnly(examples) => {
                return Err(HubError::ParquetOnly {
                    repo: repo.to_string(),
                    path: path_owned,
                    examples,
                });
            }
            DataSelection::Nothing(found) => {
                return Err(HubError::NoDataFiles {
                    repo: repo.to_string(),
                    path: path_owned,
                    found,
                });
            }
        };
        let mut paths = Vec::with_capacity(files.len());
        for file in &files {
            paths.push(self.fetch(&handle, &ctx, &sha, file)?);
        }
        self.write_ref(kind, repo, revision, &sha)?;
        Ok(paths)
    }

    /// Downloads one file of commit `sha` into the cache unless it is there; returns its path
    /// in the snapshot.
    fn fetch<T: RepoType>(
        &self,
        handle: &HFRepositorySync<T>,
        ctx: &RequestContext<'_>,
        sha: &str,
        file: &str,
    ) -> Result<PathBuf, HubError> {
        let local = self.snapshot_dir(ctx.kind, ctx.repo, sha).join(file);
        if local.is_file() {
            return Ok(local);
        }
        if let Some(hook) = &self.on_fetch {
            hook(Fetch {
                kind: ctx.kind,
                repo: ctx.repo,
                file,
            });
        }
        tracing::info!(repo = ctx.repo, file, "downloading");
        handle
            .download_file()
            .filename(file)
            .revision(sha)
            .send()
            .map_err(|e| ctx.error(e))
    }

    fn snapshot_dir(&self, kind: RepoKind, repo: &str, sha: &str) -> PathBuf {
        self.settings
            .cache_dir
            .join(kind.cache_folder(repo))
            .join("snapshots")
            .join(sha)
    }

    /// Records that `revision` is commit `sha`, as the cache layout does, so offline lookups by
    /// branch or tag find the snapshot.
    fn write_ref(
        &self,
        kind: RepoKind,
        repo: &str,
        revision: &str,
        sha: &str,
    ) -> Result<(), HubError> {
        if is_commit_sha(revision) || !is_safe_repo_path(revision) {
            return Ok(());
        }
        let path = self
            .settings
            .cache_dir
            .join(kind.cache_folder(repo))
            .join("refs")
            .join(revision);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        // Through a temporary name, so a reader never finds half a commit id.
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
        std::fs::write(&tmp, sha).map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err(&path))
    }

    /// The cached snapshot of `revision`, found through `refs/` unless it is a commit sha.
    fn cached_snapshot(
        &self,
        kind: RepoKind,
        repo: &str,
        revision: &str,
    ) -> Result<PathBuf, HubError> {
        let sha = if is_commit_sha(revision) {
            Some(revision.to_string())
        } else if is_safe_repo_path(revision) {
            let path = self
                .settings
                .cache_dir
                .join(kind.cache_folder(repo))
                .join("refs")
                .join(revision);
            std::fs::read_to_string(path)
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| is_commit_sha(s))
        } else {
            None
        };
        let dir = sha.map(|sha| self.snapshot_dir(kind, repo, &sha));
        match dir {
            Some(dir) if dir.is_dir() => Ok(dir),
            _ => Err(self.not_cached(kind, repo, revision)),
        }
    }

    fn not_cached(&self, kind: RepoKind, repo: &str, revision: &str) -> HubError {
        HubError::NotCached {
            kind,
            repo: repo.to_string(),
            revision: revision.to_string(),
            cache: self.settings.cache_dir.clone(),
        }
    }
}

fn check_id(repo: &str) -> Result<(), HubError> {
    if is_repo_id(repo) {
        Ok(())
    } else {
        Err(HubError::InvalidRepoId {
            id: repo.to_string(),
        })
    }
}

/// `owner/name` → (`owner`, `name`); callers have checked the id.
fn split(repo: &str) -> (&str, &str) {
    repo.split_once('/').unwrap_or(("", repo))
}

/// The commit sha a repo-info answer carries, checked.
fn commit_of(
    sha: Option<String>,
    ctx: &RequestContext<'_>,
    what: &'static str,
) -> Result<String, HubError> {
    sha.filter(|s| is_commit_sha(s))
        .ok_or_else(|| HubError::BadResponse {
            kind: ctx.kind,
            repo: ctx.repo.to_string(),
            what,
            missing: "a commit sha",
        })
}

/// The files of commit `sha` (the top level only unless `recursive`), with paths that stay
/// inside the snapshot.
fn list_files<T: RepoType>(
    handle: &HFRepositorySync<T>,
    sha: &str,
    recursive: bool,
    ctx: &RequestContext<'_>,
) -> Result<Vec<String>, HubError> {
    let entries = handle
        .list_tree()
        .revision(sha)
        .recursive(recursive)
        .send()
        .map_err(|e| ctx.error(e))?;
    Ok(entries
        .into_iter()
        .filter_map(|entry| match entry {
            RepoTreeEntry::File { path, .. } if is_safe_repo_path(&path) => Some(path),
            _ => None,
        })
        .collect())
}

/// Whether a cached snapshot holds a whole model: config, and every weight file.
fn is_complete_model(dir: &Path) -> Result<bool, HubError> {
    let listing = walk(dir)?;
    Ok(match select_model_files(&listing) {
        Err(_) => false,
        Ok(selection) => match selection.weights {
            Weights::Files(_) => true,
            Weights::Sharded => {
                let index = dir.join(WEIGHTS_INDEX);
                let text = std::fs::read_to_string(&index).map_err(io_err(&index))?;
                shards_from_index(&text)
                    .is_ok_and(|shards| shards.iter().all(|s| listing.contains(s)))
            }
        },
    })
}

/// Every file under `root` as a `/`-separated relative path (following the snapshot's links).
fn walk(root: &Path) -> Result<Vec<String>, HubError> {
    let mut files = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
            let path = entry.map_err(io_err(&dir))?.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.is_file()
                && let Ok(relative) = path.strip_prefix(root)
            {
                let parts: Vec<String> = relative
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                files.push(parts.join("/"));
            }
        }
    }
    files.sort();
    Ok(files)
}
