//! `GET /api/v1/openapi.json`: the API described in OpenAPI 3.1. Written by hand so that every
//! status, header and problem is stated; the tests below check it against the code (the route
//! table, the fields the types serialize, the write-only values), and schemathesis checks real
//! answers against it in CI.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

pub(super) async fn serve() -> Response {
    let mut response = (StatusCode::OK, document().to_string()).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn problem(description: &str) -> Value {
    json!({
        "description": description,
        "headers": {"X-Request-Id": {"$ref": "#/components/headers/RequestId"}},
        "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    })
}

fn ok(description: &str, schema: Value, etag: bool) -> Value {
    let mut headers = json!({
        "X-Request-Id": {"$ref": "#/components/headers/RequestId"},
        "Cache-Control": {"$ref": "#/components/headers/NoStore"}
    });
    if etag {
        headers["ETag"] = json!({"$ref": "#/components/headers/ETag"});
    }
    json!({"description": description, "headers": headers,
           "content": {"application/json": {"schema": schema}}})
}

/// Problems any authenticated endpoint may answer.
fn common(mut responses: Value, extra: &[(&str, &str)]) -> Value {
    let base = [
        (
            "400",
            "Malformed request; `field` names the parameter, header or body field.",
        ),
        ("401", "No or unaccepted bearer token."),
        (
            "403",
            "Authenticated, but lacking the permission (or X-Remote-User from a caller that is not a console backend).",
        ),
        (
            "503",
            "The Kubernetes API (TokenReview, the stores) could not be reached; nothing changed (fail closed).",
        ),
    ];
    for (code, text) in base.iter().chain(extra) {
        responses[*code] = problem(text);
    }
    responses
}

fn schema(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn array_of(name: &str) -> Value {
    json!({"type": "array", "items": schema(name)})
}

fn param(name: &str, place: &str, description: &str, schema: Value, required: bool) -> Value {
    json!({"name": name, "in": place, "required": required, "description": description, "schema": schema})
}

/// The document.
pub fn document() -> Value {
    let dns_label = json!({"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"});
    let domain = param(
        "domain",
        "path",
        "A domain name (not `global`).",
        dns_label.clone(),
        true,
    );
    let key = param(
        "key",
        "path",
        "A secret key: the Secret data-key alphabet.",
        json!({"type": "string", "pattern": "^[-._a-zA-Z0-9]{1,253}$"}),
        true,
    );
    let name = param(
        "name",
        "path",
        "The Vault config's name.",
        dns_label.clone(),
        true,
    );
    let if_match = param(
        "If-Match",
        "header",
        "The ETag of your last read: change only if nothing changed since.",
        json!({"type": "string"}),
        false,
    );
    let if_none_match = param(
        "If-None-Match",
        "header",
        "`*`: create only (the key or config must not exist).",
        json!({"type": "string", "enum": ["*"]}),
        false,
    );
    json!({
      "openapi": "3.1.0",
      "info": {
        "title": "secrets-webhook management API",
        "version": "v1",
        "description": "Domain secrets with write-only values, the secret-key selector across Kubernetes and Vault (filtered by Use), and Vault integrations with Test Connection. Errors are RFC 9457 problem details. Values never appear in any answer."
      },
      "security": [{"bearer": []}],
      "paths": {
        "/api/v1/domains/{domain}/secrets": {
          "get": {
            "operationId": "listDomainSecrets",
            "summary": "Keys of a domain (needs View on the domain).",
            "parameters": [domain],
            "responses": common(json!({"200": ok("The domain's keys; the ETag is its store's version.", array_of("SecretObject"), true)}), &[])
          }
        },
        "/api/v1/domains/{domain}/secrets/{key}": {
          "get": {
            "operationId": "getDomainSecret",
            "summary": "One key (needs View); never its value.",
            "parameters": [domain, key],
            "responses": common(json!({"200": ok("The key exists; the ETag is its store's version.", schema("SecretObject"), true)}),
              &[("404", "No such key.")])
          },
          "put": {
            "operationId": "putDomainSecret",
            "summary": "Create (If-None-Match: *) or change (If-Match: <ETag>) a key (needs Update).",
            "parameters": [domain, key, if_match, if_none_match],
            "requestBody": {"required": true, "content": {"application/json": {"schema": schema("SecretValue")}}},
            "responses": common(json!({
                "200": ok("Changed.", schema("SecretObject"), true),
                "201": ok("Created.", schema("SecretObject"), true)
              }), &[("404", "Changing a key that does not exist."), ("409", "Other writers to the domain kept winning; retry."),
                    ("412", "If-None-Match: * and the key exists, or If-Match names a version that is not current."),
                    ("413", "The body is larger than 1 MiB."), ("415", "The body is not JSON."),
                    ("422", "A body field is not acceptable."), ("428", "Neither If-None-Match: * nor If-Match was sent.")])
          },
          "delete": {
            "operationId": "deleteDomainSecret",
            "summary": "Delete a key (needs Update); 409 while live pods were granted it, unless force=true.",
            "parameters": [domain, key, if_match,
              param("force", "query", "Delete even while live pods use the key.", json!({"type": "string", "enum": ["true", "false"]}), false)],
            "responses": common(json!({"204": {"description": "Deleted.", "headers": {
                "X-Request-Id": {"$ref": "#/components/headers/RequestId"},
                "ETag": {"$ref": "#/components/headers/ETag"}}}}),
              &[("404", "No such key."), ("409", "In use: `pods` says by how many live pods (or other writers kept winning)."),
                ("412", "If-Match names a version that is not current.")])
          }
        },
        "/api/v1/global/secrets": {
          "get": {
            "operationId": "listGlobalSecrets",
            "summary": "Global keys (read-only; any authenticated caller).",
            "responses": common(json!({"200": ok("The global keys.", array_of("SecretObject"), true)}), &[])
          }
        },
        "/api/v1/secret-keys": {
          "get": {
            "operationId": "listSecretKeys",
            "summary": "The selector: the domain's keys (with Use on it), global keys, and the keys of every Vault config the caller may Use.",
            "parameters": [param("domain", "query", "The domain the workload runs in.", dns_label.clone(), true)],
            "responses": common(json!({"200": {
                "description": "Keys, each as the product's secretObject. Sources that could not be listed are named in Unavailable-Sources.",
                "headers": {
                  "X-Request-Id": {"$ref": "#/components/headers/RequestId"},
                  "Cache-Control": {"$ref": "#/components/headers/NoStore"},
                  "Unavailable-Sources": {"description": "Comma-separated sources (`vault:<name>`, `kubernetes:<id>`) whose keys could not be listed.", "schema": {"type": "string"}}
                },
                "content": {"application/json": {"schema": array_of("SecretObject")}}
              }}), &[])
          }
        },
        "/api/v1/vault-configs": {
          "get": {
            "operationId": "listVaultConfigs",
            "summary": "The Vault configs the caller may View.",
            "responses": common(json!({"200": ok("Configs, without credentials.", array_of("VaultConfig"), false)}), &[])
          }
        },
        "/api/v1/vault-configs/{name}": {
          "get": {
            "operationId": "getVaultConfig",
            "summary": "One Vault config (needs View; a config you may not view looks like a missing one).",
            "parameters": [name],
            "responses": common(json!({"200": ok("The config, without its credential.", schema("VaultConfig"), true)}),
              &[("404", "No such config visible to the caller.")])
          },
          "put": {
            "operationId": "putVaultConfig",
            "summary": "Create (platform admins, If-None-Match: *) or change (Update, If-Match) a Vault config. Credentials go into a dedicated Secret and never come back.",
            "parameters": [name, if_match, if_none_match],
            "requestBody": {"required": true, "content": {"application/json": {"schema": schema("VaultConfig")}}},
            "responses": common(json!({
                "200": ok("Changed.", schema("VaultConfig"), true),
                "201": ok("Created.", schema("VaultConfig"), true)
              }), &[("412", "If-None-Match: * and the config exists, or If-Match is not current."),
                    ("413", "The body is larger than 1 MiB."), ("415", "The body is not JSON."),
                    ("422", "A field is not acceptable (e.g. a path without /data/, a missing credential)."),
                    ("428", "Neither If-None-Match: * nor If-Match was sent.")])
          },
          "delete": {
            "operationId": "deleteVaultConfig",
            "summary": "Delete a Vault config and its credentials (platform admins).",
            "parameters": [name, if_match],
            "responses": common(json!({"204": {"description": "Deleted.", "headers": {
                "X-Request-Id": {"$ref": "#/components/headers/RequestId"}}}}),
              &[("404", "No such config."), ("412", "If-Match is not current.")])
          }
        },
        "/api/v1/vault-configs/{name}/test": {
          "post": {
            "operationId": "testVaultConfig",
            "summary": "Test Connection on a saved config (needs View): log in, check the mount is KV v2, read the path.",
            "parameters": [name],
            "responses": common(json!({"200": ok("The steps and the verdict (ok is false when a step failed).", schema("TestReport"), false)}),
              &[("404", "No such config visible to the caller.")])
          }
        },
        "/api/v1/vault-configs:test": {
          "post": {
            "operationId": "testUnsavedVaultConfig",
            "summary": "Test Connection on a config that is not saved (platform admins, or Update on the config named in `name`, whose stored credential is reused when the server and login stay the same).",
            "requestBody": {"required": true, "content": {"application/json": {"schema": schema("VaultConfig")}}},
            "responses": common(json!({"200": ok("The steps and the verdict.", schema("TestReport"), false)}),
              &[("413", "The body is larger than 1 MiB."), ("415", "The body is not JSON."), ("422", "A field is not acceptable.")])
          }
        },
        "/api/v1/openapi.json": {
          "get": {
            "operationId": "openapi",
            "summary": "This document.",
            "security": [],
            "responses": {"200": {"description": "OpenAPI 3.1.", "content": {"application/json": {"schema": {"type": "object"}}}}}
          }
        }
      },
      "components": {
        "securitySchemes": {
          "bearer": {"type": "http", "scheme": "bearer",
            "description": "A Kubernetes ServiceAccount or OIDC token (checked with TokenReview); in serve --dev a static token of apiTokens. A console backend may add X-Remote-User / X-Remote-Group."}
        },
        "headers": {
          "RequestId": {"description": "Correlates the answer with the audit line.", "schema": {"type": "string"}},
          "NoStore": {"description": "Always no-store.", "schema": {"type": "string", "enum": ["no-store"]}},
          "ETag": {"description": "The store Secret's (or VaultConfig's) resourceVersion, quoted.", "schema": {"type": "string"}}
        },
        "schemas": {
          "SecretObject": {
            "type": "object", "additionalProperties": false, "required": ["key", "source"],
            "description": "The product's secretObject.",
            "properties": {
              "key": {"type": "string"},
              "source": {"type": "object", "additionalProperties": false, "required": ["type", "id"],
                "properties": {"type": {"type": "string", "enum": ["KUBERNETES", "VAULT"]}, "id": {"type": "string"}}}
            }
          },
          "SecretValue": {
            "type": "object", "additionalProperties": false, "required": ["value"],
            "properties": {"value": {"type": "string", "minLength": 1, "maxLength": 524288, "writeOnly": true,
              "description": "The secret's value. Write-only: no answer ever carries it."}}
          },
          "VaultConfig": {
            "type": "object", "additionalProperties": false, "required": ["resourceBundle", "host", "path", "auth"],
            "properties": {
              "name": {"type": "string", "description": "Equal to the path's name when sent."},
              "resourceBundle": {"type": "string", "pattern": "^[a-z0-9.-]{1,253}$", "description": "The RAS bundle that governs View / Update / Use. Only platform admins may change it."},
              "host": {"type": "string", "format": "uri", "description": "Vault base URL, e.g. https://vault.example.com:8200."},
              "path": {"type": "string", "description": "KV v2 data path with its /data/ segment, e.g. /v1/secret/data/production."},
              "namespace": {"type": ["string", "null"], "description": "Vault Enterprise namespace."},
              "caCert": {"type": ["string", "null"], "description": "PEM CA certificate(s) of Vault's TLS certificate."},
              "auth": {
                "type": "object", "additionalProperties": false, "required": ["method"],
                "properties": {
                  "method": {"type": "string", "enum": ["appRole", "token"]},
                  "roleId": {"type": "string", "description": "AppRole role ID."},
                  "mount": {"type": "string", "description": "AppRole auth mount (default approle)."},
                  "secretId": {"type": "string", "writeOnly": true, "description": "AppRole secret ID. Write-only: kept in a dedicated Secret, never returned."},
                  "token": {"type": "string", "writeOnly": true, "description": "Vault token. Write-only: kept in a dedicated Secret, never returned."}
                }
              },
              "status": {"readOnly": true, "oneOf": [{"type": "null"}, {"type": "object", "additionalProperties": false,
                "required": ["ready", "reason", "message"],
                "properties": {"ready": {"type": "boolean"}, "reason": {"type": "string"}, "message": {"type": "string"}}}],
                "description": "The last Test Connection the webhook recorded (the VaultConfig's Ready condition)."}
            }
          },
          "TestReport": {
            "type": "object", "additionalProperties": false, "required": ["name", "ok", "steps", "verdict"],
            "properties": {
              "name": {"type": "string"},
              "ok": {"type": "boolean"},
              "steps": {"type": "array", "items": {"type": "object", "additionalProperties": false,
                "required": ["step", "ok", "detail"],
                "properties": {"step": {"type": "string"}, "ok": {"type": "boolean"}, "detail": {"type": "string"},
                  "reason": {"type": "string", "description": "Why it failed, e.g. KvV1Unsupported, LoginFailed, Unreachable."}}}},
              "verdict": {"type": "string"}
            }
          },
          "Problem": {
            "type": "object", "required": ["type", "title", "status", "detail"],
            "description": "RFC 9457 problem details.",
            "properties": {
              "type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
              "detail": {"type": "string", "description": "What is wrong and how to fix it; never a value."},
              "field": {"type": "string", "description": "The field, parameter or header at fault."},
              "pods": {"type": "integer", "description": "In-use deletions: how many live pods were granted the key."},
              "requestId": {"type": "string"}
            }
          }
        }
      }
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn props(doc: &Value, schema: &str) -> BTreeSet<String> {
        doc["components"]["schemas"][schema]["properties"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect()
    }

    fn keys(v: &Value) -> BTreeSet<String> {
        v.as_object().unwrap().keys().cloned().collect()
    }

    #[test]
    fn every_route_is_described_and_nothing_else() {
        let doc = document();
        let mut described = BTreeSet::new();
        for (path, ops) in doc["paths"].as_object().unwrap() {
            for method in ops.as_object().unwrap().keys() {
                described.insert((method.to_uppercase(), path.clone()));
            }
        }
        let routed: BTreeSet<(String, String)> = super::super::routes()
            .into_iter()
            .map(|(m, p, _)| (m.to_string(), p.to_string()))
            .collect();
        assert_eq!(described, routed);
    }

    #[test]
    fn schemas_have_exactly_the_fields_the_code_writes() {
        use super::super::handlers::{ConfigView, TestReport, TestStep};
        use super::super::vault_configs::{AuthMethod, AuthSpec, ConfigSpec, ReadyView};
        let doc = document();
        let object = crate::refs::SecretObject {
            key: "k".into(),
            source: crate::refs::Source {
                kind: crate::refs::SourceType::Vault,
                id: "v".into(),
            },
        };
        let o = serde_json::to_value(&object).unwrap();
        assert_eq!(keys(&o), props(&doc, "SecretObject"));
        assert_eq!(
            keys(&o["source"]),
            keys(
                &doc["components"]["schemas"]["SecretObject"]["properties"]["source"]["properties"]
            )
        );
        let view = ConfigView {
            name: "n".into(),
            spec: ConfigSpec {
                resource_bundle: "b".into(),
                host: "https://v".into(),
                path: "/v1/s/data/p".into(),
                namespace: Some("ns".into()),
                ca_cert: None,
                auth: AuthSpec {
                    method: AuthMethod::AppRole,
                    role_id: Some("r".into()),
                    mount: Some("m".into()),
                },
            },
            status: Some(ReadyView {
                ready: true,
                reason: "Connected".into(),
                message: "ok".into(),
            }),
        };
        let v = serde_json::to_value(&view).unwrap();
        assert_eq!(keys(&v), props(&doc, "VaultConfig"));
        // The answer's auth holds every property the schema has, except the write-only ones.
        let auth_props =
            &doc["components"]["schemas"]["VaultConfig"]["properties"]["auth"]["properties"];
        let readable: BTreeSet<String> = auth_props
            .as_object()
            .unwrap()
            .iter()
            .filter(|(_, p)| p["writeOnly"] != json!(true))
            .map(|(k, _)| k.clone())
            .collect();
        assert_eq!(keys(&v["auth"]), readable);
        assert_eq!(
            keys(&v["status"]),
            keys(
                &doc["components"]["schemas"]["VaultConfig"]["properties"]["status"]["oneOf"][1]["properties"]
            )
        );
        let report = TestReport {
            name: "n".into(),
            ok: false,
            steps: vec![TestStep {
                step: "login".into(),
                ok: false,
                detail: "d".into(),
                reason: Some("LoginFailed"),
            }],
            verdict: "verdict: FAILED".into(),
        };
        let r = serde_json::to_value(&report).unwrap();
        assert_eq!(keys(&r), props(&doc, "TestReport"));
        assert_eq!(
            keys(&r["steps"][0]),
            keys(
                &doc["components"]["schemas"]["TestReport"]["properties"]["steps"]["items"]["properties"]
            )
        );
        let mut p = super::super::problem::Problem::invalid("f", "d");
        p.pods = Some(1);
        p.request_id = "id".into();
        assert_eq!(
            keys(&serde_json::to_value(&p).unwrap()),
            props(&doc, "Problem")
        );
    }

    #[test]
    fn values_and_credentials_are_write_only() {
        let doc = document();
        let s = &doc["components"]["schemas"];
        assert_eq!(
            s["SecretValue"]["properties"]["value"]["writeOnly"],
            json!(true)
        );
        assert_eq!(
            s["VaultConfig"]["properties"]["auth"]["properties"]["secretId"]["writeOnly"],
            json!(true)
        );
        assert_eq!(
            s["VaultConfig"]["properties"]["auth"]["properties"]["token"]["writeOnly"],
            json!(true)
        );
        assert_eq!(doc["openapi"], json!("3.1.0"));
    }
}
