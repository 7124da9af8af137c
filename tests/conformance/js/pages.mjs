// Visits the server's pages in headless Debian Chromium, as a plan given as JSON in argv[2]:
//   {"signIn": {"url", "email", "password"} | null, "screenshots": DIR,
//    "visits": [{"name", "url", "viewport": {"width", "height"}, "waitFor": JS expression,
//                "texts": [selector, ...]}]}
// Prints `RESULT {json}`: per visit its console errors, failed requests, HTTP errors, the texts
// of the selectors, the screenshot's path and how many distinct colours it has (not blank).
import { mkdirSync } from "node:fs";
import { inflateSync } from "node:zlib";
import path from "node:path";
import { launchChromium } from "./browser.mjs";

const plan = JSON.parse(process.argv[2]);

// Distinct colours (4 bits a channel) of an 8-bit RGB or RGBA PNG, sampled.
function distinctColours(png) {
  let at = 8, width = 0, height = 0, kind = 0;
  const data = [];
  while (at < png.length) {
    const length = png.readUInt32BE(at);
    const type = png.toString("ascii", at + 4, at + 8);
    const body = png.subarray(at + 8, at + 8 + length);
    if (type === "IHDR") { width = body.readUInt32BE(0); height = body.readUInt32BE(4); kind = body[9]; }
    if (type === "IDAT") data.push(body);
    at += 12 + length;
  }
  const channels = kind === 6 ? 4 : 3;
  const raw = inflateSync(Buffer.concat(data));
  const stride = width * channels;
  const out = Buffer.alloc(stride * height);
  for (let y = 0; y < height; y++) {
    const filter = raw[y * (stride + 1)];
    for (let x = 0; x < stride; x++) {
      const value = raw[y * (stride + 1) + 1 + x];
      const a = x >= channels ? out[y * stride + x - channels] : 0;
      const b = y > 0 ? out[(y - 1) * stride + x] : 0;
      const c = x >= channels && y > 0 ? out[(y - 1) * stride + x - channels] : 0;
      let p = 0;
      if (filter === 1) p = a;
      else if (filter === 2) p = b;
      else if (filter === 3) p = (a + b) >> 1;
      else if (filter === 4) {
        const e = a + b - c, pa = Math.abs(e - a), pb = Math.abs(e - b), pc = Math.abs(e - c);
        p = pa <= pb && pa <= pc ? a : pb <= pc ? b : c;
      }
      out[y * stride + x] = (value + p) & 0xff;
    }
  }
  const seen = new Set();
  for (let i = 0; i < out.length; i += channels * 7) {
    seen.add(((out[i] >> 4) << 8) | ((out[i + 1] >> 4) << 4) | (out[i + 2] >> 4));
  }
  return seen.size;
}

const browser = await launchChromium();
const results = [];
try {
  const context = await browser.newContext();
  if (plan.signIn) {
    const page = await context.newPage();
    await page.goto(plan.signIn.url);
    await page.fill('input[name="email"]', plan.signIn.email);
    await page.fill('input[name="password"]', plan.signIn.password);
    await page.click('button[type="submit"]');
    await page.locator("#result").waitFor({ timeout: 15000 });
    await page.close();
  }
  if (plan.screenshots) mkdirSync(plan.screenshots, { recursive: true });
  for (const visit of plan.visits) {
    const page = await context.newPage();
    if (visit.viewport) await page.setViewportSize(visit.viewport);
    const consoleErrors = [], failed = [], httpErrors = [];
    page.on("console", (m) => { if (m.type() === "error") consoleErrors.push(m.text()); });
    page.on("pageerror", (e) => consoleErrors.push(String(e)));
    page.on("requestfailed", (r) => failed.push(`${r.url()} ${r.failure()?.errorText}`));
    page.on("response", (r) => { if (r.status() >= 400) httpErrors.push(`${r.status()} ${r.url()}`); });
    const started = Date.now();
    const response = await page.goto(visit.url);
    // Polled from here: a string predicate given to waitForFunction is evaluated with eval in
    // the page, which the pages' content security policy forbids.
    if (visit.waitFor) {
      const deadline = Date.now() + 20000;
      while (!(await page.evaluate(visit.waitFor))) {
        if (Date.now() > deadline) throw new Error(`${visit.name}: timed out waiting for ${visit.waitFor}`);
        await new Promise((resolve) => setTimeout(resolve, 50));
      }
    }
    const ms = Date.now() - started;
    const texts = {};
    for (const selector of visit.texts || []) {
      const element = page.locator(selector);
      texts[selector] = (await element.count()) ? await element.first().innerText() : null;
    }
    const screenshot = plan.screenshots ? path.join(plan.screenshots, `${visit.name}.png`) : undefined;
    const png = await page.screenshot({ path: screenshot, fullPage: true });
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth > window.innerWidth + 1);
    results.push({
      name: visit.name, status: response.status(), ms, consoleErrors, failed, httpErrors, texts,
      screenshot, colours: distinctColours(png), horizontalOverflow: overflow,
      csp: response.headers()["content-security-policy"] || null,
    });
    await page.close();
  }
} finally {
  await browser.close();
}
console.log(`RESULT ${JSON.stringify({ visits: results })}`);
