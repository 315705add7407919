//! What README.md, docs/ and examples/ show as working, run against the real binary:
//!
//! - README's `review` commands print what their comments say; its denial example is what
//!   `review` prints for that reference;
//! - README's "Try it" (`serve --dev`, then the `curl` of `examples/review-spark-driver.json`),
//!   and the log of that process parsed against the schema in `docs/logging.md`: one JSON object
//!   per line, no key twice, every field documented with its type;
//! - every field any `tracing` event in src/ can write is in that schema, and none repeats one of
//!   the four fixed keys (lines the test run never provokes included);
//! - with a development OpenBao: `examples/spark-driver-pod.yaml`'s "Try it" and README's
//!   `vault check`, with the output they show.

mod support;

use std::collections::BTreeMap;
use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap()
}

/// The binary, run from the repository root (the examples use paths relative to it).
fn binary() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_secrets-webhook"));
    command.current_dir(repo());
    command
}

/// `cargo run -- ARGS` or `secrets-webhook ARGS` as written in a doc, run with the built binary.
fn run_doc_command(line: &str, config: Option<&Path>) -> Output {
    let words = shlex::split(line).unwrap_or_else(|| panic!("not a shell command: {line}"));
    let args: Vec<&str> = match words.iter().position(|w| w == "--") {
        Some(i) if words[0] == "cargo" => words[i + 1..].iter().map(String::as_str).collect(),
        _ if words[0] == "secrets-webhook" => words[1..].iter().map(String::as_str).collect(),
        _ => panic!("not a secrets-webhook command: {line}"),
    };
    let mut command = binary();
    match config {
        // The documented command, with its `--config` pointing at `config` instead.
        Some(config) => {
            let mut args = args.iter();
            while let Some(arg) = args.next() {
                if *arg == "--config" {
                    args.next();
                    continue;
                }
                command.arg(arg);
            }
            command.arg("--config").arg(config);
        }
        None => {
            command.args(&args);
        }
    }
    command.output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Fenced code blocks of a Markdown text: (info string, body).
fn code_blocks(markdown: &str) -> Vec<(String, String)> {
    let mut blocks = Vec::new();
    let mut open: Option<(String, String)> = None;
    for line in markdown.lines() {
        match (&mut open, line.trim_start().strip_prefix("```")) {
            (None, Some(info)) => open = Some((info.trim().to_owned(), String::new())),
            (Some(_), Some(_)) => blocks.extend(open.take()),
            (Some((_, body)), None) => {
                body.push_str(line);
                body.push('\n');
            }
            (None, None) => {}
        }
    }
    blocks
}

fn env_value<'a>(pod: &'a Value, name: &str) -> &'a Value {
    let env = pod["spec"]["containers"][0]["env"].as_array().unwrap();
    env.iter()
        .find(|e| e["name"] == name)
        .unwrap_or(&Value::Null)
}

/// README: every `review` command in a code block prints what its comment says.
#[test]
fn readme_review_commands_print_what_the_readme_says() {
    let readme = read("README.md");
    let commands: Vec<(String, String)> = code_blocks(&readme)
        .into_iter()
        .flat_map(|(_, body)| body.lines().map(str::to_owned).collect::<Vec<_>>())
        .filter(|l| l.starts_with("cargo run -- review"))
        .map(|l| {
            let (command, claim) = l.split_once('#').expect("a comment says what it prints");
            (command.trim().to_owned(), claim.trim().to_owned())
        })
        .collect();
    assert!(commands.len() >= 3, "{commands:?}");
    for (command, claim) in commands {
        let out = run_doc_command(&command, None);
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert!(out.status.success(), "{command}: {stderr}");
        let printed: Value =
            serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{command}: {e}"));
        match claim.as_str() {
            "the AdmissionReview response" => {
                assert_eq!(printed["kind"], "AdmissionReview", "{command}");
                assert_eq!(printed["response"]["allowed"], true, "{command}");
                assert_eq!(printed["response"]["patchType"], "JSONPatch", "{command}");
            }
            "the decoded JSON Patch" => {
                let ops = printed.as_array().expect("a JSON Patch array");
                assert!(
                    !ops.is_empty() && ops.iter().all(|op| op["op"].is_string()),
                    "{command}"
                );
            }
            "the mutated pod" => {
                assert_eq!(printed["kind"], "Pod", "{command}");
                assert_eq!(
                    env_value(&printed, "DB_PASSWORD")["valueFrom"]["secretKeyRef"],
                    json!({"name": "iomete-secret-store-finance", "key": "db_password", "optional": false}),
                    "{command}"
                );
            }
            other => panic!("{command}: README claims {other:?}, which this test does not check"),
        }
    }
}

/// README's example denial is what `review` prints for that reference, word for word.
#[test]
fn readme_denial_example_is_what_review_prints() {
    let readme = read("README.md");
    let example = code_blocks(&readme)
        .into_iter()
        .map(|(_, body)| body)
        .find(|body| body.starts_with("annotation env.secrets.iomete.com/X:"))
        .expect("README shows a denial");
    let example = example.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut pod: Value = serde_json::from_str(&read("examples/spark-driver-pod.json")).unwrap();
    // A typo in the key, as alice (who holds Use on `finance` in the dev config) would make it.
    pod["metadata"]["annotations"] =
        json!({"env.secrets.iomete.com/X": "kubernetes:finance/db_pasword"});
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pod.json");
    std::fs::write(&file, pod.to_string()).unwrap();
    let out = binary()
        .args(["review", "--user", "alice"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "a denial exits 1");
    assert_eq!(
        text(&out.stderr).trim(),
        format!("error: denied: {example}")
    );
}

/// `docs/logging.md`'s field table: name -> (type, where it is present).
fn documented_fields() -> BTreeMap<String, (String, String)> {
    let doc = read("docs/logging.md");
    let section = doc.split("## Fields").nth(1).expect("a Fields section");
    let section = section.split("\n## ").next().unwrap_or_default();
    section
        .lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let name = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
            Some((name.to_owned(), (cells[2].to_owned(), cells[3].to_owned())))
        })
        .collect()
}

fn has_type(value: &Value, documented: &str) -> bool {
    match documented {
        "string" => value.is_string(),
        "number" => value.is_number(),
        "integer" => value.is_u64() || value.is_i64(),
        "boolean" => value.is_boolean(),
        other => panic!("docs/logging.md names an unknown type {other:?}"),
    }
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The arguments of the macro call whose `(` is at the start of `text`, split at top-level
/// commas (string literals and nested brackets skipped).
fn macro_args(text: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut current = String::new();
    let mut depth = 0usize;
    let mut chars = text.chars();
    let mut in_string = false;
    while let Some(c) = chars.next() {
        if in_string {
            current.push(c);
            match c {
                '\\' => current.extend(chars.next()),
                '"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                current.push(c);
            }
            '(' | '[' | '{' => {
                if depth > 0 {
                    current.push(c);
                }
                depth += 1;
            }
            ')' | ']' | '}' => {
                depth -= 1;
                if depth == 0 {
                    args.push(current.trim().to_owned());
                    return args;
                }
                current.push(c);
            }
            ',' if depth == 1 => args.push(std::mem::take(&mut current).trim().to_owned()),
            _ => current.push(c),
        }
    }
    panic!("unbalanced macro call: {text:.200}")
}

/// A Rust string literal's text (escapes and `\`-newline continuations resolved).
fn literal(arg: &str) -> String {
    let inner = arg.trim().trim_start_matches('"').trim_end_matches('"');
    let mut out = String::new();
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('\n') => while chars.next_if(|c| c.is_whitespace()).is_some() {},
            Some('n') => out.push('\n'),
            Some(other) => out.push(other),
            None => {}
        }
    }
    out
}

/// The messages and field names of every `tracing::LEVEL!(...)` event in src/, each with where
/// it is written: (messages, fields).
type Located = Vec<(String, String)>;
fn logged_events() -> (Located, Located) {
    let mut files = Vec::new();
    rust_files(&repo().join("src"), &mut files);
    let mut fields = Vec::new();
    let mut messages = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        // Events of a file's unit tests are the tests' own, not the server's.
        let text = text
            .split("#[cfg(test)]\nmod tests")
            .next()
            .unwrap_or_default();
        let shown = file.strip_prefix(repo()).unwrap().display().to_string();
        for level in ["trace", "debug", "info", "warn", "error"] {
            let call = format!("tracing::{level}!(");
            for (at, _) in text.match_indices(&call) {
                let line = text[..at].lines().count();
                for arg in macro_args(&text[at + call.len() - 1..]) {
                    // The message ends the fields; `target:` and `parent:` are not fields.
                    if arg.starts_with('"') {
                        messages.push((literal(&arg), format!("{shown}:{line}")));
                        break;
                    }
                    if arg.starts_with("target:") || arg.starts_with("parent:") {
                        continue;
                    }
                    let name = arg.split('=').next().unwrap_or_default().trim();
                    let name = name.trim_start_matches(['%', '?']).trim();
                    fields.push((name.to_owned(), format!("{shown}:{line}")));
                }
            }
        }
    }
    (messages, fields)
}

/// Every field an event in src/ writes is documented in docs/logging.md, and none is one of the
/// four keys every line already has (it would repeat a key in the object: the denial text once
/// overwrote "admission" as a denial line's `message`). Covers lines no test run provokes.
#[test]
fn every_logged_field_is_documented_and_none_repeats_a_fixed_key() {
    let documented = documented_fields();
    let (messages, fields) = logged_events();
    assert!(
        fields.len() > 40,
        "the scan found too few fields: {fields:?}"
    );
    assert!(
        fields.iter().any(|(n, _)| n == "denial") && fields.iter().any(|(n, _)| n == "audit"),
        "{fields:?}"
    );
    let mut wrong = Vec::new();
    for (name, at) in &fields {
        if ["timestamp", "level", "target", "message"].contains(&name.as_str()) {
            wrong.push(format!(
                "{at}: a field named {name:?} repeats the line's own key"
            ));
        } else if !documented.contains_key(name) {
            wrong.push(format!(
                "{at}: field {name:?} is not in docs/logging.md's Fields table"
            ));
        }
    }
    // Every event is in the Events table (the table may show a long message's beginning).
    let doc = read("docs/logging.md");
    let events = doc.split("## Events").nth(1).expect("an Events section");
    let events = events.split("\n## ").next().unwrap_or_default();
    let listed: Vec<&str> = events
        .lines()
        .filter_map(|l| l.split('|').nth(1))
        .flat_map(|cell| cell.split('`').skip(1).step_by(2))
        // `beginning ...`: a long message shown by its beginning.
        .map(|l| l.trim_end_matches("...").trim_end())
        .collect();
    assert!(listed.len() > 20, "{listed:?}");
    for (message, at) in &messages {
        if !listed.iter().any(|l| message.starts_with(l)) {
            wrong.push(format!(
                "{at}: event {message:?} is not in docs/logging.md's Events table"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// Checks one parsed log line against the documented fields.
fn check_line(line: &Map<String, Value>, fields: &BTreeMap<String, (String, String)>) {
    let required = |on: &'static str| -> Vec<&String> {
        let present = fields.iter().filter(|(_, (_, o))| o == on);
        present.map(|(name, _)| name).collect()
    };
    for name in required("every line")
        .into_iter()
        .filter(|n| *n != "message")
    {
        assert!(line.contains_key(name.as_str()), "no {name}: {line:?}");
    }
    let ours = line["target"]
        .as_str()
        .is_some_and(|t| t.starts_with("secrets_webhook"));
    if !ours {
        return;
    }
    for (name, value) in line {
        let (kind, _) = fields
            .get(name)
            .unwrap_or_else(|| panic!("field {name:?} is not in docs/logging.md: {line:?}"));
        assert!(has_type(value, kind), "{name} is not a {kind}: {line:?}");
    }
    assert!(line.contains_key("message"), "{line:?}");
    if line["message"] != "admission" {
        return;
    }
    let mut wanted = required("every admission line");
    match line["decision"].as_str() {
        Some("denied") => wanted.extend(required("denied admission lines")),
        Some("allowed" | "patched") => {
            wanted.extend(required("allowed and patched admission lines"))
        }
        other => panic!("decision {other:?}: {line:?}"),
    }
    if line.contains_key("kind") {
        wanted.extend(required("SparkApplication and VaultConfig admission lines"));
    }
    for name in wanted {
        assert!(
            line.contains_key(name.as_str()),
            "admission line without {name}: {line:?}"
        );
    }
}

/// Starts `command` (the binary) with its production log format and level, stdout piped, and its
/// stderr (the JSON log) collected line by line until it exits.
fn spawn_logged(
    command: &mut Command,
) -> (std::process::Child, std::thread::JoinHandle<Vec<String>>) {
    let mut child = command
        .env_remove("RUST_LOG")
        .env_remove("SECRETS_WEBHOOK_LOG_FORMAT")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<String>>()
    });
    (child, log)
}

/// README "Try it": `serve --dev` with the embedded default, the printed `curl` of
/// `examples/review-spark-driver.json`; then the process's log, parsed line by line against
/// `docs/logging.md`.
#[tokio::test]
async fn readme_try_it_serves_the_example_and_logs_by_the_documented_schema() {
    let fields = documented_fields();
    assert!(fields.len() > 10, "{fields:?}");
    let certs = tempfile::tempdir().unwrap();
    let mut command = binary();
    command
        .args([
            "serve",
            "--dev",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--api-listen",
            "127.0.0.1:0",
        ])
        .arg("--dev-cert-dir")
        .arg(certs.path())
        .env_remove("SECRETS_WEBHOOK_CONFIG");
    let (mut child, log) = spawn_logged(&mut command);
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut banner = Vec::new();
    let mut lines = stdout.lines();
    let curl = loop {
        let line = lines
            .next()
            .expect("serve --dev prints its banner")
            .unwrap();
        if line.trim_start().starts_with("curl ") {
            break line.trim().to_owned();
        }
        banner.push(line);
    };
    let api_port = loop {
        let line = lines
            .next()
            .expect("serve --dev announces its API")
            .unwrap();
        if let Some(rest) = line.strip_prefix("management API: https://localhost:") {
            break rest
                .chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>();
        }
    };
    // The printed command is README's, with the port that was bound.
    let readme = read("README.md");
    let readme_curl = code_blocks(&readme)
        .into_iter()
        .find(|(_, body)| body.starts_with("curl "))
        .map(|(_, body)| {
            body.replace("\\\n", " ")
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        })
        .expect("README shows the curl command");
    let port = curl
        .split("https://localhost:")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .expect("a port in the printed command")
        .to_owned();
    let printed = curl.split_whitespace().collect::<Vec<_>>().join(" ");
    let ca = certs.path().join("ca.pem");
    assert_eq!(
        printed,
        readme_curl
            .replace(".dev-certs/ca.pem", &ca.display().to_string())
            .replace("localhost:8443", &format!("localhost:{port}")),
        "{banner:?}"
    );

    let client = support::tls::https_client(&std::fs::read_to_string(&ca).unwrap());
    let post_to = |path: &'static str, body: String| {
        let client = client.clone();
        let url = format!("https://localhost:{port}{path}");
        async move {
            let response = client
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            response.json::<Value>().await.unwrap()
        }
    };
    let post = |body: String| post_to("/mutate", body);
    let example = read("examples/review-spark-driver.json");
    let answer = post(example.clone()).await;
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
    assert!(answer["response"]["patch"].is_string(), "{answer}");
    let mut as_bob: Value = serde_json::from_str(&example).unwrap();
    as_bob["request"]["userInfo"] = json!({"username": "bob", "groups": ["system:authenticated"]});
    as_bob["request"]["uid"] = json!("uid-bob");
    let denied = post(as_bob.to_string()).await;
    assert_eq!(denied["response"]["allowed"], false, "{denied}");
    let plain = post(support::tls::review("uid-plain")).await;
    assert_eq!(plain["response"]["allowed"], true, "{plain}");
    let invalid = post("{\"not\": \"a review\"}".into()).await;
    assert_eq!(invalid["response"]["allowed"], false, "{invalid}");
    // The validating webhook: a SparkApplication whose requester names another user in `run-as`.
    let app = |uid: &str, run_as: &str| {
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": uid, "operation": "CREATE", "name": "pi", "namespace": "iomete-system",
                "kind": {"group": "sparkoperator.k8s.io", "version": "v1beta2", "kind": "SparkApplication"},
                "resource": {"group": "sparkoperator.k8s.io", "version": "v1beta2", "resource": "sparkapplications"},
                "userInfo": {"username": "bob", "groups": ["system:authenticated"]},
                "object": {"apiVersion": "sparkoperator.k8s.io/v1beta2", "kind": "SparkApplication",
                    "metadata": {"name": "pi", "namespace": "iomete-system"},
                    "spec": {"driver": {"annotations": {"secrets.iomete.com/run-as": run_as}}}},
                "oldObject": null, "dryRun": false}})
        .to_string()
    };
    let run_as_denied = post_to("/validate", app("uid-app-alice", "alice")).await;
    assert_eq!(
        run_as_denied["response"]["allowed"], false,
        "{run_as_denied}"
    );
    let run_as_allowed = post_to("/validate", app("uid-app-bob", "bob")).await;
    assert_eq!(
        run_as_allowed["response"]["allowed"], true,
        "{run_as_allowed}"
    );
    // The defaulting webhook: a VaultConfig created without `delivery` gets runtime.
    let vault_config = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "uid-vaultconfig", "operation": "CREATE", "name": "prod",
            "namespace": "iomete-system",
            "kind": {"group": "secrets.iomete.com", "version": "v1alpha1", "kind": "VaultConfig"},
            "resource": {"group": "secrets.iomete.com", "version": "v1alpha1", "resource": "vaultconfigs"},
            "userInfo": {"username": "platform-admin", "groups": ["system:authenticated"]},
            "object": {"apiVersion": "secrets.iomete.com/v1alpha1", "kind": "VaultConfig",
                "metadata": {"name": "prod", "namespace": "iomete-system"},
                "spec": {"resourceBundle": "b", "host": "https://vault:8200", "path": "/v1/secret/data/p",
                    "auth": {"token": {"secretRef": {"name": "t", "key": "token"}}}}},
            "oldObject": null, "dryRun": false}});
    let defaulted = post_to("/default", vault_config.to_string()).await;
    assert_eq!(defaulted["response"]["allowed"], true, "{defaulted}");
    assert!(defaulted["response"]["patch"].is_string(), "{defaulted}");
    // The management API writes audit lines: one for a caller without a token.
    let anonymous = client
        .get(format!(
            "https://localhost:{api_port}/api/v1/domains/finance/secrets"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "still running after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(0));
    let log = log.join().unwrap().join("\n");

    let lines = support::logs::parse_lines(&log);
    for line in &lines {
        check_line(line, &fields);
    }
    let admissions: Vec<&Map<String, Value>> = lines
        .iter()
        .filter(|l| l["message"] == "admission")
        .collect();
    let by_uid = |uid: &str| {
        admissions
            .iter()
            .find(|l| l["uid"] == uid)
            .unwrap_or_else(|| panic!("no admission line for {uid}: {log}"))
    };
    let patched = by_uid("6f3a8f0e-1c55-4d43-9d2a-1f1b1c3f5a01");
    assert_eq!(
        (
            &patched["decision"],
            &patched["identity"],
            &patched["workload"]
        ),
        (&json!("patched"), &json!("alice"), &json!("spark-driver"))
    );
    // Denial lines carry identity and workload too (README: every admission line does).
    let bob = by_uid("uid-bob");
    assert_eq!(
        (
            &bob["decision"],
            &bob["identity"],
            &bob["workload"],
            &bob["reason"]
        ),
        (
            &json!("denied"),
            &json!("bob"),
            &json!("spark-driver"),
            &json!("forbidden")
        )
    );
    assert_eq!(bob["denial"], denied["response"]["status"]["message"]);
    assert_eq!(by_uid("uid-plain")["decision"], "allowed");
    // The validating webhook's lines: the same fields, plus what was validated; the denial in
    // `denial`, `message` still "admission".
    let app_denied = by_uid("uid-app-alice");
    assert_eq!(
        (
            &app_denied["kind"],
            &app_denied["name"],
            &app_denied["identity"],
            &app_denied["decision"],
            &app_denied["reason"]
        ),
        (
            &json!("SparkApplication"),
            &json!("pi"),
            &json!("bob"),
            &json!("denied"),
            &json!("run-as")
        )
    );
    assert_eq!(
        app_denied["denial"],
        run_as_denied["response"]["status"]["message"]
    );
    assert_eq!(by_uid("uid-app-bob")["decision"], "allowed");
    let vault_line = by_uid("uid-vaultconfig");
    assert_eq!(
        (
            &vault_line["kind"],
            &vault_line["name"],
            &vault_line["identity"],
            &vault_line["decision"],
            &vault_line["ops"]
        ),
        (
            &json!("VaultConfig"),
            &json!("prod"),
            &json!("platform-admin"),
            &json!("patched"),
            &json!(1)
        )
    );
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "audit" && l["actor"] == "anonymous"),
        "no audit line: {log}"
    );
    for event in ["serving", "SIGTERM received", "drained; exiting"] {
        assert!(
            lines.iter().any(|l| l["message"] == event),
            "no {event:?} line: {log}"
        );
    }
}

/// A local config file has no CREATE to default `delivery` at, and an upgrade must not switch it:
/// an entry without `delivery` stays materialize, and start-up warns once for each such entry,
/// naming it and the fix (docs/logging.md); entries that name it are not warned about.
#[tokio::test]
async fn start_up_warns_once_per_local_vault_config_that_names_no_delivery() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("config.yaml");
    let entry = |name: &str, delivery: &str| {
        format!(
            "  - {{name: {name}, host: 'http://127.0.0.1:9', path: /v1/secret/data/p, \
             resourceBundle: b, auth: {{token: {{file: /nonexistent}}}}{delivery}}}\n"
        )
    };
    let text = format!(
        "vaultConfigs:\n{}{}{}{}",
        entry("unnamed-one", ""),
        entry("named-runtime", ", delivery: runtime"),
        entry("named-materialize", ", delivery: materialize"),
        entry("unnamed-two", ""),
    );
    std::fs::write(&config, text).unwrap();
    let mut command = binary();
    command
        .args(["serve", "--dev", "--listen", "127.0.0.1:0"])
        .args([
            "--admin-listen",
            "127.0.0.1:0",
            "--api-listen",
            "127.0.0.1:0",
        ])
        .arg("--dev-cert-dir")
        .arg(tmp.path().join("certs"))
        .arg("--config")
        .arg(&config);
    let (mut child, log) = spawn_logged(&mut command);
    // Started: the banner's `curl` line is printed once both ports are bound. Stdout is read to
    // its end (a closed pipe would fail the server's later prints).
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if line.trim_start().starts_with("curl ") {
                let _ = started_tx.send(());
            }
        }
    });
    let started = started_rx.recv_timeout(Duration::from_secs(30)).is_ok();
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    let log = log.join().unwrap().join("\n");
    assert!(started, "serve --dev did not start: {log}");
    assert_eq!(status.code(), Some(0), "{log}");
    let fields = documented_fields();
    let lines = support::logs::parse_lines(&log);
    for line in &lines {
        check_line(line, &fields);
    }
    let warned: Vec<&Value> = lines
        .iter()
        .filter(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("Vault config does not name delivery"))
        })
        .map(|l| {
            assert_eq!(l["level"], "WARN", "{l:?}");
            let message = l["message"].as_str().unwrap();
            assert!(message.contains("set delivery: runtime"), "{message}");
            assert!(
                message.contains("delivery: materialize to keep it"),
                "{message}"
            );
            &l["config"]
        })
        .collect();
    assert_eq!(
        warned,
        [&json!("unnamed-one"), &json!("unnamed-two")],
        "{log}"
    );
}

/// A copy of `examples/dev-config.yaml` pointing at `bao` (README's development OpenBao runs on
/// 127.0.0.1:8200 with the token in `examples/dev-vault-token`; tests use a free port).
fn dev_config_for(bao: &support::openbao::OpenBao) -> PathBuf {
    let original = read("examples/dev-config.yaml");
    for expected in ["http://127.0.0.1:8200", "examples/dev-vault-token"] {
        assert!(
            original.contains(expected),
            "dev-config.yaml no longer has {expected}"
        );
    }
    let token = bao.file("dev-vault-token", support::openbao::ROOT_TOKEN);
    let config = original
        .replace("http://127.0.0.1:8200", &bao.addr)
        .replace("examples/dev-vault-token", &token.display().to_string());
    bao.file("dev-config.yaml", &config)
}

/// With the development OpenBao README describes: `examples/spark-driver-pod.yaml`'s "Try it"
/// prints what its comment says, and README's `vault check` prints README's lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_examples_print_what_they_say() {
    let Some(bin) = support::openbao::require_bao("vault_examples_print_what_they_say") else {
        return;
    };
    let bao = support::openbao::OpenBao::start(&bin).await;
    // README: `bao kv put secret/production s3_secret=... s3_access_key=...`
    bao.put_kv2(
        None,
        "secret",
        "production",
        json!({"s3_secret": "dev-s3-secret", "s3_access_key": "dev-s3-access-key"}),
    )
    .await;
    let config = dev_config_for(&bao);

    // examples/spark-driver-pod.yaml: "#   secrets-webhook review ..." and the lines it prints.
    let example = read("examples/spark-driver-pod.yaml");
    let comment: Vec<&str> = example
        .lines()
        .take_while(|l| l.starts_with('#'))
        .map(|l| l.trim_start_matches('#').trim())
        .collect();
    let command = comment
        .iter()
        .find(|l| l.starts_with("secrets-webhook review"))
        .expect("the example says how to try it");
    let out = run_doc_command(command, Some(&config));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{command}: {stderr}");
    let answer: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(answer["response"]["allowed"], true, "{stdout}");
    let would_write: Vec<&str> = comment
        .iter()
        .copied()
        .filter(|l| l.starts_with("would write:"))
        .collect();
    assert!(
        !would_write.is_empty(),
        "the example shows the would-be writes"
    );
    assert_eq!(stderr.lines().collect::<Vec<_>>(), would_write, "{command}");
    assert!(!stdout.contains("dev-s3-secret") && !stderr.contains("dev-s3-secret"));

    // README: `cargo run -- vault check ...` and the block of output after it.
    let readme = read("README.md");
    let blocks = code_blocks(&readme);
    let at = blocks
        .iter()
        .position(|(_, body)| body.contains("-- vault check "))
        .expect("README shows vault check");
    let command = blocks[at]
        .1
        .lines()
        .find(|l| l.contains("vault check"))
        .unwrap();
    let shown = &blocks[at + 1].1;
    let out = run_doc_command(command, Some(&config));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        shown.replace("http://127.0.0.1:8200", &bao.addr),
        "README's vault check output"
    );
}
