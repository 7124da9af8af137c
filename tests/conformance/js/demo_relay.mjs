// Signs in on the login page, then opens /demo/?relay=1 in the same browser context (so the
// access_token cookie is sent) and waits for decoded video. Prints `RESULT {json}`.
import { launchChromium } from "./browser.mjs";

const [base, email, password] = process.argv.slice(2);
const browser = await launchChromium();
try {
  const context = await browser.newContext();
  const page = await context.newPage();
  await page.goto(`${base}/login`);
  await page.fill('input[name="email"]', email);
  await page.fill('input[name="password"]', password);
  await page.click('button[type="submit"]');
  await page.locator("#result").innerText({ timeout: 15000 });
  await page.goto(`${base}/demo/?relay=1`);
  await page.click("#start");
  let stats = null;
  const deadline = Date.now() + 20000;
  while (Date.now() < deadline) {
    stats = await page.evaluate(() => window.demoStats());
    if (stats && stats.framesDecoded >= 30 && stats.candidate) break;
    await page.waitForTimeout(100);
  }
  console.log(`RESULT ${JSON.stringify(stats)}`);
} finally {
  await browser.close();
}
