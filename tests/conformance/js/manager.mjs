// JavaScript only: the workspace manager's data functions through the npm client, with the
// camel-cased names the client gives them. Prints `RESULT {json}`.
import { WebSocket } from "ws";
import { hyphaWebsocketClient } from "hypha-rpc";

globalThis.WebSocket = WebSocket;

const [serverUrl, token] = process.argv.slice(2);
const api = await hyphaWebsocketClient.connectToServer({
  server_url: serverUrl,
  WebSocketClass: WebSocket,
  token,
  client_id: "js-manager",
});
await api.setEnv("GREETING", { text: "hello", n: 3 });
const env = await api.getEnv("GREETING");
await api.logEvent("js.measured", { value: 7 });
const events = await api.getEvents("js.measured");
const stats = await api.getEventStats();
await api.registerService({ id: "js-listed", config: { visibility: "public" }, f: () => 1 });
const listed = await api.listServices({ service_id: "js-*" });
const pong = await api.ping(`${api.config.workspace}/js-manager`);
let refused = null;
try {
  await api.getEnv("MISSING");
} catch (e) {
  refused = String(e.message || e);
}
console.log(
  `RESULT ${JSON.stringify({
    env,
    events: events.map((e) => ({ type: e.event_type, data: e.data, user: e.user_id })),
    stats,
    listed: listed.map((s) => s.id),
    pong,
    refused,
  })}`,
);
await api.disconnect();
process.exit(0);
