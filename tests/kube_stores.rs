//! The Kubernetes store watch cache (`StoreWatch`) under API server faults (failed lists, closed
//! watches, `410 Expired`), and the fake API server's own contract, all through the real
//! `kube::Client` over HTTP on 127.0.0.1. The watch's ordinary behaviour against real Secrets is in
//! tests/e2e.rs (`store_watch_follows_real_secrets_and_ignores_what_is_not_a_store`).

mod support;

use std::time::Duration;

use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
    WatchEvent, WatchParams,
};
use secrets_webhook::backends::kubernetes::StoreWatch;
use secrets_webhook::backends::{StoreCheck, StoreIndex};
use secrets_webhook::config::Naming;
use serde_json::json;
use support::fake_apiserver::{Collection, FakeApiServer, Fault, SarAnswer, pod, secret};

const NS: &str = "iomete-system";
const WAIT: Duration = Duration::from_secs(10);

fn api_error(err: kube::Error) -> Box<kube::core::Status> {
    match err {
        kube::Error::Api(status) => status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// Poll `cond` until it holds or `WAIT` passes.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A fake server holding a global and a `finance` store, and a ready watch on it.
async fn watched() -> (FakeApiServer, std::sync::Arc<StoreWatch>) {
    let api = FakeApiServer::start().await;
    api.put(secret(NS, "iomete-secret-store", &[("legacy_token", "v1")]));
    api.put(secret(
        NS,
        "iomete-secret-store-finance",
        &[("db_password", "v2"), ("api_key", "v3")],
    ));
    let watch = StoreWatch::spawn(api.client(), &Naming::default());
    tokio::time::timeout(WAIT, watch.wait_ready())
        .await
        .expect("store watch ready");
    assert!(api.wait_for_watches(1, WAIT).await, "watch established");
    (api, watch)
}

// ----- StoreWatch -----

#[tokio::test]
async fn not_ready_until_first_listing() {
    let api = FakeApiServer::start().await;
    api.put(secret(NS, "iomete-secret-store", &[("k", "v")]));
    let list_path = format!("/api/v1/namespaces/{NS}/secrets");
    api.inject(Fault::status("GET", &list_path, 500).except_watches());
    let watch = StoreWatch::spawn(api.client(), &Naming::default());
    eventually("a failed list", || api.count("GET", &list_path) >= 1).await;
    assert!(!watch.ready());
    assert_eq!(
        watch.check("iomete-secret-store", "k"),
        StoreCheck::MissingStore
    );

    api.clear_faults();
    tokio::time::timeout(WAIT, watch.wait_ready())
        .await
        .expect("ready after the list succeeds");
    assert!(watch.ready());
    assert_eq!(watch.check("iomete-secret-store", "k"), StoreCheck::Present);
}

#[tokio::test]
async fn recovers_when_the_server_closes_the_watch() {
    let (api, watch) = watched().await;
    let watches = || {
        api.requests()
            .iter()
            .filter(|r| r.query.contains("watch=true"))
            .count()
    };
    let before = watches();
    api.close_watches();
    api.put(secret(
        NS,
        "iomete-secret-store",
        &[("legacy_token", "v1"), ("after_close", "v")],
    ));
    eventually("change after the close seen", || {
        watch.check("iomete-secret-store", "after_close") == StoreCheck::Present
    })
    .await;
    assert!(watches() > before, "the watcher watched again");
}

/// After a watch ends, the store watch resumes from the last event it saw (its object's
/// resourceVersion), not from the older listing: nothing is replayed, and a short watch history
/// on the server cannot force a relist.
#[tokio::test]
async fn resumes_from_the_last_event_it_saw() {
    let (api, watch) = watched().await;
    let seen = api.put(secret(
        NS,
        "iomete-secret-store",
        &[("legacy_token", "v1"), ("latest", "v")],
    ));
    eventually("the event seen", || {
        watch.check("iomete-secret-store", "latest") == StoreCheck::Present
    })
    .await;
    api.clear_log();
    api.close_watches();
    eventually("watching again", || {
        api.requests()
            .iter()
            .any(|r| r.query.contains("watch=true"))
    })
    .await;
    let rewatch = api
        .requests()
        .into_iter()
        .find(|r| r.query.contains("watch=true"))
        .expect("a new watch");
    let rv = seen["metadata"]["resourceVersion"].as_str().unwrap();
    assert!(
        rewatch.query.contains(&format!("resourceVersion={rv}&"))
            || rewatch.query.ends_with(&format!("resourceVersion={rv}")),
        "resumed from {} instead of the last event ({rv})",
        rewatch.query
    );
}

#[tokio::test]
async fn relists_after_410_expired_and_drops_stores_deleted_meanwhile() {
    let (api, watch) = watched().await;
    let lists = || {
        api.requests()
            .iter()
            .filter(|r| r.path.ends_with("/secrets") && !r.query.contains("watch=true"))
            .count()
    };
    assert_eq!(lists(), 1);
    assert_eq!(
        watch.stores(),
        ["iomete-secret-store", "iomete-secret-store-finance"]
    );
    assert_eq!(
        watch.keys("iomete-secret-store-finance"),
        Some(vec!["api_key".to_string(), "db_password".to_string()])
    );
    assert_eq!(watch.keys("iomete-secret-store-hr"), None);
    // Keep the watcher away while the store is deleted and the history is compacted, so the
    // deletion is only visible through a relist.
    api.inject(Fault::status("GET", "/api/v1/namespaces", 500).watches_only());
    api.close_watches();
    eventually("watch closed", || api.open_watches() == 0).await;
    api.remove(
        &Collection::secrets(),
        Some(NS),
        "iomete-secret-store-finance",
    );
    api.put(secret(NS, "iomete-secret-store-hr", &[("payroll", "v")]));
    api.compact();
    api.clear_faults();
    eventually("relist applied", || {
        watch.check("iomete-secret-store-hr", "payroll") == StoreCheck::Present
    })
    .await;
    assert_eq!(lists(), 2, "410 Expired led to exactly one relist");
    assert_eq!(
        watch.check("iomete-secret-store-finance", "db_password"),
        StoreCheck::MissingStore
    );
    assert!(watch.ready(), "stays ready across the relist");
    assert_eq!(
        watch.stores(),
        ["iomete-secret-store", "iomete-secret-store-hr"]
    );
    assert_eq!(
        watch.keys("iomete-secret-store-hr"),
        Some(vec!["payroll".to_string()])
    );
}

#[tokio::test]
async fn keeps_no_values() {
    let canary = "canary-value-3f9c1d";
    let api = FakeApiServer::start().await;
    api.put(secret(
        NS,
        "iomete-secret-store-finance",
        &[("db_password", canary)],
    ));
    let watch = StoreWatch::spawn(api.client(), &Naming::default());
    tokio::time::timeout(WAIT, watch.wait_ready())
        .await
        .unwrap();
    api.put(secret(
        NS,
        "iomete-secret-store-finance",
        &[("db_password", canary), ("other", canary)],
    ));
    eventually("update seen", || {
        watch.check("iomete-secret-store-finance", "other") == StoreCheck::Present
    })
    .await;
    let debug = format!("{watch:?}");
    assert!(debug.contains("db_password"), "{debug}");
    let encoded = "Y2FuYXJ5LXZhbHVlLTNmOWMxZA=="; // base64 of the canary, as on the wire
    assert!(
        !debug.contains(canary) && !debug.contains(encoded),
        "{debug}"
    );
}

#[tokio::test]
async fn dropping_the_watch_stops_it() {
    let (api, watch) = watched().await;
    drop(watch);
    eventually("watch connection closed", || api.open_watches() == 0).await;
}

// ----- the fake API server itself, as other tests rely on it -----

#[tokio::test]
async fn fake_pod_get_missing_is_a_404_status() {
    let api = FakeApiServer::start().await;
    api.put(pod("spark", "driver"));
    let pods: Api<Pod> = Api::namespaced(api.client(), "spark");
    assert_eq!(
        pods.get("driver").await.unwrap().metadata.name.as_deref(),
        Some("driver")
    );

    let status = api_error(pods.get("x").await.unwrap_err());
    assert_eq!((status.code, status.reason.as_str()), (404, "NotFound"));
    assert_eq!(status.message, "pods \"x\" not found");
    let details = status.details.unwrap();
    assert_eq!(
        (details.name.as_str(), details.kind.as_str()),
        ("x", "pods")
    );
    assert_eq!(api.count("GET", "/api/v1/namespaces/spark/pods/x"), 1);
    assert_eq!(api.count("GET", "/api/v1/namespaces/spark/pods/driver"), 1);
}

#[tokio::test]
async fn fake_subject_access_review_records_and_answers() {
    let api = FakeApiServer::start().await;
    api.set_sar_responder(|body| match body["spec"]["user"].as_str() {
        Some("alice") => SarAnswer::Allow,
        Some("bob") => SarAnswer::Deny("no grant".into()),
        Some("carol") => SarAnswer::Deny(String::new()),
        Some("dave") => SarAnswer::ExplicitDeny("denied by policy".into()),
        Some("erin") => SarAnswer::EvaluationError("authorizer webhook unreachable".into()),
        _ => SarAnswer::Error(500),
    });
    let sars: Api<SubjectAccessReview> = Api::all(api.client());
    let review = |user: &str| SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.into()),
            groups: Some(vec!["eng".into()]),
            resource_attributes: Some(ResourceAttributes {
                verb: Some("use".into()),
                resource: Some("domains".into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let pp = PostParams::default();
    let status = |user: &'static str| {
        let sars = sars.clone();
        let pp = pp.clone();
        async move {
            let answer = sars.create(&pp, &review(user)).await.unwrap();
            serde_json::to_value(answer.status.unwrap()).unwrap()
        }
    };
    // Exactly the fields a real API server writes: RBAC never sets `denied`, and leaves out an
    // empty reason.
    assert_eq!(status("alice").await, json!({"allowed": true}));
    assert_eq!(
        status("bob").await,
        json!({"allowed": false, "reason": "no grant"})
    );
    assert_eq!(status("carol").await, json!({"allowed": false}));
    assert_eq!(
        status("dave").await,
        json!({"allowed": false, "denied": true, "reason": "denied by policy"})
    );
    assert_eq!(
        status("erin").await,
        json!({"allowed": false, "evaluationError": "authorizer webhook unreachable"})
    );
    assert_eq!(
        api_error(sars.create(&pp, &review("eve")).await.unwrap_err()).code,
        500
    );
    // Validation as the API server does it: attributes and a subject are required.
    let mut no_attributes = review("alice");
    no_attributes.spec.resource_attributes = None;
    let invalid = api_error(sars.create(&pp, &no_attributes).await.unwrap_err());
    assert_eq!((invalid.code, invalid.reason.as_str()), (422, "Invalid"));
    let mut nobody = review("alice");
    (nobody.spec.user, nobody.spec.groups) = (None, None);
    assert_eq!(
        api_error(sars.create(&pp, &nobody).await.unwrap_err()).code,
        422
    );

    let bodies = api.sar_requests();
    assert_eq!(bodies.len(), 8);
    assert_eq!(bodies[0]["spec"]["user"], "alice");
    assert_eq!(bodies[0]["spec"]["groups"], json!(["eng"]));

    // Without a responder: a user no RBAC rule mentions.
    let fresh = FakeApiServer::start().await;
    let sars: Api<SubjectAccessReview> = Api::all(fresh.client());
    let answer = sars.create(&pp, &review("alice")).await.unwrap();
    assert_eq!(
        serde_json::to_value(answer.status.unwrap()).unwrap(),
        json!({"allowed": false})
    );
}

#[tokio::test]
async fn fake_secret_writes_bump_resource_versions_and_detect_conflicts() {
    let api = FakeApiServer::start().await;
    let secrets: Api<Secret> = Api::namespaced(api.client(), "team");
    let pp = PostParams::default();
    let new: Secret = serde_json::from_value(secret("team", "s", &[("a", "1")])).unwrap();
    let created = secrets.create(&pp, &new).await.unwrap();
    let rv1: u64 = created
        .metadata
        .resource_version
        .clone()
        .unwrap()
        .parse()
        .unwrap();
    assert!(created.metadata.uid.is_some() && created.metadata.creation_timestamp.is_some());
    assert!(api_error(secrets.create(&pp, &new).await.unwrap_err()).is_already_exists());

    let merge = Patch::Merge(json!({"stringData": {"b": "2"}}));
    let patched = secrets
        .patch("s", &PatchParams::default(), &merge)
        .await
        .unwrap();
    let rv2: u64 = patched
        .metadata
        .resource_version
        .clone()
        .unwrap()
        .parse()
        .unwrap();
    assert!(rv2 > rv1);
    let data = patched.data.unwrap();
    assert_eq!(
        data.get("b").map(|v| v.0.as_slice()),
        Some(&b"2"[..]),
        "stringData is folded into data"
    );

    // Replace with the stale resourceVersion: 409 Conflict; with the current one: accepted.
    let mut stale = created.clone();
    stale.metadata.labels = Some([("x".to_owned(), "y".to_owned())].into());
    assert!(api_error(secrets.replace("s", &pp, &stale).await.unwrap_err()).is_conflict());
    stale.metadata.resource_version = Some(rv2.to_string());
    assert!(secrets.replace("s", &pp, &stale).await.is_ok());

    let apply = Patch::Apply(
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "applied"}, "data": {"k": "dg=="}}),
    );
    assert!(
        secrets
            .patch("applied", &PatchParams::apply("test"), &apply)
            .await
            .is_ok(),
        "apply creates"
    );
    let ops = Patch::Json::<()>(
        serde_json::from_value(json!([{"op": "remove", "path": "/data/k"}])).unwrap(),
    );
    let removed = secrets
        .patch("applied", &PatchParams::default(), &ops)
        .await
        .unwrap();
    assert!(removed.data.unwrap_or_default().is_empty());

    assert!(
        secrets
            .delete("s", &DeleteParams::default())
            .await
            .unwrap()
            .is_right(),
        "core delete answers a Status"
    );
    assert!(api_error(secrets.get("s").await.unwrap_err()).is_not_found());
}

#[tokio::test]
async fn fake_lists_honour_selectors_and_pages() {
    let api = FakeApiServer::start().await;
    for (name, team) in [("a", "x"), ("b", "y"), ("c", "x")] {
        let mut s = secret("ns", name, &[]);
        s["metadata"]["labels"] = json!({"team": team});
        api.put(s);
    }
    let secrets: Api<Secret> = Api::namespaced(api.client(), "ns");
    let names = |list: kube::core::ObjectList<Secret>| {
        list.items
            .into_iter()
            .filter_map(|s| s.metadata.name)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(
            secrets
                .list(&ListParams::default().labels("team=x"))
                .await
                .unwrap()
        ),
        ["a", "c"]
    );
    assert_eq!(
        names(
            secrets
                .list(&ListParams::default().fields("metadata.name=b"))
                .await
                .unwrap()
        ),
        ["b"]
    );
    let first = secrets.list(&ListParams::default().limit(2)).await.unwrap();
    let token = first.metadata.continue_.clone().unwrap();
    assert_eq!(
        first.metadata.resource_version,
        Some(api.resource_version().to_string())
    );
    assert_eq!(names(first), ["a", "b"]);
    assert_eq!(
        names(
            secrets
                .list(&ListParams::default().limit(2).continue_token(&token))
                .await
                .unwrap()
        ),
        ["c"]
    );
}

#[tokio::test]
async fn fake_watch_replays_streams_and_expires() {
    let api = FakeApiServer::start().await;
    api.put(secret("ns", "a", &[]));
    let rv = api.resource_version().to_string();
    api.put(secret("ns", "b", &[]));
    let secrets: Api<Secret> = Api::namespaced(api.client(), "ns");
    let mut events = secrets
        .watch(&WatchParams::default().timeout(5), &rv)
        .await
        .unwrap()
        .boxed();
    let name = |e: WatchEvent<Secret>| match e {
        WatchEvent::Added(s) => format!("ADDED {}", s.metadata.name.unwrap()),
        WatchEvent::Modified(s) => format!("MODIFIED {}", s.metadata.name.unwrap()),
        WatchEvent::Deleted(s) => format!("DELETED {}", s.metadata.name.unwrap()),
        WatchEvent::Bookmark(b) => format!("BOOKMARK {}", b.metadata.resource_version),
        WatchEvent::Error(e) => format!("ERROR {}", e.code),
    };
    assert_eq!(
        name(events.try_next().await.unwrap().unwrap()),
        "ADDED b",
        "replayed after rv"
    );
    api.put(secret("ns", "a", &[("k", "v")]));
    api.remove(&Collection::secrets(), Some("ns"), "b");
    api.put(secret("elsewhere", "c", &[]));
    api.send_bookmarks();
    assert_eq!(
        name(events.try_next().await.unwrap().unwrap()),
        "MODIFIED a"
    );
    assert_eq!(name(events.try_next().await.unwrap().unwrap()), "DELETED b");
    assert_eq!(
        name(events.try_next().await.unwrap().unwrap()),
        format!("BOOKMARK {}", api.resource_version())
    );
    api.close_watches();
    assert!(
        events.try_next().await.unwrap().is_none(),
        "closed by the server"
    );

    api.compact();
    let mut expired = secrets
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    assert_eq!(
        name(expired.try_next().await.unwrap().unwrap()),
        "ERROR 410"
    );
}

#[tokio::test]
async fn fake_custom_resources_and_status_subresource() {
    let api = FakeApiServer::start().await;
    let ar = ApiResource::from_gvk_with_plural(
        &kube::core::GroupVersionKind::gvk("secrets.iomete.com", "v1alpha1", "VaultConfig"),
        "vaultconfigs",
    );
    let configs: Api<DynamicObject> = Api::namespaced_with(api.client(), "team", &ar);
    let mut obj = DynamicObject::new("prod", &ar);
    obj.data = json!({"spec": {"path": "/v1/secret/data/prod"}, "status": {"phase": "ignored"}});
    let created = configs.create(&PostParams::default(), &obj).await.unwrap();
    assert_eq!(
        created.data.get("status"),
        None,
        "status is not set through the main resource"
    );
    assert_eq!(created.metadata.generation, Some(1));

    let status = Patch::Merge(json!({"status": {"phase": "Ready"}}));
    let with_status = configs
        .patch_status("prod", &PatchParams::default(), &status)
        .await
        .unwrap();
    assert_eq!(with_status.data["status"]["phase"], "Ready");
    assert_eq!(
        with_status.metadata.generation,
        Some(1),
        "status changes leave generation alone"
    );

    let spec = Patch::Merge(
        json!({"spec": {"path": "/v1/secret/data/other"}, "status": {"phase": "nope"}}),
    );
    let changed = configs
        .patch("prod", &PatchParams::default(), &spec)
        .await
        .unwrap();
    assert_eq!(
        (
            changed.data["status"]["phase"].as_str(),
            changed.metadata.generation
        ),
        (Some("Ready"), Some(2))
    );

    let all: Api<DynamicObject> = Api::all_with(api.client(), &ar);
    assert_eq!(
        all.list(&ListParams::default()).await.unwrap().items.len(),
        1
    );
    let missing = api_error(configs.get("nope").await.unwrap_err());
    assert_eq!(
        missing.message,
        "vaultconfigs.secrets.iomete.com \"nope\" not found"
    );
}

/// A status subresource exists only where it is declared: the VaultConfig CRD declares one, the
/// ResourceBundle CRD does not, Secrets have none (their `/status` is a 404, as on a real server);
/// a custom resource is served only while its CRD is installed.
#[tokio::test]
async fn fake_status_subresource_only_where_declared() {
    let api = FakeApiServer::start().await;
    let not_found = "the server could not find the requested resource";

    // Secrets: `/status` does not exist, whatever the verb.
    api.put(secret("ns", "s", &[("a", "1")]));
    let secrets: Api<Secret> = Api::namespaced(api.client(), "ns");
    let status = Patch::Merge(json!({"status": {"phase": "x"}}));
    let e = api_error(
        secrets
            .patch_status("s", &PatchParams::default(), &status)
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.message.as_str()), (404, not_found));
    let e = api_error(secrets.get_status("s").await.unwrap_err());
    assert_eq!(e.code, 404);
    let mut whole: Secret = secrets.get("s").await.unwrap();
    whole.metadata.managed_fields = None;
    let e = api_error(
        secrets
            .replace_status("s", &PostParams::default(), &whole)
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 404);
    // Pods have one: a status write changes only the status.
    api.put(pod("ns", "p"));
    let pods: Api<Pod> = Api::namespaced(api.client(), "ns");
    let patched = pods
        .patch_status(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Running"}, "spec": {"nodeName": "n1"}})),
        )
        .await
        .unwrap();
    assert_eq!(patched.status.unwrap().phase.as_deref(), Some("Running"));
    assert_eq!(patched.spec.unwrap().node_name, None);

    // ResourceBundle: no status subresource in its CRD, so `/status` is a 404 and `status` is an
    // ordinary field of the main resource.
    let ar = ApiResource::from_gvk_with_plural(
        &kube::core::GroupVersionKind::gvk("secrets.iomete.com", "v1alpha1", "ResourceBundle"),
        "resourcebundles",
    );
    let bundles: Api<DynamicObject> = Api::namespaced_with(api.client(), "ns", &ar);
    let mut bundle = DynamicObject::new("b", &ar);
    bundle.data = json!({"spec": {"domains": ["finance"]}, "status": {"note": "kept"}});
    let created = bundles
        .create(&PostParams::default(), &bundle)
        .await
        .unwrap();
    assert_eq!(created.data["status"]["note"], "kept");
    let e = api_error(
        bundles
            .patch_status("b", &PatchParams::default(), &status)
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.message.as_str()), (404, not_found));

    // A custom resource whose CRD is not installed is not served; installing it serves it.
    let widgets_ar = ApiResource::from_gvk_with_plural(
        &kube::core::GroupVersionKind::gvk("example.com", "v1", "Widget"),
        "widgets",
    );
    let widgets: Api<DynamicObject> = Api::namespaced_with(api.client(), "ns", &widgets_ar);
    let e = api_error(widgets.list(&ListParams::default()).await.unwrap_err());
    assert_eq!((e.code, e.message.as_str()), (404, not_found));
    api.put(json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.com"},
        "spec": {"group": "example.com", "scope": "Namespaced",
                 "names": {"kind": "Widget", "plural": "widgets"},
                 "versions": [{"name": "v1", "served": true, "storage": true,
                               "subresources": {"status": {}}}]}
    }));
    assert!(
        widgets
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    let v2_ar = ApiResource::from_gvk_with_plural(
        &kube::core::GroupVersionKind::gvk("example.com", "v2", "Widget"),
        "widgets",
    );
    let v2: Api<DynamicObject> = Api::namespaced_with(api.client(), "ns", &v2_ar);
    assert_eq!(
        api_error(v2.list(&ListParams::default()).await.unwrap_err()).code,
        404,
        "a version the CRD does not serve"
    );
}

#[tokio::test]
async fn fake_faults_fail_hang_and_clear() {
    let api = FakeApiServer::start().await;
    api.put(pod("ns", "p"));
    let pods: Api<Pod> = Api::namespaced(api.client(), "ns");
    api.inject(Fault::status("GET", "/api/v1/namespaces/ns/pods/p", 500).times(1));
    assert_eq!(api_error(pods.get("p").await.unwrap_err()).code, 500);
    assert!(pods.get("p").await.is_ok(), "fault used up");
    // kube's default client retries 429/503/504 itself: one 503 is invisible to the caller.
    api.inject(Fault::status("GET", "/api/v1/namespaces/ns/pods/p", 503).times(1));
    api.clear_log();
    assert!(pods.get("p").await.is_ok());
    assert_eq!(api.count("GET", "/api/v1/namespaces/ns/pods/p"), 2);

    api.inject(Fault::hang("*", "/api/v1/namespaces/ns/pods"));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), pods.get("p"))
            .await
            .is_err(),
        "hangs"
    );
    api.clear_faults();
    assert!(pods.get("p").await.is_ok());
}

#[tokio::test]
async fn fake_serves_streaming_lists_and_watch_options() {
    use kube::runtime::watcher::{Config, Event, watcher};
    let api = FakeApiServer::start().await;
    api.put(secret("ns", "a", &[]));
    let secrets: Api<Secret> = Api::namespaced(api.client(), "ns");
    // sendInitialEvents: ADDED for the current state, then the initial-events-end bookmark.
    let mut events = watcher(secrets.clone(), Config::default().streaming_lists()).boxed();
    let mut seen = Vec::new();
    while let Some(event) = tokio::time::timeout(WAIT, events.try_next())
        .await
        .unwrap()
        .unwrap()
    {
        match event {
            Event::Init => seen.push("init".to_owned()),
            Event::InitApply(s) => seen.push(s.metadata.name.unwrap()),
            Event::InitDone => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, ["init", "a"]);
    let lists = api
        .requests()
        .iter()
        .filter(|r| !r.query.contains("watch=true"))
        .count();
    assert_eq!(lists, 0, "no list call with streaming lists");

    // timeoutSeconds ends the stream; a label selector filters live events.
    let wp = WatchParams::default().timeout(1).labels("team=x");
    let rv = api.resource_version().to_string();
    let mut watch = secrets.watch(&wp, &rv).await.unwrap().boxed();
    let mut labelled = secret("ns", "b", &[]);
    labelled["metadata"]["labels"] = json!({"team": "x"});
    api.put(secret("ns", "c", &[]));
    api.put(labelled);
    match watch.try_next().await.unwrap() {
        Some(WatchEvent::Added(s)) => assert_eq!(s.metadata.name.as_deref(), Some("b")),
        other => panic!("unexpected {other:?}"),
    }
    let ended = tokio::time::timeout(Duration::from_secs(3), watch.try_next()).await;
    assert!(ended.unwrap().unwrap().is_none(), "ended by timeoutSeconds");
}

#[tokio::test]
async fn fake_patch_preconditions_dry_run_and_custom_resource_delete() {
    let api = FakeApiServer::start().await;
    api.put(secret("ns", "s", &[("a", "1")]));
    let secrets: Api<Secret> = Api::namespaced(api.client(), "ns");
    let stale =
        Patch::Merge(json!({"metadata": {"resourceVersion": "1"}, "stringData": {"b": "2"}}));
    assert!(
        api_error(
            secrets
                .patch("s", &PatchParams::default(), &stale)
                .await
                .unwrap_err()
        )
        .is_conflict()
    );

    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let new: Secret = serde_json::from_value(secret("ns", "dry", &[])).unwrap();
    let before = api.resource_version();
    assert_eq!(
        secrets
            .create(&dry, &new)
            .await
            .unwrap()
            .metadata
            .name
            .as_deref(),
        Some("dry")
    );
    assert!(
        api.object(&Collection::secrets(), Some("ns"), "dry")
            .is_none()
    );
    assert_eq!(api.resource_version(), before, "dry run writes nothing");

    let bundles = Collection::new("secrets.iomete.com/v1alpha1", "resourcebundles");
    api.put(
        json!({"apiVersion": "secrets.iomete.com/v1alpha1", "kind": "ResourceBundle",
                   "metadata": {"name": "b", "namespace": "ns"}, "spec": {}}),
    );
    assert_eq!(api.objects(&bundles).len(), 1);
    let ar = ApiResource::from_gvk_with_plural(
        &kube::core::GroupVersionKind::gvk("secrets.iomete.com", "v1alpha1", "ResourceBundle"),
        "resourcebundles",
    );
    let api_bundles: Api<DynamicObject> = Api::namespaced_with(api.client(), "ns", &ar);
    let deleted = api_bundles
        .delete("b", &DeleteParams::default())
        .await
        .unwrap();
    assert!(
        deleted.is_left(),
        "custom resources answer with the deleted object"
    );
    assert!(api.objects(&bundles).is_empty());
}
