//! Hugging Face Hub access for burnish, both ways. Downloads: a model's snapshot directory
//! ([`Hub::model_dir`]) or a dataset's JSON files ([`Hub::dataset_files`]) through the standard
//! Hub cache, offline from the cache with `HF_HUB_OFFLINE=1`; [`resolve_model`] takes a local
//! directory when one exists and the Hub otherwise. Pushes: a finished run directory
//! ([`PushPlan`]) goes up to a model repo in one commit ([`Hub::push`]).
//!
//! Settings come from the environment exactly as other Hub clients read them (`HF_ENDPOINT`,
//! `HF_HOME`, `HF_HUB_CACHE`, `HF_HUB_OFFLINE`, `HF_TOKEN`, `HF_TOKEN_PATH`, `HF_HOME/token`).
//! The token is sent in the `Authorization` header and nowhere else: no error, log line or
//! `Debug` output of this crate contains it. This crate never loads a model; it only puts
//! files on disk and says where.

mod download;
mod error;
mod hub;
mod push;
mod repo_id;
mod selection;
mod settings;

pub use error::{HubError, TokenNote};
pub use hub::{Fetch, Hub, resolve_model};
pub use push::{PushFile, PushPlan, PushTarget, Pushed, RunKind};
pub use repo_id::{RepoKind, is_repo_id};
