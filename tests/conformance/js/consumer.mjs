// Connects with the real npm hypha-rpc client, gets a service by id, calls one function and
// prints `RESULT {json}`. Arguments: server url, service id, function, JSON list of arguments
// (an argument `{"$bytes": n}` is sent as n bytes: a large one goes in chunks).
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
const args = JSON.parse(argsJson).map((a) =>
  a && typeof a === "object" && "$bytes" in a ? new Uint8Array(a.$bytes).fill(7) : a,
);
const result = await svc[fn](...args);
// Calls of this client still awaiting their answer (a chunked call's process, say), once
// they are all answered or after ten seconds.
// The client's stats serialise every session to estimate its size, and throw while a session
// holds a timer (a call still waiting for its answer): counted as still pending then.
const awaiting = () => {
  try {
    return server.rpc.get_session_stats().promise_sessions;
  } catch {
    return Infinity;
  }
};
const deadline = Date.now() + 10000;
let pending = awaiting();
while (pending > 0 && Date.now() < deadline) {
  await new Promise((r) => setTimeout(r, 50));
  pending = awaiting();
}
console.log(`PENDING ${pending}`);
console.log(`RESULT ${JSON.stringify(result)}`);
await server.disconnect();
process.exit(0);
