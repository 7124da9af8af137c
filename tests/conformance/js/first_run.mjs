// The first run in headless Debian Chromium: opens the setup link, is told when the passwords
// differ, creates the admin, finds the link spent, and signs in with the new account.
// Usage: node first_run.mjs SETUP_URL EMAIL PASSWORD SCREENSHOT_DIR
// Prints `RESULT {json}`.
import { mkdirSync } from "node:fs";
import path from "node:path";
import { launchChromium } from "./browser.mjs";

const [setupUrl, email, password, shots] = process.argv.slice(2);
mkdirSync(shots, { recursive: true });
const browser = await launchChromium();
// Each console error is labelled with the step it came in (refusals answer 400 and 404 on
// purpose, which the browser reports as console errors).
const consoleErrors = [], failed = [];
let step = "open";
try {
  const context = await browser.newContext({ viewport: { width: 390, height: 844 } });
  const page = await context.newPage();
  page.on("console", (m) => { if (m.type() === "error") consoleErrors.push(`${step}: ${m.text()}`); });
  page.on("pageerror", (e) => consoleErrors.push(`${step}: ${e}`));
  page.on("requestfailed", (r) => failed.push(`${r.url()} ${r.failure()?.errorText}`));
  const opened = await page.goto(setupUrl);
  await page.screenshot({ path: path.join(shots, "setup-form.png"), fullPage: true });
  const fill = async (confirm) => {
    await page.fill('input[name="email"]', email);
    await page.fill('input[name="password"]', password);
    await page.fill('input[name="confirm"]', confirm);
    await page.click('button[type="submit"]');
    return page.locator("#result").innerText({ timeout: 15000 });
  };
  step = "mismatch";
  const mismatch = await fill(password + "x");
  step = "create";
  const created = await fill(password);
  await page.screenshot({ path: path.join(shots, "setup-done.png"), fullPage: true });
  step = "again";
  const again = await page.goto(setupUrl);
  const spent = await page.locator("#result").innerText();
  step = "sign-in";
  await page.goto(new URL("/login", setupUrl).href);
  await page.fill('input[name="email"]', email);
  await page.fill('input[name="password"]', password);
  await page.click('button[type="submit"]');
  const signedIn = await page.locator("#result").innerText({ timeout: 15000 });
  console.log(`RESULT ${JSON.stringify({
    openedStatus: opened.status(), mismatch, created, againStatus: again.status(), spent, signedIn,
    consoleErrors, failed,
  })}`);
} finally {
  await browser.close();
}
