// Connects with the real npm hypha-rpc client, registers a public service, prints its
// workspace as `READY {json}` and stays until stdin closes.
import { WebSocket } from "ws";
import { hyphaWebsocketClient } from "hypha-rpc";

// Node 20 has no global WebSocket; the client reads its constants from the global.
globalThis.WebSocket = WebSocket;

const [serverUrl, clientId] = process.argv.slice(2);
const server = await hyphaWebsocketClient.connectToServer({
  server_url: serverUrl,
  client_id: clientId,
  WebSocketClass: WebSocket,
});
await server.registerService({
  id: "js-math",
  config: { visibility: "public" },
  add: (a, b) => a + b,
  greet: (name) => `hello ${name} from js`,
  echo: (x) => x,
  // Calls of this client still awaiting their answer (a chunked answer's process, say). The
  // client's stats throw while a session holds a timer (a call still waiting): counted then
  // as one pending at least.
  pending: () => {
    try {
      return server.rpc.get_session_stats().promise_sessions;
    } catch {
      return Number.MAX_SAFE_INTEGER;
    }
  },
});
console.log(`READY ${JSON.stringify({ workspace: server.config.workspace })}`);
process.stdin.resume();
process.stdin.on("end", async () => {
  await server.disconnect();
  process.exit(0);
});
