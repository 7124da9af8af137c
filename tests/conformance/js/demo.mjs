// Opens /demo/ in headless Debian Chromium, clicks Start and waits for decoded video. Prints
// `RESULT {json}`: frames decoded, resolution, time from the click to 60 frames, and whether
// a frame of the video has more than one colour (not blank).
import { launchChromium } from "./browser.mjs";

const [url] = process.argv.slice(2);
const browser = await launchChromium();
try {
  const page = await browser.newPage();
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
  console.log(`RESULT ${JSON.stringify({ ...stats, sixtyFramesMs, distinctColours })}`);
} finally {
  await browser.close();
}
