// The JavaScript client's login flow under Node: prints `LOGIN_URL <url>` from the login
// callback, then `RESULT {json}` with the token once someone signed in.
import { WebSocket } from "ws";
import { hyphaWebsocketClient } from "hypha-rpc";

// Node 20 has no global WebSocket; the client reads it from the global.
globalThis.WebSocket = WebSocket;
const [serverUrl] = process.argv.slice(2);
const token = await hyphaWebsocketClient.login({
  server_url: serverUrl,
  login_timeout: 60,
  login_callback: (context) => console.log(`LOGIN_URL ${context.login_url}`),
});
console.log(`RESULT ${JSON.stringify({ token })}`);
process.exit(0);
