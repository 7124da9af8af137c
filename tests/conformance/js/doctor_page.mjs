// Runs the connectivity doctor page in headless Debian Chromium: signs in when an email is
// given, clicks "Run the checks", waits for the verdict, takes a screenshot.
// Usage: node doctor_page.mjs BASE_URL SCREENSHOT [EMAIL PASSWORD]
// Prints `RESULT {json}`: the page's report, what it shows, console errors, failed requests.
import { launchChromium } from "./browser.mjs";

const [base, screenshot, email, password] = process.argv.slice(2);
const browser = await launchChromium();
const consoleErrors = [], failed = [], httpErrors = [];
try {
  const context = await browser.newContext({ viewport: { width: 390, height: 844 } });
  if (email) {
    const login = await context.newPage();
    await login.goto(new URL("/login", base).href);
    await login.fill('input[name="email"]', email);
    await login.fill('input[name="password"]', password);
    await login.click('button[type="submit"]');
    await login.locator("#result").waitFor({ timeout: 15000 });
    await login.close();
  }
  const page = await context.newPage();
  page.on("console", (m) => { if (m.type() === "error") consoleErrors.push(m.text()); });
  page.on("pageerror", (e) => consoleErrors.push(String(e)));
  page.on("requestfailed", (r) => failed.push(`${r.url()} ${r.failure()?.errorText}`));
  page.on("response", (r) => { if (r.status() >= 400) httpErrors.push(`${r.status()} ${r.url()}`); });
  await page.goto(new URL("/doctor/", base).href);
  await page.waitForFunction(() => !document.getElementById("run").disabled, null, { timeout: 15000 });
  const who = await page.locator("#who").innerText();
  const clicked = Date.now();
  await page.click("#run");
  const report = await (await page.waitForFunction(() => window.doctorReport, null, { timeout: 90000 })).jsonValue();
  const toVerdictMs = Date.now() - clicked;
  const verdict = await page.locator("#verdict").innerText();
  await page.screenshot({ path: screenshot, fullPage: true });
  console.log(`RESULT ${JSON.stringify({ who, verdict, toVerdictMs, report, consoleErrors, failed, httpErrors })}`);
} finally {
  await browser.close();
}
