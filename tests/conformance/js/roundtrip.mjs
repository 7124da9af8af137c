// JavaScript only: two clients; one registers a service, the other finds it through
// getService and listServices and calls it. Prints `RESULT {json}`.
import { WebSocket } from "ws";
import { hyphaWebsocketClient } from "hypha-rpc";

// Node 20 has no global WebSocket; the client reads its constants from the global.
globalThis.WebSocket = WebSocket;

const [serverUrl, token] = process.argv.slice(2);
const config = { server_url: serverUrl, WebSocketClass: WebSocket };
if (token) config.token = token;
const a = await hyphaWebsocketClient.connectToServer({ ...config, client_id: "js-provider" });
await a.registerService({
  id: "js-echo",
  config: { visibility: "protected" },
  echo: (x) => x,
});
const b = await hyphaWebsocketClient.connectToServer({ ...config, client_id: "js-consumer" });
const svc = await b.getService("js-echo");
const echoed = await svc.echo({ n: 42, s: "text" });
const listed = await b.listServices();
const info = await b.getServiceInfo("js-echo");
console.log(
  `RESULT ${JSON.stringify({
    workspace: a.config.workspace,
    sameWorkspace: a.config.workspace === b.config.workspace,
    echoed,
    listed: listed.map((s) => s.id),
    serviceId: svc.id,
    infoId: info.id,
  })}`,
);
await a.disconnect();
await b.disconnect();
process.exit(0);
