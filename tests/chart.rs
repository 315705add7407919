//! The Helm chart `charts/secrets-webhook` is GENERATED from the kustomize manifests (the one source
//! of truth, `manifests/`): its `templates/` and `crds/` come from `kubectl kustomize` of the base,
//! the cert-manager overlay and the components, with the overlays and components turned into
//! values (docs/install.md). `Chart.yaml` and `values.yaml` are written by hand.
//!
//! - `chart_is_generated_from_the_manifests`: the files in the chart are what the generator makes
//!   now. After changing `manifests/`, regenerate with `UPDATE_CHART=1 cargo test --test chart`.
//! - `chart_renders_exactly_what_kustomize_renders`: `helm template` with each overlay's and
//!   component's values renders the same objects as `kubectl kustomize` of that variant.
//!
//! Both need kubectl (with kustomize) and helm: `$KUBE_E2E_BIN`, else the built binaries of
//! scripts/build-k8s-bins.sh, else `PATH`. Without them: a loud SKIP (a failure in CI).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize as _;
use serde_yaml::{Mapping, Value};

const NS: &str = "iomete-system";
const CHART: &str = "charts/secrets-webhook";
const HEADER: &str = "# GENERATED from manifests/ by tests/chart.rs (UPDATE_CHART=1 cargo test --test chart).\n\
                      # Do not edit: change manifests/ and regenerate.\n";

const IF_CERT_MANAGER: &str = "{{- if eq .Values.certificate.mode \"cert-manager\" }}";
const IF_SAR: &str = "{{- if eq .Values.authorizer \"subject-access-review\" }}";
const IF_DISABLED: &str = "{{- if not .Values.features.secretsV2.enabled }}";
const IF_API: &str = "{{- if .Values.managementApi.enabled }}";
const END: &str = "{{- end }}";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// kubectl and helm, or `None` after a loud SKIP line (a panic in CI).
fn tools(test: &str) -> Option<(PathBuf, PathBuf)> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(dir) = std::env::var_os("KUBE_E2E_BIN") {
        dirs.push(dir.into());
    }
    if let Ok(out) = Command::new("bash")
        .arg(repo().join("scripts/build-k8s-bins.sh"))
        .arg("--no-build")
        .output()
        && out.status.success()
    {
        dirs.push(String::from_utf8_lossy(&out.stdout).trim().into());
    }
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    let find = |name: &str| dirs.iter().map(|d| d.join(name)).find(|p| p.is_file());
    if let (Some(kubectl), Some(helm)) = (find("kubectl"), find("helm")) {
        return Some((kubectl, helm));
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: CI is set but kubectl and helm were not found (scripts/build-k8s-bins.sh)");
    }
    let _ = writeln!(
        std::io::stderr(),
        "\n*** SKIP {test}: no kubectl/helm (run scripts/build-k8s-bins.sh); the chart was NOT checked ***\n"
    );
    None
}

fn run(command: &mut Command) -> String {
    let out = command.output().expect("run");
    assert!(
        out.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn documents(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).unwrap())
        .filter(|doc| !doc.is_null())
        .collect()
}

/// `kubectl kustomize` of a kustomization made of `resources` and `components` (paths relative to
/// `manifests/`), in a scratch directory inside `manifests/` (kustomize loads only below its root).
fn kustomize(kubectl: &Path, resources: &[&str], components: &[&str]) -> Vec<Value> {
    let dir = tempfile::Builder::new()
        .prefix(".chart.")
        .tempdir_in(repo().join("manifests"))
        .unwrap();
    let list = |items: &[&str]| {
        items
            .iter()
            .map(|i| format!("../{i}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    std::fs::write(
        dir.path().join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n\
             resources: [{}]\ncomponents: [{}]\n",
            list(resources),
            list(components)
        ),
    )
    .unwrap();
    documents(&run(Command::new(kubectl).arg("kustomize").arg(dir.path())))
}

fn id(object: &Value) -> (String, String) {
    (
        object["kind"].as_str().unwrap_or_default().to_owned(),
        object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

fn find<'a>(objects: &'a [Value], kind: &str, name_prefix: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && id(o).1.starts_with(name_prefix))
        .unwrap_or_else(|| panic!("no {kind} {name_prefix}*"))
}

/// Every string that names the install namespace names the release's namespace instead.
fn template_namespace(value: &mut Value) {
    match value {
        Value::String(s) if s.contains(NS) => *s = s.replace(NS, "{{ .Release.Namespace }}"),
        Value::Sequence(items) => items.iter_mut().for_each(template_namespace),
        Value::Mapping(map) => map.values_mut().for_each(template_namespace),
        _ => {}
    }
}

fn map<'a>(value: &'a mut Value, path: &[&str]) -> &'a mut Mapping {
    let mut at = value;
    for key in path {
        at = at
            .get_mut(*key)
            .unwrap_or_else(|| panic!("no {key} in {path:?}"));
    }
    at.as_mapping_mut().expect("a mapping")
}

fn items_added(before: &Value, after: &Value) -> Vec<Value> {
    let before = before.as_sequence().cloned().unwrap_or_default();
    let after = after.as_sequence().cloned().unwrap_or_default();
    assert!(
        after.starts_with(&before),
        "a component changes more than it appends: the generator handles appended items only"
    );
    after[before.len()..].to_vec()
}

fn yaml(value: &Value) -> String {
    serde_yaml::to_string(value).unwrap()
}

/// Blocks of template text that replace placeholder keys or list items (`__BLOCK_name__`),
/// indented like the placeholder.
struct Blocks(BTreeMap<String, String>);

impl Blocks {
    fn key(&mut self, name: &str, text: String) -> Value {
        self.0.insert(name.into(), text);
        Value::String(format!("__BLOCK_{name}__"))
    }

    fn expand(&self, text: &str) -> String {
        let mut out = String::new();
        for line in text.lines() {
            let Some(block) = self.0.iter().find_map(|(name, block)| {
                line.contains(&format!("__BLOCK_{name}__")).then_some(block)
            }) else {
                out.push_str(line);
                out.push('\n');
                continue;
            };
            let trimmed = line.trim_start();
            assert!(
                !(trimmed.starts_with("- ") && trimmed.ends_with(": null")),
                "a placeholder key first in a list item: extend the generator"
            );
            let indent = line.len() - trimmed.len();
            for block_line in block.lines().filter(|l| !l.is_empty()) {
                out.push_str(&" ".repeat(indent));
                out.push_str(&block_line.replace("@INDENT+2@", &(indent + 2).to_string()));
                out.push('\n');
            }
        }
        out
    }
}

fn indent(text: &str, by: usize) -> String {
    text.lines()
        .map(|l| format!("{}{l}\n", " ".repeat(by)))
        .collect()
}

/// The ConfigMap of the data-plane policies' lists.
const DATA_PLANE: &str = "secrets-webhook-data-plane";

/// A webhook configuration: each webhook's clientConfig becomes the Service or `webhook.url`
/// (with the webhook's own path) and, self-managed, `webhook.caBundle`; cert-manager's annotation
/// comes with its overlay.
fn webhook_configuration(
    object: &mut Value,
    kind: &str,
    cert_manager: &[Value],
    blocks: &mut Blocks,
) {
    let count = object["webhooks"].as_sequence().unwrap().len();
    for index in 0..count {
        let hook = &mut object["webhooks"][index];
        let mut service = hook["clientConfig"]["service"].clone();
        let path = service["path"].as_str().unwrap().to_owned();
        template_namespace(&mut service);
        let client = hook.as_mapping_mut().unwrap();
        let at = client.keys().position(|k| k == "clientConfig").unwrap();
        let name = format!("clientConfig-{}-{index}", kind.to_lowercase());
        let mut rebuilt = Mapping::new();
        for (i, (k, v)) in std::mem::take(client).into_iter().enumerate() {
            if i == at {
                rebuilt.insert(blocks.key(&name, String::new()), Value::Null);
            } else {
                rebuilt.insert(k, v);
            }
        }
        *client = rebuilt;
        blocks.0.insert(
            name,
            format!(
                "clientConfig:\n\
                 {{{{- if .Values.webhook.url }}}}\n  url: {{{{ printf \"%s{path}\" (trimSuffix \"/mutate\" .Values.webhook.url) | quote }}}}\n\
                 {{{{- else }}}}\n  service:\n{}{END}\n\
                 {{{{- if eq .Values.certificate.mode \"self-managed\" }}}}\n  caBundle: {{{{ required \"certificate.mode=self-managed needs webhook.caBundle (base64 of ca.pem from `secrets-webhook certs`)\" .Values.webhook.caBundle }}}}\n\
                 {{{{- else if ne .Values.certificate.mode \"cert-manager\" }}}}\n  {{{{- fail \"certificate.mode must be cert-manager or self-managed\" }}}}\n{END}\n",
                indent(&yaml(&service), 4)
            ),
        );
    }
    let cm_hook = find(cert_manager, kind, "secrets-webhook");
    let mut annotations = cm_hook["metadata"]["annotations"].clone();
    assert!(
        object["metadata"].get("annotations").is_none(),
        "base annotations: extend the generator"
    );
    template_namespace(&mut annotations);
    let block = format!("cert-manager-annotations-{}", kind.to_lowercase());
    let meta = map(object, &["metadata"]);
    meta.insert(blocks.key(&block, String::new()), Value::Null);
    let mut wrapped = Mapping::new();
    wrapped.insert("annotations".into(), annotations);
    blocks.0.insert(
        block,
        format!(
            "{IF_CERT_MANAGER}\n{}{END}\n",
            yaml(&Value::Mapping(wrapped))
        ),
    );
}

/// The chart's generated files: path (relative to the chart) → content.
fn generate(kubectl: &Path) -> BTreeMap<String, String> {
    let base = kustomize(kubectl, &["base"], &[]);
    let cert_manager = kustomize(kubectl, &["overlays/cert-manager"], &[]);
    let sar = kustomize(kubectl, &["base"], &["components/sar-authorizer"]);
    let disabled = kustomize(kubectl, &["base"], &["components/feature-disabled"]);
    let api = kustomize(kubectl, &["base"], &["components/management-api"]);
    let in_base = |o: &Value| base.iter().any(|b| id(b) == id(o));

    let mut files = BTreeMap::new();
    let mut blocks = Blocks(BTreeMap::new());
    let config_map = id(find(&base, "ConfigMap", "secrets-webhook-config")).1;
    for object in &base {
        let (kind, name) = id(object);
        if kind == "CustomResourceDefinition" {
            files.insert(
                format!("crds/{name}.yaml"),
                format!("{HEADER}{}", yaml(object)),
            );
            continue;
        }
        let mut object = object.clone();
        let file = format!("templates/{}-{}.yaml", kind.to_lowercase(), name);
        match kind.as_str() {
            "ConfigMap" if name == config_map => {
                // A fixed name; the Deployment rolls on a change through a checksum annotation.
                map(&mut object, &["metadata"])
                    .insert("name".into(), "secrets-webhook-config".into());
                let data = map(&mut object, &["data"]);
                let config = data["config.yaml"]
                    .as_str()
                    .unwrap()
                    .replace(NS, "{{ .Release.Namespace }}");
                data.remove("config.yaml");
                data.insert(blocks.key("config", String::new()), Value::Null);
                blocks.0.insert(
                    "config".into(),
                    format!(
                        "config.yaml: |\n{{{{- if .Values.config }}}}\n{{{{- .Values.config | nindent @INDENT+2@ }}}}\n{{{{- else }}}}\n{}{END}\n",
                        indent(&config, 2)
                    ),
                );
                template_namespace(&mut object);
                files.insert(
                    "templates/configmap-secrets-webhook-config.yaml".into(),
                    format!("{HEADER}{}", blocks.expand(&yaml(&object))),
                );
                continue;
            }
            "Deployment" => {
                let pod = map(&mut object, &["spec", "template"]);
                let meta = pod
                    .entry("metadata".into())
                    .or_insert(Value::Mapping(Mapping::new()));
                let annotations = meta
                    .as_mapping_mut()
                    .unwrap()
                    .entry("annotations".into())
                    .or_insert(Value::Mapping(Mapping::new()));
                annotations.as_mapping_mut().unwrap().insert(
                    "checksum/config".into(),
                    "{{ include (print $.Template.BasePath \"/configmap-secrets-webhook-config.yaml\") . | sha256sum }}".into(),
                );
                for volume in map(&mut object, &["spec", "template", "spec"])["volumes"]
                    .as_sequence_mut()
                    .unwrap()
                {
                    if volume["configMap"]["name"] == config_map.as_str() {
                        volume["configMap"]["name"] = "secrets-webhook-config".into();
                    }
                }
                let variant = |objects: &[Value]| {
                    find(objects, "Deployment", "secrets-webhook")["spec"]["template"]["spec"]["containers"][0].clone()
                };
                let base_container = variant(&base);
                let container =
                    &mut map(&mut object, &["spec", "template", "spec"])["containers"][0];
                assert_eq!(container["image"], "secrets-webhook:latest");
                container["image"] =
                    "{{ .Values.image.repository }}:{{ .Values.image.tag }}".into();
                container["imagePullPolicy"] = "{{ .Values.image.pullPolicy }}".into();
                for (field, other, condition, tag) in [
                    ("args", variant(&disabled), IF_DISABLED, "disabled"),
                    ("args", variant(&api), IF_API, "api"),
                    ("env", variant(&sar), IF_SAR, "sar"),
                    ("ports", variant(&api), IF_API, "api"),
                ] {
                    let added = items_added(&base_container[field], &other[field]);
                    assert!(!added.is_empty(), "the {condition} variant adds no {field}");
                    let name = format!("{field}-variant-{tag}");
                    let placeholder = blocks.key(&name, String::new());
                    container[field]
                        .as_sequence_mut()
                        .unwrap()
                        .push(placeholder);
                    blocks.0.insert(
                        name,
                        format!("{condition}\n{}{END}\n", yaml(&Value::Sequence(added))),
                    );
                }
            }
            "MutatingWebhookConfiguration" | "ValidatingWebhookConfiguration" => {
                webhook_configuration(&mut object, &kind, &cert_manager, &mut blocks);
            }
            "ConfigMap" if name == DATA_PLANE => {
                // The data-plane lists are values; unset, the manifests' own.
                let data = map(&mut object, &["data"]);
                for (key, value) in data.iter_mut() {
                    let key = key.as_str().unwrap();
                    let default = value.as_str().unwrap_or_default().replace('"', "\\\"");
                    *value = format!(
                        "{{{{ index .Values.dataPlane \"{key}\" | default \"{default}\" }}}}"
                    )
                    .into();
                }
            }
            // The management API's port on the Service, and its ingress.
            "Service" | "NetworkPolicy" => {
                let field = if kind == "Service" {
                    "ports"
                } else {
                    "ingress"
                };
                let with_api = find(&api, &kind, &name)["spec"][field].clone();
                let added = items_added(&object["spec"][field], &with_api);
                if !added.is_empty() {
                    let key = format!("{}-{field}-api", kind.to_lowercase());
                    let placeholder = blocks.key(&key, String::new());
                    map(&mut object, &["spec"])
                        .get_mut(field)
                        .and_then(Value::as_sequence_mut)
                        .unwrap()
                        .push(placeholder);
                    blocks.0.insert(
                        key,
                        format!("{IF_API}\n{}{END}\n", yaml(&Value::Sequence(added))),
                    );
                }
            }
            _ => {}
        }
        template_namespace(&mut object);
        files.insert(file, format!("{HEADER}{}", blocks.expand(&yaml(&object))));
    }

    // Objects that only an overlay or a component adds: rendered under its value.
    for (file, objects, condition, skip_kinds) in [
        (
            "templates/cert-manager.yaml",
            &cert_manager,
            IF_CERT_MANAGER,
            &["CustomResourceDefinition"][..],
        ),
        ("templates/sar-authorizer.yaml", &sar, IF_SAR, &[][..]),
        ("templates/management-api.yaml", &api, IF_API, &[][..]),
    ] {
        // `{{ if … -}}`: the header's newline stays, the condition's own goes.
        let condition = condition
            .replacen("{{-", "{{", 1)
            .replacen(" }}", " -}}", 1);
        let mut text = format!("{HEADER}{condition}\n");
        for object in objects.iter().filter(|o| !in_base(o)) {
            if skip_kinds.contains(&id(object).0.as_str()) {
                continue;
            }
            let mut object = object.clone();
            template_namespace(&mut object);
            text.push_str("---\n");
            text.push_str(&yaml(&object));
        }
        text.push_str(END);
        text.push('\n');
        files.insert(file.into(), text);
    }
    files
}

fn chart_files() -> BTreeMap<String, String> {
    let root = repo().join(CHART);
    let mut files = BTreeMap::new();
    for dir in ["templates", "crds"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            if text.starts_with(HEADER) {
                let name = path.file_name().unwrap().to_string_lossy();
                files.insert(format!("{dir}/{name}"), text);
            }
        }
    }
    files
}

#[test]
fn chart_is_generated_from_the_manifests() {
    let Some((kubectl, _)) = tools("chart_is_generated_from_the_manifests") else {
        return;
    };
    let want = generate(&kubectl);
    let have = chart_files();
    if std::env::var_os("UPDATE_CHART").is_some() {
        let root = repo().join(CHART);
        for stale in have.keys().filter(|k| !want.contains_key(*k)) {
            std::fs::remove_file(root.join(stale)).unwrap();
        }
        for (path, text) in &want {
            std::fs::create_dir_all(root.join(path).parent().unwrap()).unwrap();
            std::fs::write(root.join(path), text).unwrap();
        }
        return;
    }
    for (path, text) in &want {
        assert_eq!(
            have.get(path),
            Some(text),
            "{CHART}/{path} is not what manifests/ generate: run UPDATE_CHART=1 cargo test --test chart"
        );
    }
    for path in have.keys() {
        assert!(
            want.contains_key(path),
            "{CHART}/{path} is no longer generated: run UPDATE_CHART=1 cargo test --test chart"
        );
    }
}

/// Objects by (kind, name), with the differences that are Helm's by design taken out: the
/// ConfigMap's content-hash suffix (Helm rolls the Deployment with a checksum annotation instead).
fn normalized(objects: Vec<Value>) -> BTreeMap<(String, String), Value> {
    objects
        .into_iter()
        .map(|mut o| {
            if o["kind"] == "ConfigMap"
                && o["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("secrets-webhook-config"))
            {
                o["metadata"]["name"] = "secrets-webhook-config".into();
            }
            if o["kind"] == "Deployment" {
                let pod = &mut o["spec"]["template"];
                for volume in pod["spec"]["volumes"].as_sequence_mut().unwrap() {
                    if let Some(name) = volume["configMap"]["name"].as_str()
                        && name.starts_with("secrets-webhook-config")
                    {
                        volume["configMap"]["name"] = "secrets-webhook-config".into();
                    }
                }
                if let Some(annotations) = pod["metadata"].get_mut("annotations") {
                    annotations
                        .as_mapping_mut()
                        .unwrap()
                        .remove("checksum/config");
                    if annotations.as_mapping().unwrap().is_empty() {
                        pod["metadata"]
                            .as_mapping_mut()
                            .unwrap()
                            .remove("annotations");
                    }
                }
            }
            (id(&o), o)
        })
        .collect()
}

#[test]
fn chart_renders_exactly_what_kustomize_renders() {
    let Some((kubectl, helm)) = tools("chart_renders_exactly_what_kustomize_renders") else {
        return;
    };
    let helm_home = tempfile::tempdir().unwrap();
    let template = |sets: &[&str]| {
        let mut command = Command::new(&helm);
        command
            .args(["template", "secrets-webhook"])
            .arg(repo().join(CHART))
            .args(["--namespace", NS, "--include-crds"])
            .env("HELM_CACHE_HOME", helm_home.path().join("cache"))
            .env("HELM_CONFIG_HOME", helm_home.path().join("config"))
            .env("HELM_DATA_HOME", helm_home.path().join("data"));
        for set in sets {
            command.args(["--set", set]);
        }
        normalized(documents(&run(&mut command)))
    };
    let placeholder = "webhook.caBundle=UkVQTEFDRS1NRQ==";
    /// (what, helm --set values, kustomize resources, kustomize components)
    type Case<'a> = (&'a str, Vec<&'a str>, &'a [&'a str], &'a [&'a str]);
    let cases: [Case; 5] = [
        (
            "cert-manager overlay",
            vec![],
            &["overlays/cert-manager"],
            &[],
        ),
        (
            "self-managed overlay",
            vec!["certificate.mode=self-managed", placeholder],
            &["overlays/self-managed"],
            &[],
        ),
        (
            "self-managed + feature-disabled",
            vec![
                "certificate.mode=self-managed",
                placeholder,
                "features.secretsV2.enabled=false",
            ],
            &["overlays/self-managed"],
            &["components/feature-disabled"],
        ),
        (
            "cert-manager + sar-authorizer",
            vec!["authorizer=subject-access-review"],
            &["overlays/cert-manager"],
            &["components/sar-authorizer"],
        ),
        (
            "cert-manager + management-api",
            vec!["managementApi.enabled=true"],
            &["overlays/cert-manager"],
            &["components/management-api"],
        ),
    ];
    for (what, sets, resources, components) in cases {
        let want = normalized(kustomize(&kubectl, resources, components));
        let have = template(&sets);
        assert_eq!(
            have.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "{what}: helm renders other objects than kustomize"
        );
        for (key, object) in &want {
            assert_eq!(&have[key], object, "{what}: {key:?} differs");
        }
    }
    // The switch reaches the webhook's command line, and nothing else changes with it.
    let on = template(&[]);
    let off = template(&["features.secretsV2.enabled=false"]);
    let deployment = ("Deployment".to_string(), "secrets-webhook".to_string());
    let args = |objects: &BTreeMap<(String, String), Value>| {
        objects[&deployment]["spec"]["template"]["spec"]["containers"][0]["args"].clone()
    };
    assert!(!yaml(&args(&on)).contains("--enabled=false"));
    assert!(yaml(&args(&off)).contains("--enabled=false"));
    assert_eq!(on.len(), off.len());
}

#[test]
fn chart_refuses_a_self_managed_install_without_a_ca_bundle() {
    let Some((_, helm)) = tools("chart_refuses_a_self_managed_install_without_a_ca_bundle") else {
        return;
    };
    let helm_home = tempfile::tempdir().unwrap();
    let out = Command::new(&helm)
        .args(["template", "secrets-webhook"])
        .arg(repo().join(CHART))
        .args(["--namespace", NS, "--set", "certificate.mode=self-managed"])
        .env("HELM_CACHE_HOME", helm_home.path().join("cache"))
        .env("HELM_CONFIG_HOME", helm_home.path().join("config"))
        .env("HELM_DATA_HOME", helm_home.path().join("data"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("needs webhook.caBundle"), "{stderr}");
}
