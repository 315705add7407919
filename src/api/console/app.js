// secrets-webhook console: plain JS against /api/v1. Names are always set with textContent.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { editing: null, vaultEditing: null };

function token() { return sessionStorage.getItem("token") || ""; }

function show(text, error) {
  const box = $("#message");
  box.textContent = text;
  box.className = error ? "error" : "";
  box.hidden = !text;
}

async function api(method, path, body, headers) {
  const init = { method, headers: Object.assign({ Authorization: "Bearer " + token() }, headers || {}) };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const res = await fetch(path, init);
  let data = null;
  const type = res.headers.get("content-type") || "";
  if (type.includes("json")) data = await res.json();
  return { res, data, etag: res.headers.get("etag") };
}

function problemText(r) {
  if (r.data && r.data.detail) return r.data.detail;
  return "HTTP " + r.res.status;
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function button(label, cls, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  if (cls) b.className = cls;
  b.addEventListener("click", onClick);
  return b;
}

function emptyRow(tbody, cols, text) {
  const tr = document.createElement("tr");
  const td = cell(tr, text, "empty");
  td.colSpan = cols;
  tbody.appendChild(tr);
}

function sourceTag(source) {
  const span = document.createElement("span");
  span.className = "tag" + (source.type === "VAULT" ? " vault" : "");
  span.textContent = source.type === "VAULT" ? "Vault (" + source.id + ")" : "IOMETE managed";
  return span;
}

// ---- tabs ----
function selectTab(name) {
  document.querySelectorAll("nav button").forEach((b) => b.setAttribute("aria-selected", String(b.dataset.tab === name)));
  document.querySelectorAll("main > section").forEach((s) => { s.hidden = s.id !== "tab-" + name; });
  show("");
  if (!token()) return;
  if (name === "domain") loadDomain();
  if (name === "global") loadGlobal();
  if (name === "vault") loadVaults();
}

// ---- domain secrets ----
function domain() { return $("#domain").value.trim(); }

async function loadDomain() {
  const tbody = $("#secrets tbody");
  tbody.replaceChildren();
  const d = domain();
  const list = await api("GET", "/api/v1/domains/" + encodeURIComponent(d) + "/secrets");
  if (!list.res.ok) { show(problemText(list), true); emptyRow(tbody, 3, "Not available"); return; }
  const rows = list.data.slice();
  // Vault keys the user may Use show next to the domain's own, read-only.
  const keys = await api("GET", "/api/v1/secret-keys?domain=" + encodeURIComponent(d));
  if (keys.res.ok) rows.push(...keys.data.filter((k) => k.source.type === "VAULT"));
  if (rows.length === 0) emptyRow(tbody, 3, "No secrets in domain " + d + " yet");
  for (const item of rows) {
    const tr = document.createElement("tr");
    tr.dataset.key = item.key;
    cell(tr, item.key);
    const src = document.createElement("td");
    src.appendChild(sourceTag(item.source));
    tr.appendChild(src);
    const actions = document.createElement("td");
    if (item.source.type === "KUBERNETES") {
      actions.appendChild(button("Edit", "", () => editSecret(item.key)));
      actions.appendChild(button("Delete", "danger", () => deleteSecret(item.key)));
    } else {
      actions.textContent = "read-only";
    }
    tr.appendChild(actions);
    tbody.appendChild(tr);
  }
}

function newSecret() {
  state.editing = null;
  $("#secret-form-title").textContent = "New Domain Secret";
  $("#secret-submit").textContent = "Create";
  $("#secret-key").value = "";
  $("#secret-key").readOnly = false;
  $("#secret-value").value = "";
  $("#secret-form").hidden = false;
  $("#secret-key").focus();
}

async function editSecret(key) {
  const got = await api("GET", "/api/v1/domains/" + encodeURIComponent(domain()) + "/secrets/" + encodeURIComponent(key));
  if (!got.res.ok) { show(problemText(got), true); return; }
  state.editing = { key, etag: got.etag };
  $("#secret-form-title").textContent = "Edit " + key;
  $("#secret-submit").textContent = "Save";
  $("#secret-key").value = key;
  $("#secret-key").readOnly = true;
  $("#secret-value").value = "";
  $("#secret-form").hidden = false;
  $("#secret-value").focus();
}

async function submitSecret(event) {
  event.preventDefault();
  const key = $("#secret-key").value.trim();
  const value = $("#secret-value").value;
  const headers = state.editing ? { "If-Match": state.editing.etag } : { "If-None-Match": "*" };
  const path = "/api/v1/domains/" + encodeURIComponent(domain()) + "/secrets/" + encodeURIComponent(key);
  const r = await api("PUT", path, { value }, headers);
  $("#secret-value").value = "";
  if (!r.res.ok) { show(problemText(r), true); return; }
  $("#secret-form").hidden = true;
  show((state.editing ? "Saved " : "Created ") + key + ". Its value can never be viewed again.");
  state.editing = null;
  loadDomain();
}

async function deleteSecret(key) {
  if (!window.confirm("Delete secret " + key + " from domain " + domain() + "?")) return;
  const path = "/api/v1/domains/" + encodeURIComponent(domain()) + "/secrets/" + encodeURIComponent(key);
  let r = await api("DELETE", path);
  if (r.res.status === 409 && r.data && r.data.pods) {
    const again = window.confirm("Secret " + key + " is in use by " + r.data.pods +
      " live pod(s); jobs that start after deletion will fail. Delete anyway?");
    if (!again) { show("Kept " + key + ": it is in use by " + r.data.pods + " pod(s)."); return; }
    r = await api("DELETE", path + "?force=true");
  }
  if (!r.res.ok) { show(problemText(r), true); return; }
  show("Deleted " + key + ".");
  loadDomain();
}

// ---- global ----
async function loadGlobal() {
  const tbody = $("#globals tbody");
  tbody.replaceChildren();
  const r = await api("GET", "/api/v1/global/secrets");
  if (!r.res.ok) { show(problemText(r), true); return; }
  if (r.data.length === 0) emptyRow(tbody, 2, "No global secrets");
  for (const item of r.data) {
    const tr = document.createElement("tr");
    cell(tr, item.key);
    const src = document.createElement("td");
    src.appendChild(sourceTag(item.source));
    tr.appendChild(src);
    tbody.appendChild(tr);
  }
}

// ---- Vault integrations ----
async function loadVaults() {
  const tbody = $("#vaults tbody");
  tbody.replaceChildren();
  const r = await api("GET", "/api/v1/vault-configs");
  if (!r.res.ok) { show(problemText(r), true); return; }
  if (r.data.length === 0) emptyRow(tbody, 6, "No Vault integrations you may view");
  for (const c of r.data) {
    const tr = document.createElement("tr");
    tr.dataset.name = c.name;
    cell(tr, c.name);
    cell(tr, c.host);
    cell(tr, c.path);
    cell(tr, c.resourceBundle);
    if (c.status) cell(tr, c.status.ready ? "Ready" : c.status.reason, "status-" + c.status.ready);
    else cell(tr, "—");
    const actions = document.createElement("td");
    actions.appendChild(button("Edit", "", () => editVault(c.name)));
    actions.appendChild(button("Test", "", () => testSaved(c.name)));
    tr.appendChild(actions);
    tbody.appendChild(tr);
  }
}

function methodChanged() {
  const appRole = $("#v-method").value === "appRole";
  document.querySelectorAll("#vault-form .approle").forEach((l) => { l.hidden = !appRole; });
  document.querySelectorAll("#vault-form .token").forEach((l) => { l.hidden = appRole; });
}

function vaultBody() {
  const method = $("#v-method").value;
  const auth = { method };
  if (method === "appRole") {
    auth.roleId = $("#v-role-id").value.trim();
    if ($("#v-secret-id").value) auth.secretId = $("#v-secret-id").value;
  } else if ($("#v-token").value) {
    auth.token = $("#v-token").value;
  }
  const body = {
    name: $("#v-name").value.trim(),
    resourceBundle: $("#v-bundle").value.trim(),
    host: $("#v-host").value.trim(),
    path: $("#v-path").value.trim(),
    auth,
  };
  const ns = $("#v-namespace").value.trim();
  if (ns) body.namespace = ns;
  return body;
}

function newVault() {
  state.vaultEditing = null;
  $("#vault-form").reset();
  $("#vault-form-title").textContent = "Create Vault configuration";
  $("#v-submit").textContent = "Create";
  $("#v-name").readOnly = false;
  $("#v-cred-hint").hidden = true;
  $("#v-result").replaceChildren();
  methodChanged();
  $("#vault-form").hidden = false;
  $("#v-name").focus();
}

async function editVault(name) {
  const r = await api("GET", "/api/v1/vault-configs/" + encodeURIComponent(name));
  if (!r.res.ok) { show(problemText(r), true); return; }
  const c = r.data;
  state.vaultEditing = { name, etag: r.etag };
  $("#vault-form").reset();
  $("#vault-form-title").textContent = "Edit " + name;
  $("#v-submit").textContent = "Save";
  $("#v-name").value = c.name;
  $("#v-name").readOnly = true;
  $("#v-bundle").value = c.resourceBundle;
  $("#v-host").value = c.host;
  $("#v-path").value = c.path;
  $("#v-namespace").value = c.namespace || "";
  $("#v-method").value = c.auth.method;
  $("#v-role-id").value = c.auth.roleId || "";
  $("#v-cred-hint").hidden = false;
  $("#v-result").replaceChildren();
  methodChanged();
  $("#vault-form").hidden = false;
}

function showReport(report) {
  const list = $("#v-result");
  list.replaceChildren();
  for (const step of report.steps) {
    const li = document.createElement("li");
    li.className = step.ok ? "ok" : "failed";
    li.textContent = step.step + " … " + step.detail;
    list.appendChild(li);
  }
  const verdict = document.createElement("li");
  verdict.className = report.ok ? "ok" : "failed";
  verdict.id = "v-verdict";
  verdict.textContent = report.verdict;
  list.appendChild(verdict);
}

async function testVault() {
  $("#v-result").replaceChildren();
  const r = await api("POST", "/api/v1/vault-configs:test", vaultBody());
  if (!r.res.ok) { show(problemText(r), true); return; }
  show("");
  showReport(r.data);
}

async function testSaved(name) {
  const r = await api("POST", "/api/v1/vault-configs/" + encodeURIComponent(name) + "/test");
  if (!r.res.ok) { show(problemText(r), true); return; }
  show("Test Connection of " + name + ": " + r.data.verdict, !r.data.ok);
}

async function submitVault(event) {
  event.preventDefault();
  const body = vaultBody();
  const headers = state.vaultEditing ? { "If-Match": state.vaultEditing.etag } : { "If-None-Match": "*" };
  const r = await api("PUT", "/api/v1/vault-configs/" + encodeURIComponent(body.name), body, headers);
  $("#v-secret-id").value = "";
  $("#v-token").value = "";
  if (!r.res.ok) { show(problemText(r), true); return; }
  $("#vault-form").hidden = true;
  show((state.vaultEditing ? "Saved " : "Created ") + body.name + ".");
  state.vaultEditing = null;
  loadVaults();
}

// ---- sign in ----
function signedIn() {
  const on = Boolean(token());
  $("#signout").hidden = !on;
  $("#signin").hidden = on;
  $("#token-label").hidden = on;
  $("#who").textContent = on ? "Signed in" : "";
}

document.addEventListener("DOMContentLoaded", () => {
  $("#signin-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem("token", $("#token").value.trim());
    $("#token").value = "";
    signedIn();
    selectTab("domain");
  });
  $("#signout").addEventListener("click", () => { sessionStorage.removeItem("token"); signedIn(); location.reload(); });
  document.querySelectorAll("nav button").forEach((b) => b.addEventListener("click", () => selectTab(b.dataset.tab)));
  $("#domain-form").addEventListener("submit", (e) => { e.preventDefault(); loadDomain(); });
  $("#new-secret").addEventListener("click", newSecret);
  $("#secret-form").addEventListener("submit", submitSecret);
  $("#secret-cancel").addEventListener("click", () => { $("#secret-form").hidden = true; $("#secret-value").value = ""; });
  $("#new-vault").addEventListener("click", newVault);
  $("#v-method").addEventListener("change", methodChanged);
  $("#v-test").addEventListener("click", testVault);
  $("#vault-form").addEventListener("submit", submitVault);
  $("#v-cancel").addEventListener("click", () => { $("#vault-form").hidden = true; });
  const params = new URLSearchParams(location.search);
  if (params.get("domain")) $("#domain").value = params.get("domain");
  signedIn();
  if (token()) selectTab("domain");
});
