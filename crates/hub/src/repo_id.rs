//! Hub repository ids (`owner/name`): telling one apart from a local path, and the two kinds of
//! repository burnish reads (models and datasets). This module owns the naming rules only; it
//! makes no request.

use std::fmt;

/// The longest repository id the Hub accepts, owner and name together.
const MAX_ID_LEN: usize = 96;

/// Whether `s` looks like a Hub repository id: `owner/name`, each part made of ASCII letters,
/// digits, `-`, `_` and `.`, starting and ending with a letter, digit or `_`, with no `--` or
/// `..`, and 96 characters at most.
///
/// Callers use a local directory when one exists at that path and the Hub otherwise; a path
/// such as `./model`, `/abs/dir` or `a/b/c` is never an id.
///
/// ```
/// use burnish_hub::is_repo_id;
///
/// assert!(is_repo_id("HuggingFaceTB/SmolLM2-135M-Instruct"));
/// assert!(!is_repo_id("tests/fixtures/models/llama"));
/// assert!(!is_repo_id("gpt2")); // the short form has no owner
/// ```
pub fn is_repo_id(s: &str) -> bool {
    if s.len() > MAX_ID_LEN || s.ends_with(".git") || s.contains("--") || s.contains("..") {
        return false;
    }
    match s.split_once('/') {
        Some((owner, name)) => is_part(owner) && is_part(name),
        None => false,
    }
}

/// One side of `owner/name`.
fn is_part(part: &str) -> bool {
    let edge = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let inner = |c: char| edge(c) || c == '-' || c == '.';
    match (part.chars().next(), part.chars().last()) {
        (Some(first), Some(last)) => edge(first) && edge(last) && part.chars().all(inner),
        _ => false,
    }
}

/// The kind of repository a request is about; it decides the URL prefix and the cache folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoKind {
    Model,
    Dataset,
}

impl RepoKind {
    /// The plural used by the API and the cache folder (`models--owner--name`).
    pub(crate) fn plural(self) -> &'static str {
        match self {
            RepoKind::Model => "models",
            RepoKind::Dataset => "datasets",
        }
    }

    /// The repository's web page under `endpoint`.
    pub(crate) fn page(self, endpoint: &str, repo: &str) -> String {
        match self {
            RepoKind::Model => format!("{endpoint}/{repo}"),
            RepoKind::Dataset => format!("{endpoint}/datasets/{repo}"),
        }
    }

    /// The folder of this repository in the Hub cache, as every Hub client names it.
    pub(crate) fn cache_folder(self, repo: &str) -> String {
        format!("{}--{}", self.plural(), repo.replace('/', "--"))
    }
}

impl fmt::Display for RepoKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RepoKind::Model => "model",
            RepoKind::Dataset => "dataset",
        })
    }
}

/// Whether a revision is a full commit sha (40 hex digits) rather than a branch or tag.
pub(crate) fn is_commit_sha(revision: &str) -> bool {
    revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_owner_slash_name_with_hub_characters() {
        for id in [
            "org/tiny",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "meta-llama/Llama-3.2-1B",
            "a_b/c.d-e",
            "Qwen/Qwen2.5-0.5B",
            "x/y",
        ] {
            assert!(is_repo_id(id), "{id} should be an id");
        }
    }

    #[test]
    fn paths_and_malformed_ids_are_not_ids() {
        for s in [
            "",
            "gpt2",
            "/abs/path",
            "./model",
            "../model",
            "a/b/c",
            "org/",
            "/name",
            "org/name/",
            "org/-name",
            "org/name-",
            "org/.name",
            "org/na--me",
            "org/na..me",
            "org/name.git",
            "org/na me",
            "org/naïve",
            "org\\name",
            "C:/models",
        ] {
            assert!(!is_repo_id(s), "{s:?} should not be an id");
        }
        let long = format!("org/{}", "a".repeat(93));
        assert!(!is_repo_id(&long));
        assert!(is_repo_id(&format!("org/{}", "a".repeat(92))));
    }

    #[test]
    fn cache_folders_follow_the_hub_layout() {
        assert_eq!(
            RepoKind::Model.cache_folder("org/tiny"),
            "models--org--tiny"
        );
        assert_eq!(
            RepoKind::Dataset.cache_folder("org/rows"),
            "datasets--org--rows"
        );
        assert_eq!(
            RepoKind::Dataset.page("http://h", "org/rows"),
            "http://h/datasets/org/rows"
        );
    }

    #[test]
    fn commit_shas_are_forty_hex_digits() {
        assert!(is_commit_sha(&"ab12".repeat(10)));
        assert!(!is_commit_sha("main"));
        assert!(!is_commit_sha(&"g".repeat(40)));
    }
}
