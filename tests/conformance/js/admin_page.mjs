// The accounts page in headless Debian Chromium. As an admin: open /admin/, add a user through
// the form, read the users table; then that new user signs in. As a non-admin: the page says
// it is for admins. Usage: node admin_page.mjs BASE ADMIN_EMAIL NEW_EMAIL USER_EMAIL PASSWORD SCREENSHOT
// Prints `RESULT {json}`.
import { launchChromium } from "./browser.mjs";

const [base, adminEmail, newEmail, userEmail, password, screenshot] = process.argv.slice(2);
const browser = await launchChromium();

async function signIn(context, email) {
  const page = await context.newPage();
  await page.goto(new URL("/login", base).href);
  await page.fill('input[name="email"]', email);
  await page.fill('input[name="password"]', password);
  await page.click('button[type="submit"]');
  const result = await page.locator("#result").innerText({ timeout: 15000 });
  await page.close();
  return result;
}

function watch(page) {
  const seen = { consoleErrors: [], failed: [] };
  page.on("console", (m) => { if (m.type() === "error") seen.consoleErrors.push(m.text()); });
  page.on("pageerror", (e) => seen.consoleErrors.push(String(e)));
  page.on("requestfailed", (r) => seen.failed.push(`${r.url()} ${r.failure()?.errorText}`));
  return seen;
}

try {
  const adminContext = await browser.newContext({ viewport: { width: 1100, height: 900 } });
  await signIn(adminContext, adminEmail);
  const page = await adminContext.newPage();
  const adminSeen = watch(page);
  await page.goto(new URL("/admin/", base).href);
  await page.waitForFunction(() => window.adminReady, null, { timeout: 15000 });
  await page.fill('#add input[name="email"]', newEmail);
  await page.fill('#add input[name="password"]', password);
  await page.click('#add button[type="submit"]');
  await page.waitForFunction(() => document.getElementById("message").textContent.startsWith("Added"), null, { timeout: 15000 });
  const added = await page.locator("#message").innerText();
  const users = await page.locator("#users").innerText();
  await page.screenshot({ path: screenshot, fullPage: true });
  const newUserContext = await browser.newContext();
  const newUserSignedIn = await signIn(newUserContext, newEmail);

  const userContext = await browser.newContext();
  await signIn(userContext, userEmail);
  const userPage = await userContext.newPage();
  const userSeen = watch(userPage);
  await userPage.goto(new URL("/admin/", base).href);
  await userPage.waitForFunction(() => window.adminReady, null, { timeout: 15000 });
  const refused = await userPage.locator("#message").innerText();
  const adminHidden = await userPage.evaluate(() => document.getElementById("admin").hidden);
  const apiStatus = await userPage.evaluate(async () => (await fetch("/api/admin/users")).status);
  console.log(`RESULT ${JSON.stringify({ added, users, newUserSignedIn, refused, adminHidden, apiStatus, adminSeen, userSeen })}`);
} finally {
  await browser.close();
}
