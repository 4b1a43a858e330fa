//! Hub settings read from the environment, with the names and precedence every Hugging Face
//! client uses: the endpoint (`HF_ENDPOINT`), the cache (`HF_HUB_CACHE`, `HF_HOME`), offline
//! mode (`HF_HUB_OFFLINE`) and the token (`HF_TOKEN`, then the token file). This module reads
//! variables and the token file; it makes no request, and the token never leaves it except as
//! the `Authorization` header handed to the HTTP client.

use std::fmt;
use std::path::{Path, PathBuf};

/// The public Hub, used when `HF_ENDPOINT` is not set.
const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// An access token. Its `Debug` output is redacted, and it has no `Display`, so it cannot end up
/// in a message or a log by accident.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Token(String);

impl Token {
    /// The secret itself, for the HTTP client only.
    pub(crate) fn secret(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// Everything the Hub client needs, resolved once.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// Base URL of the Hub, without a trailing slash.
    pub endpoint: String,
    /// The cache root holding `models--owner--name/` folders.
    pub cache_dir: PathBuf,
    /// `HF_HUB_OFFLINE`: never touch the network, read the cache only.
    pub offline: bool,
    pub token: Option<Token>,
}

impl Settings {
    /// Reads the settings from the process environment.
    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// Reads the settings through `var`, which returns a variable's value if it is set.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let set = |name: &str| var(name).filter(|v| !v.is_empty());
        let home = hf_home(&set);
        let endpoint = set("HF_ENDPOINT")
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string())
            .trim_end_matches('/')
            .to_string();
        let cache_dir = set("HF_HUB_CACHE")
            .or_else(|| set("HUGGINGFACE_HUB_CACHE"))
            .map(PathBuf::from)
            .unwrap_or_else(|| home.join("hub"));
        let offline = set("HF_HUB_OFFLINE").is_some_and(|v| is_true(&v));
        let token = if set("HF_HUB_DISABLE_IMPLICIT_TOKEN").is_some_and(|v| is_true(&v)) {
            None
        } else {
            resolve_token(&set, &home)
        };
        Settings {
            endpoint,
            cache_dir,
            offline,
            token,
        }
    }

    /// The endpoint as it may be shown: credentials in it (`https://user:secret@host`) read
    /// `***`.
    pub fn shown_endpoint(&self) -> String {
        self.redact(&self.endpoint)
    }

    /// `text` with the endpoint's credentials, wherever they appear, replaced by `***` (the
    /// client's errors quote the URLs it requested).
    pub fn redact(&self, text: &str) -> String {
        let authority = self
            .endpoint
            .split_once("://")
            .map_or(self.endpoint.as_str(), |(_, rest)| rest)
            .split('/')
            .next()
            .unwrap_or_default();
        match authority.rsplit_once('@') {
            Some((credentials, _)) if !credentials.is_empty() => {
                text.replace(&format!("{credentials}@"), "***@")
            }
            _ => text.to_string(),
        }
    }
}

/// Boolean environment values as the Python client reads them.
fn is_true(value: &str) -> bool {
    matches!(
        value.trim().to_ascii_lowercase().as_str(),
        "1" | "on" | "yes" | "true"
    )
}

/// `HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
fn hf_home(set: &impl Fn(&str) -> Option<String>) -> PathBuf {
    if let Some(home) = set("HF_HOME") {
        return PathBuf::from(home);
    }
    if let Some(xdg) = set("XDG_CACHE_HOME") {
        return Path::new(&xdg).join("huggingface");
    }
    let user_home = set("HOME").unwrap_or_else(|| "/tmp".to_string());
    Path::new(&user_home).join(".cache").join("huggingface")
}

/// `HF_TOKEN`, else the file named by `HF_TOKEN_PATH`, else `HF_HOME/token` (where
/// `huggingface-cli login` writes it). Surrounding whitespace is trimmed; an empty value counts
/// as unset.
fn resolve_token(set: &impl Fn(&str) -> Option<String>, hf_home: &Path) -> Option<Token> {
    let nonempty = |s: String| {
        let s = s.trim().to_string();
        (!s.is_empty()).then_some(Token(s))
    };
    if let Some(token) = set("HF_TOKEN").and_then(nonempty) {
        return Some(token);
    }
    let from_file = |path: &Path| std::fs::read_to_string(path).ok().and_then(nonempty);
    if let Some(token) = set("HF_TOKEN_PATH").and_then(|p| from_file(Path::new(&p))) {
        return Some(token);
    }
    from_file(&hf_home.join("token"))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn settings(vars: &[(&str, &str)]) -> Settings {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::from_vars(|name| map.get(name).cloned())
    }

    #[test]
    fn defaults_point_at_the_public_hub_and_the_home_cache() {
        let s = settings(&[("HOME", "/home/u")]);
        assert_eq!(s.endpoint, "https://huggingface.co");
        assert_eq!(s.cache_dir, PathBuf::from("/home/u/.cache/huggingface/hub"));
        assert!(!s.offline);
    }

    #[test]
    fn credentials_in_the_endpoint_are_never_shown() {
        let s = settings(&[("HF_ENDPOINT", "https://me:s3cret@mirror.example/hf/")]);
        assert_eq!(s.endpoint, "https://me:s3cret@mirror.example/hf");
        assert_eq!(s.shown_endpoint(), "https://***@mirror.example/hf");
        let error = "error sending request for url (https://me:s3cret@mirror.example/hf/api)";
        assert!(!s.redact(error).contains("s3cret"), "{}", s.redact(error));
        let plain = settings(&[("HF_ENDPOINT", "https://mirror.example/a@b")]);
        assert_eq!(plain.shown_endpoint(), "https://mirror.example/a@b");
    }

    #[test]
    fn endpoint_cache_and_offline_come_from_their_variables() {
        let s = settings(&[
            ("HF_ENDPOINT", "http://127.0.0.1:9/"),
            ("HF_HOME", "/h"),
            ("HF_HUB_OFFLINE", "1"),
        ]);
        assert_eq!(s.endpoint, "http://127.0.0.1:9");
        assert_eq!(s.cache_dir, PathBuf::from("/h/hub"));
        assert!(s.offline);
        let s = settings(&[("HF_HOME", "/h"), ("HF_HUB_CACHE", "/c")]);
        assert_eq!(s.cache_dir, PathBuf::from("/c"));
        let s = settings(&[("XDG_CACHE_HOME", "/x")]);
        assert_eq!(s.cache_dir, PathBuf::from("/x/huggingface/hub"));
        for (value, offline) in [("ON", true), ("yes", true), ("0", false), ("", false)] {
            assert_eq!(settings(&[("HF_HUB_OFFLINE", value)]).offline, offline);
        }
    }

    #[test]
    fn token_comes_from_the_variable_then_the_token_path_then_hf_home() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        std::fs::create_dir_all(&home).unwrap();
        std::fs::write(home.join("token"), "hf_home_token\n").unwrap();
        let path_file = dir.path().join("elsewhere");
        std::fs::write(&path_file, "  hf_path_token  \n").unwrap();
        let home = home.to_str().unwrap();
        let path_file = path_file.to_str().unwrap();

        let token = |vars: &[(&str, &str)]| settings(vars).token.map(|t| t.secret().to_string());
        assert_eq!(
            token(&[
                ("HF_HOME", home),
                ("HF_TOKEN_PATH", path_file),
                ("HF_TOKEN", "hf_var")
            ]),
            Some("hf_var".into())
        );
        assert_eq!(
            token(&[("HF_HOME", home), ("HF_TOKEN_PATH", path_file)]),
            Some("hf_path_token".into())
        );
        assert_eq!(token(&[("HF_HOME", home)]), Some("hf_home_token".into()));
        // A token path that cannot be read falls back to HF_HOME/token.
        assert_eq!(
            token(&[("HF_HOME", home), ("HF_TOKEN_PATH", "/nonexistent/token")]),
            Some("hf_home_token".into())
        );
        assert_eq!(
            token(&[("HF_HOME", home), ("HF_TOKEN", "  ")]),
            Some("hf_home_token".into())
        );
        assert_eq!(
            token(&[("HF_HOME", home), ("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")]),
            None
        );
        assert_eq!(token(&[("HF_HOME", "/nonexistent")]), None);
    }

    #[test]
    fn tokens_never_show_in_debug_output() {
        let s = settings(&[("HF_TOKEN", "hf_secret_value")]);
        let debug = format!("{s:?}");
        assert!(!debug.contains("hf_secret_value"), "{debug}");
        assert!(debug.contains("<redacted>"));
    }
}
