// Connects with the real npm hypha-rpc client, gets a service by id, calls one function and
// prints `RESULT {json}`. Arguments: server url, service id, function, JSON list of arguments.
import { WebSocket } from "ws";
import { hyphaWebsocketClient } from "hypha-rpc";

// Node 20 has no global WebSocket; the client reads its constants from the global.
globalThis.WebSocket = WebSocket;

const [serverUrl, serviceId, fn, argsJson] = process.argv.slice(2);
const server = await hyphaWebsocketClient.connectToServer({
  server_url: serverUrl,
  WebSocketClass: WebSocket,
});
const svc = await server.getService(serviceId);
const result = await svc[fn](...JSON.parse(argsJson));
console.log(`RESULT ${JSON.stringify(result)}`);
await server.disconnect();
process.exit(0);
