// Demo benchmark in headless Debian Chromium. Arguments: page URL, server pid.
// 1. Start-to-first-decoded-frame over 20 connects (a fresh page each time), polled every 5 ms.
// 2. One viewer for 10 s: server CPU (% of one core, from /proc) and decoded fps.
// 3. Four viewers at once for 10 s: decoded fps of each.
import { readFileSync } from "node:fs";
import { launchChromium } from "./browser.mjs";

const [url, pid] = process.argv.slice(2);
const cpuTicks = () => {
  const fields = readFileSync(`/proc/${pid}/stat`, "utf8").split(") ")[1].split(" ");
  return Number(fields[11]) + Number(fields[12]); // utime + stime, in clock ticks (100/s)
};
const browser = await launchChromium();
const startViewer = async () => {
  const page = await browser.newPage();
  await page.goto(url);
  const clicked = Date.now();
  await page.click("#start");
  while ((await page.evaluate(() => window.demoStats()))?.framesDecoded < 1) {
    if (Date.now() - clicked > 15000) throw new Error("no frame within 15 s");
    await page.waitForTimeout(5);
  }
  return { page, firstFrameMs: Date.now() - clicked };
};
const frames = async (page) => (await page.evaluate(() => window.demoStats())).framesDecoded;
// Percent of one core: 100 clock ticks are one core-second.
const measure = async (viewers, seconds) => {
  const starts = await Promise.all(viewers.map((v) => frames(v.page)));
  const c0 = cpuTicks(), t0 = Date.now();
  await viewers[0].page.waitForTimeout(seconds * 1000);
  const elapsed = (Date.now() - t0) / 1000;
  const ends = await Promise.all(viewers.map((v) => frames(v.page)));
  return {
    fps: ends.map((e, i) => Math.round(((e - starts[i]) / elapsed) * 10) / 10),
    cpuPercent: Math.round(((cpuTicks() - c0) / elapsed) * 10) / 10,
  };
};
// Fresh server: one viewer, then three more beside it (no closed pages in between).
const viewers = [await startViewer()];
await viewers[0].page.waitForTimeout(1000);
const one = await measure(viewers, 10);
for (let i = 0; i < 3; i++) viewers.push(await startViewer());
await viewers[0].page.waitForTimeout(1000);
const four = await measure(viewers, 10);
for (const v of viewers) await v.page.close();
// Last: 20 connects, each on a fresh page.
const firsts = [];
for (let i = 0; i < 20; i++) {
  const { page, firstFrameMs } = await startViewer();
  firsts.push(firstFrameMs);
  await page.close();
}
firsts.sort((a, b) => a - b);
console.log(JSON.stringify({
  firstFrameMedianMs: firsts[10], firstFrameMinMs: firsts[0], firstFrameMaxMs: firsts[19],
  oneViewerFps: one.fps[0], oneViewerServerCpuPercent: one.cpuPercent,
  fourViewersFps: four.fps, fourViewersServerCpuPercent: four.cpuPercent,
}));
await browser.close();
