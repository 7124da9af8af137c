// Opens a login URL in headless Debian Chromium, fills the email and password form, submits,
// and prints `RESULT {json}` with the page's result line and the cookie it got.
import { launchChromium } from "./browser.mjs";

const [url, email, password] = process.argv.slice(2);
const browser = await launchChromium();
try {
  const context = await browser.newContext();
  const page = await context.newPage();
  await page.goto(url);
  await page.fill('input[name="email"]', email);
  await page.fill('input[name="password"]', password);
  await page.click('button[type="submit"]');
  const result = await page.locator("#result").innerText({ timeout: 15000 });
  const cookies = await context.cookies();
  const token = cookies.find((c) => c.name === "access_token");
  console.log(`RESULT ${JSON.stringify({ result, httpOnly: token?.httpOnly, sameSite: token?.sameSite, hasCookie: !!token })}`);
} finally {
  await browser.close();
}
