// Clicks through the console in headless Chromium: sign in, create / edit / delete a domain
// secret, the Global tab, a new Vault integration with Test Connection against OpenBao (a KV v1
// path fails, the KV v2 path passes), then the domain list with the Vault keys. Run by
// tests/console.rs, which starts the API and OpenBao and passes everything in the environment.
// Every response body the page receives is searched for the secret values.
import { chromium } from "playwright-core";
import { X509Certificate, createHash } from "node:crypto";
import { mkdtempSync, readFileSync, mkdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`missing ${name}`);
  return v;
};
const base = env("CONSOLE_URL");
const shots = env("SCREENSHOT_DIR");
const canaries = [env("CANARY_VALUE"), env("CANARY_SECRET_ID")];
mkdirSync(shots, { recursive: true });

// Trust exactly the test CA: Chromium ignores errors only for chains holding this key.
const ca = new X509Certificate(readFileSync(env("CA_PEM")));
const spki = createHash("sha256").update(ca.publicKey.export({ type: "spki", format: "der" })).digest("base64");

const profile = mkdtempSync(join(tmpdir(), "console-chromium-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM_BIN || "/usr/bin/chromium",
  headless: true,
  viewport: { width: 1280, height: 800 },
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    `--ignore-certificate-errors-spki-list=${spki}`],
});
const page = context.pages()[0] || (await context.newPage());
const bodies = [];
page.on("response", async (r) => { try { bodies.push(await r.text()); } catch { /* redirects */ } });
const errors = [];
page.on("pageerror", (e) => errors.push(String(e)));
page.on("dialog", (d) => d.accept());
const shot = (name) => page.screenshot({ path: join(shots, name), fullPage: true });
const step = (text) => console.log(`step: ${text}`);

async function signIn(token) {
  if (await page.locator("#signout").isVisible()) await page.click("#signout");
  await page.waitForSelector("#token:visible");
  await page.fill("#token", token);
  await page.click("#signin");
  await page.waitForSelector("#signout:visible");
}

try {
  step("open the console");
  await page.goto(`${base}/console/`);
  await page.waitForSelector("h1");
  await signIn(env("TOKEN_ALICE"));
  await page.waitForSelector("#secrets tbody tr[data-key='db_password']");

  step("create a domain secret");
  await page.click("#new-secret");
  await page.fill("#secret-key", "console_key");
  await page.fill("#secret-value", canaries[0]);
  await shot("01-new-domain-secret.png");
  await page.click("#secret-submit");
  await page.waitForSelector("#secrets tbody tr[data-key='console_key']");
  await page.waitForSelector("#message:has-text('Created console_key')");
  if ((await page.inputValue("#secret-value")) !== "") throw new Error("the value stayed in the form");

  step("edit it");
  await page.click("#secrets tbody tr[data-key='console_key'] button:has-text('Edit')");
  await page.waitForSelector("#secret-form:visible");
  if (!(await page.locator("#secret-key").evaluate((e) => e.readOnly))) throw new Error("key editable on edit");
  await page.fill("#secret-value", canaries[0] + "-2");
  await page.click("#secret-submit");
  await page.waitForSelector("#message:has-text('Saved console_key')");

  step("delete another one");
  await page.click("#secrets tbody tr[data-key='db_password'] button:has-text('Delete')");
  await page.waitForSelector("#message:has-text('Deleted db_password')");
  await page.waitForSelector("#secrets tbody tr[data-key='db_password']", { state: "detached" });

  step("global tab, read-only");
  await page.click("nav button[data-tab='global']");
  await page.waitForSelector("#globals tbody tr:has-text('warehouse_path')");
  if (await page.locator("#globals button").count()) throw new Error("global secrets have actions");
  await shot("02-global.png");

  step("new Vault integration with Test Connection (as a platform admin)");
  await signIn(env("TOKEN_ADMIN"));
  await page.click("nav button[data-tab='vault']");
  await page.click("#new-vault");
  await page.fill("#v-name", "vault-console");
  await page.fill("#v-bundle", "vault-bundle");
  await page.fill("#v-host", env("VAULT_HOST"));
  await page.fill("#v-path", "/v1/kv1/data/production");
  await page.selectOption("#v-method", "appRole");
  await page.fill("#v-role-id", env("VAULT_ROLE_ID"));
  await page.fill("#v-secret-id", canaries[1]);
  await page.click("#v-test");
  await page.waitForSelector("#v-verdict:has-text('KV version 1')");
  await page.fill("#v-path", "/v1/secret/data/production");
  await page.click("#v-test");
  await page.waitForSelector("#v-verdict:has-text('verdict: ok')");
  await shot("03-vault-test-connection.png");
  await page.click("#v-submit");
  await page.waitForSelector("#vaults tbody tr[data-name='vault-console']");
  await shot("04-vault-integrations.png");

  step("edit it without resending the secret ID (same server and login)");
  await page.click("#vaults tbody tr[data-name='vault-console'] button:has-text('Edit')");
  await page.waitForSelector("#vault-form:visible");
  if ((await page.inputValue("#v-secret-id")) !== "") throw new Error("the secret ID came back");
  await page.fill("#v-path", "/v1/secret/data/production/team");
  await page.click("#v-submit");
  await page.waitForSelector("#message:has-text('Saved vault-console')");

  step("the domain list aggregates the Vault keys alice may Use");
  await signIn(env("TOKEN_ALICE"));
  await page.waitForSelector("#secrets tbody tr[data-key='token']:has-text('Vault (vault-console)')");
  await shot("05-domain-secrets.png");

  step("a Vault field named like HTML is shown as text, never run");
  const rows = await page.locator("#secrets tbody td").allTextContents();
  if (!rows.includes("<img src=x onerror=window.__xss=1>")) throw new Error("the HTML-like key is not shown as text");
  if (await page.evaluate(() => window.__xss)) throw new Error("a key name ran as HTML");
  if (await page.locator("#secrets img").count()) throw new Error("a key name became an element");

  const html = await page.content();
  for (const c of canaries) {
    if (html.includes(c)) throw new Error("a value is in the page");
    if (bodies.some((b) => b.includes(c))) throw new Error("a value came back in a response");
  }
  if (errors.length) throw new Error("page errors: " + errors.join("; "));
  console.log(`ok: ${bodies.length} responses checked`);
} catch (e) {
  await shot("failure.png").catch(() => {});
  console.error(String(e && e.stack || e));
  process.exitCode = 1;
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
