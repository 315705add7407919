//! The management API in `--dev` shape, over real TLS: token paths, every permission boundary,
//! write-only values (a canary searched in every answer and every log line in every encoding of
//! `support::leaks`), ETags and concurrent edits, problem details, audit
//! lines, and Vault configs with Test Connection against a real OpenBao.

mod support;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::api::{Answer, ApiServer, CONFIG};
use support::logs::captured_logs;

const FINANCE: &str = "/api/v1/domains/finance/secrets";

fn logs() -> String {
    String::from_utf8_lossy(&captured_logs().lock().unwrap()).into_owned()
}

/// `canary` in no form a value could leak in (`support::leaks`).
fn assert_no_canary(canary: &str, haystack: &str, where_: &str) {
    support::leaks::assert_no_leak(&[(where_, haystack)], &[canary]);
}

fn assert_problem(a: &Answer, status: StatusCode, field: Option<&str>) -> Value {
    assert_eq!(a.status, status, "{}", a.text);
    assert_eq!(
        a.header("content-type").as_deref(),
        Some("application/problem+json")
    );
    assert_eq!(a.header("cache-control").as_deref(), Some("no-store"));
    let p = a.json();
    assert_eq!(p["status"], json!(status.as_u16()));
    assert!(
        p["type"]
            .as_str()
            .unwrap()
            .starts_with("urn:secrets-webhook:problem:")
    );
    assert!(!p["detail"].as_str().unwrap().is_empty());
    assert_eq!(p["requestId"].as_str(), a.header("x-request-id").as_deref());
    if let Some(f) = field {
        assert_eq!(p["field"], json!(f), "{}", a.text);
    }
    p
}

#[tokio::test]
async fn bearer_tokens_and_console_backend_headers() {
    let _ = captured_logs(); // before the first request, so its audit lines are captured
    let api = ApiServer::dev(CONFIG).await;
    // No token, another scheme, an unknown token: 401 with the fix, never the token.
    let none = api.call(Method::GET, FINANCE, None, &[], None).await;
    assert_problem(&none, StatusCode::UNAUTHORIZED, Some("Authorization"));
    assert!(
        none.header("www-authenticate")
            .unwrap()
            .starts_with("Bearer")
    );
    let basic = api
        .call(
            Method::GET,
            FINANCE,
            None,
            &[("authorization", "Basic YTpi")],
            None,
        )
        .await;
    assert!(
        assert_problem(&basic, StatusCode::UNAUTHORIZED, None)["detail"]
            .as_str()
            .unwrap()
            .contains("Bearer")
    );
    let unknown = api.get(FINANCE, "not-a-token-canary-9911").await;
    assert_problem(&unknown, StatusCode::UNAUTHORIZED, None);
    assert!(!unknown.text.contains("canary-9911"));
    // A known token.
    let ok = api.get(FINANCE, "t-alice").await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(
        ok.json(),
        json!([{"key": "db_password", "source": {"type": "KUBERNETES", "id": "finance"}}])
    );
    // X-Remote-User from a caller that is no console backend: refused, not ignored.
    let forged = api
        .call(
            Method::GET,
            FINANCE,
            Some("t-carol"),
            &[("x-remote-user", "alice")],
            None,
        )
        .await;
    let p = assert_problem(&forged, StatusCode::FORBIDDEN, Some("X-Remote-User"));
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .contains("not a console backend")
    );
    let forged_group = api
        .call(
            Method::GET,
            FINANCE,
            Some("t-bob"),
            &[("x-remote-group", "platform-admins")],
            None,
        )
        .await;
    assert_problem(&forged_group, StatusCode::FORBIDDEN, Some("X-Remote-User"));
    // The console backend acts for the user it names, with that user's permissions only.
    let as_alice = api
        .call(
            Method::GET,
            FINANCE,
            Some("t-console"),
            &[("x-remote-user", "alice")],
            None,
        )
        .await;
    assert_eq!(as_alice.status, StatusCode::OK);
    let as_bob = api
        .call(
            Method::PUT,
            &format!("{FINANCE}/k1"),
            Some("t-console"),
            &[("x-remote-user", "bob"), ("if-none-match", "*")],
            Some(json!({"value": "v"})),
        )
        .await;
    assert_problem(&as_bob, StatusCode::FORBIDDEN, None);
    let as_admin_group = api
        .call(
            Method::GET,
            "/api/v1/vault-configs/nope",
            Some("t-console"),
            &[
                ("x-remote-user", "mallory"),
                ("x-remote-group", "platform-admins"),
            ],
            None,
        )
        .await;
    // The console backend is trusted to assert groups too: an admin sees a plain 404.
    assert!(
        assert_problem(&as_admin_group, StatusCode::NOT_FOUND, Some("name"))["detail"]
            .as_str()
            .unwrap()
            .contains("mallory")
    );
    // The console backend without X-Remote-User is itself (no grants).
    let itself = api.get(FINANCE, "t-console").await;
    assert_problem(&itself, StatusCode::FORBIDDEN, None);
    // Every denial is one audit line with actor, action, target, outcome and request id.
    let request_id = as_bob.header("x-request-id").unwrap();
    let line = logs()
        .lines()
        .find(|l| l.contains(&request_id))
        .map(str::to_string)
        .expect("an audit line");
    for part in [
        "audit",
        "bob (via console backend system:serviceaccount:iomete:console)",
        "secret.put",
        "domain finance key k1",
        "403 forbidden",
    ] {
        assert!(line.contains(part), "{part} missing in {line}");
    }
}

#[tokio::test]
async fn view_without_update_cannot_write_and_existence_is_not_revealed() {
    let api = ApiServer::dev(CONFIG).await;
    let create = [("if-none-match", "*")];
    // bob holds View on finance: he lists, but cannot create, edit or delete.
    assert_eq!(api.get(FINANCE, "t-bob").await.status, StatusCode::OK);
    let p = assert_problem(
        &api.put(
            &format!("{FINANCE}/new"),
            "t-bob",
            &create,
            json!({"value": "v"}),
        )
        .await,
        StatusCode::FORBIDDEN,
        None,
    );
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .contains("lacks Update on domain \"finance\""),
        "{p}"
    );
    let etag = api.get(FINANCE, "t-bob").await.etag();
    let edit = api
        .put(
            &format!("{FINANCE}/db_password"),
            "t-bob",
            &[("if-match", &etag)],
            json!({"value": "v"}),
        )
        .await;
    assert_problem(&edit, StatusCode::FORBIDDEN, None);
    assert_problem(
        &api.delete(&format!("{FINANCE}/db_password"), "t-bob", &[])
            .await,
        StatusCode::FORBIDDEN,
        None,
    );
    // carol holds nothing: the same 403 whether the key or domain exists or not.
    let existing = api.get(&format!("{FINANCE}/db_password"), "t-carol").await;
    let missing = api.get(&format!("{FINANCE}/nothing"), "t-carol").await;
    assert_problem(&existing, StatusCode::FORBIDDEN, None);
    assert_problem(&missing, StatusCode::FORBIDDEN, None);
    assert_eq!(existing.json()["detail"], missing.json()["detail"]);
    // uma holds Use only: no listing, but the selector shows finance's keys.
    assert_problem(
        &api.get(FINANCE, "t-uma").await,
        StatusCode::FORBIDDEN,
        None,
    );
    let keys = api
        .get("/api/v1/secret-keys?domain=finance", "t-uma")
        .await
        .json();
    assert!(keys.as_array().unwrap().contains(
        &json!({"key": "db_password", "source": {"type": "KUBERNETES", "id": "finance"}})
    ));
    // bob (View, no Use) sees only global keys in the selector.
    let keys = api
        .get("/api/v1/secret-keys?domain=finance", "t-bob")
        .await
        .json();
    assert_eq!(
        keys,
        json!([{"key": "warehouse_path", "source": {"type": "KUBERNETES", "id": "global"}}])
    );
    // Global keys are read-only for everyone, listed for anyone authenticated.
    assert_eq!(
        api.get("/api/v1/global/secrets", "t-carol").await.status,
        StatusCode::OK
    );
    let global = api
        .put(
            "/api/v1/domains/global/secrets/x",
            "t-admin",
            &create,
            json!({"value": "v"}),
        )
        .await;
    assert_problem(&global, StatusCode::FORBIDDEN, Some("domain"));
    // Vault configs: a config you may not view looks exactly like a missing one.
    let admin_body = json!({"resourceBundle": "vault-bundle", "host": "http://127.0.0.1:9", "path": "/v1/secret/data/x",
                            "auth": {"method": "token", "token": "tok"}});
    let made = api
        .put(
            "/api/v1/vault-configs/vc",
            "t-admin",
            &create,
            admin_body.clone(),
        )
        .await;
    assert_eq!(made.status, StatusCode::CREATED, "{}", made.text);
    let hidden = api.get("/api/v1/vault-configs/vc", "t-bob").await;
    let absent = api.get("/api/v1/vault-configs/zz", "t-bob").await;
    assert_problem(&hidden, StatusCode::NOT_FOUND, Some("name"));
    assert_eq!(
        hidden.json()["detail"]
            .as_str()
            .unwrap()
            .replace("\"vc\"", "\"zz\""),
        absent.json()["detail"].as_str().unwrap()
    );
    let w1 = api
        .put(
            "/api/v1/vault-configs/vc",
            "t-bob",
            &[("if-match", "\"1\"")],
            admin_body.clone(),
        )
        .await;
    let w2 = api
        .put(
            "/api/v1/vault-configs/zz",
            "t-bob",
            &create,
            admin_body.clone(),
        )
        .await;
    assert_problem(&w1, StatusCode::FORBIDDEN, None);
    assert_eq!(
        w1.json()["detail"]
            .as_str()
            .unwrap()
            .replace("\"vc\"", "\"zz\""),
        w2.json()["detail"].as_str().unwrap()
    );
    assert_eq!(
        api.get("/api/v1/vault-configs", "t-bob").await.json(),
        json!([])
    );
    // alice holds View (and Use) but not Update on the config: she reads it, cannot change it.
    let seen = api.get("/api/v1/vault-configs/vc", "t-alice").await;
    assert_eq!(seen.status, StatusCode::OK);
    assert!(seen.json()["auth"].get("token").is_none());
    let etag = seen.etag();
    let p = assert_problem(
        &api.put(
            "/api/v1/vault-configs/vc",
            "t-alice",
            &[("if-match", &etag)],
            admin_body.clone(),
        )
        .await,
        StatusCode::FORBIDDEN,
        None,
    );
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .contains("lacks Update on vault config"),
        "{p}"
    );
    // victor holds Update: he changes the path, keeps the stored credential...
    let mut changed = admin_body.clone();
    changed["path"] = json!("/v1/secret/data/y");
    changed["auth"] = json!({"method": "token"});
    let ok = api
        .put(
            "/api/v1/vault-configs/vc",
            "t-victor",
            &[("if-match", &etag)],
            changed.clone(),
        )
        .await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text);
    let etag = ok.etag();
    // ...but a new host needs the credential again, and the bundle is the admins' to move.
    let mut moved = changed.clone();
    moved["host"] = json!("https://attacker.example:8200");
    assert_problem(
        &api.put(
            "/api/v1/vault-configs/vc",
            "t-victor",
            &[("if-match", &etag)],
            moved,
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        Some("auth.token"),
    );
    let mut rebundled = changed.clone();
    rebundled["resourceBundle"] = json!("finance-bundle");
    assert_problem(
        &api.put(
            "/api/v1/vault-configs/vc",
            "t-victor",
            &[("if-match", &etag)],
            rebundled,
        )
        .await,
        StatusCode::FORBIDDEN,
        Some("resourceBundle"),
    );
    // Deleting and creating configs is for admins; a non-admin cannot test an unsaved config.
    assert_problem(
        &api.delete("/api/v1/vault-configs/vc", "t-victor", &[])
            .await,
        StatusCode::FORBIDDEN,
        None,
    );
    assert_problem(
        &api.post(
            "/api/v1/vault-configs:test",
            "t-alice",
            Some(admin_body.clone()),
        )
        .await,
        StatusCode::FORBIDDEN,
        None,
    );
    // victor may test with the stored credential through `name` (same server and login).
    let mut named = changed.clone();
    named["name"] = json!("vc");
    let tested = api
        .post("/api/v1/vault-configs:test", "t-victor", Some(named))
        .await;
    assert_eq!(tested.status, StatusCode::OK, "{}", tested.text);
    assert_eq!(tested.json()["ok"], json!(false)); // nothing listens on port 9
    assert_eq!(
        api.delete("/api/v1/vault-configs/vc", "t-admin", &[])
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert_problem(
        &api.get("/api/v1/vault-configs/vc", "t-admin").await,
        StatusCode::NOT_FOUND,
        None,
    );
}

#[tokio::test]
async fn domain_secret_lifecycle_with_etags_and_problems() {
    let _ = captured_logs(); // before the first request, so its audit line is captured
    let api = ApiServer::dev(CONFIG).await;
    let key = format!("{FINANCE}/api_key");
    // A write without a precondition is refused (428), naming the fix.
    assert_problem(
        &api.put(&key, "t-alice", &[], json!({"value": "v1"})).await,
        StatusCode::PRECONDITION_REQUIRED,
        Some("If-Match"),
    );
    // Create.
    let created = api
        .put(
            &key,
            "t-alice",
            &[("if-none-match", "*")],
            json!({"value": "v1"}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    assert_eq!(
        created.json(),
        json!({"key": "api_key", "source": {"type": "KUBERNETES", "id": "finance"}})
    );
    assert_eq!(
        created.header("location").as_deref(),
        Some("/api/v1/domains/finance/secrets/api_key")
    );
    assert_eq!(created.header("cache-control").as_deref(), Some("no-store"));
    let etag = created.etag();
    // The engine sees it at once (one store serves both).
    assert_eq!(
        api.webhook
            .stores
            .check("iomete-secret-store-finance", "api_key"),
        secrets_webhook::backends::StoreCheck::Present
    );
    // Creating again: 412, with the fix.
    assert_problem(
        &api.put(
            &key,
            "t-alice",
            &[("if-none-match", "*")],
            json!({"value": "v1"}),
        )
        .await,
        StatusCode::PRECONDITION_FAILED,
        Some("If-None-Match"),
    );
    // Edit with the ETag; the old ETag is then stale.
    let edited = api
        .put(
            &key,
            "t-alice",
            &[("if-match", &etag)],
            json!({"value": "v2"}),
        )
        .await;
    assert_eq!(edited.status, StatusCode::OK);
    assert_ne!(edited.etag(), etag);
    assert_problem(
        &api.put(
            &key,
            "t-alice",
            &[("if-match", &etag)],
            json!({"value": "v3"}),
        )
        .await,
        StatusCode::PRECONDITION_FAILED,
        Some("If-Match"),
    );
    assert_eq!(api.get(&key, "t-alice").await.etag(), edited.etag());
    // Bad input: each answer names the field and never echoes it.
    let pasted = "ghp_PASTEDSECRETVALUE123";
    for (path, body, status, field) in [
        (
            format!("{FINANCE}/bad key"),
            json!({"value": "v"}),
            StatusCode::BAD_REQUEST,
            "key",
        ),
        (
            "/api/v1/domains/Fin_ance/secrets/k".to_string(),
            json!({"value": "v"}),
            StatusCode::BAD_REQUEST,
            "domain",
        ),
        (
            format!("{FINANCE}/k"),
            json!({"value": 5}),
            StatusCode::BAD_REQUEST,
            "value",
        ),
        (
            format!("{FINANCE}/k"),
            json!({"value": ""}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "value",
        ),
        (
            format!("{FINANCE}/k"),
            json!({"valeu": pasted}),
            StatusCode::BAD_REQUEST,
            "valeu",
        ),
        (
            format!("{FINANCE}/k"),
            json!({}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "value",
        ),
        (
            format!("{FINANCE}/k"),
            json!([pasted]),
            StatusCode::BAD_REQUEST,
            "body",
        ),
    ] {
        let a = api
            .put(&path, "t-alice", &[("if-none-match", "*")], body)
            .await;
        assert_problem(&a, status, Some(field));
        assert!(!a.text.contains(pasted));
    }
    let not_json = api
        .client
        .put(format!("{}{FINANCE}/k", api.base))
        .bearer_auth("t-alice")
        .header("if-none-match", "*")
        .header("content-type", "application/json")
        .body(format!("{{\"value\": {pasted}"))
        .send()
        .await
        .unwrap();
    assert_eq!(not_json.status(), StatusCode::BAD_REQUEST);
    assert!(!not_json.text().await.unwrap().contains(pasted));
    let big = api
        .put(
            &format!("{FINANCE}/k"),
            "t-alice",
            &[("if-none-match", "*")],
            json!({"value": "x".repeat(600 * 1024)}),
        )
        .await;
    assert_problem(&big, StatusCode::UNPROCESSABLE_ENTITY, Some("value"));
    // Delete: 404 for a missing key (after authorization), 412 for a stale If-Match, then 204.
    assert_problem(
        &api.delete(&format!("{FINANCE}/nothing"), "t-alice", &[])
            .await,
        StatusCode::NOT_FOUND,
        None,
    );
    assert_problem(
        &api.delete(&key, "t-alice", &[("if-match", &etag)]).await,
        StatusCode::PRECONDITION_FAILED,
        None,
    );
    assert_eq!(
        api.delete(&key, "t-alice", &[]).await.status,
        StatusCode::NO_CONTENT
    );
    assert_problem(&api.get(&key, "t-alice").await, StatusCode::NOT_FOUND, None);
    // A new domain's store is created with its first key.
    let hr = api
        .put(
            "/api/v1/domains/hr/secrets/k",
            "t-admin",
            &[("if-none-match", "*")],
            json!({"value": "v"}),
        )
        .await;
    assert_problem(&hr, StatusCode::FORBIDDEN, None); // no bundle lists hr: nobody holds Update
    // Audit: one line per change with the outcome.
    let log = logs();
    for id in [
        created.header("x-request-id").unwrap(),
        edited.header("x-request-id").unwrap(),
    ] {
        let line = log.lines().find(|l| l.contains(&id)).expect("audit line");
        let line: serde_json::Value = serde_json::from_str(line).expect("a JSON log line");
        assert_eq!(line["actor"], "alice", "{line}");
    }
}

#[tokio::test]
async fn concurrent_edits_never_lose_a_write() {
    let api = std::sync::Arc::new(ApiServer::dev(CONFIG).await);
    let key = format!("{FINANCE}/raced");
    let etag = api
        .put(
            &key,
            "t-alice",
            &[("if-none-match", "*")],
            json!({"value": "v0"}),
        )
        .await
        .etag();
    // Two edits from the same read: exactly one wins, the other is told its read is stale.
    for round in 0..5 {
        let precondition = [("if-match", etag.as_str())];
        let (a, b) = tokio::join!(
            api.put(
                &key,
                "t-alice",
                &precondition,
                json!({"value": format!("a{round}")})
            ),
            api.put(
                &key,
                "t-alice",
                &precondition,
                json!({"value": format!("b{round}")})
            ),
        );
        let mut statuses = [a.status, b.status];
        statuses.sort();
        if round == 0 {
            assert_eq!(
                statuses,
                [StatusCode::OK, StatusCode::PRECONDITION_FAILED],
                "{} / {}",
                a.text,
                b.text
            );
        } else {
            // Later rounds reuse the first ETag: both are stale now.
            assert_eq!(
                statuses,
                [
                    StatusCode::PRECONDITION_FAILED,
                    StatusCode::PRECONDITION_FAILED
                ]
            );
        }
    }
    // Creates of different keys race too: every one lands.
    let creates = (0..16).map(|i| {
        let api = api.clone();
        tokio::spawn(async move {
            api.put(
                &format!("{FINANCE}/k{i}"),
                "t-alice",
                &[("if-none-match", "*")],
                json!({"value": "v"}),
            )
            .await
            .status
        })
    });
    for status in futures::future::join_all(creates).await {
        assert_eq!(status.unwrap(), StatusCode::CREATED);
    }
    let listed = api.get(FINANCE, "t-alice").await.json();
    for i in 0..16 {
        assert!(
            listed
                .as_array()
                .unwrap()
                .iter()
                .any(|o| o["key"] == json!(format!("k{i}"))),
            "k{i} lost"
        );
    }
}

#[tokio::test]
async fn a_canary_value_appears_in_no_answer_and_no_log() {
    let _ = captured_logs();
    let api = ApiServer::dev(CONFIG).await;
    let canary = "cAnArY-5eCr3t\"va\\lue/7+9=";
    let mut seen = String::new();
    let key = format!("{FINANCE}/canary");
    let created = api
        .put(
            &key,
            "t-alice",
            &[("if-none-match", "*")],
            json!({"value": canary}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED);
    seen += &created.everything();
    let edited = api
        .put(
            &key,
            "t-alice",
            &[("if-match", &created.etag())],
            json!({"value": format!("{canary}2")}),
        )
        .await;
    seen += &edited.everything();
    // Every failure path that carries the value in its body.
    seen += &api
        .put(
            &key,
            "t-alice",
            &[("if-none-match", "*")],
            json!({"value": canary}),
        )
        .await
        .everything();
    seen += &api
        .put(
            &key,
            "t-bob",
            &[("if-none-match", "*")],
            json!({"value": canary}),
        )
        .await
        .everything();
    seen += &api
        .put(
            &key,
            "t-alice",
            &[("if-match", "\"0\"")],
            json!({"value": canary}),
        )
        .await
        .everything();
    seen += &api
        .put(
            &key,
            "t-alice",
            &[("if-none-match", "*")],
            json!({"value": canary, "extra": canary}),
        )
        .await
        .everything();
    seen += &api
        .put(
            &key,
            "nope",
            &[("if-none-match", "*")],
            json!({"value": canary}),
        )
        .await
        .everything();
    seen += &api
        .put(
            &format!("{FINANCE}/x"),
            "t-alice",
            &[("if-none-match", "*")],
            json!({"value": [canary]}),
        )
        .await
        .everything();
    // Reads.
    seen += &api.get(FINANCE, "t-alice").await.everything();
    seen += &api.get(&key, "t-alice").await.everything();
    seen += &api
        .get("/api/v1/secret-keys?domain=finance", "t-alice")
        .await
        .everything();
    // Vault credentials: AppRole secret ID and token, on create, change, test and read.
    let app_role = json!({"resourceBundle": "vault-bundle", "host": "http://127.0.0.1:9", "path": "/v1/secret/data/x",
                          "auth": {"method": "appRole", "roleId": "role-1", "secretId": canary}});
    let made = api
        .put(
            "/api/v1/vault-configs/canary",
            "t-admin",
            &[("if-none-match", "*")],
            app_role.clone(),
        )
        .await;
    assert_eq!(made.status, StatusCode::CREATED, "{}", made.text);
    seen += &made.everything();
    seen += &api
        .post("/api/v1/vault-configs/canary/test", "t-admin", None)
        .await
        .everything();
    seen += &api
        .post(
            "/api/v1/vault-configs:test",
            "t-admin",
            Some(app_role.clone()),
        )
        .await
        .everything();
    let token = json!({"resourceBundle": "vault-bundle", "host": "http://127.0.0.1:9", "path": "/v1/secret/data/x",
                       "auth": {"method": "token", "token": canary}});
    seen += &api
        .put(
            "/api/v1/vault-configs/canary",
            "t-admin",
            &[("if-match", &made.etag())],
            token.clone(),
        )
        .await
        .everything();
    seen += &api
        .post("/api/v1/vault-configs:test", "t-admin", Some(token))
        .await
        .everything();
    seen += &api
        .get("/api/v1/vault-configs/canary", "t-admin")
        .await
        .everything();
    seen += &api
        .get("/api/v1/vault-configs", "t-admin")
        .await
        .everything();
    assert!(seen.contains("canary") && seen.contains("x-request-id"));
    assert_no_canary(canary, &seen, "an API answer");
    assert_no_canary(canary, &logs(), "the logs");
    assert_no_canary(
        canary,
        &format!(
            "{:?}",
            api.api.stores.read("iomete-secret-store-finance").await
        ),
        "a store's Debug",
    );
}

#[tokio::test]
async fn openapi_document_and_unknown_routes() {
    let api = ApiServer::dev(CONFIG).await;
    let doc = api
        .call(Method::GET, "/api/v1/openapi.json", None, &[], None)
        .await;
    assert_eq!(doc.status, StatusCode::OK);
    assert_eq!(doc.json()["openapi"], json!("3.1.0"));
    assert_eq!(doc.json(), secrets_webhook::api::openapi::document());
    assert_problem(
        &api.get("/api/v1/nothing", "t-alice").await,
        StatusCode::NOT_FOUND,
        None,
    );
    let wrong = api
        .call(Method::PATCH, FINANCE, Some("t-alice"), &[], None)
        .await;
    assert_eq!(wrong.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        wrong.header("content-type").as_deref(),
        Some("application/problem+json")
    );
    // The console: its three files, under a CSP that allows only them.
    let page = api.call(Method::GET, "/console/", None, &[], None).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.text.contains("New Domain Secret") && page.text.contains("Vault Integrations"));
    assert!(
        page.header("content-security-policy")
            .unwrap()
            .contains("default-src 'self'")
    );
    assert!(
        api.call(Method::GET, "/console/app.js", None, &[], None)
            .await
            .text
            .contains("textContent")
    );
}

#[test]
fn static_tokens_are_refused_without_dev() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, "apiTokens: [{token: t, user: u}]\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_secrets-webhook"))
        .args(["serve", "--config"])
        .arg(&config)
        .env_remove("SECRETS_WEBHOOK_DEV")
        .env("KUBECONFIG", dir.path().join("none"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("static API tokens are for serve --dev only"),
        "{stderr}"
    );
}

// ---- against a real OpenBao ---------------------------------------------------------------------

#[tokio::test]
async fn vault_configs_selector_and_test_connection_against_openbao() {
    use support::openbao::{OpenBao, ROOT_TOKEN, require_bao};
    let Some(bin) = require_bao("vault_configs_selector_and_test_connection_against_openbao")
    else {
        return;
    };
    let bao = OpenBao::start(&bin).await;
    bao.put_kv2(
        None,
        "secret",
        "production",
        json!({"db_password": "x", "port": "5432"}),
    )
    .await;
    bao.put_kv2(None, "secret", "production/team", json!({"token": "y"}))
        .await;
    bao.api(
        "POST",
        "sys/mounts/kv1",
        Some(json!({"type": "kv", "options": {"version": "1"}})),
    )
    .await;
    bao.api("POST", "kv1/production", Some(json!({"a": "b"})))
        .await;
    bao.policy(
        "read-prod",
        r#"path "secret/*" { capabilities = ["read", "list"] }
path "kv1/*" { capabilities = ["read", "list"] }"#,
    )
    .await;
    let (role_id, secret_id) = bao.approle("api-test", &["read-prod"], "1h").await;
    let api = ApiServer::dev(CONFIG).await;
    let host = bao.addr.clone();
    let config = |path: &str| {
        json!({"resourceBundle": "vault-bundle", "host": host, "path": path,
        "auth": {"method": "appRole", "roleId": role_id, "secretId": secret_id}})
    };
    // Test Connection before saving: the `vault check` steps.
    let tested = api
        .post(
            "/api/v1/vault-configs:test",
            "t-admin",
            Some(config("/v1/secret/data/production")),
        )
        .await;
    assert_eq!(tested.status, StatusCode::OK, "{}", tested.text);
    let r = tested.json();
    assert_eq!(r["ok"], json!(true), "{r}");
    assert_eq!(r["steps"][0]["step"], json!("login (approle)"));
    assert_eq!(
        r["steps"][1],
        json!({"step": "mount secret/", "ok": true, "detail": "kv v2 ok"})
    );
    assert_eq!(r["verdict"], json!("verdict: ok"));
    // KV v1 is rejected at test time; a path without /data/ before anything is sent.
    let v1 = api
        .post(
            "/api/v1/vault-configs:test",
            "t-admin",
            Some(config("/v1/kv1/data/production")),
        )
        .await
        .json();
    assert_eq!(v1["ok"], json!(false));
    assert!(
        v1["steps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["reason"] == json!("KvV1Unsupported")),
        "{v1}"
    );
    let no_data = api
        .post(
            "/api/v1/vault-configs:test",
            "t-admin",
            Some(config("/v1/kv1/production")),
        )
        .await;
    assert!(
        assert_problem(&no_data, StatusCode::UNPROCESSABLE_ENTITY, Some("path"))["detail"]
            .as_str()
            .unwrap()
            .contains("/data/")
    );
    // Save it; the engine's backend and the selector use it at once.
    let saved = api
        .put(
            "/api/v1/vault-configs/vault-api",
            "t-admin",
            &[("if-none-match", "*")],
            config("/v1/secret/data/production"),
        )
        .await;
    assert_eq!(saved.status, StatusCode::CREATED, "{}", saved.text);
    assert!(!saved.text.contains(&secret_id));
    assert_eq!(
        secrets_webhook::backends::VaultSource::bundle_of(
            api.api.vault.as_deref().unwrap(),
            "vault-api"
        )
        .as_deref(),
        Some("vault-bundle")
    );
    let saved_test = api
        .post("/api/v1/vault-configs/vault-api/test", "t-alice", None)
        .await
        .json();
    assert_eq!(saved_test["ok"], json!(true), "{saved_test}");
    // alice holds Use on vault-bundle: the selector shows the config's keys.
    let keys = api
        .get("/api/v1/secret-keys?domain=finance", "t-alice")
        .await
        .json();
    let vault_keys: Vec<&str> = keys
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["source"] == json!({"type": "VAULT", "id": "vault-api"}))
        .map(|k| k["key"].as_str().unwrap())
        .collect();
    assert_eq!(vault_keys, ["db_password", "port", "team#token"]);
    // victor holds View and Update, not Use: no Vault keys for him.
    let keys = api
        .get("/api/v1/secret-keys?domain=finance", "t-victor")
        .await
        .json();
    assert!(
        keys.as_array()
            .unwrap()
            .iter()
            .all(|k| k["source"]["type"] == json!("KUBERNETES")),
        "{keys}"
    );
    // A token config with the root token works too; a wrong token fails at login, named.
    let token_cfg = json!({"resourceBundle": "vault-bundle", "host": host, "path": "/v1/secret/data/production",
        "auth": {"method": "token", "token": ROOT_TOKEN}});
    assert_eq!(
        api.post("/api/v1/vault-configs:test", "t-admin", Some(token_cfg))
            .await
            .json()["ok"],
        json!(true)
    );
    let bad = json!({"resourceBundle": "vault-bundle", "host": host, "path": "/v1/secret/data/production",
        "auth": {"method": "token", "token": "hvs.wrong"}});
    let failed = api
        .post("/api/v1/vault-configs:test", "t-admin", Some(bad))
        .await
        .json();
    assert_eq!(
        failed["steps"][0]["reason"],
        json!("LoginFailed"),
        "{failed}"
    );
    assert!(!failed.to_string().contains("hvs.wrong"));
}
