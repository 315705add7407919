//! The management API against the real control plane (scripts/kube-e2e.sh: etcd, kube-apiserver,
//! kube-controller-manager, the chart and the webhook): the API runs in cluster shape in this
//! process, as the webhook's ServiceAccount with exactly the shipped RBAC plus
//! `components/management-api`. Real ServiceAccount tokens through TokenReview, real Secrets and
//! their resourceVersions, concurrent edits refused by the API server, a pod admitted by the
//! webhook making a key "in use", and a VaultConfig whose credentials Secret the garbage collector
//! removes with it. Without the Kubernetes binaries: a loud SKIP (a failure in CI).

mod support;

use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use secrets_webhook::admission::Webhook;
use secrets_webhook::backends::vault::{VaultBackend, VaultOptions};
use secrets_webhook::config::{LocalConfig, Naming, Settings};
use secrets_webhook::identity::{KeyRing, Keys, TrustedControllers};
use secrets_webhook::metrics::Metrics;
use serde_json::{Value, json};
use support::api::ApiServer;
use support::kube_e2e::{Cluster, NS, cluster, unique};

/// The API's RBAC component (`components/management-api/rbac.yaml`), bound to the webhook's
/// ServiceAccount in the data-plane namespace, as the component renders it on the base.
fn apply_api_rbac(k: &Cluster) {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("manifests/components/management-api/rbac.yaml"),
    )
    .unwrap();
    let mut items = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let mut object: Value = serde::Deserialize::deserialize(doc).unwrap();
        if object.is_null() {
            continue;
        }
        if matches!(object["kind"].as_str(), Some("Role" | "RoleBinding")) {
            object["metadata"]["namespace"] = json!(NS);
        }
        if let Some(subjects) = object["subjects"].as_array_mut() {
            for s in subjects {
                s["namespace"] = json!(NS);
            }
        }
        items.push(object);
    }
    assert_eq!(items.len(), 4);
    k.apply(&json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string());
}

async fn api_as_webhook(k: &Cluster) -> ApiServer {
    let kubeconfig = kube::config::Kubeconfig::read_from(k.dir.join("webhook.kubeconfig")).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    let client = kube::Client::try_from(config).unwrap();
    let settings = Settings {
        naming: Naming {
            namespace: NS.into(),
            ..Naming::default()
        },
        ..Settings::default()
    };
    // The installed webhook's signing key, as its Secret gives it to every replica: the API
    // counts only pods whose stamps it signed.
    let key = k
        .get("secret", NS, "secrets-webhook-signing-key")
        .expect("the install created the signing key");
    let current = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        key["data"]["current"].as_str().unwrap(),
    )
    .unwrap();
    let keys = Keys::fixed(KeyRing::new(&current, None).unwrap());
    let vault = VaultBackend::in_cluster(
        client.clone(),
        settings.naming.clone(),
        Arc::clone(&keys),
        VaultOptions::default(),
    );
    let webhook = Webhook::from_cluster_parts(
        settings,
        client.clone(),
        Arc::new(Metrics::new()),
        TrustedControllers::default(),
        keys,
        Arc::clone(&vault),
    )
    .unwrap();
    for _ in 0..300 {
        if webhook.ready() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        webhook.ready(),
        "the API's engine parts did not list their objects"
    );
    let file = LocalConfig::parse(&format!(
        "apiAdmins: [{{kind: User, name: \"system:serviceaccount:{NS}:api-admin\"}}]"
    ))
    .unwrap();
    let api = secrets_webhook::api::cluster(&webhook, vault, client, &file, vec![]).unwrap();
    ApiServer::serve(webhook, api).await
}

fn service_account(k: &Cluster, name: &str) -> (String, String) {
    k.apply(&json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": NS}}).to_string());
    (
        format!("system:serviceaccount:{NS}:{name}"),
        k.token(NS, name, None),
    )
}

#[test]
fn the_api_on_a_real_control_plane() {
    let Some(k) = cluster("the_api_on_a_real_control_plane") else {
        return;
    };
    let _shared = k.shared();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
        .block_on(on_a_real_control_plane(k));
}

async fn on_a_real_control_plane(k: &Cluster) {
    apply_api_rbac(k);
    let (alice_user, alice) = service_account(k, "api-alice");
    let (bob_user, bob) = service_account(k, "api-bob");
    let (_, admin) = service_account(k, "api-admin");
    let d = unique("apid");
    k.apply(&json!({"apiVersion": "secrets.iomete.com/v1alpha1", "kind": "ResourceBundle",
        "metadata": {"name": format!("{d}-bundle"), "namespace": NS},
        "spec": {"domains": [d], "grants": [
            {"subjects": [{"kind": "User", "name": alice_user}], "permissions": ["view", "update", "use"]},
            {"subjects": [{"kind": "User", "name": "alice"}], "permissions": ["use"]},
            {"subjects": [{"kind": "User", "name": bob_user}], "permissions": ["view"]}]}}).to_string());
    let api = api_as_webhook(k).await;
    let list = format!("/api/v1/domains/{d}/secrets");

    // Tokens: real ServiceAccount tokens pass TokenReview; anything else is 401.
    let mut listed = api.get(&list, &alice).await;
    for _ in 0..50 {
        if listed.status == StatusCode::OK {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await; // the bundle reaching the watch
        listed = api.get(&list, &alice).await;
    }
    assert_eq!(listed.status, StatusCode::OK, "{}", listed.text);
    assert_eq!(listed.json(), json!([]));
    assert_eq!(
        api.get(&list, "not-a-token").await.status,
        StatusCode::UNAUTHORIZED
    );
    // One character of the signature changed (not the last: its low bits are padding).
    let at = alice.len() - 10;
    let swap = if &alice[at..at + 1] == "A" { "B" } else { "A" };
    let forged = format!("{}{swap}{}", &alice[..at], &alice[at + 1..]);
    assert_eq!(
        api.get(&list, &forged).await.status,
        StatusCode::UNAUTHORIZED
    );

    // Create: the real store Secret, its resourceVersion as the ETag.
    let key = format!("{list}/api_key");
    let created = api
        .put(
            &key,
            &alice,
            &[("if-none-match", "*")],
            json!({"value": "canary-e2e-Zq81"}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    let store = k
        .get("secret", NS, &format!("iomete-secret-store-{d}"))
        .expect("the store Secret");
    assert_eq!(
        created.etag(),
        format!(
            "\"{}\"",
            store["metadata"]["resourceVersion"].as_str().unwrap()
        )
    );
    assert!(store["data"]["api_key"].is_string());
    assert!(!created.text.contains("canary"));

    // View without Update cannot write.
    assert_eq!(api.get(&list, &bob).await.status, StatusCode::OK);
    assert_eq!(
        api.put(
            &format!("{list}/x"),
            &bob,
            &[("if-none-match", "*")],
            json!({"value": "v"})
        )
        .await
        .status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        api.delete(&key, &bob, &[]).await.status,
        StatusCode::FORBIDDEN
    );

    // Two edits from one read: the API server's optimistic concurrency lets exactly one through.
    let etag = created.etag();
    let precondition = [("if-match", etag.as_str())];
    let (a, b) = tokio::join!(
        api.put(&key, &alice, &precondition, json!({"value": "one"})),
        api.put(&key, &alice, &precondition, json!({"value": "two"})),
    );
    let mut statuses = [a.status, b.status];
    statuses.sort();
    assert_eq!(
        statuses,
        [StatusCode::OK, StatusCode::PRECONDITION_FAILED],
        "{} / {}",
        a.text,
        b.text
    );

    // In use: a pod the webhook admitted with a grant for the key.
    let pod = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": unique("uses"), "namespace": NS,
                     "labels": {"secrets.iomete.com/inject": "true"},
                     "annotations": {"env.secrets.iomete.com/API_KEY": format!("kubernetes:{d}/api_key")}},
        "spec": {"containers": [{"name": "main", "image": "busybox"}]}});
    let stored = k.eventually("the webhook admits the pod", || {
        let run = k
            .kubectl()
            .user("alice", &[])
            .args(["create", "-o", "json", "-f", "-"])
            .stdin(pod.to_string())
            .run();
        if run.success {
            Ok(run.json())
        } else {
            Err(run.stderr)
        }
    });
    let granted: Value = serde_json::from_str(
        stored["metadata"]["annotations"]["secrets.iomete.com/granted"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(granted, json!([format!("kubernetes:{d}/api_key")]));
    let refused = api.delete(&key, &alice, &[]).await;
    assert_eq!(refused.status, StatusCode::CONFLICT, "{}", refused.text);
    assert_eq!(refused.json()["pods"], json!(1));
    let forced = api
        .call(
            reqwest::Method::DELETE,
            &format!("{key}?force=true"),
            Some(&alice),
            &[],
            None,
        )
        .await;
    assert_eq!(forced.status, StatusCode::NO_CONTENT, "{}", forced.text);
    let store = k
        .get("secret", NS, &format!("iomete-secret-store-{d}"))
        .unwrap();
    assert!(store["data"].get("api_key").is_none());

    // A Vault config: the object, its immutable credentials Secret owned by it; never returned.
    let name = unique("vc");
    let body = json!({"resourceBundle": format!("{d}-bundle"), "host": "http://127.0.0.1:9", "path": "/v1/secret/data/x",
                      "auth": {"method": "token", "token": "canary-token-Zq81"}});
    assert_eq!(
        api.put(
            &format!("/api/v1/vault-configs/{name}"),
            &alice,
            &[("if-none-match", "*")],
            body.clone()
        )
        .await
        .status,
        StatusCode::FORBIDDEN
    );
    let made = api
        .put(
            &format!("/api/v1/vault-configs/{name}"),
            &admin,
            &[("if-none-match", "*")],
            body,
        )
        .await;
    assert_eq!(made.status, StatusCode::CREATED, "{}", made.text);
    let object = k.get("vaultconfig", NS, &name).expect("the VaultConfig");
    assert!(!object.to_string().contains("canary"));
    let secret_name = object["spec"]["auth"]["token"]["secretRef"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let secret = k
        .get("secret", NS, &secret_name)
        .expect("the credentials Secret");
    assert_eq!(secret["immutable"], json!(true));
    assert_eq!(
        secret["metadata"]["ownerReferences"][0]["name"],
        json!(name)
    );
    assert_eq!(
        api.delete(&format!("/api/v1/vault-configs/{name}"), &admin, &[])
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert!(k.get("vaultconfig", NS, &name).is_none());
    assert!(k.get("secret", NS, &secret_name).is_none());
    // Against a real OpenBao: the saved config's Test Connection logs in with the credential the
    // API put into its Secret (read through the API server), and the webhook records `Ready`.
    if let Some(bin) = support::openbao::require_bao("the_api_on_a_real_control_plane (Vault)") {
        let bao = support::openbao::OpenBao::start(&bin).await;
        bao.put_kv2(None, "secret", "e2e", json!({"db_password": "x"}))
            .await;
        let name = unique("vault");
        let body = json!({"resourceBundle": format!("{d}-bundle"), "host": bao.addr, "path": "/v1/secret/data/e2e",
                          "auth": {"method": "token", "token": support::openbao::ROOT_TOKEN}});
        let made = api
            .put(
                &format!("/api/v1/vault-configs/{name}"),
                &admin,
                &[("if-none-match", "*")],
                body,
            )
            .await;
        assert_eq!(made.status, StatusCode::CREATED, "{}", made.text);
        let tested = api
            .post(&format!("/api/v1/vault-configs/{name}/test"), &admin, None)
            .await
            .json();
        assert_eq!(tested["ok"], json!(true), "{tested}");
        let mut ready = Value::Null;
        for _ in 0..100 {
            ready = api
                .get(&format!("/api/v1/vault-configs/{name}"), &alice)
                .await
                .json()["status"]
                .clone();
            if ready["ready"] == json!(true) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(
            ready["ready"],
            json!(true),
            "the webhook recorded no Ready condition: {ready}"
        );
        assert!(!ready.to_string().contains(support::openbao::ROOT_TOKEN));
        assert_eq!(
            api.delete(&format!("/api/v1/vault-configs/{name}"), &admin, &[])
                .await
                .status,
            StatusCode::NO_CONTENT
        );
    }
    let _ = k
        .kubectl()
        .ns(NS)
        .args([
            "delete",
            "pod",
            stored["metadata"]["name"].as_str().unwrap(),
            "--wait=false",
        ])
        .run();
}
