// Opens /demo/ in headless Debian Chromium, clicks Start and waits for decoded video. Prints
// `RESULT {json}`: frames decoded, resolution, time from the click to 60 frames, and whether
// a frame of the video has more than one colour (not blank).
import { launchChromium } from "./browser.mjs";

const [url] = process.argv.slice(2);
const browser = await launchChromium();
try {
  const page = await browser.newPage();
  const consoleErrors = [];
  page.on("console", (m) => { if (m.type() === "error") consoleErrors.push(m.text()); });
  page.on("pageerror", (e) => consoleErrors.push(String(e)));
  await page.goto(url);
  const clicked = Date.now();
  await page.click("#start");
  let stats = null;
  const deadline = Date.now() + 20000;
  while (Date.now() < deadline) {
    stats = await page.evaluate(() => window.demoStats());
    if (stats && stats.framesDecoded >= 60) break;
    await page.waitForTimeout(50);
  }
  const sixtyFramesMs = Date.now() - clicked;
  const firstFrameMs = await page.evaluate(() => window.demoFirstFrameMs());
  // The figures the page shows, as labelled fields (read once they have been refreshed).
  await page.waitForFunction(() => document.getElementById("s-first").textContent !== "–", null, { timeout: 5000 });
  const fields = {};
  for (const id of ["s-codec", "s-resolution", "s-fps", "s-bitrate", "s-rtt", "s-first", "s-pair", "signin", "state"]) {
    fields[id] = await page.locator(`#${id}`).innerText();
  }
  const phases = await page.evaluate(() => window.demoPhases());
  const pageText = await page.locator("main").innerText();
  const distinctColours = await page.evaluate(() => {
    const video = document.getElementById("video");
    const canvas = document.createElement("canvas");
    canvas.width = video.videoWidth;
    canvas.height = video.videoHeight;
    const ctx = canvas.getContext("2d");
    ctx.drawImage(video, 0, 0);
    const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
    const seen = new Set();
    for (let i = 0; i < data.length; i += 4 * 97) seen.add((data[i] >> 4) * 256 + (data[i + 1] >> 4) * 16 + (data[i + 2] >> 4));
    return seen.size;
  });
  await page.screenshot({ path: process.env.SCREENSHOT || "/tmp/hypha-rtc-demo.png" });

  // Controls over the data channel, confirmed by the server for this viewer.
  const confirm = async (p, action, accept) => {
    await p.evaluate(() => { window.__before = window.demoConfirmed(); });
    const t0 = Date.now();
    await action();
    while (Date.now() - t0 < 5000) {
      // Only a confirmation that arrived after the action counts.
      const c = await p.evaluate(() => { const c = window.demoConfirmed(); return c !== window.__before ? c : null; });
      if (c && accept(c)) return { ...c, ms: Date.now() - t0 };
      await p.waitForTimeout(10);
    }
    return null;
  };
  const frames = async (p) => (await p.evaluate(() => window.demoStats())).framesDecoded;
  const text1 = await confirm(page, () => page.fill("#text", "viewer one"), (c) => c.text === "viewer one");
  const speed1 = await confirm(page, () => page.evaluate(() => { const s = document.getElementById("speed"); s.value = 80; s.dispatchEvent(new Event("input")); }), (c) => c.speed === 800);
  const second = await browser.newPage();
  await second.goto(url);
  await second.click("#start");
  const t2 = Date.now();
  while (Date.now() - t2 < 10000 && !((await second.evaluate(() => window.demoStats()))?.framesDecoded >= 10)) await second.waitForTimeout(50);
  const text2 = await confirm(second, () => second.fill("#text", "viewer two"), (c) => c.text === "viewer two");
  const still1 = await confirm(page, () => page.evaluate(() => window.demoSend({})), (c) => c.ok);
  const tooLong = await confirm(page, () => page.evaluate(() => window.demoSend({ text: "x".repeat(5000) })), (c) => c.ok === false);
  const negative = await confirm(page, () => page.evaluate(() => window.demoSend({ speed: -50 })), (c) => c.ok && c.speed === 0);
  await page.click("#stop");
  await page.waitForTimeout(300);
  const pausedFrom = await frames(page);
  await page.waitForTimeout(1000);
  const pausedTo = await frames(page);
  await page.click("#start");
  const resumeStart = Date.now();
  let resumed = pausedTo;
  while (Date.now() - resumeStart < 5000 && resumed < pausedTo + 15) { await page.waitForTimeout(50); resumed = await frames(page); }
  const secondFrames = await frames(second);
  // Disconnect ends both sessions on the server at once: its viewer gauge drops to zero.
  const viewers = async () => {
    const text = await (await fetch(new URL("/metrics", url))).text();
    const line = text.split("\n").find((l) => l.startsWith("hypha_rtc_demo_viewers "));
    return line ? Number(line.split(" ")[1]) : null;
  };
  const viewersBefore = await viewers();
  await page.click("#disconnect");
  await second.click("#disconnect");
  const d0 = Date.now();
  let viewersAfter = await viewers();
  while (viewersAfter !== 0 && Date.now() - d0 < 10000) { await page.waitForTimeout(20); viewersAfter = await viewers(); }
  const disconnectMs = Date.now() - d0;
  console.log(`RESULT ${JSON.stringify({ ...stats, sixtyFramesMs, distinctColours, text1, speed1, text2, still1, tooLong, negative,
    pausedFrames: pausedTo - pausedFrom, resumedFrames: resumed - pausedTo, secondFrames, viewersBefore, viewersAfter, disconnectMs,
    firstFrameMs, fields, phases, pageText, consoleErrors })}`);
} finally {
  await browser.close();
}
