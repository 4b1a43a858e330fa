//! Hub access end to end against a stand-in Hub on 127.0.0.1 (`hub/server.rs`): a model fetched
//! by id scores exactly like its local directory, is fetched once, and then works offline from
//! the cache; missing, gated and uncached repos say what to do; datasets yield their JSON files
//! and refuse Parquet-only data; `burnish push` uploads a real run in one commit with the token
//! in the `Authorization` header and nowhere else, `--dry-run` makes no request, and refused or
//! failed pushes exit non-zero without claiming a push.

mod server;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use server::FakeHub;

use crate::fixtures::{assert_success, model_dir};

/// The token the stand-in Hub accepts; no output may ever contain it.
const TOKEN: &str = "hf_test_Zq81secretvalue";

/// Variables of the caller's environment that would change what the binary does.
const HOST_VARS: &[&str] = &[
    "HF_TOKEN",
    "HF_TOKEN_PATH",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_HUB_OFFLINE",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN",
    "XDG_CACHE_HOME",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
];

/// `burnish ARGS` talking to `hub`, with `HF_HOME` at `home` and the extra variables `vars`.
fn burnish(hub: &FakeHub, home: &Path, vars: &[(&str, &str)], args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_burnish"));
    for var in HOST_VARS {
        command.env_remove(var);
    }
    command
        .env("HF_ENDPOINT", hub.url())
        .env("HF_HOME", home)
        .env("NO_PROXY", "127.0.0.1")
        .envs(vars.iter().copied())
        .args(args)
        .output()
        .unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[track_caller]
fn assert_failure_says(out: &Output, needles: &[&str]) {
    assert!(!out.status.success(), "should fail: {}", stdout(out));
    let err = stderr(out);
    for needle in needles {
        assert!(err.contains(needle), "stderr lacks {needle:?}:\n{err}");
    }
}

#[track_caller]
fn assert_secret_kept(out: &Output) {
    assert!(!stdout(out).contains(TOKEN), "token on stdout");
    assert!(!stderr(out).contains(TOKEN), "token on stderr");
}

/// A stand-in Hub serving the committed llama fixture as `org/tiny`.
fn hub_with_tiny() -> FakeHub {
    let hub = FakeHub::start();
    hub.add_model_dir("org/tiny", &model_dir("llama"));
    hub
}

fn score(hub: &FakeHub, home: &Path, vars: &[(&str, &str)], model: &str) -> Output {
    let text = "Hello world, the sky is blue.";
    let args = [
        "score", "--model", model, "--text", text, "--device", "cpu", "--json",
    ];
    burnish(hub, home, vars, &args)
}

#[test]
fn a_hub_model_scores_like_its_directory_is_fetched_once_and_then_works_offline() {
    let hub = hub_with_tiny();
    let home = tempfile::tempdir().unwrap();
    let local = score(&hub, home.path(), &[], model_dir("llama").to_str().unwrap());
    assert_success(&local);
    assert!(hub.seen().is_empty(), "a local directory needs no request");

    let fetched = score(&hub, home.path(), &[], "org/tiny");
    assert_success(&fetched);
    assert_eq!(stdout(&fetched), stdout(&local));
    assert!(stderr(&fetched).contains("downloading model org/tiny: model.safetensors"));

    // The standard cache layout, with only what a model directory needs.
    let sha = hub.sha("models", "org/tiny");
    let repo = home.path().join("hub/models--org--tiny");
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/main")).unwrap(),
        sha
    );
    let snapshot = repo.join("snapshots").join(&sha);
    let mut names: Vec<String> = std::fs::read_dir(&snapshot)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "chat_template.jinja",
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );

    // Online again: the revision is resolved, nothing is downloaded twice.
    hub.forget_seen();
    let again = score(&hub, home.path(), &[], "org/tiny");
    assert_success(&again);
    assert_eq!(stdout(&again), stdout(&local));
    let downloads: Vec<String> = hub
        .seen()
        .into_iter()
        .filter(|s| s.path.contains("/resolve/"))
        .map(|s| s.path)
        .collect();
    assert!(downloads.is_empty(), "fetched again: {downloads:?}");

    // Offline: the cache alone, not a single request.
    hub.forget_seen();
    let offline = score(&hub, home.path(), &[("HF_HUB_OFFLINE", "1")], "org/tiny");
    assert_success(&offline);
    assert_eq!(stdout(&offline), stdout(&local));
    assert!(hub.seen().is_empty(), "offline made requests");
}

#[test]
fn missing_gated_and_uncached_models_say_what_to_do() {
    let hub = hub_with_tiny();
    hub.add_model_dir("org/gated", &model_dir("llama"));
    hub.set_gated("models", "org/gated");
    hub.set_token(TOKEN);
    let home = tempfile::tempdir().unwrap();
    let home = home.path();

    let out = score(&hub, home, &[], "org/missing");
    assert_failure_says(
        &out,
        &[
            "`org/missing` is not a local path",
            "model `org/missing` was not found",
            "check the id",
        ],
    );

    let out = burnish(
        &hub,
        home,
        &[],
        &[
            "score",
            "--model",
            "org/tiny",
            "--revision",
            "v9",
            "--ids",
            "1,2",
        ],
    );
    assert_failure_says(&out, &["revision `v9`", "not found"]);

    let out = score(&hub, home, &[], "org/gated");
    assert_failure_says(
        &out,
        &[
            "gated or private",
            "no token is set",
            "accept the licence",
            "HF_TOKEN",
            "huggingface-cli login",
        ],
    );

    let wrong = "hf_wrong_Kq2secret";
    let out = score(&hub, home, &[("HF_TOKEN", wrong)], "org/gated");
    assert_failure_says(&out, &["gated or private", "the token sent has no access"]);
    assert!(!stderr(&out).contains(wrong) && !stdout(&out).contains(wrong));

    // The token file `huggingface-cli login` writes is read too.
    std::fs::write(home.join("token"), format!("{TOKEN}\n")).unwrap();
    let out = score(&hub, home, &[], "org/gated");
    assert_success(&out);
    assert_secret_kept(&out);
    assert!(
        hub.seen()
            .iter()
            .any(|s| s.authorization.as_deref() == Some(&format!("Bearer {TOKEN}")))
    );

    let fresh = tempfile::tempdir().unwrap();
    let out = score(&hub, fresh.path(), &[("HF_HUB_OFFLINE", "1")], "org/tiny");
    assert_failure_says(
        &out,
        &[
            "not in the Hub cache",
            "run once online",
            "unset HF_HUB_OFFLINE",
        ],
    );

    // A snapshot another client cached in part (no weights) is not a model offline.
    let partial = tempfile::tempdir().unwrap();
    assert_success(&score(&hub, partial.path(), &[], "org/tiny"));
    let snapshot = partial
        .path()
        .join("hub/models--org--tiny/snapshots")
        .join(hub.sha("models", "org/tiny"));
    std::fs::remove_file(snapshot.join("model.safetensors")).unwrap();
    let out = score(&hub, partial.path(), &[("HF_HUB_OFFLINE", "1")], "org/tiny");
    assert_failure_says(&out, &["not in the Hub cache"]);

    // Not shaped like an id: a local path, whose loader says what is missing.
    let out = score(&hub, home, &[], "no/such/dir");
    assert_failure_says(&out, &["no/such/dir/", "not found"]);
}

fn hub_for_library(hub: &FakeHub, home: &Path, offline: bool) -> burnish_hub::Hub {
    let mut vars = HashMap::from([
        ("HF_ENDPOINT".to_string(), hub.url()),
        ("HF_HOME".to_string(), home.display().to_string()),
    ]);
    if offline {
        vars.insert("HF_HUB_OFFLINE".into(), "1".into());
    }
    burnish_hub::Hub::from_vars(|k| vars.get(k).cloned()).unwrap()
}

#[test]
fn datasets_yield_their_json_files_and_refuse_parquet_only_data() {
    let hub = FakeHub::start();
    let rows = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|i| format!("{{\"prompt\": \"p{i}\", \"completion\": \"c{i}\"}}\n"))
            .collect::<String>()
            .into_bytes()
    };
    let files = |names: &[(&str, Vec<u8>)]| -> BTreeMap<String, Vec<u8>> {
        names
            .iter()
            .map(|(n, d)| (n.to_string(), d.clone()))
            .collect()
    };
    hub.add_repo(
        "datasets",
        "org/rows",
        files(&[
            ("README.md", b"# rows".to_vec()),
            ("dataset_infos.json", b"{}".to_vec()),
            ("data/train.jsonl", rows(3)),
            ("data/test.jsonl", rows(1)),
            ("extra/other.json", b"[]".to_vec()),
        ]),
    );
    hub.add_repo(
        "datasets",
        "org/parquet",
        files(&[("data/train-00000-of-00001.parquet", b"PAR1".to_vec())]),
    );
    let home = tempfile::tempdir().unwrap();
    let online = hub_for_library(&hub, home.path(), false);

    let paths = online
        .dataset_files("org/rows", None, Some("data"))
        .unwrap();
    let names: Vec<&str> = paths
        .iter()
        .map(|p| p.file_name().unwrap().to_str().unwrap())
        .collect();
    assert_eq!(names, ["test.jsonl", "train.jsonl"]);
    assert_eq!(std::fs::read(&paths[1]).unwrap(), rows(3));

    let err = online
        .dataset_files("org/parquet", None, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("Parquet is not supported"), "{err}");
    let err = online
        .dataset_files("org/rows", None, Some("nowhere"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("no JSON or JSONL files"), "{err}");

    hub.forget_seen();
    let offline = hub_for_library(&hub, home.path(), true);
    let cached = offline
        .dataset_files("org/rows", None, Some("data/"))
        .unwrap();
    assert_eq!(cached, paths);
    assert!(hub.seen().is_empty());
    let err = offline
        .dataset_files("org/rows", None, Some("extra"))
        .unwrap_err();
    assert!(err.to_string().contains("HF_HUB_OFFLINE"), "{err}");
}

/// A finished LoRA run of the fixture recipe with checkpoints, trained once for all push tests.
fn trained_run() -> &'static Path {
    static RUN: OnceLock<PathBuf> = OnceLock::new();
    RUN.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("hub-push-run");
        let _ = std::fs::remove_dir_all(&dir);
        let recipe =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../recipes/fixture-chat-sft.toml");
        let out = Command::new(env!("CARGO_BIN_EXE_burnish"))
            .args(["train", recipe.to_str().unwrap(), "--device", "cpu"])
            .args(["--set", &format!("output.dir=\"{}\"", dir.display())])
            .args(["--set", "train.max_steps=2", "--set", "train.save_every=1"])
            .output()
            .unwrap();
        assert_success(&out);
        assert!(
            dir.join("checkpoints").is_dir(),
            "the run should have checkpoints"
        );
        dir
    })
}

/// The files a push of the fixture run must upload, with their contents.
fn expected_upload(run: &Path) -> BTreeMap<String, Vec<u8>> {
    [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "metrics.jsonl",
        "recipe.toml",
    ]
    .iter()
    .map(|name| (name.to_string(), std::fs::read(run.join(name)).unwrap()))
    .collect()
}

#[test]
fn push_uploads_a_run_in_one_commit_with_the_token_in_the_header_only() {
    let run = trained_run();
    let hub = FakeHub::start();
    hub.set_token(TOKEN);
    let home = tempfile::tempdir().unwrap();
    let push = |extra: &[&str]| {
        let mut args = vec!["push", run.to_str().unwrap(), "--repo", "me/tiny-lora"];
        args.extend_from_slice(extra);
        burnish(&hub, home.path(), &[("HF_TOKEN", TOKEN)], &args)
    };

    let out = push(&["--private", "--message", "first push"]);
    assert_success(&out);
    assert_secret_kept(&out);
    let commits = hub.commits();
    assert_eq!(commits.len(), 1, "one commit");
    let commit = &commits[0];
    assert_eq!(
        (commit.repo.as_str(), commit.revision.as_str()),
        ("me/tiny-lora", "main")
    );
    assert_eq!(commit.summary, "first push");
    assert_eq!(
        commit.files,
        expected_upload(run),
        "exactly the run's files, never checkpoints"
    );
    assert!(hub.is_private("me/tiny-lora"));
    let oid = hub.sha("models", "me/tiny-lora");
    assert!(
        stdout(&out).contains(&format!("/me/tiny-lora/commit/{oid}")),
        "{}",
        stdout(&out)
    );
    // The fixture recipe trains from a local path, which the card names: worth a warning.
    assert!(stderr(&out).contains("is not a Hub id"), "{}", stderr(&out));
    let seen = hub.seen();
    assert!(!seen.is_empty());
    for request in &seen {
        assert_eq!(
            request.authorization.as_deref(),
            Some(format!("Bearer {TOKEN}").as_str()),
            "{} {}",
            request.method,
            request.path
        );
    }

    // The repo exists now: a second push is a second commit, not an error.
    let out = push(&[]);
    assert_success(&out);
    assert_eq!(hub.commits().len(), 2);
    assert_eq!(
        hub.commits()[1].summary,
        "Upload adapter trained with burnish"
    );
}

#[test]
fn push_dry_run_lists_files_and_sizes_and_makes_no_request() {
    let run = trained_run();
    let hub = FakeHub::start();
    let home = tempfile::tempdir().unwrap();
    let out = burnish(
        &hub,
        home.path(),
        &[("HF_TOKEN", TOKEN)],
        &["push", run.to_str().unwrap(), "--repo", "me/x", "--dry-run"],
    );
    assert_success(&out);
    assert_secret_kept(&out);
    let text = stdout(&out);
    for (name, data) in expected_upload(run) {
        let line = text
            .lines()
            .find(|l| l.ends_with(&format!("  {name}")))
            .unwrap_or_else(|| panic!("{name} not listed:\n{text}"));
        assert!(line.contains(&data.len().to_string()), "{line}");
    }
    assert!(!text.contains("checkpoints"), "{text}");
    assert!(hub.seen().is_empty(), "--dry-run made requests");
}

#[test]
fn refused_pushes_exit_non_zero_keep_the_token_secret_and_claim_nothing() {
    let run = trained_run();
    let run = run.to_str().unwrap();
    let home = tempfile::tempdir().unwrap();
    let args = ["push", run, "--repo", "me/tiny-lora"];

    // A token the Hub does not accept: refused at repo creation.
    let hub = FakeHub::start();
    hub.set_token("hf_the_right_one");
    let out = burnish(&hub, home.path(), &[("HF_TOKEN", TOKEN)], &args);
    assert_failure_says(
        &out,
        &["refused", "HTTP 401", "HF_TOKEN", "Nothing was committed"],
    );
    assert_secret_kept(&out);
    assert!(!stdout(&out).contains("pushed"));
    assert!(hub.commits().is_empty());

    // Refused at the commit.
    let hub = FakeHub::start();
    hub.set_token(TOKEN);
    hub.fail_commit(403);
    let out = burnish(&hub, home.path(), &[("HF_TOKEN", TOKEN)], &args);
    assert_failure_says(&out, &["refused", "HTTP 403", "Nothing was committed"]);
    assert_secret_kept(&out);
    assert!(!stdout(&out).contains("pushed"));

    // No token at all: said before any request.
    hub.forget_seen();
    let out = burnish(&hub, home.path(), &[], &args);
    assert_failure_says(&out, &["no Hub token found", "huggingface-cli login"]);
    assert!(hub.seen().is_empty());

    // A directory that is not a finished run.
    let empty = tempfile::tempdir().unwrap();
    let out = burnish(
        &hub,
        home.path(),
        &[("HF_TOKEN", TOKEN)],
        &["push", empty.path().to_str().unwrap(), "--repo", "me/x"],
    );
    assert_failure_says(&out, &["not a finished run"]);
}

#[test]
fn a_push_failing_mid_upload_reports_the_failure_and_commits_nothing() {
    let run = trained_run();
    let hub = FakeHub::start();
    hub.set_token(TOKEN);
    hub.fail_commit(500);
    let home = tempfile::tempdir().unwrap();
    let out = burnish(
        &hub,
        home.path(),
        &[("HF_TOKEN", TOKEN)],
        &["push", run.to_str().unwrap(), "--repo", "me/tiny-lora"],
    );
    assert_failure_says(
        &out,
        &["failed while committing", "500", "Nothing was committed"],
    );
    assert_secret_kept(&out);
    assert!(!stdout(&out).contains("pushed"), "{}", stdout(&out));
    assert!(hub.commits().is_empty());
}

#[test]
fn a_recipe_trains_from_a_hub_model_and_a_hub_dataset() {
    let hub = hub_with_tiny();
    let rows: String = (0..4)
        .map(|i| {
            format!(
                "{{\"messages\": [{{\"role\": \"user\", \"content\": \"q{i}\"}}, {{\"role\": \"assistant\", \"content\": \"a{i}\"}}]}}\n"
            )
        })
        .collect();
    hub.add_repo(
        "datasets",
        "org/chat",
        BTreeMap::from([("train.jsonl".to_string(), rows.into_bytes())]),
    );
    let home = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let recipe = work.path().join("recipe.toml");
    std::fs::write(
        &recipe,
        "[model]\nbase = \"org/tiny\"\n\n[adapter]\nr = 4\n\n[data]\ntrain = \"org/chat\"\n\n\
         [train]\nmax_steps = 2\n\n[output]\ndir = \"run\"\n",
    )
    .unwrap();
    let train = || {
        burnish(
            &hub,
            home.path(),
            &[],
            &["train", recipe.to_str().unwrap(), "--device", "cpu"],
        )
    };
    assert_success(&train());
    let run = work.path().join("run");
    // The Hub ids, not cache paths, are what the run records and the Hub links.
    let card = std::fs::read_to_string(run.join("README.md")).unwrap();
    assert!(
        card.contains("base_model: org/tiny") && card.contains("datasets:\n- org/chat"),
        "{card}"
    );
    let config = std::fs::read_to_string(run.join("adapter_config.json")).unwrap();
    assert!(
        config.contains("\"base_model_name_or_path\": \"org/tiny\""),
        "{config}"
    );
    let resolved = std::fs::read_to_string(run.join("recipe.toml")).unwrap();
    assert!(resolved.contains("base = \"org/tiny\""), "{resolved}");

    // A typo that is neither a directory nor a repo says both.
    std::fs::write(
        &recipe,
        std::fs::read_to_string(&recipe)
            .unwrap()
            .replace("org/tiny", "org/tinny"),
    )
    .unwrap();
    assert_failure_says(&train(), &["org/tinny", "not a local directory"]);
}
