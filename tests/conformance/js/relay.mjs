// In headless Debian Chromium: two RTCPeerConnections restricted to relay candidates, with the
// ICE servers hypha-rtc issued, connect through coturn and exchange data-channel messages.
// Argument: the JSON list of ICE servers. Prints `RESULT {json}`.
import { launchChromium } from "./browser.mjs";

const iceServers = JSON.parse(process.argv[2]);
const browser = await launchChromium();
try {
  const page = await browser.newPage();
  const result = await page.evaluate(async (iceServers) => {
    const config = { iceServers, iceTransportPolicy: "relay" };
    const a = new RTCPeerConnection(config);
    const b = new RTCPeerConnection(config);
    a.onicecandidate = (e) => e.candidate && b.addIceCandidate(e.candidate);
    b.onicecandidate = (e) => e.candidate && a.addIceCandidate(e.candidate);
    const received = new Promise((resolve) => {
      b.ondatachannel = (e) => {
        e.channel.onmessage = (m) => {
          e.channel.send(`echo: ${m.data}`);
          resolve(m.data);
        };
      };
    });
    const channel = a.createDataChannel("proof");
    const echoed = new Promise((resolve) => (channel.onmessage = (m) => resolve(m.data)));
    channel.onopen = () => channel.send("through the relay");
    await a.setLocalDescription(await a.createOffer());
    await b.setRemoteDescription(a.localDescription);
    await b.setLocalDescription(await b.createAnswer());
    await a.setRemoteDescription(b.localDescription);
    const timeout = new Promise((_, reject) => setTimeout(() => reject(new Error(`no relay connection: ${a.iceConnectionState}`)), 15000));
    const [got, back] = await Promise.race([Promise.all([received, echoed]), timeout]);
    const stats = await a.getStats();
    let pair, local;
    stats.forEach((s) => { if (s.type === "transport" && s.selectedCandidatePairId) pair = stats.get(s.selectedCandidatePairId); });
    if (pair) local = stats.get(pair.localCandidateId);
    a.close();
    b.close();
    return { got, back, candidateType: local && local.candidateType };
  }, iceServers);
  console.log(`RESULT ${JSON.stringify(result)}`);
} finally {
  await browser.close();
}
