// Node's own http2 module through keyhole: a CONNECT tunnel opened with the http module (the
// http2 module has no proxy support), TLS with ALPN h2 over it, one request with
// `te: trailers`; prints status, headers, body and trailers as JSON.
// Usage: node h2.mjs <proxy-url> <https-url>   (NODE_EXTRA_CA_CERTS names the keyhole CA)
import http from "node:http";
import http2 from "node:http2";
import tls from "node:tls";

const [proxy, target] = process.argv.slice(2);
const url = new URL(target);
const authority = `${url.hostname}:${url.port || 443}`;
const proxyUrl = new URL(proxy);

const connect = http.request({ host: proxyUrl.hostname, port: proxyUrl.port, method: "CONNECT", path: authority });
connect.on("connect", (res, socket) => {
  if (res.statusCode !== 200) {
    console.error(`CONNECT answered ${res.statusCode}`);
    process.exit(1);
  }
  const session = http2.connect(url.origin, {
    createConnection: () => tls.connect({ socket, servername: url.hostname, ALPNProtocols: ["h2"] }),
  });
  session.on("error", (err) => { console.error(err); process.exit(1); });
  const req = session.request({ ":method": "GET", ":path": url.pathname + url.search, te: "trailers" });
  let status = 0, headers = {}, trailers = {}, body = "";
  req.on("response", (h) => { status = h[":status"]; headers = h; });
  req.on("trailers", (t) => { trailers = t; });
  req.setEncoding("utf8");
  req.on("data", (chunk) => { body += chunk; });
  req.on("end", () => {
    console.log(JSON.stringify({ status, headers: Object.entries(headers), body, trailers: Object.entries(trailers), alpn: session.alpnProtocol }));
    session.close();
  });
  req.end();
});
connect.on("error", (err) => { console.error(err); process.exit(1); });
connect.end();
