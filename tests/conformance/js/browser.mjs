// Debian's headless Chromium, driven by playwright-core; never a browser download. The flags keep
// it off the network (background services, QUIC) and out of first-run work.
import { chromium } from "playwright-core";

export function launchChromium() {
  return chromium.launch({
    executablePath: "/usr/bin/chromium",
    args: [
      "--headless", "--disable-gpu", "--no-sandbox", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
      // Tests that serve https trust their own certificate this way (one key, nothing else).
      ...(process.env.CHROMIUM_EXTRA_ARGS || "").split(" ").filter(Boolean),
    ],
  });
}
