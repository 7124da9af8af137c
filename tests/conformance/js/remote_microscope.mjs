// Serves pages/remote_microscope.html and the hypha-rpc browser bundle (from the pinned npm
// package) on loopback, opens the page in headless Debian Chromium, signs in on the server's
// login page when the page asks, and prints `RESULT {json}`: what the page reached, its console
// errors and failed requests.
// Usage: node remote_microscope.mjs SERVER_URL SERVICE_ID EMAIL PASSWORD
import { createServer } from "node:http";
import { readFile } from "node:fs/promises";
import { fileURLToPath } from "node:url";
import path from "node:path";
import { launchChromium } from "./browser.mjs";

const [serverUrl, serviceId, email, password] = process.argv.slice(2);
const here = path.dirname(fileURLToPath(import.meta.url));
const dist = path.join(here, "node_modules", "hypha-rpc", "dist");

const files = createServer(async (request, response) => {
  const url = new URL(request.url, "http://127.0.0.1");
  let file = null;
  let type = "text/html; charset=utf-8";
  if (url.pathname === "/") {
    file = path.join(here, "pages", "remote_microscope.html");
  } else {
    const name = url.pathname.match(/^\/hypha-rpc\/([\w.-]+)$/)?.[1];
    if (name) {
      file = path.join(dist, name);
      type = name.endsWith(".map") ? "application/json" : "text/javascript; charset=utf-8";
    }
  }
  try {
    if (!file) throw new Error("not found");
    const body = await readFile(file);
    response.writeHead(200, { "content-type": type });
    response.end(body);
  } catch {
    response.writeHead(404);
    response.end();
  }
});
await new Promise((resolve) => files.listen(0, "127.0.0.1", resolve));
const pageUrl = `http://127.0.0.1:${files.address().port}/?server=${encodeURIComponent(serverUrl)}&service=${encodeURIComponent(serviceId)}`;

const browser = await launchChromium();
const consoleErrors = [];
const failed = [];
try {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.on("console", (m) => { if (m.type() === "error") consoleErrors.push(m.text()); });
  page.on("pageerror", (e) => consoleErrors.push(String(e)));
  page.on("requestfailed", (r) => failed.push(`${r.url()} ${r.failure()?.errorText}`));
  const started = Date.now();
  await page.goto(pageUrl);
  const loginUrl = await (await page.waitForFunction(() => window.loginUrl, null, { timeout: 30000 })).jsonValue();
  const signIn = await context.newPage();
  await signIn.goto(loginUrl);
  await signIn.fill('input[name="email"]', email);
  await signIn.fill('input[name="password"]', password);
  await signIn.click('button[type="submit"]');
  const signedIn = await signIn.locator("#result").innerText({ timeout: 15000 });
  const result = await (await page.waitForFunction(() => window.result, null, { timeout: 90000 })).jsonValue();
  const bundle = new URL(await page.evaluate(() => document.scripts[0].src)).pathname;
  console.log(`RESULT ${JSON.stringify({ ...result, signedIn, bundle, seconds: (Date.now() - started) / 1000, consoleErrors, failed })}`);
} finally {
  await browser.close();
  files.close();
}
