// Demo benchmark in headless Debian Chromium. Arguments: page URL, server pid, cycles (500).
// 1. One viewer for 10 s: server CPU (% of one core, from /proc) and decoded fps.
// 2. Four viewers at once for 10 s: decoded fps of each, server CPU.
// 3. Start to first frame over 20 connects (a fresh page each time), timed inside the page from
//    the Start click to the first decoded frame presented by the video element
//    (requestVideoFrameCallback); getStats() is no clock for this, Chrome caches its report
//    for tens of milliseconds.
// 4. Connect/disconnect cycles on one page (Start, first decoded frame, Disconnect): server RSS
//    and threads after 20 warm-up cycles and after the rest, each once the server reports no
//    live viewer.
import { readFileSync } from "node:fs";
import { launchChromium } from "./browser.mjs";

const [url, pid, cyclesArg] = process.argv.slice(2);
const cycles = Number(cyclesArg || 500);
const cpuTicks = () => {
  const fields = readFileSync(`/proc/${pid}/stat`, "utf8").split(") ")[1].split(" ");
  return Number(fields[11]) + Number(fields[12]); // utime + stime, in clock ticks (100/s)
};
const status = (key) => Number(readFileSync(`/proc/${pid}/status`, "utf8").match(new RegExp(`^${key}:\\s+(\\d+)`, "m"))[1]);
const liveViewers = async () => {
  const text = await (await fetch(new URL("/metrics", url))).text();
  return Number(text.split("\n").find((l) => l.startsWith("hypha_rtc_demo_viewers ")).split(" ")[1]);
};
const settle = async () => {
  const t0 = Date.now();
  while ((await liveViewers()) !== 0) {
    if (Date.now() - t0 > 20000) throw new Error("viewers still alive 20 s after disconnecting");
    await new Promise((r) => setTimeout(r, 20));
  }
};
const browser = await launchChromium();
const firstFrame = async (page) => {
  const clicked = Date.now();
  await page.click("#start");
  for (;;) {
    const ms = await page.evaluate(() => window.demoFirstFrameMs());
    if (ms !== null) return ms;
    if (Date.now() - clicked > 15000) throw new Error("no frame within 15 s");
    await page.waitForTimeout(5);
  }
};
const startViewer = async () => {
  const page = await browser.newPage();
  await page.goto(url);
  const firstFrameMs = await firstFrame(page);
  return { page, firstFrameMs, phases: await page.evaluate(() => window.demoPhases()) };
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
const close = async (page) => { await page.click("#disconnect"); await page.close(); };
// Fresh server: one viewer, then three more beside it.
const viewers = [await startViewer()];
await viewers[0].page.waitForTimeout(1000);
const one = await measure(viewers, 10);
for (let i = 0; i < 3; i++) viewers.push(await startViewer());
await viewers[0].page.waitForTimeout(1000);
const four = await measure(viewers, 10);
for (const v of viewers) await close(v.page);
await settle();
// 20 connects, each on a fresh page.
const firsts = [];
const phaseTimes = new Map();
for (let i = 0; i < 20; i++) {
  const { page, firstFrameMs, phases } = await startViewer();
  firsts.push(firstFrameMs);
  for (const p of phases) phaseTimes.set(p.name, [...(phaseTimes.get(p.name) || []), p.ms]);
  await close(page);
}
firsts.sort((a, b) => a - b);
// Median time from the click to each step the page saw (signaling, ICE, DTLS, first frame).
const phaseMedians = Object.fromEntries([...phaseTimes].map(([name, ms]) => {
  ms.sort((a, b) => a - b);
  return [name, ms.length % 2 ? ms[(ms.length - 1) / 2] : (ms[ms.length / 2 - 1] + ms[ms.length / 2]) / 2];
}));
// Connect/disconnect cycles on one page.
const page = await browser.newPage();
await page.goto(url);
const cycle = async () => { await firstFrame(page); await page.click("#disconnect"); };
for (let i = 0; i < 20; i++) await cycle();
await settle();
const rss0 = status("VmRSS"), threads0 = status("Threads");
const c0 = Date.now();
for (let i = 20; i < cycles; i++) await cycle();
const cyclesSeconds = (Date.now() - c0) / 1000;
await settle();
const rss1 = status("VmRSS"), threads1 = status("Threads");
console.log(JSON.stringify({
  firstFrameMedianMs: (firsts[9] + firsts[10]) / 2, firstFrameMinMs: firsts[0], firstFrameMaxMs: firsts[19], phaseMedians,
  oneViewerFps: one.fps[0], oneViewerServerCpuPercent: one.cpuPercent,
  fourViewersFps: four.fps, fourViewersServerCpuPercent: four.cpuPercent,
  cycles, cyclesSeconds: Math.round(cyclesSeconds), rssAfterWarmupKiB: rss0, rssAfterCyclesKiB: rss1,
  rssGrowthKiB: rss1 - rss0, threadsAfterWarmup: threads0, threadsAfterCycles: threads1,
}));
await browser.close();
