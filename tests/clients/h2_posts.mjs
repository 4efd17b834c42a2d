// Node's http2 module through keyhole: one CONNECT tunnel, one HTTP/2 session, COUNT POSTs
// of SIZE bytes one after another; prints the status each got (0: no answer) as JSON.
// Usage: node h2_posts.mjs <proxy-url> <https-url> <count> <size>  (NODE_EXTRA_CA_CERTS: the CA)
import http from "node:http";
import http2 from "node:http2";
import tls from "node:tls";

const [proxy, target, count, size] = process.argv.slice(2);
const url = new URL(target);
const proxyUrl = new URL(proxy);
const body = Buffer.from(`{"model":"unpriced-model","x":"${"x".repeat(Number(size))}"}`);

function post(session) {
  return new Promise((resolve) => {
    const req = session.request({ ":method": "POST", ":path": url.pathname + url.search,
                                  "content-type": "application/json" });
    let status = 0;
    req.on("response", (h) => { status = h[":status"]; });
    req.on("error", () => resolve(status));  // a reset after the answer is fine: it came
    req.on("data", () => {});
    req.on("end", () => resolve(status));
    req.on("close", () => resolve(status));
    req.end(body);
  });
}

const connect = http.request({ host: proxyUrl.hostname, port: proxyUrl.port, method: "CONNECT",
                               path: `${url.hostname}:${url.port || 443}` });
connect.on("connect", async (res, socket) => {
  const session = http2.connect(url.origin, {
    createConnection: () => tls.connect({ socket, servername: url.hostname, ALPNProtocols: ["h2"] }),
  });
  session.on("error", () => {});
  const statuses = [];
  for (let i = 0; i < Number(count); i++) statuses.push(await post(session));
  console.log(JSON.stringify(statuses));
  session.close();
});
connect.on("error", (err) => { console.error(err); process.exit(1); });
connect.end();
