//! A stand-in for the Hugging Face Hub on 127.0.0.1: the part of its HTTP API that burnish uses
//! (repo info, tree listing, file resolve with HEAD and GET, repo creation, preupload, commit),
//! written by hand on `std::net` so the tests need no network and no server library. It records
//! every request (method, path, `Authorization` header) and every commit, and can be told to
//! fail a step.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine;
use serde_json::{Value, json};

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub authorization: Option<String>,
}

/// One commit the server accepted.
#[derive(Debug, Clone)]
pub struct Commit {
    pub repo: String,
    pub revision: String,
    pub summary: String,
    /// Path → contents, decoded.
    pub files: BTreeMap<String, Vec<u8>>,
}

#[derive(Debug, Default)]
struct Repo {
    sha: String,
    files: BTreeMap<String, Vec<u8>>,
    /// Readable only with the server's token.
    gated: bool,
    private: bool,
}

#[derive(Debug, Default)]
struct State {
    /// Keyed by (`models` | `datasets`, `owner/name`).
    repos: HashMap<(String, String), Repo>,
    seen: Vec<Seen>,
    commits: Vec<Commit>,
    /// The token that opens gated repos and allows pushes.
    token: Option<String>,
    /// HTTP status to answer to commits instead of making them.
    fail_commit: Option<u16>,
}

/// The running server; it stops when dropped.
pub struct FakeHub {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
}

impl FakeHub {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (thread_state, thread_stop) = (state.clone(), stop.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if thread_stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let state = thread_state.clone();
                std::thread::spawn(move || {
                    let _ = serve(stream, &state, addr);
                });
            }
        });
        FakeHub { addr, state, stop }
    }

    /// The value for `HF_ENDPOINT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// Adds a repo (`models` or `datasets`) whose `main` is a commit with these files.
    pub fn add_repo(&self, kind: &str, id: &str, files: BTreeMap<String, Vec<u8>>) {
        let sha = fake_sha(&format!("{kind}/{id}"));
        self.state().repos.insert(
            (kind.to_string(), id.to_string()),
            Repo {
                sha,
                files,
                ..Repo::default()
            },
        );
    }

    /// Adds the files of a local directory (top level) as model repo `id`.
    pub fn add_model_dir(&self, id: &str, dir: &std::path::Path) {
        let mut files = BTreeMap::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                let name = path.file_name().unwrap().to_str().unwrap().to_string();
                files.insert(name, std::fs::read(&path).unwrap());
            }
        }
        self.add_repo("models", id, files);
    }

    pub fn set_gated(&self, kind: &str, id: &str) {
        let mut state = self.state();
        let repo = state.repos.get_mut(&(kind.into(), id.into())).unwrap();
        repo.gated = true;
    }

    pub fn sha(&self, kind: &str, id: &str) -> String {
        self.state().repos[&(kind.to_string(), id.to_string())]
            .sha
            .clone()
    }

    pub fn is_private(&self, id: &str) -> bool {
        self.state().repos[&("models".to_string(), id.to_string())].private
    }

    pub fn set_token(&self, token: &str) {
        self.state().token = Some(token.to_string());
    }

    pub fn fail_commit(&self, status: u16) {
        self.state().fail_commit = Some(status);
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.state().seen.clone()
    }

    pub fn forget_seen(&self) {
        self.state().seen.clear();
    }

    pub fn commits(&self) -> Vec<Commit> {
        self.state().commits.clone()
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

/// A 40-hex-digit commit id derived from `seed`.
fn fake_sha(seed: &str) -> String {
    let mut out = String::new();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    while out.len() < 40 {
        for b in seed.bytes().chain(out.clone().into_bytes()) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        out.push_str(&format!("{h:016x}"));
    }
    out.truncate(40);
    out
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn json(status: u16, value: Value) -> Self {
        Response {
            status,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: value.to_string().into_bytes(),
        }
    }

    fn error(status: u16, code: &str, message: &str) -> Self {
        let mut r = Self::json(status, json!({ "error": message }));
        if !code.is_empty() {
            r.headers.push(("X-Error-Code".into(), code.into()));
        }
        r
    }
}

/// Reads one request from `stream`, answers it, and closes the connection.
fn serve(stream: TcpStream, state: &Mutex<State>, addr: SocketAddr) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Ok(());
    };
    let (method, target) = (method.to_string(), target.to_string());
    let mut headers = HashMap::new();
    loop {
        let mut header = String::new();
        reader.read_line(&mut header)?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((k, v)) = header.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let length: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    let path = target.split('?').next().unwrap_or("").to_string();
    let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
    let authorization = headers.get("authorization").cloned();

    let response = {
        let mut state = state.lock().unwrap();
        state.seen.push(Seen {
            method: method.clone(),
            path: path.clone(),
            authorization: authorization.clone(),
        });
        let authorized = match (&state.token, &authorization) {
            (Some(token), Some(auth)) => *auth == format!("Bearer {token}"),
            _ => false,
        };
        route(
            &mut state,
            &method,
            &path,
            query,
            &body,
            authorized,
            authorization.is_some(),
            addr,
        )
    };

    let mut stream = stream;
    let reason = match response.status {
        200 => "OK",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        409 => "Conflict",
        _ => "Error",
    };
    let mut head = format!("HTTP/1.1 {} {reason}\r\n", response.status);
    for (k, v) in &response.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        response.body.len()
    ));
    stream.write_all(head.as_bytes())?;
    if method != "HEAD" {
        stream.write_all(&response.body)?;
    }
    stream.flush()
}

#[allow(clippy::too_many_arguments)]
fn route(
    state: &mut State,
    method: &str,
    path: &str,
    query: &str,
    body: &[u8],
    authorized: bool,
    sent_token: bool,
    addr: SocketAddr,
) -> Response {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        ("POST", ["api", "repos", "create"]) => create_repo(state, body, authorized, addr),
        ("GET", ["api", kind, owner, name, "revision", revision]) => {
            let id = format!("{owner}/{name}");
            with_repo(state, kind, &id, authorized, sent_token, |repo| {
                if *revision != "main" && *revision != repo.sha {
                    return Response::error(404, "RevisionNotFound", "Invalid rev id");
                }
                Response::json(
                    200,
                    json!({ "id": id, "sha": repo.sha, "private": repo.private }),
                )
            })
        }
        ("GET", ["api", kind, owner, name, "tree", _revision]) => {
            let id = format!("{owner}/{name}");
            let recursive = query.contains("recursive=true");
            with_repo(state, kind, &id, authorized, sent_token, |repo| {
                let entries: Vec<Value> = repo
                    .files
                    .iter()
                    .filter(|(p, _)| recursive || !p.contains('/'))
                    .map(|(p, data)| {
                        json!({"type": "file", "oid": etag(data), "size": data.len(), "path": p})
                    })
                    .collect();
                Response::json(200, Value::Array(entries))
            })
        }
        ("HEAD" | "GET", ["datasets", owner, name, "resolve", _rev, file @ ..]) => {
            resolve(state, "datasets", owner, name, file, authorized, sent_token)
        }
        ("HEAD" | "GET", [owner, name, "resolve", _rev, file @ ..]) => {
            resolve(state, "models", owner, name, file, authorized, sent_token)
        }
        ("POST", ["api", "models", _, _, "preupload", _]) => {
            if !authorized {
                return Response::error(401, "", "Invalid credentials");
            }
            let request: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            let files: Vec<Value> = request["files"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|f| json!({"path": f["path"], "uploadMode": "regular", "shouldIgnore": false}))
                .collect();
            Response::json(200, json!({ "files": files }))
        }
        ("POST", ["api", "models", owner, name, "commit", revision]) => commit(
            state,
            &format!("{owner}/{name}"),
            revision,
            body,
            authorized,
            addr,
        ),
        _ => Response::error(404, "", "no such route"),
    }
}

/// Runs `f` on a readable repo, or answers 404 / 401 as the Hub does.
fn with_repo(
    state: &State,
    kind: &str,
    id: &str,
    authorized: bool,
    sent_token: bool,
    f: impl FnOnce(&Repo) -> Response,
) -> Response {
    match state.repos.get(&(kind.to_string(), id.to_string())) {
        None => Response::error(404, "RepoNotFound", "Repository not found"),
        Some(repo) if repo.gated && !authorized => {
            let status = if sent_token { 403 } else { 401 };
            Response::error(
                status,
                "GatedRepo",
                &format!("Access to model {id} is restricted."),
            )
        }
        Some(repo) => f(repo),
    }
}

fn resolve(
    state: &State,
    kind: &str,
    owner: &str,
    name: &str,
    file: &[&str],
    authorized: bool,
    sent_token: bool,
) -> Response {
    let id = format!("{owner}/{name}");
    let file = file.join("/");
    with_repo(
        state,
        kind,
        &id,
        authorized,
        sent_token,
        |repo| match repo.files.get(&file) {
            None => {
                let mut r = Response::error(404, "EntryNotFound", "Entry not found");
                r.headers.push(("X-Repo-Commit".into(), repo.sha.clone()));
                r
            }
            Some(data) => Response {
                status: 200,
                headers: vec![
                    ("ETag".into(), format!("\"{}\"", etag(data))),
                    ("X-Repo-Commit".into(), repo.sha.clone()),
                ],
                body: data.clone(),
            },
        },
    )
}

/// A content id for a file, as the Hub's ETag.
fn etag(data: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}{:08x}", data.len())
}

fn create_repo(state: &mut State, body: &[u8], authorized: bool, addr: SocketAddr) -> Response {
    if !authorized {
        return Response::error(401, "", "Invalid username or password.");
    }
    let request: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let id = format!(
        "{}/{}",
        request["organization"].as_str().unwrap_or(""),
        request["name"].as_str().unwrap_or("")
    );
    let kind = format!("{}s", request["type"].as_str().unwrap_or("model"));
    let key = (kind, id.clone());
    if state.repos.contains_key(&key) {
        return Response::error(409, "", "You already created this model repo");
    }
    state.repos.insert(
        key,
        Repo {
            sha: fake_sha(&id),
            private: request["private"].as_bool().unwrap_or(false),
            ..Repo::default()
        },
    );
    Response::json(200, json!({ "url": format!("http://{addr}/{id}") }))
}

fn commit(
    state: &mut State,
    id: &str,
    revision: &str,
    body: &[u8],
    authorized: bool,
    addr: SocketAddr,
) -> Response {
    if let Some(status) = state.fail_commit {
        return Response::error(status, "", "refused by the test");
    }
    if !authorized {
        return Response::error(401, "", "Invalid credentials");
    }
    let Some(repo) = state.repos.get_mut(&("models".to_string(), id.to_string())) else {
        return Response::error(404, "RepoNotFound", "Repository not found");
    };
    let mut summary = String::new();
    let mut files = BTreeMap::new();
    for line in body.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let Ok(entry) = serde_json::from_slice::<Value>(line) else {
            return Response::error(400, "", "bad ndjson line");
        };
        let value = &entry["value"];
        match entry["key"].as_str() {
            Some("header") => summary = value["summary"].as_str().unwrap_or("").to_string(),
            Some("file") if value["encoding"] == "base64" => {
                let Ok(data) = base64::engine::general_purpose::STANDARD
                    .decode(value["content"].as_str().unwrap_or(""))
                else {
                    return Response::error(400, "", "bad base64");
                };
                files.insert(value["path"].as_str().unwrap_or("").to_string(), data);
            }
            _ => return Response::error(400, "", "unexpected commit entry"),
        }
    }
    repo.files.extend(files.clone());
    repo.sha = fake_sha(&format!("{id}{}", repo.sha));
    let sha = repo.sha.clone();
    state.commits.push(Commit {
        repo: id.to_string(),
        revision: revision.to_string(),
        summary,
        files,
    });
    Response::json(
        200,
        json!({
            "success": true,
            "commitOid": sha,
            "commitUrl": format!("http://{addr}/{id}/commit/{sha}"),
        }),
    )
}
