// The console's in-use warning: deleting a key that live pods were granted first asks, then
// (declined) keeps the key, then (confirmed) deletes it with ?force=true. Run by tests/console.rs
// against the API in cluster shape (the fake API server holds the pods).
import { chromium } from "playwright-core";
import { X509Certificate, createHash } from "node:crypto";
import { mkdtempSync, readFileSync, mkdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const env = (name) => { const v = process.env[name]; if (!v) throw new Error(`missing ${name}`); return v; };
const base = env("CONSOLE_URL");
const shots = env("SCREENSHOT_DIR");
mkdirSync(shots, { recursive: true });
const ca = new X509Certificate(readFileSync(env("CA_PEM")));
const spki = createHash("sha256").update(ca.publicKey.export({ type: "spki", format: "der" })).digest("base64");
const profile = mkdtempSync(join(tmpdir(), "console-chromium-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM_BIN || "/usr/bin/chromium",
  headless: true,
  viewport: { width: 1280, height: 700 },
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    `--ignore-certificate-errors-spki-list=${spki}`],
});
const page = context.pages()[0] || (await context.newPage());
const dialogs = [];
let acceptInUse = false;
page.on("dialog", (d) => {
  dialogs.push(d.message());
  if (d.message().includes("in use")) return acceptInUse ? d.accept() : d.dismiss();
  return d.accept();
});
try {
  await page.goto(`${base}/console/`);
  await page.fill("#token", env("TOKEN"));
  await page.click("#signin");
  const row = "#secrets tbody tr[data-key='db_password']";
  await page.waitForSelector(row);
  await page.click(`${row} button:has-text('Delete')`);
  await page.waitForSelector("#message:has-text('it is in use by 2 pod(s)')");
  await page.screenshot({ path: join(shots, "06-in-use-warning.png"), fullPage: true });
  if (!dialogs.some((m) => m.includes("in use by 2 live pod(s)"))) throw new Error("no in-use warning: " + dialogs.join(" | "));
  await page.waitForSelector(row);
  acceptInUse = true;
  await page.click(`${row} button:has-text('Delete')`);
  await page.waitForSelector("#message:has-text('Deleted db_password')");
  await page.waitForSelector(row, { state: "detached" });
  console.log("ok: warned, kept, then deleted with force");
} catch (e) {
  await page.screenshot({ path: join(shots, "in-use-failure.png"), fullPage: true }).catch(() => {});
  console.error(String((e && e.stack) || e));
  process.exitCode = 1;
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
